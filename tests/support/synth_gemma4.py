"""Random-weight Gemma 4 text models (arch `gemma4`, the E2B / E4B "per-layer embedding" kind), for tests and
benchmarks; no real weights here. Same approach and helpers as tests/support/synth.py (Gemma 3n).

Layout (vendored llama.cpp of llama-cpp-python 0.3.36: src/models/gemma4.cpp load_arch_hparams / load_arch_tensors,
conversion/gemma.py Gemma4Model; published config of google/gemma-4-E2B-it; facts and sources in
/tmp/notes/gemma4-text.md at the time of writing):

- Sliding layers (every 5th layer global) and global layers have different head sizes (`key_length_swa` 256 vs
  `key_length` 512) and RoPE widths (`rope.dimension_count_swa` 256 vs `rope.dimension_count` 512, the global
  one "proportional": the shared `rope_freqs` tensor, 1 for the rotated quarter and 1e30 for the rest in a real
  file; ones here, which rotates every pair: same size and speed, different numbers).
- KV sharing: the last `shared_kv_layers` layers own no KV cache; each reuses the cache of the last KV layer of
  its kind (llama-model.cpp: n_layer_kv_from_start - 2 for sliding, - 1 for global). Google's checkpoint still
  carries their (unused) attn_k / attn_v / attn_k_norm, and so do the published GGUFs: written here too.
- Double-wide MLP: the shared layers' FFN is twice as wide (`feed_forward_length` is a per-layer array).
- Per-layer embeddings: `per_layer_token_embd` {per_layer_dim * n_layer, n_vocab} (E2B: 8960 x 262,144, half
  the model), read from `embedding_length_per_layer_input` (not hard-coded as for Gemma 3n, so tiny models can
  shrink it). No altup, no laurel. Output tied to `token_embd`. One `layer_output_scale` scalar per layer.

Edges (each aborts the process, SIGABRT, rather than raising; the writer refuses such shapes):
- a pattern with no sliding layer: `GGML_ASSERT(hparams.is_swa_any())`;
- fewer than 2 KV layers: `GGML_ASSERT(hparams.n_layer_kv_from_start >= 2)` (the KV-reuse callback is installed
  for every gemma4 model, even with no shared layer), so the smallest model has 2 layers;
- shared layers reuse layer kv-2 (sliding) and kv-1 (global) by position, not by kind: the last two KV layers
  must be sliding then global, as in the published shapes.

Tokenizer: the Gemma 3 one (262,144 tokens, SentencePiece `llama` model) copied from a Gemma 3 GGUF, as for
Gemma 3n. Real Gemma 4 files carry tokenizer model `gemma4` (BPE with merges, ~10 MB more metadata) and the
`<|turn>` / `<turn|>` turn markers, which this vocabulary lacks (they tokenize as several pieces).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType

from tests.support.synth import KV, SEED, Q, TensorSpec, Tokenizer, _kv, text_model_tail, tokenizer_for, write_gguf

ARCH = "gemma4"


@dataclass(frozen=True)
class Gemma4Shape:
    """Hyper-parameters of a Gemma 4 text model (dense, per-layer embeddings) and its tensors' storage types."""

    name: str
    n_layer: int
    n_embd: int
    n_ff: int  # FFN width of the KV layers; the shared layers' is 2 x n_ff with double_wide_mlp
    n_head: int
    n_head_kv: int
    head_dim_swa: int
    head_dim_full: int
    shared_kv_layers: int
    per_layer_dim: int = 256
    double_wide_mlp: bool = True
    n_vocab: int | None = None  # None: the tokenizer's count; larger: pad with unused tokens
    per_layer_type: GGMLQuantizationType = Q.F16
    token_embd_type: GGMLQuantizationType = Q.F16
    matrix_type: GGMLQuantizationType = Q.F16
    context_length: int = 131072
    sliding_window: int = 512
    swa_period: int = 5  # every 5th layer global
    rope_partial_full: float = 0.25  # rotated fraction of a global head ("proportional" RoPE)

    @property
    def n_layer_kv(self) -> int:
        """Layers with their own KV cache (the first ones)."""
        return self.n_layer - self.shared_kv_layers

    def sliding_pattern(self) -> list[bool]:
        return [(i + 1) % self.swa_period != 0 for i in range(self.n_layer)]

    def head_dim(self, il: int) -> int:
        return self.head_dim_swa if self.sliding_pattern()[il] else self.head_dim_full

    def ffn_width(self, il: int) -> int:
        return 2 * self.n_ff if self.double_wide_mlp and il >= self.n_layer_kv else self.n_ff

    def kv_source(self, il: int) -> int:
        """The layer whose KV cache layer `il` attends over (itself, or for a shared layer llama.cpp's choice)."""
        if il < self.n_layer_kv:
            return il
        return self.n_layer_kv - (2 if self.sliding_pattern()[il] else 1)

    def problems(self) -> list[str]:
        """Why llama.cpp would reject or abort on this shape (empty when it loads)."""
        out = []
        pattern = self.sliding_pattern()
        if not any(pattern):
            out.append("no sliding-window layer (GGML_ASSERT is_swa_any aborts)")
        if self.n_layer_kv < 2:
            out.append("fewer than 2 KV layers (GGML_ASSERT n_layer_kv_from_start >= 2 aborts)")
        elif self.shared_kv_layers and not (pattern[self.n_layer_kv - 2] and not pattern[self.n_layer_kv - 1]):
            out.append("the last two KV layers must be sliding then global (shared layers reuse them by position)")
        if self.shared_kv_layers < 0 or self.n_head <= 0 or self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            out.append("inconsistent head or shared-layer counts")
        if self.head_dim_full % 2 or self.head_dim_swa % 2 or self.per_layer_dim <= 0:
            out.append("head sizes must be even and per_layer_dim positive")
        return out


