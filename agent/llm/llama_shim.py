"""Every use of llama-cpp-python beyond its public API, in one place.

The engine needs a few things the `Llama` class keeps private: the raw model, context and vocabulary handles
(for libmtmd, LoRA adapters and the abort callback), its token bookkeeping (to keep a KV-cache prefix that holds
images, which its own prefix matching cannot see), its per-turn sampler (freed here: it otherwise leaks 3 MiB a
turn through a reference cycle), and the model parameters it builds (CPU weight repacking is not a constructor
option). An upgrade of llama-cpp-python can break any of these: tests/test_llama_shim.py checks each against the
installed version, and this is the only file to change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

TESTED_VERSION = "0.3.36"  # pyproject.toml pins it


def model_handle(llm: Any) -> Any:
    """The llama_model pointer."""
    return llm._model.model


def vocab_handle(llm: Any) -> Any:
    """The llama_vocab pointer."""
    return llm._model.vocab


def context_handle(llm: Any) -> Any:
    """The llama_context pointer."""
    return llm._ctx.ctx


def free_sampler(llm: Any) -> None:
    """Free the sampler chain the last generate() made, now (generate() makes a new one; sample() copes with
    None). Its only way out is a reference cycle, which holds 12 bytes x vocabulary (3 MiB for Gemma) until
    Python's cyclic GC happens to run (bench/RESULTS.md finding 10)."""
    sampler, llm._sampler = llm._sampler, None
    if sampler is not None:
        sampler.close()


def keep_prefix(llm: Any, keep: int) -> None:
    """Drop the KV cache after the first `keep` positions; the next generate() evaluates at least one token."""
    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
    llm.n_tokens = keep
    llm._requires_eval = True  # the logits are stale now


def cached_tokens(llm: Any) -> Any:
    """The token ids the KV cache holds, in order (media positions hold their pseudo-token)."""
    return llm.input_ids[: llm.n_tokens]


def record_media(llm: Any, pseudo_token: int, new_n_past: int) -> None:
    """Book the positions a media chunk filled (n_tokens .. new_n_past) under its pseudo-token."""
    llm.input_ids[llm.n_tokens:new_n_past] = pseudo_token
    llm.n_tokens = new_n_past


_params_lock = threading.Lock()


@contextlib.contextmanager
def model_params(repack: bool) -> Iterator[None]:
    """Within this block, llama_cpp.Llama builds its model with CPU weight repacking on or off.

    llama-cpp-python 0.3.36 does not expose llama_model_params.use_extra_bufts; it fills the struct from
    llama_model_default_params(), which is wrapped here for the duration of one constructor call."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    with _params_lock:
        original = lib.llama_model_default_params

        def patched() -> Any:
            params = original()
            params.use_extra_bufts = repack
            return params

        lib.llama_model_default_params = patched
        try:
            yield
        finally:
            lib.llama_model_default_params = original
