"""Every private llama-cpp-python access the agent makes (agent/llm/llama_shim.py) still works on the installed
version: an upgrade that breaks one fails here, by name, instead of somewhere in a turn."""

from __future__ import annotations

from importlib.metadata import version

import llama_cpp

from agent.config import ModelConfig
from agent.llm import llama_shim
from agent.llm.local import LocalModel
from agent.turns.types import Request
from tests.support import models as testmodels


def test_the_pinned_version_is_installed() -> None:
    """The release this file is tested against (the local label names this project's patches on top)."""
    assert version("llama-cpp-python").split("+")[0] == llama_shim.TESTED_VERSION


def test_handles_bookkeeping_and_sampler() -> None:
    model = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), temperature=0.0, max_tokens=4, n_ctx=512,
                                   n_batch=256, n_ubatch=256))
    try:
        llm = model.llm
        assert llama_shim.model_handle(llm) and llama_shim.context_handle(llm)
        assert llama_cpp.llama_vocab_n_tokens(llama_shim.vocab_handle(llm)) == llm.n_vocab()
        model.generate(Request(text="hello"))
        held = list(llama_shim.cached_tokens(llm))
        assert len(held) == llm.n_tokens > 3
        assert llm._sampler is None  # the turn freed its sampler chain (free_sampler)
        llama_shim.keep_prefix(llm, 3)
        assert list(llama_shim.cached_tokens(llm)) == held[:3]
        llama_shim.record_media(llm, -7, 6)
        assert list(llama_shim.cached_tokens(llm)) == [*held[:3], -7, -7, -7]
    finally:
        model.close()


def test_model_params_switches_repacking_for_one_constructor() -> None:
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params
    with llama_shim.model_params(repack=False):
        assert llama_module.llama_cpp.llama_model_default_params().use_extra_bufts is False
    with llama_shim.model_params(repack=True):
        assert llama_module.llama_cpp.llama_model_default_params().use_extra_bufts is True
    assert llama_module.llama_cpp.llama_model_default_params is original
