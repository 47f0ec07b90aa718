"""The synthetic Gemma 4 projector (vision `gemma4v` + audio `gemma4a` in one mmproj) runs through libmtmd."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader
from llama_cpp import mtmd_cpp as mtmd

from agent.memory import tokens
from tests.support import models as testmodels
from tests.support import synth_gemma4v as g4
from tests.support.models_gemma4 import tiny_gemma4_projector
from tests.support.mtmd import eval_chunks, mtmd_context, pcm_bitmap, rgb_bitmap, text_context, tokenize

CHUNK_IMAGE, CHUNK_AUDIO = 1, 2


def _encode(ctx: object, bitmap: object, n_embd: int) -> tuple[int, np.ndarray]:
    """Tokenize the default marker with one bitmap, encode its media chunk; (tokens, embeddings)."""
    chunks, found = tokenize(ctx, mtmd.mtmd_default_marker(), bitmap)
    try:
        media = [i for i, (t, _n) in enumerate(found) if t in (CHUNK_IMAGE, CHUNK_AUDIO)]
        assert len(media) == 1
        chunk = mtmd.mtmd_input_chunks_get(chunks, media[0])
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n_tokens * n_embd,)).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    return n_tokens, embd


def test_one_projector_carries_vision_and_audio() -> None:
    with text_context(testmodels.tiny_text(), n_ctx=512) as (model, _lctx), \
            mtmd_context(tiny_gemma4_projector(), model) as ctx:
        assert mtmd.mtmd_support_vision(ctx) and mtmd.mtmd_support_audio(ctx)
        assert mtmd.mtmd_get_audio_sample_rate(ctx) == 16000
        n_embd = llama_cpp.llama_model_n_embd(model)
        for width, height in ((48, 48), (960, 480)):
            n, embd = _encode(ctx, rgb_bitmap(width, height), n_embd)
            assert n == tokens.dyn_image_tokens(width, height)
            assert np.isfinite(embd).all() and embd.std() > 0
        n, embd = _encode(ctx, pcm_bitmap(2.0), n_embd)
        assert n == tokens.audio_tokens(32000) == 50
        assert np.isfinite(embd).all() and embd.std() > 0


def test_image_tokens_follow_libmtmd_budget() -> None:
    assert tokens.dyn_image_tokens(48, 48) == 81  # below the 70-token floor: scaled up to 9 x 9
    assert tokens.dyn_image_tokens(960, 480) == 200
    assert tokens.dyn_image_tokens(768, 768) == 256
    assert tokens.dyn_image_tokens(4000, 4000) <= tokens.MAX_IMAGE_TOKENS


def test_image_and_audio_chunks_evaluate_into_the_text_model() -> None:
    with text_context(testmodels.tiny_text(), n_ctx=512) as (model, lctx), \
            mtmd_context(tiny_gemma4_projector(), model) as ctx:
        for bitmap in (rgb_bitmap(48, 48), pcm_bitmap(1.0)):
            chunks, found = tokenize(ctx, b"Describe: " + mtmd.mtmd_default_marker(), bitmap)
            try:
                eval_chunks(ctx, lctx, chunks, found)
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)


@pytest.mark.parametrize(("qtype", "published"), [(g4.Q.F16, 985_654_080), (g4.Q.Q8_0, 557_368_064)])
def test_e2b_layout_matches_the_published_size(qtype: g4.GGMLQuantizationType, published: int) -> None:
    # tensor data only (32-byte aligned); the header adds ~14 KB more than the published one has
    tensors = g4.gemma4_projector_tensors(g4.E2B_TEXT_N_EMBD, g4.E2B_V, g4.E2B_A, qtype)
    data = sum(t.nbytes + (-t.nbytes) % 32 for t in tensors)
    assert abs(data - published) / published < 0.01


def test_tiny_file_is_deterministic_and_typed(tmp_path: Path) -> None:
    first = g4.write_gemma4_projector(tmp_path / "a.gguf", 32)
    second = g4.write_gemma4_projector(tmp_path / "b.gguf", 32)
    assert first.read_bytes() == second.read_bytes() == tiny_gemma4_projector().read_bytes()
    reader = GGUFReader(first)
    fields = {f.name: f for f in reader.fields.values()}
    assert "clip.projector_type" not in fields
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["a.conv1d.0.weight"] == g4.Q.F32 and types["v.position_embd.weight"] == g4.Q.F32
    assert types["v.blk.0.attn_q.weight"] == g4.Q.F16 and types["mm.a.input_projection.weight"] == g4.Q.F16


def test_q8_0_variant_loads_and_encodes(tmp_path: Path) -> None:
    projector = g4.write_gemma4_projector(tmp_path / "q8.gguf", 32, qtype=g4.Q.Q8_0)
    types = {t.name: t.tensor_type for t in GGUFReader(projector).tensors}
    assert types["v.blk.0.ffn_up.weight"] == g4.Q.Q8_0 and types["v.patch_embd.weight"] == g4.Q.F32
    with text_context(testmodels.tiny_text(), n_ctx=256) as (model, _lctx), mtmd_context(projector, model) as ctx:
        n_embd = llama_cpp.llama_model_n_embd(model)
        n, embd = _encode(ctx, rgb_bitmap(48, 48), n_embd)
        assert n == 81 and np.isfinite(embd).all()
        n, embd = _encode(ctx, pcm_bitmap(1.0), n_embd)
        assert n == 25 and np.isfinite(embd).all()
