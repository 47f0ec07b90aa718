"""Memory planner: what a GGUF model will hold in RAM under each load setting, from its header alone.

Two kinds of memory count against a memory cgroup's limit:
- anonymous (not reclaimable, there is no swap): CPU-repacked weights, KV cache, compute buffers, the vision
  projector, the vocabulary, Python itself;
- file-backed model pages (clean, reclaimable): llama.cpp maps the file. The pages read for every token (the
  weights left in place, the tied output head) must stay resident, or each token reads them from disk again
  (thrashing). The per-layer-embedding table (each token reads one row) and the file copy of repacked weights
  are cold: the kernel may drop them, and `release_cold_pages` drops them right after loading.

A setting fits when anonymous + hot file bytes <= budget - margin, the budget being memory.limit_mib, the
cgroup's limit or MemTotal, whichever is lowest. `plan()` takes the fastest setting that fits, or refuses with
the table of every setting and what it needs. Sizes come from llama.cpp's own rules (llama-kv-cache*.cpp,
ggml-cpu/repack.cpp, models/gemma3n.cpp); the few that depend on the allocator are calibrated against measured
RSS (see CALIBRATION, bench/memory_cap.py and bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from agent.config import MemoryConfig, ModelConfig
from agent.modelfile import GgufInfo, Tensor, inspect

log = logging.getLogger("agent.memory")

MiB = 1 << 20
PAGE = mmap.PAGESIZE
Q = GGMLQuantizationType
KV_TYPES = {"f16": Q.F16, "q8_0": Q.Q8_0}
GGML_TYPE_IDS = {"f16": 1, "q8_0": 8}  # ggml_type values for llama_context_params.type_k / type_v

# --- calibration: the terms the tensor table cannot give exactly (measured on this project's machines) -------
CALIBRATION: dict[str, float] = {
    # llama.cpp vocabulary (token texts, maps, piece cache) plus llama-cpp-python's candidate arrays, per token
    "vocab_bytes_per_token": 176,
    # llama.cpp model and context bookkeeping (tensor metadata, graph hash sets), per tensor in the file
    "bytes_per_tensor": 5 * 1024,
    "load_fixed_bytes": MiB // 4,
    # per turn, whatever the prompt: logits, soft-capping copies, sampler arrays, glibc arenas, thread stacks
    "turn_fixed_bytes": 4.5 * MiB,
    # compute-buffer pages a ubatch touches, in float32 activations per unit of width W = n_embd x altup streams
    # + n_ff + per-layer-input width (the allocator reuses freed tensors, so this is far below the reserved
    # size, which is dominated by logits for every token of the ubatch)
    "act_width_fixed_floats": 160,  # times W, once
    "act_width_floats_per_token": 2.0,  # times W, per ubatch token
    "act_q_floats_per_token": 1.0,  # times n_head x head_dim, per ubatch token
    # code pages of libllama / ggml that loading and running a model touch (file-backed, hot)
    "library_code_bytes": 3 * MiB,
    # importing llama_cpp (libllama, ggml) when the planner runs before it is imported
    "import_anon_bytes": 8 * MiB,
    # vision projector compute while an image is encoded (gemma3nv MobileNetV5: float32 activations, im2col
    # copies), in units of the first stage's widest activation ((image_size / 4)^2 x its expansion channels x 4
    # bytes): MobileNetV5-300M at 768 x 768 measured ~560 MiB on top of its weights
    "vision_stage0_activations": 7.8,
    "vision_bytes_per_pixel": 960,  # projectors without MobileNetV5 stage-0 tensors
}
SWA_DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5}  # every n-th layer global (llama.cpp defaults)
KV_FROM_START = {"gemma3n": 20}  # gemma3n: only the first 20 layers own a KV cache, the rest reuse it
ALTUP = {"gemma3n": 4}
PLE_DIM = {"gemma3n": 256}
GET_ROWS_TABLES = ("token_embd.weight", "per_layer_token_embd.weight")


class MemoryPlanError(Exception):
    """No setting fits the memory budget; the message holds the table that shows why."""


# --- budget -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    limit: int  # bytes
    source: str  # where the limit comes from
    margin: int

    @property
    def usable(self) -> int:
        return self.limit - self.margin


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    value = int(text)
    return None if value >= 1 << 60 else value  # v1 says "no limit" with a huge number


def _mounts(mountinfo: str) -> tuple[Path | None, Path | None]:
    """(cgroup v2 mount, cgroup v1 memory mount) from /proc/self/mountinfo."""
    v2 = v1 = None
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
        elif rest[0] == "cgroup" and "memory" in rest[2].split(",") and v1 is None:
            v1 = Path(fields[4])
    return v2, v1


def cgroup_limit(proc: str = "/proc/self") -> tuple[int | None, str]:
    """The memory limit of this process's cgroup and its ancestors: (bytes or None, where it was read). v2: the
    lowest memory.max or memory.high (MemoryMax=, MemoryHigh=); v1: memory.limit_in_bytes, hierarchically."""
    v2, v1 = _mounts(f"{proc}/mountinfo")
    try:
        lines = Path(f"{proc}/cgroup").read_text().splitlines()
    except OSError:
        return None, "no /proc/self/cgroup"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and v2 is not None and (v2 / "cgroup.controllers").exists():
            node = v2 / path.lstrip("/")
            best: tuple[int | None, str] = (None, "cgroup v2: no memory.max")
            while True:  # v2 limits are hierarchical: the lowest ancestor's memory.max binds
                for name in ("memory.max", "memory.high"):  # above memory.high the kernel reclaims and throttles
                    limit = _read_limit(node / name)
                    if limit is not None and (best[0] is None or limit < best[0]):
                        best = (limit, f"cgroup v2 {node}/{name}")
                if node == v2 or node.parent == node:
                    break
                node = node.parent
            if best[0] is not None:
                return best
        if "memory" in controllers.split(",") and v1 is not None:
            node = v1 / path.lstrip("/")
            own = _read_limit(node / "memory.limit_in_bytes")
            hierarchical = None
            with contextlib.suppress(OSError, ValueError):
                for stat_line in (node / "memory.stat").read_text().splitlines():
                    if stat_line.startswith("hierarchical_memory_limit "):
                        hierarchical = _read_limit_text(stat_line.split()[1])
            limits = [x for x in (own, hierarchical) if x is not None]
            if limits:
                return min(limits), f"cgroup v1 {node}/memory.limit_in_bytes"
            return None, "cgroup v1: no limit"
    return None, "no memory cgroup"


def _read_limit_text(text: str) -> int | None:
    value = int(text)
    return None if value >= 1 << 60 else value


def mem_total(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def budget(cfg: MemoryConfig, proc: str = "/proc/self") -> Budget:
    """memory.limit_mib, the cgroup's limit or the machine's RAM, whichever is lowest, less memory.margin_mib."""
    options: list[tuple[int, str]] = []
    if cfg.limit_mib:
        options.append((cfg.limit_mib * MiB, "memory.limit_mib"))
    limit, where = cgroup_limit(proc)
    if limit is not None:
        options.append((limit, where))
    total = mem_total()
    if total is not None:
        options.append((total, "MemTotal"))
    if not options:
        options.append((2048 * MiB, "default 2 GiB"))
    best = min(options)
    return Budget(best[0], best[1], cfg.margin_mib * MiB)


# --- what the model file says ---------------------------------------------------------------------------------


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
    head_k: int
    head_v: int
    kv_heads: tuple[int, ...]
    n_vocab: int
    n_swa: int
    swa: tuple[bool, ...]
    kv_layers: tuple[bool, ...]  # which layers own a KV cache (gemma3n shares the first 20 layers' cache)
    n_altup: int
    ple_width: int  # gemma3n per-layer input width x n_layer, else 0

    @classmethod
    def of(cls, info: GgufInfo) -> Shape:
        arch = info.arch
        n_layer = int(info.key("block_count", 0))
        n_embd = int(info.key("embedding_length", 0))
        if n_layer <= 0 or n_embd <= 0:
            raise MemoryPlanError(f"{info.path}: no {arch}.block_count / embedding_length in the header")
        n_head = max(_per_layer(info.key("attention.head_count"), n_layer, 1))
        head_k = int(info.key("attention.key_length", n_embd // max(n_head, 1)))
        head_v = int(info.key("attention.value_length", head_k))
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
        from_start = KV_FROM_START.get(arch, -1)
        kv_layers = tuple(from_start < 0 or i < from_start for i in range(n_layer))
        ple = PLE_DIM.get(arch, 0) * n_layer
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


# --- settings and their estimates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One way to load the model."""

    mmap: bool = True
    repack: bool = True
    n_ctx: int = 2048
    kv_type: str = "f16"  # f16 | q8_0 (a quantized V cache needs flash attention)
    n_ubatch: int = 512
    projector_resident: bool = True
    flash_attn: bool = False
    swa_full: bool = True  # brain.Model keeps a full-size sliding-window cache (exact prefix reuse)

    def label(self) -> str:
        return (f"{'mmap' if self.mmap else 'no-mmap'} repack {'on' if self.repack else 'off'} "
                f"ctx {self.n_ctx} kv {self.kv_type}{' fa' if self.flash_attn else ''} ub {self.n_ubatch}"
                + ("" if self.projector_resident else " proj on-demand"))


