"""camera.input_size changes what the vision encoder does: a header-patched copy of the projector per size, made
once, atomically, checked; encoded at 256 and 768 it still gives 256 finite embeddings, and the projector's own
size loads the stock file unchanged."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as mtmd

from agent.gguf import ModelFileError, inspect
from agent.llm.input_size import projector_for, resized
from tests.support import models as testmodels
from tests.support.mtmd import mtmd_context, pcm_bitmap, rgb_bitmap, text_context, tokenize

STOCK = 512  # the tiny projector's own image_size (patch 2: 256 tokens)


def embeddings(projector: Path) -> np.ndarray:
    """What the encoder makes of one 640x480 picture: (tokens, n_embd) floats."""
    with text_context(testmodels.tiny_text()) as (model, _lctx), mtmd_context(projector, model) as ctx:
        bitmap = rgb_bitmap(640, 480)
        chunks, found = tokenize(ctx, mtmd.mtmd_default_marker(), bitmap)
        try:
            chunk = mtmd.mtmd_input_chunks_get(chunks, [t for t, _n in found].index(1))
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            n_embd = llama_cpp.llama_model_n_embd(model)
            out = mtmd.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)),
                                         shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


def test_each_input_size_gives_256_finite_embeddings_from_its_own_encode(tmp_path: Path) -> None:
    stock = testmodels.tiny_vision_projector()
    assert projector_for(str(stock), STOCK, tmp_path) == str(stock)  # the projector's own size: the stock file
    results = {STOCK: embeddings(stock)}
    for size in (256, 768):
        copy = Path(projector_for(str(stock), size, tmp_path))
        assert copy.parent == tmp_path and inspect(copy).metadata["clip.vision.image_size"] == size
        results[size] = embeddings(copy)
    for size, embd in results.items():
        assert embd.shape[0] == 256 and np.isfinite(embd).all(), size
    # the encoder really ran at each size: three different encodes of the same picture
    assert not np.allclose(results[256], results[STOCK]) and not np.allclose(results[768], results[STOCK])


@pytest.mark.fast
def test_a_copy_is_made_once_and_a_damaged_one_is_made_again(tmp_path: Path) -> None:
    stock = str(testmodels.tiny_vision_projector())
    copy = Path(projector_for(stock, 256, tmp_path))
    made = copy.stat().st_mtime_ns
    assert projector_for(stock, 256, tmp_path) == str(copy) and copy.stat().st_mtime_ns == made  # reused
    data = bytearray(copy.read_bytes())
    at = data.index(b"clip.vision.patch_size") + len(b"clip.vision.patch_size") + 4
    data[at:at + 4] = (7).to_bytes(4, "little")  # a patch size nobody wrote
    copy.write_bytes(bytes(data))
    assert projector_for(stock, 256, tmp_path) == str(copy)
    assert inspect(copy).metadata["clip.vision.patch_size"] == 1  # checked, found wrong, made again
    assert [p.name for p in tmp_path.iterdir()] == [copy.name]  # no temporary file left behind


@pytest.mark.fast
def test_what_cannot_be_resized_is_left_alone_or_refused(tmp_path: Path) -> None:
    _text, audio = testmodels.tiny_audio_pair()
    assert projector_for(str(audio), 256, tmp_path) == str(audio)  # an audio projector has no image size
    info = inspect(testmodels.tiny_vision_projector())
    with pytest.raises(ModelFileError, match="cannot be made from a 300 px input"):
        resized(info, 300)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_evaluating_kept_embeddings_equals_libmtmds_own_evaluation(kind: str) -> None:
    """An image or a clip encoded, its embeddings kept apart (so an on-demand projector can be freed first) and
    evaluated by decode_embeddings leaves the model in the same state as libmtmd's helper: the same logits after
    it."""
    from agent.llm.projector import Piece, Projector, decode_embeddings

    text, projector_path = ((testmodels.tiny_text(), testmodels.tiny_vision_projector()) if kind == "image"
                            else testmodels.tiny_audio_pair())

    def logits_after_media(ours: bool) -> np.ndarray:
        with text_context(text) as (model, lctx):
            projector = Projector(str(projector_path), model, 2)
            try:
                bitmap = rgb_bitmap(512, 512) if kind == "image" else pcm_bitmap(2.0)
                chunks, found = tokenize(projector.ctx, mtmd.mtmd_default_marker(), bitmap)
                at = [t for t, _n in found].index(1 if kind == "image" else 2)
                chunk, n_tokens = mtmd.mtmd_input_chunks_get(chunks, at), found[at][1]
                assert n_tokens == (256 if kind == "image" else 50)  # gemma4a: 25 tokens a second
                piece = Piece([-1] * n_tokens, chunk, kind, n_tokens)
                if ours:
                    encoded = projector.encode(piece)
                    assert encoded is not None and encoded.embd.shape[0] == n_tokens
                    n_past = decode_embeddings(lctx, encoded, 0, 32)
                else:
                    n_past = projector.evaluate(piece, lctx, 0, 32)
                assert n_past == n_tokens
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
                batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(2), 1)
                batch.pos = (llama_cpp.llama_pos * 1)(n_past)
                assert llama_cpp.llama_decode(lctx, batch) == 0
                n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
                return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).copy()
            finally:
                projector.close()

    ours, libmtmd = logits_after_media(True), logits_after_media(False)
    assert np.isfinite(ours).all() and np.allclose(ours, libmtmd, atol=1e-3)
