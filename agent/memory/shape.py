"""What a GGUF header says about a model's memory: its shape (layers, widths, heads, KV layout, vocabulary), the
bytes of a row of each tensor type, and which matrices this CPU's llama.cpp repacks into anonymous memory."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from agent.gguf import GgufInfo, Tensor

Q = GGMLQuantizationType
SWA_DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5}  # every n-th layer global (llama.cpp defaults)
# Layers that own a KV cache, counted from the first; the later layers read an earlier layer's cache.
# gemma3n: hard-coded 20 (llama-hparams); gemma4: n_layer - attention.shared_kv_layers (models/gemma4.cpp).
KV_FROM_START = {"gemma3n": 20}
KV_SHARED_FROM_HEADER = ("gemma4",)
ALTUP = {"gemma3n": 4}  # gemma3n carries 4 hidden-state streams; gemma4 dropped AltUp
# Per-layer input width (the per-layer embedding table is {width x n_layer, n_vocab}): hard-coded 256 for gemma3n;
# gemma4 reads embedding_length_per_layer_input.
PLE_DIM = {"gemma3n": 256}
GET_ROWS_TABLES = ("token_embd.weight", "per_layer_token_embd.weight")

class MemoryPlanError(Exception):
    """No setting fits the memory budget (the message holds the table that shows why), or the header lacks what
    planning needs."""


def _per_layer(value: Any, n_layer: int, default: int) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value[:n_layer])
    return (int(value) if isinstance(value, int) else default,) * n_layer


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters that size a model's memory."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    head_k: tuple[int, ...]  # per layer: gemma4 has wider heads on its global layers (key_length vs _swa)
    head_v: tuple[int, ...]
    kv_heads: tuple[int, ...]
    n_vocab: int
    n_swa: int
    swa: tuple[bool, ...]
    kv_layers: tuple[bool, ...]  # which layers own a KV cache (gemma3n / gemma4 share the first layers' cache)
    n_altup: int
    ple_width: int  # per-layer input width x n_layer (gemma3n, gemma4), else 0

    @classmethod
    def of(cls, info: GgufInfo) -> Shape:
        arch = info.arch
        n_layer = int(info.key("block_count", 0))
        n_embd = int(info.key("embedding_length", 0))
        if n_layer <= 0 or n_embd <= 0:
            raise MemoryPlanError(f"{info.path}: no {arch}.block_count / embedding_length in the header")
        n_head = max(_per_layer(info.key("attention.head_count"), n_layer, 1))
        key_full = int(info.key("attention.key_length", n_embd // max(n_head, 1)))
        value_full = int(info.key("attention.value_length", key_full))
        key_swa = int(info.key("attention.key_length_swa", key_full))
        value_swa = int(info.key("attention.value_length_swa", key_swa))
        kv_heads = _per_layer(info.key("attention.head_count_kv"), n_layer, n_head)
        n_ff = max(_per_layer(info.key("feed_forward_length"), n_layer, 4 * n_embd))
        tokens = info.metadata.get("tokenizer.ggml.tokens")
        embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
        n_vocab = int(tokens) if isinstance(tokens, int) else len(tokens) if isinstance(tokens, list) else 0
        if embd is not None and len(embd.shape) == 2:
            n_vocab = max(n_vocab, embd.shape[1])
        n_swa = int(info.key("attention.sliding_window", 0) or 0)
        pattern = info.key("attention.sliding_window_pattern")
        if not n_swa:
            swa = (False,) * n_layer
        elif isinstance(pattern, list):
            swa = tuple(bool(p) for p in pattern[:n_layer])
        else:
            n = int(pattern) if isinstance(pattern, int) else SWA_DEFAULT_PATTERN.get(arch, 0)
            swa = tuple(n == 0 or i % n < n - 1 for i in range(n_layer)) if n else (False,) * n_layer
        head_k = tuple(key_swa if s else key_full for s in swa)
        head_v = tuple(value_swa if s else value_full for s in swa)
        from_start = KV_FROM_START.get(arch, -1)
        if arch in KV_SHARED_FROM_HEADER:
            from_start = n_layer - int(info.key("attention.shared_kv_layers", 0) or 0)
        kv_layers = tuple(from_start < 0 or i < from_start for i in range(n_layer))
        ple = int(info.key("embedding_length_per_layer_input", PLE_DIM.get(arch, 0)) or 0) * n_layer
        return cls(arch, n_layer, n_embd, n_ff, n_head, head_k, head_v, kv_heads, n_vocab, n_swa, swa, kv_layers,
                   ALTUP.get(arch, 1), ple)


def row_bytes(qtype: int, n: int) -> int:
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    return -(-n // block) * size


# --- the CPU's weight repacking (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type) ---------------------


@dataclass(frozen=True)
class Cpu:
    features: frozenset[str]

    @classmethod
    def detect(cls) -> Cpu:
        """The features llama.cpp was built with and found (its system info), else /proc/cpuinfo's flags."""
        try:
            import llama_cpp

            text = llama_cpp.llama_print_system_info().decode()
            found = {part.split("=")[0].strip() for part in text.split("|") if part.strip().endswith("= 1")}
            return cls(frozenset(f.replace("CPU : ", "").strip() for f in found))
        except (ImportError, OSError, AttributeError):
            return cls(frozenset(_cpuinfo_features()))

    def has(self, *names: str) -> bool:
        return all(n in self.features for n in names)

    def repacks(self, t: Tensor) -> bool:
        """Would llama.cpp's CPU_REPACK buffer take this matrix (as the weight of a matrix multiplication)?"""
        if "REPACK" not in self.features or len(t.shape) != 2:
            return False
        rows, ty = t.shape[1], Q(t.type)
        x86 = self.has("AVX2")
        neon_i8, neon_dot = self.has("NEON", "MATMUL_INT8"), self.has("NEON", "DOTPROD")
        if ty in (Q.Q4_0, Q.IQ4_NL, Q.MXFP4):
            return (x86 and rows % 8 == 0) or ((neon_i8 or neon_dot) and rows % 4 == 0)
        if ty == Q.Q4_K:
            return (x86 or neon_i8 or neon_dot) and rows % 8 == 0
        if ty == Q.Q2_K:
            return self.has("AVX512") and rows % 8 == 0
        if ty in (Q.Q5_K, Q.Q6_K):
            return (neon_i8 or neon_dot) and rows % 8 == 0
        if ty == Q.Q8_0:
            return (neon_i8 or neon_dot) and rows % 4 == 0
        return False


def _cpuinfo_features() -> set[str]:
    names = {"avx2": "AVX2", "avx512f": "AVX512", "asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "MATMUL_INT8"}
    found = {"REPACK"}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                found |= {names[f] for f in line.split(":", 1)[1].split() if f in names}
    return found