@dataclass
class Estimate:
    """Predicted bytes for one setting. `anon` and `hot_file` are what must fit."""

    setting: Setting
    repacked: int = 0  # weights copied into anonymous memory (CPU_REPACK), or every weight without mmap
    kv: int = 0
    compute: int = 0  # compute buffer pages touched by a full ubatch, output buffer, sampler
    vocab: int = 0
    projector: int = 0  # projector weights kept resident (0 when loaded for each image)
    projector_transient: int = 0  # added while an image is encoded: its compute (+ its weights when on demand)
    baseline: int = 0  # the Python process before the model
    fixed: int = 0
    mapped_file: int = 0  # model file bytes mapped once loaded (uncapped RssFile growth)
    hot_file: int = 0  # model-file bytes read for every decoded token
    code: int = 0  # library code pages the model's load and run touch (file-backed, hot)
    read_per_token: int = 0  # all weight bytes one decoded token reads (anonymous + file)
    cold_ranges: list[tuple[int, int]] = field(default_factory=list)  # file ranges safe to drop after load
    hot_ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def anon(self) -> int:
        return (self.repacked + self.kv + self.compute + self.vocab + self.projector + self.baseline
                + self.fixed)

    @property
    def need(self) -> int:
        """Steady state: anonymous + hot file pages. While an image is encoded the hot file pages may be dropped
        (and read again afterwards), so that moment needs anonymous + the projector's transient bytes."""
        return max(self.anon + self.hot_file + self.code, self.anon + self.projector_transient)