# Tiny test model: 4 layers (sliding, global, sliding, global), the last two sharing the first two's KV cache, so
# every Gemma 4 feature runs: two head sizes, KV sharing, the double-wide MLP, per-layer embeddings (8 per layer).
GEMMA4_TINY = Gemma4Shape("tiny", n_layer=4, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, head_dim_swa=16,
                          head_dim_full=32, shared_kv_layers=2, per_layer_dim=8, swa_period=2,
                          per_layer_type=Q.Q4_0, token_embd_type=Q.Q4_0, context_length=4096, sliding_window=64)
# Published shape (google/gemma-4-E2B-it config.json, text_config): hidden 1536, 35 layers (global every 5th),
# 8 heads, 1 KV head, head_dim 256 / global_head_dim 512, 20 KV-shared layers, intermediate 6144 doubled on the
# shared layers, 256 per-layer dims, vocab 262,144, context 131,072, sliding window 512.
GEMMA4_E2B = Gemma4Shape("E2B", n_layer=35, n_embd=1536, n_ff=6144, n_head=8, n_head_kv=1, head_dim_swa=256,
                         head_dim_full=512, shared_kv_layers=20)
GEMMA4_SHAPES = {s.name: s for s in (GEMMA4_TINY, GEMMA4_E2B)}


