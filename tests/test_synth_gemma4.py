"""The synthetic Gemma 4 text models have the published layout and run through the real llama.cpp."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import llama_cpp
import numpy as np
import pytest

from agent.gguf import inspect
from tests.support import synth_gemma4 as g4
from tests.support.models import assert_runs_greedy
from tests.support.models_gemma4 import tiny_gemma4_text

TINY, E2B = g4.GEMMA4_TINY, g4.GEMMA4_E2B


# ------------------------------------------------------------------------------------------------ shapes (pure)

@pytest.mark.fast
def test_e2b_shape_is_the_published_one() -> None:
    sliding = E2B.sliding_pattern()
    assert [i for i, s in enumerate(sliding) if not s] == [4, 9, 14, 19, 24, 29, 34]
    assert E2B.n_layer_kv == 15
    assert [E2B.kv_source(i) for i in range(15, 20)] == [13, 13, 13, 13, 14]  # same-kind last KV layer
    assert {E2B.ffn_width(i) for i in range(15)} == {6144} and {E2B.ffn_width(i) for i in range(15, 35)} == {12288}
    assert (E2B.head_dim(0), E2B.head_dim(4)) == (256, 512)
    tensors = {t.name: t for t in g4.gemma4_text_tensors(E2B, 262_144)}
    assert tensors["per_layer_token_embd.weight"].shape == (256 * 35, 262_144)
    assert tensors["blk.4.attn_q.weight"].shape == (1536, 8 * 512)
    assert tensors["blk.3.attn_k.weight"].shape == (1536, 256)
    assert tensors["blk.34.ffn_down.weight"].shape == (12288, 1536)
    assert "output.weight" not in tensors  # tied to token_embd
    params = sum(t.n_elements for t in tensors.values())
    assert math.isclose(params, 4.647e9, rel_tol=1e-3)  # 5.1 B published with vision (~0.15 B) and audio (~0.3 B)
    assert not E2B.problems()


@pytest.mark.fast
@pytest.mark.parametrize(("change", "why"), [
    ({"swa_period": 1}, "no sliding-window layer"),
    ({"n_layer": 1, "shared_kv_layers": 0}, "fewer than 2 KV layers"),
    ({"shared_kv_layers": 3}, "fewer than 2 KV layers"),
    ({"n_layer": 5, "shared_kv_layers": 2}, "sliding then global"),
])
def test_shapes_llama_cpp_would_abort_on_are_refused(change: dict[str, Any], why: str) -> None:
    shape = dataclasses.replace(TINY, **change)
    assert any(why in p for p in shape.problems())
    with pytest.raises(ValueError, match=why):  # before the tokenizer is even read
        g4.write_gemma4_text("/nonexistent/never-written.gguf", shape, "/nonexistent/tokenizer.gguf")


# ------------------------------------------------------------------------------------------------ the tiny file

def test_tiny_header_has_the_gemma4_layout() -> None:
    info = inspect(tiny_gemma4_text())
    assert info.arch == "gemma4"
    assert info.key("block_count") == 4 and info.key("embedding_length") == 32
    assert info.key("attention.sliding_window_pattern") == [True, False, True, False]
    assert info.key("attention.shared_kv_layers") == 2
    assert info.key("feed_forward_length") == [64, 64, 128, 128]
    assert (info.key("attention.key_length"), info.key("attention.key_length_swa")) == (32, 16)
    assert (info.key("rope.dimension_count"), info.key("rope.dimension_count_swa")) == (32, 16)
    assert info.key("embedding_length_per_layer_input") == 8
    shapes = {t.name: t.shape for t in info.tensors}
    assert len(shapes) == len(g4.gemma4_text_tensors(TINY, 262_144))
    assert shapes["per_layer_token_embd.weight"] == (32, 262_144)
    assert shapes["blk.1.attn_q.weight"] == (32, 64) and shapes["blk.0.attn_q.weight"] == (32, 32)
    assert shapes["blk.2.ffn_up.weight"] == (32, 128)
    assert shapes["rope_freqs.weight"] == (16,)
    types = {t.name: t.type_name for t in info.tensors}
    assert types["per_layer_token_embd.weight"] == "Q4_0" and types["token_embd.weight"] == "Q4_0"
    assert info.size < 24 << 20


def test_tiny_loads_and_generates() -> None:
    llm = llama_cpp.Llama(str(tiny_gemma4_text()), n_ctx=512, n_threads=2, seed=1, verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "gemma4" and llm.n_vocab() == 262_144
        tokens = llm.tokenize(b"<start_of_turn>user\nWho is at the door?<end_of_turn>\n", add_bos=True, special=True)
        logits = assert_runs_greedy(llm, tokens)
        assert np.abs(logits).max() <= 30.0 + 1e-3  # final logit soft-capping
    finally:
        llm.close()


def test_tiny_runs_past_the_sliding_window_on_shared_kv() -> None:
    """More tokens than the 64-token window: the shared layers read the sliding cache after it wraps."""
    llm = llama_cpp.Llama(str(tiny_gemma4_text()), n_ctx=512, n_threads=2, seed=1, verbose=False)
    try:
        llm.eval(list(range(1000, 1200)))
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        assert llm.n_tokens == 200 and np.isfinite(logits).all()
    finally:
        llm.close()


def test_tiny_chat_template_renders_gemma4_turns() -> None:
    llm = llama_cpp.Llama(str(tiny_gemma4_text(template=True)), n_ctx=512, n_threads=2, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == g4.GEMMA4_CHAT_TEMPLATE
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                           temperature=0.0)
        assert isinstance(reply, dict) and reply["usage"]["prompt_tokens"] > 3
    finally:
        llm.close()