def estimate(info: GgufInfo, setting: Setting, cpu: Cpu | None = None, baseline: int | None = None,
             projector: GgufInfo | None = None, n_tokens: int | None = None, n_kv: int | None = None) -> Estimate:
    """Predict the memory of `info` loaded with `setting`. `n_tokens` (default: a full ubatch) and `n_kv` (default:
    the whole context) size the compute buffer; `baseline` defaults to this process's anonymous memory now."""
    cpu = cpu or Cpu.detect()
    shape = Shape.of(info)
    est = Estimate(setting)
    est.baseline = python_baseline() if baseline is None else baseline
    cal = CALIBRATION
    tied = not any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        start, end = info.data_offset + t.offset, info.data_offset + t.offset + t.nbytes
        table = t.name in GET_ROWS_TABLES  # read by rows: one row per token
        matmul = not table or (t.name == "token_embd.weight" and tied)  # read whole for every token
        row = row_bytes(t.type, t.shape[0])
        if table:
            est.read_per_token += row
        if matmul:
            est.read_per_token += t.nbytes
        if not setting.mmap:  # everything is read into anonymous memory; a tied table is loaded twice
            est.repacked += t.nbytes * (2 if table and matmul else 1)
            continue
        if matmul and setting.repack and cpu.repacks(t):
            est.repacked += t.nbytes  # the copy is anonymous; the file pages are cold after the load
            est.cold_ranges.append((start, end))
            if table:
                est.hot_file += _pages(row)
        elif matmul:
            est.hot_file += t.nbytes
            est.hot_ranges.append((start, end))
        else:
            est.hot_file += _pages(row)
            est.cold_ranges.append((start, end))
    if setting.mmap:
        first = min(t.offset for t in info.tensors) + info.data_offset
        est.mapped_file = info.size - (first & ~(PAGE - 1))  # llama.cpp unmaps the header pages
    est.kv = kv_bytes(shape, setting)
    est.code = int(cal["library_code_bytes"])
    est.read_per_token += est.kv // 2  # a decoded token reads about half a full cache on average
    est.compute = compute_bytes(shape, setting, n_tokens, n_kv)
    est.vocab = int(shape.n_vocab * cal["vocab_bytes_per_token"])
    imported = "llama_cpp" in sys.modules or baseline is not None
    est.fixed = int(cal["load_fixed_bytes"] + 4 * shape.n_vocab + cal["bytes_per_tensor"] * len(info.tensors)
                    + (0 if imported else cal["import_anon_bytes"]))  # + the output buffer (one row of logits)
    if projector is not None:
        weights, compute = projector_bytes(projector)
        est.projector = weights if setting.projector_resident else 0
        est.projector_transient = compute + (0 if setting.projector_resident else weights)
    return est


