"""The synthetic models load and run through the real libraries: llama.cpp, libmtmd (vision, audio), whisper.cpp."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import wave
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as mtmd

from agent.gguf import inspect
from agent.llm.prompt import ChatTemplate, TemplateProblem, gemma_prompt
from agent.turns.types import Turn
from tests.support import models as testmodels
from tests.support import synth
from tests.support.mtmd import eval_chunks, mtmd_context, pcm_bitmap, rgb_bitmap, text_context, tokenize

CHUNK_TEXT, CHUNK_IMAGE, CHUNK_AUDIO = 0, 1, 2  # mtmd_input_chunk_type


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ text

def test_tiny_text_has_the_gemma3n_layout() -> None:
    info = inspect(testmodels.tiny_text())
    assert info.arch == "gemma3n"
    assert info.key("block_count") == 2 and info.key("embedding_length") == 32
    names = {t.name for t in info.tensors}
    assert {"per_layer_token_embd.weight", "altup_proj.weight", "blk.1.laurel_r.weight"} <= names
    assert len(names) == len(synth.gemma3n_text_tensors(synth.TINY, 262_144))
    types = {t.name: t.type_name for t in info.tensors}
    assert types["per_layer_token_embd.weight"] == "TQ1_0" and types["token_embd.weight"] == "Q4_0"
    assert info.size < 48 << 20


def test_tiny_text_tokenizes_like_gemma3_and_generates(gemma270m: Path) -> None:
    tiny = llama_cpp.Llama(str(testmodels.tiny_text()), n_ctx=256, n_threads=2, seed=1, verbose=False)
    real = llama_cpp.Llama(str(gemma270m), n_ctx=256, n_threads=2, vocab_only=True, verbose=False)
    try:
        text = b"<start_of_turn>user\nWhat is on the camera?<end_of_turn>\n"
        tokens = tiny.tokenize(text, add_bos=True, special=True)
        assert tokens == real.tokenize(text, add_bos=True, special=True)
        assert tiny.n_vocab() == 262_144 and tiny.metadata["general.architecture"] == "gemma3n"
        testmodels.assert_runs_greedy(tiny, tokens)
    finally:
        tiny.close()
        real.close()


def test_chat_template_matches_the_builtin_gemma_format() -> None:
    path = testmodels.tiny_text(template=True)
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        source = llm.metadata["tokenizer.chat_template"]
        assert source == synth.GEMMA3N_CHAT_TEMPLATE
        turns = [Turn("user", "Is the door open?"), Turn("model", "Yes."), Turn("user", "Who is there?")]
        rendered = ChatTemplate(source, "<bos>", "<eos>").render("You watch a camera.", turns)
        assert rendered == gemma_prompt("You watch a camera.", turns, "<bos>")
        with pytest.raises(TemplateProblem, match="alternate"):
            ChatTemplate(source, "<bos>", "<eos>").render("", [Turn("user", "a"), Turn("user", "b")])
        # llama-cpp-python's own Jinja path formats the chat from the GGUF's template and generates
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                           temperature=0.0)
        assert isinstance(reply, dict)
        assert reply["usage"]["prompt_tokens"] == len(
            llm.tokenize(gemma_prompt("", [Turn("user", "Hi")], "<bos>").encode(), add_bos=False, special=True))
    finally:
        llm.close()


def test_text_shapes_llama_cpp_would_abort_on_are_refused(tmp_path: Path) -> None:
    no_sliding_layer = dataclasses.replace(synth.TINY, swa_period=1)
    with pytest.raises(ValueError, match="sliding"):
        synth.write_gemma3n_text(tmp_path / "t.gguf", no_sliding_layer, testmodels.gemma3_tokenizer())
    assert not list(tmp_path.iterdir())


def test_tiny_text_without_template_has_none() -> None:
    assert "tokenizer.chat_template" not in inspect(testmodels.tiny_text()).metadata


# ------------------------------------------------------------------------------------------------ vision

def test_vision_projector_gives_256_image_tokens_and_evaluates() -> None:
    with text_context(testmodels.tiny_text()) as (model, lctx), \
            mtmd_context(testmodels.tiny_vision_projector(), model) as ctx:
        assert mtmd.mtmd_support_vision(ctx) and not mtmd.mtmd_support_audio(ctx)
        bitmap = rgb_bitmap(512, 512)
        chunks, found = tokenize(ctx, b"Describe " + mtmd.mtmd_default_marker() + b" briefly.", bitmap)
        try:
            assert [t for t, _n in found] == [CHUNK_TEXT, CHUNK_IMAGE, CHUNK_TEXT]
            assert found[1][1] == synth.IMAGE_TOKENS
            n_past = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
            assert rc == 0
            assert n_past.value == sum(n for _t, n in found)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


@pytest.mark.parametrize("size", [(256, 256), (768, 768), (640, 480), (1, 1)])
def test_any_bitmap_size_is_resized_to_the_projector_input(size: tuple[int, int]) -> None:
    with text_context(testmodels.tiny_text(), n_ctx=512) as (model, _lctx), \
            mtmd_context(testmodels.tiny_vision_projector(), model) as ctx:
        bitmap = rgb_bitmap(*size)
        chunks, found = tokenize(ctx, mtmd.mtmd_default_marker(), bitmap)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    assert (CHUNK_IMAGE, synth.IMAGE_TOKENS) in found


def test_projector_input_size_does_not_change_the_token_count() -> None:
    path = testmodels.tiny_vision_projector(image_size=256)
    assert inspect(path).metadata["clip.vision.patch_size"] == 1
    with text_context(testmodels.tiny_text()) as (model, lctx), mtmd_context(path, model) as ctx:
        bitmap = rgb_bitmap(512, 512)
        chunks, found = tokenize(ctx, mtmd.mtmd_default_marker(), bitmap)
        n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 128, True, ctypes.byref(n_past))  # 2 batches
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    assert rc == 0 and (CHUNK_IMAGE, synth.IMAGE_TOKENS) in found


@pytest.mark.parametrize(("image_size", "patch_size"), [(500, None), (0, None), (512, 4), (512, 3), (512, 0)])
def test_projector_shapes_libmtmd_would_abort_on_are_refused(tmp_path: Path, image_size: int,
                                                              patch_size: int | None) -> None:
    target = tmp_path / "p.gguf"
    with pytest.raises(ValueError, match=r"image_size|patch_size"):
        synth.write_gemma3nv_projector(target, 32, image_size=image_size, patch_size=patch_size)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_mismatched_text_width_fails_cleanly(tmp_path: Path) -> None:
    projector = synth.write_gemma3nv_projector(tmp_path / "wide.gguf", 64)
    with text_context(testmodels.tiny_text(), n_ctx=256) as (model, _lctx):
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        assert mtmd.mtmd_init_from_file(str(projector).encode(), model, params) is None


# ------------------------------------------------------------------------------------------------ audio

def test_audio_projector_tokenizes_and_evaluates_pcm() -> None:
    text_model, projector = testmodels.tiny_audio_pair()
    with text_context(text_model) as (model, lctx), mtmd_context(projector, model) as ctx:
        assert mtmd.mtmd_support_audio(ctx) and not mtmd.mtmd_support_vision(ctx)
        assert mtmd.mtmd_get_audio_sample_rate(ctx) == 16000
        counts = []
        for seconds in (1.0, 2.0):
            bitmap = pcm_bitmap(seconds)
            assert mtmd.mtmd_bitmap_is_audio(bitmap)
            chunks, found = tokenize(ctx, b"Transcribe: " + mtmd.mtmd_default_marker(), bitmap)
            try:
                audio = [n for t, n in found if t == CHUNK_AUDIO]
                counts.append(audio[0])
                eval_chunks(ctx, lctx, chunks, found)
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
    assert counts == [synth.AUDIO_TOKENS_PER_SECOND, 2 * synth.AUDIO_TOKENS_PER_SECOND]


def test_empty_audio_is_refused_without_a_crash() -> None:
    text_model, projector = testmodels.tiny_audio_pair()
    with text_context(text_model, n_ctx=256) as (model, _lctx), mtmd_context(projector, model) as ctx:
        empty = (ctypes.c_float * 1)()
        bitmap = mtmd.mtmd_bitmap_init_from_audio(0, empty)
        text = mtmd.mtmd_input_text()
        prompt = mtmd.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    assert rc != 0


# ------------------------------------------------------------------------------------------------ whisper

def test_whisper_model_transcribes_a_wav(tmp_path: Path) -> None:
    from pywhispercpp.model import Model

    wav = tmp_path / "tone.wav"
    pcm = (8000 * np.sin(2 * np.pi * 300 * np.arange(32000) / 16000)).astype(np.int16)
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm.tobytes())
    # temperature_inc 0: greedy only (random weights would otherwise trigger whisper's temperature fallbacks)
    model = Model(str(testmodels.tiny_whisper()), redirect_whispercpp_logs_to=None, n_threads=2,
                  print_progress=False, language="en", temperature_inc=0.0)
    segments = model.transcribe(str(wav))
    assert segments and all(isinstance(s.text, str) for s in segments)
    assert [s.text for s in model.transcribe(pcm.astype(np.float32) / np.float32(32768))] == [s.text for s in segments]


# ------------------------------------------------------------------------------------------------ determinism

def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = synth.write_gemma4a_projector(tmp_path / "a.gguf", 32)
    second = synth.write_gemma4a_projector(tmp_path / "b.gguf", 32)
    assert sha256(first) == sha256(second) == sha256(testmodels.tiny_audio_pair()[1])
    whisper = synth.write_whisper_ggml(tmp_path / "w.bin")
    assert sha256(whisper) == sha256(testmodels.tiny_whisper())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "w.bin"]  # no temporaries left


def test_read_tokenizer_rejects_what_is_not_a_whole_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all, just some text")
    with pytest.raises(ValueError, match="not a GGUF"):
        synth.read_tokenizer(bogus)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(testmodels.gemma3_tokenizer().read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or malformed"):
        synth.read_tokenizer(truncated)