def gemma4_text_tensors(shape: Gemma4Shape, n_vocab: int) -> list[TensorSpec]:
    """Every tensor of a converted Gemma 4 E-model GGUF (llama.cpp LLM_ARCH_GEMMA4), in a converter-like order."""
    e, m, f32 = shape.n_embd, shape.matrix_type, Q.F32
    plt = shape.per_layer_dim * shape.n_layer
    out = [
        TensorSpec("token_embd.weight", (e, n_vocab), shape.token_embd_type, scale=0.01),
        TensorSpec("per_layer_token_embd.weight", (plt, n_vocab), shape.per_layer_type, scale=0.02),
        TensorSpec("per_layer_model_proj.weight", (e, plt), Q.F16),
        TensorSpec("per_layer_proj_norm.weight", (shape.per_layer_dim,), f32, "ones"),
        TensorSpec("rope_freqs.weight", (shape.head_dim_full // 2,), f32, "ones"),
        TensorSpec("output_norm.weight", (e,), f32, "ones"),
    ]
    for i in range(shape.n_layer):
        b, hd, ff = f"blk.{i}.", shape.head_dim(i), shape.ffn_width(i)
        q_dim, kv_dim = shape.n_head * hd, shape.n_head_kv * hd
        out += [
            TensorSpec(b + "attn_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "attn_q.weight", (e, q_dim), m),
            TensorSpec(b + "attn_k.weight", (e, kv_dim), m),  # unused on shared layers, present in real files
            TensorSpec(b + "attn_v.weight", (e, kv_dim), m),
            TensorSpec(b + "attn_output.weight", (q_dim, e), m),
            TensorSpec(b + "attn_q_norm.weight", (hd,), f32, "ones"),
            TensorSpec(b + "attn_k_norm.weight", (hd,), f32, "ones"),
            TensorSpec(b + "post_attention_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "ffn_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "ffn_gate.weight", (e, ff), m),
            TensorSpec(b + "ffn_up.weight", (e, ff), m),
            TensorSpec(b + "ffn_down.weight", (ff, e), m),
            TensorSpec(b + "post_ffw_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "inp_gate.weight", (e, shape.per_layer_dim), m),
            TensorSpec(b + "proj.weight", (shape.per_layer_dim, e), m),
            TensorSpec(b + "post_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "layer_output_scale.weight", (1,), f32, "ones"),
        ]
    return out


def gemma4_text_metadata(shape: Gemma4Shape, tokenizer: Tokenizer, chat_template: str | None) -> list[KV]:
    """The keys conversion/gemma.py (Gemma4Model) writes for a Gemma 4 E-model, with this shape's values."""
    a, U32, F32 = ARCH, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    arr = GGUFValueType.ARRAY
    ffn = [shape.ffn_width(i) for i in range(shape.n_layer)]
    kvs = [
        _kv("general.type", "model", GGUFValueType.STRING),
        _kv("general.name", f"Gemma 4 {shape.name} (synthetic random weights)", GGUFValueType.STRING),
        _kv("general.description",
            "Random weights with the real tensor layout, written by tests/support/synth_gemma4.py",
            GGUFValueType.STRING),
        _kv(f"{a}.block_count", shape.n_layer, U32),
        _kv(f"{a}.context_length", shape.context_length, U32),
        _kv(f"{a}.embedding_length", shape.n_embd, U32),
        (_kv(f"{a}.feed_forward_length", ffn, arr, U32) if len(set(ffn)) > 1
         else _kv(f"{a}.feed_forward_length", ffn[0], U32)),
        _kv(f"{a}.attention.head_count", shape.n_head, U32),
        _kv(f"{a}.attention.head_count_kv", shape.n_head_kv, U32),
        _kv(f"{a}.rope.freq_base", 1_000_000.0, F32),
        _kv(f"{a}.rope.freq_base_swa", 10_000.0, F32),
        _kv(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, F32),
        _kv(f"{a}.final_logit_softcapping", 30.0, F32),
        _kv(f"{a}.attention.sliding_window", shape.sliding_window, U32),
        _kv(f"{a}.attention.shared_kv_layers", shape.shared_kv_layers, U32),
        _kv(f"{a}.embedding_length_per_layer_input", shape.per_layer_dim, U32),
        _kv(f"{a}.attention.sliding_window_pattern", shape.sliding_pattern(), arr, GGUFValueType.BOOL),
        _kv(f"{a}.attention.key_length", shape.head_dim_full, U32),
        _kv(f"{a}.attention.value_length", shape.head_dim_full, U32),
        _kv(f"{a}.attention.key_length_swa", shape.head_dim_swa, U32),
        _kv(f"{a}.attention.value_length_swa", shape.head_dim_swa, U32),
        _kv(f"{a}.rope.dimension_count", shape.head_dim_full, U32),  # "proportional": rope_freqs masks the rest
        _kv(f"{a}.rope.dimension_count_swa", shape.head_dim_swa, U32),
    ]
    return kvs + text_model_tail((shape.per_layer_type, shape.token_embd_type, shape.matrix_type), tokenizer,
                                 chat_template)


# Gemma 4's turn format, plain text turns only (the published template also handles the system role natively,
# thinking channels, tools, images and audio): BOS, `<|turn>role\n ... <turn|>\n`, "assistant" spoken as "model",
# then an open model turn. The Gemma 3 vocabulary of these files lacks <|turn> / <turn|>: they tokenize as pieces.
GEMMA4_CHAT_TEMPLATE = """{{- bos_token -}}
{%- for turn in messages -%}
  {%- set role = 'model' if turn['role'] == 'assistant' else turn['role'] -%}
  {%- set content = turn['content'] if turn['content'] is string else turn['content'][0]['text'] -%}
  {{- '<|turn>' ~ role ~ '\\n' ~ (content | trim) ~ '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def write_gemma4_text(path: str | os.PathLike[str], shape: Gemma4Shape, tokenizer_from: str | os.PathLike[str],
                      chat_template: str | bool | None = None, seed: int = SEED) -> Path:
    """Write a random-weight Gemma 4 text GGUF with `shape`, the tokenizer of `tokenizer_from` (a Gemma 3 GGUF)
    and, if asked, a chat template (True: GEMMA4_CHAT_TEMPLATE; a string: that template)."""
    if problems := shape.problems():
        raise ValueError(f"{shape.name}: llama.cpp would abort or misread this shape: {'; '.join(problems)}")
    tokenizer = tokenizer_for(tokenizer_from, shape.n_vocab)
    template = GEMMA4_CHAT_TEMPLATE if chat_template is True else (chat_template or None)
    kvs = gemma4_text_metadata(shape, tokenizer, template)
    return write_gguf(path, ARCH, kvs, gemma4_text_tensors(shape, tokenizer.n_tokens), seed)