FAULT_AROUND = 64 * 1024  # the kernel maps up to this aligned window of cached pages around a faulting page


def mapped_after_touch(ranges: list[tuple[int, int]], window: int = FAULT_AROUND) -> int:
    """Bytes a process maps when it touches `ranges` of a file whose pages are cached: each range widened to the
    fault-around window (what RssFile shows; the page cache needs only the ranges themselves)."""
    spans = sorted((lo // window * window, -(-hi // window) * window) for lo, hi in ranges if hi > lo)
    total, end = 0, -1
    for lo, hi in spans:
        if lo > end:
            total += hi - lo
        elif hi > end:
            total += hi - end
        end = max(end, hi)
    return total


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE + PAGE  # a row rarely starts on a page boundary


def kv_bytes(shape: Shape, s: Setting) -> int:
    """llama_kv_cache(_iswa): K and V rows for every cell of every layer that owns a cache."""
    size = -(-s.n_ctx // 256) * 256  # llama.cpp pads n_ctx to 256
    swa_size = size if s.swa_full else min(size, -(-(shape.n_swa + s.n_ubatch) // 256) * 256)
    kv_type = KV_TYPES[s.kv_type]
    total = 0
    for il in range(shape.n_layer):
        if not shape.kv_layers[il]:
            continue
        cells = swa_size if shape.swa[il] else size
        heads = shape.kv_heads[il]
        total += cells * (row_bytes(kv_type, shape.head_k * heads) + row_bytes(kv_type, shape.head_v * heads))
    return total


def compute_bytes(shape: Shape, s: Setting, n_tokens: int | None = None, n_kv: int | None = None) -> int:
    """Compute-buffer pages touched by a ubatch of `n_tokens` (default: a full ubatch) attending over `n_kv`
    cells (default: the whole context), plus the per-turn logits and sampler arrays. Fitted to measured RSS of
    Gemma 3n E2B, Gemma 3 270M and a tiny Gemma 3n (bench/RESULTS.md); within ~15 MiB on E2B."""
    cal = CALIBRATION
    n = min(n_tokens or s.n_ubatch, s.n_ubatch)
    kv = min(n_kv or s.n_ctx, s.n_ctx)
    width = shape.n_embd * shape.n_altup + shape.n_ff + shape.ple_width
    per_token = (cal["act_width_floats_per_token"] * width + cal["act_q_floats_per_token"] * shape.n_head
                 * shape.head_k + 2 * kv)  # + the causal masks (sliding and global)
    if not s.flash_attn:
        per_token += shape.n_head * kv  # the attention scores, materialized without flash attention
    return int(cal["turn_fixed_bytes"] + 4 * cal["act_width_fixed_floats"] * width + 4 * per_token * n)


def projector_bytes(info: GgufInfo) -> tuple[int, int]:
    """A libmtmd projector: (weights, compute while encoding). clip.cpp reads every tensor into anonymous
    memory; its compute buffer is reserved at load and touched while an image is encoded."""
    weights = sum(t.nbytes for t in info.tensors)
    size = int(info.metadata.get("clip.vision.image_size", 0) or 0)
    stage0 = [t.shape[3] for t in info.tensors if t.name.startswith("v.blk.0.") and t.name.endswith(
        "conv_exp.weight") and len(t.shape) == 4]
    if stage0:
        widest = (size // 4) ** 2 * max(stage0) * 4
        return weights, int(CALIBRATION["vision_stage0_activations"] * widest)
    return weights, int(CALIBRATION["vision_bytes_per_pixel"] * size * size)


def python_baseline() -> int:
    """This process's anonymous memory now (what it holds before any model is loaded)."""
    return rss()["rss_anon"]


def rss(status: str = "/proc/self/status") -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of a process, in bytes (keys rss_anon, rss_file, rss, rss_peak)."""
    from agent.health import process_memory

    out = process_memory(status)
    return {k: out.get(k, 0) for k in ("rss_anon", "rss_file", "rss", "rss_peak")}


# --- candidate settings, fastest first ------------------------------------------------------------------------


def candidates(model: ModelConfig, cfg: MemoryConfig, cpu: Cpu, info: GgufInfo, has_projector: bool) -> list[Setting]:
    """Every setting the config allows, best first (bench/RESULTS.md): repacking decodes faster; a resident
    projector saves its load on each image; an f16 cache (exact) over q8_0 (no measurable speed difference here);
    then the largest ubatch (prefill speed barely depends on it from 64 tokens up; it only costs memory)."""
    any_repack = any(cpu.repacks(t) for t in info.tensors)
    repacks = [True, False] if cfg.repack == "auto" else [bool(cfg.repack)]
    if not any_repack:
        repacks = [False]
    kv_types = ["f16", "q8_0"] if cfg.kv_type == "auto" else [cfg.kv_type]
    if cfg.flash_attn is False:  # a quantized V cache needs flash attention
        kv_types = [kv for kv in kv_types if kv == "f16"]
        if not kv_types:
            raise MemoryPlanError("memory.kv_type q8_0 needs flash attention: set memory.flash_attn to auto or true")
    ubatches = sorted({u for u in (model.n_ubatch, 512, 256, 128, 64) if u <= model.n_ubatch}, reverse=True)
    residency = {"auto": [True, False], "resident": [True], "on_demand": [False]}[cfg.projector]
    if not has_projector:
        residency = [True]
    out = []
    for repack in repacks:
        for resident in residency:
            for kv in kv_types:
                for ub in ubatches:
                    out.append(Setting(True, repack, model.n_ctx, kv, ub, resident, _flash(cfg, kv)))
    out.append(Setting(False, False, model.n_ctx, kv_types[0], ubatches[0], residency[0], _flash(cfg, kv_types[0])))
    return out


def _flash(cfg: MemoryConfig, kv_type: str) -> bool:
    return cfg.flash_attn is True or (cfg.flash_attn == "auto" and kv_type != "f16")


def manual_setting(model: ModelConfig, cfg: MemoryConfig) -> Setting:
    kv = "f16" if cfg.kv_type == "auto" else cfg.kv_type
    if kv != "f16" and cfg.flash_attn is False:
        raise MemoryPlanError("memory.kv_type q8_0 needs flash attention: set memory.flash_attn to auto or true")
    return Setting(True, cfg.repack is not False, model.n_ctx, kv, model.n_ubatch, cfg.projector != "on_demand",
                   _flash(cfg, kv))


# --- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The chosen setting (None: nothing fits), the budget, and every setting considered."""

    model_path: str
    budget: Budget
    chosen: Estimate | None
    table: list[Estimate]
    mode: str
    release_cold: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.chosen is not None and self.chosen.need <= self.budget.usable

    def summary(self) -> str:
        if self.chosen is None:
            return f"nothing fits {_mib(self.budget.usable)} MiB"
        e = self.chosen
        return (f"{e.setting.label()}: anonymous {_mib(e.anon)} MiB + hot file {_mib(e.hot_file)} MiB = "
                f"{_mib(e.need)} MiB of {_mib(self.budget.usable)} MiB usable ({self.budget.source} "
                f"{_mib(self.budget.limit)} MiB less margin {_mib(self.budget.margin)} MiB)")

    def lines(self, rows: int = 8) -> list[str]:
        """Human-readable lines for `gemma-agent check` and the log."""
        b = self.budget
        out = [f"memory      budget {_mib(b.limit)} MiB ({b.source}), margin {_mib(b.margin)} MiB, "
               f"usable {_mib(b.usable)} MiB; mode {self.mode}"]
        if self.chosen is not None:
            e = self.chosen
            verdict = "fits" if self.fits else "DOES NOT FIT (manual mode: loading anyway)"
            out.append(f"memory plan {e.setting.label()} -> {verdict}")
            out.append(f"  anonymous {_mib(e.anon)} MiB = repacked weights {_mib(e.repacked)} + KV cache "
                       f"{_mib(e.kv)} + compute {_mib(e.compute)} + vocabulary {_mib(e.vocab)} + projector "
                       f"{_mib(e.projector)} + python {_mib(e.baseline)} + other {_mib(e.fixed)}")
            out.append(f"  file-backed: hot {_mib(e.hot_file)} MiB read per token, "
                       f"{_mib(e.mapped_file - e.hot_file)} MiB cold; {_mib(e.read_per_token)} MiB read per "
                       f"decoded token in all" + ("; cold pages dropped after load" if self.release_cold else ""))
        else:
            out.append(f"memory plan REFUSED: no setting fits {_mib(b.usable)} MiB")
            if self.table:
                least = min(self.table, key=lambda e: e.need)
                weights = least.repacked + least.hot_file
                out.append(f"  reason: the smallest setting ({least.setting.label()}) needs {_mib(least.need)} MiB; "
                           f"the weights read for every token alone are {_mib(weights)} MiB (repacked "
                           f"{_mib(least.repacked)} + mapped {_mib(least.hot_file)}), "
                           + ("more than the whole budget" if weights > b.usable else
                              f"leaving {_mib(b.usable - weights)} MiB for KV cache, compute and Python"))
        out.extend(self.notes)
        shown = self.table if self.chosen is None else self.table[:rows]
        out.append(f"  {'setting':<46} {'anon':>6} {'hot':>6} {'need':>6}  verdict (MiB)")
        for e in shown:
            verdict = "fits" if e.need <= b.usable else f"over by {_mib(e.need - b.usable)}"
            mark = "*" if e is self.chosen else " "
            out.append(f" {mark}{e.setting.label():<46} {_mib(e.anon):>6} {_mib(e.hot_file):>6} "
                       f"{_mib(e.need):>6}  {verdict}")
        if len(self.table) > len(shown):
            out.append(f"  ... {len(self.table) - len(shown)} slower settings not shown")
        return out

    def refusal(self) -> str:
        return "\n".join([f"{self.model_path}: does not fit the memory budget", *self.lines()])

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for llama_cpp.Llama (use `model_params(repack=...)` around the constructor)."""
        if self.chosen is None:
            raise MemoryPlanError(self.refusal())
        s = self.chosen.setting
        return {"use_mmap": s.mmap, "n_ubatch": s.n_ubatch, "type_k": GGML_TYPE_IDS[s.kv_type],
                "type_v": GGML_TYPE_IDS[s.kv_type], "flash_attn": s.flash_attn}


def _mib(n: int) -> int:
    return round(n / MiB)


def plan(info: GgufInfo, model: ModelConfig, cfg: MemoryConfig, projector: GgufInfo | None = None,
         cpu: Cpu | None = None, baseline: int | None = None, limit: Budget | None = None) -> Plan:
    """The fastest setting that fits (auto), or the configured one with its prediction (manual)."""
    cpu = cpu or Cpu.detect()
    base = python_baseline() if baseline is None else baseline
    limit = limit or budget(cfg)
    notes: list[str] = []
    if cfg.mode == "manual":
        table = [estimate(info, manual_setting(model, cfg), cpu, base, projector)]
        chosen: Estimate | None = table[0]
    else:
        table = [estimate(info, s, cpu, base, projector)
                 for s in candidates(model, cfg, cpu, info, projector is not None)]
        chosen = next((e for e in table if e.need <= limit.usable), None)
    result = Plan(info.path, limit, chosen, table, cfg.mode, notes=notes)
    if chosen is not None:
        whole = chosen.anon + chosen.mapped_file
        result.release_cold = cfg.release_cold is True or (cfg.release_cold == "auto" and chosen.setting.mmap
                                                            and whole > limit.usable)
    if chosen is not None and chosen is not table[0] and cfg.mode == "auto":
        notes.append(f"  faster settings need more than {_mib(limit.usable)} MiB (first: "
                     f"{table[0].setting.label()}, {_mib(table[0].need)} MiB)")
    return result


def plan_for(model: ModelConfig, cfg: MemoryConfig, baseline: int | None = None) -> Plan:
    """Read the model (and projector) headers named in the config and plan."""
    info = inspect(model.path)
    projector = inspect(model.mmproj) if model.mmproj else None
    return plan(info, model, cfg, projector, baseline=baseline)


# --- applying a plan ------------------------------------------------------------------------------------------

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


def mapped_ranges(path: str | os.PathLike[str], maps: str = "/proc/self/maps") -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of every mapping of `path` in this process."""
    st = os.stat(path)
    out = []
    for line in Path(maps).read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        dev, inode = parts[3], parts[4]
        major, minor = (int(x, 16) for x in dev.split(":"))
        if int(inode) != st.st_ino or os.makedev(major, minor) != st.st_dev:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, int(parts[2], 16)))
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def advise(path: str | os.PathLike[str], ranges: list[tuple[int, int]], advice: int) -> int:
    """madvise() the pages of file byte ranges wherever this process maps `path`; returns the bytes advised.
    Ranges are shrunk to whole pages, so a page shared with a neighbouring tensor is left alone."""
    done = 0
    for lo, hi, offset in mapped_ranges(path):
        for start, end in ranges:
            a = max(start, offset)
            b = min(end, offset + (hi - lo))
            a = -(-a // PAGE) * PAGE
            b = b // PAGE * PAGE
            if b <= a:
                continue
            if _libc.madvise(lo + a - offset, b - a, advice) != 0:
                err = ctypes.get_errno()
                log.warning("madvise(%d) on %s failed: %s", advice, path, os.strerror(err))
                continue
            done += b - a
    return done


def release_cold_pages(path: str | os.PathLike[str], est: Estimate) -> int:
    """Drop the cold pages (per-layer-embedding table, file copy of repacked weights) from this process and from
    the page cache, mark the table random-access (no read-ahead when a row comes back), and ask the kernel to
    read the hot pages back ahead of the first token. Returns the bytes dropped."""
    dropped = advise(path, est.cold_ranges, mmap.MADV_DONTNEED)
    advise(path, est.cold_ranges, mmap.MADV_RANDOM)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.warning("cannot reopen %s to drop its cold pages: %s", path, exc)
        return dropped
    try:
        for start, end in est.cold_ranges:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    advise(path, est.hot_ranges, mmap.MADV_WILLNEED)
    return dropped


@functools.cache
def _malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_heap() -> bool:
    """Give memory freed inside the C heap back to the kernel (glibc malloc_trim); False where there is none.

    Without it a projector freed and loaded again leaves ~20 MiB more anonymous memory per cycle on the tiny test
    projector: glibc raises its mmap threshold after the first free, so the second load lands in the heap."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


def file_rss(path: str | os.PathLike[str], smaps: str = "/proc/self/smaps") -> int:
    """Bytes of `path` resident and mapped in this process (the file's share of RssFile)."""
    st = os.stat(path)
    total, inside = 0, False
    for line in Path(smaps).read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
            major, minor = (int(x, 16) for x in head[3].split(":"))
            inside = head[4].isdigit() and int(head[4]) == st.st_ino and os.makedev(major, minor) == st.st_dev
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def describe_estimate(e: Estimate) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (MiB), for the bench."""
    out: dict[str, Any] = {k: round(v / MiB, 1) for k, v in dataclasses.asdict(e).items() if isinstance(v, int)}
    out.update(anon=round(e.anon / MiB, 1), need=round(e.need / MiB, 1), setting=e.setting.label())
    return out
