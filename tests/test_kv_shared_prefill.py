"""The llama.cpp this project builds (.ci/build-llama, .ci/llama-patches): installed with its patches, and a prompt
evaluated with the KV-sharing layers of Gemma 3n and Gemma 4 cut down to the output rows gives the logits and the
continuation of the full computation."""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from agent.llm import llama_shim
from tests.support import models as testmodels
from tests.support.paths import ROOT


def test_the_installed_llama_cpp_python_is_built_with_the_project_patches() -> None:
    patches = sorted((ROOT / ".ci" / "llama-patches").glob("*.patch"))
    label = hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest()[:8]
    assert patches and version("llama-cpp-python") == f"{llama_shim.TESTED_VERSION}+gemmaagent.{label}"


def prefill(model: Path, all_rows: bool, tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    """The last prompt token's logits and a greedy continuation; `all_rows`: logits for every prompt token, so no
    row can be left out."""
    llm = llama_cpp.Llama(str(model), n_ctx=256, n_batch=64, n_ubatch=16, n_threads=2, logits_all=all_rows,
                          verbose=False)
    def last() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama_shim.context_handle(llm), -1),
                                     shape=(llm.n_vocab(),)).copy()

    try:
        llm.eval(tokens)
        logits, following = last(), []
        for _ in range(6):  # greedy, one token at a time on the KV cache the prompt left
            following.append(int(np.argmax(last())))
            llm.eval(following[-1:])
        return logits, following
    finally:
        llm.close()


@pytest.mark.parametrize("model", [testmodels.deep_text, testmodels.gemma4_text], ids=["gemma3n", "gemma4"])
def test_only_the_output_rows_past_the_kv_layers_give_the_full_result(model: Any) -> None:
    """40 tokens in micro-batches of 16: two without an output (their last row is kept), one with one."""
    tokens = [int(t) for t in np.random.default_rng(3).integers(300, 30000, size=40)]
    cut, cut_following = prefill(model(), False, tokens)
    full, full_following = prefill(model(), True, tokens)
    assert np.isfinite(cut).all() and np.abs(full).max() > 0.1
    np.testing.assert_allclose(cut, full, rtol=0, atol=1e-4 * float(np.abs(full).max()))
    assert cut_following == full_following
