"""llama.cpp and libmtmd through their C API, for tests that look below the engine: a text context, a projector
context, tokenizing a prompt with one bitmap, and bitmaps of random pixels or a tone."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd


@contextmanager
def text_context(path: Path, n_ctx: int = 2048, n_batch: int = 512) -> Iterator[tuple[Any, Any]]:
    """A llama.cpp model and context through the C API (what libmtmd needs), freed afterwards."""
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads, params.n_threads_batch = (
        n_ctx, n_batch, n_batch, 2, 2)
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    try:
        yield model, ctx
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


@contextmanager
def mtmd_context(projector: Path, model: Any) -> Iterator[Any]:
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = mtmd.mtmd_init_from_file(str(projector).encode(), model, params)
    assert ctx, f"libmtmd could not load {projector}"
    try:
        yield ctx
    finally:
        mtmd.mtmd_free(ctx)


def tokenize(ctx: Any, prompt: bytes, bitmap: Any) -> tuple[Any, list[tuple[int, int]]]:
    """mtmd_tokenize one bitmap into chunks; return the chunks and their (type, n_tokens)."""
    text = mtmd.mtmd_input_text()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
    chunks = mtmd.mtmd_input_chunks_init()
    rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    assert rc == 0, f"mtmd_tokenize returned {rc}"
    found = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        found.append((mtmd.mtmd_input_chunk_get_type(chunk), mtmd.mtmd_input_chunk_get_n_tokens(chunk)))
    return chunks, found


def rgb_bitmap(width: int, height: int) -> Any:
    pixels = np.random.default_rng(7).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * pixels.nbytes).from_buffer_copy(pixels.tobytes()))


def pcm_bitmap(seconds: float) -> Any:
    n = int(16000 * seconds)
    pcm = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
    return mtmd.mtmd_bitmap_init_from_audio(n, (ctypes.c_float * n).from_buffer_copy(pcm.tobytes()))


def eval_chunks(ctx: Any, lctx: Any, chunks: Any, found: list[tuple[int, int]], n_batch: int = 512) -> None:
    """Evaluate tokenized chunks into the text context from position 0; every chunk's tokens must land."""
    n_past = llama_cpp.llama_pos(0)
    rc = mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, n_batch, True, ctypes.byref(n_past))
    assert rc == 0 and n_past.value == sum(n for _t, n in found)
