"""Predicted bytes of one load setting: anonymous memory (repacked weights, KV cache, compute buffers, vocabulary,
projector, Python) and the file pages every decoded token reads. Sizes follow llama.cpp's own rules
(llama-kv-cache*.cpp, ggml-cpu/repack.cpp, models/gemma3n.cpp); the few that depend on the allocator are calibrated
against measured RSS (CALIBRATION; bench/memory_cap.py and bench/RESULTS.md)."""

from __future__ import annotations

import dataclasses
import mmap
import sys
from dataclasses import dataclass, field
from typing import Any

from agent.gguf import GgufInfo
from agent.memory.probe import MiB, python_baseline
from agent.memory.shape import GET_ROWS_TABLES, Cpu, Q, Shape, row_bytes
from agent.memory.tokens import PATCH_MERGE, audio_tokens_for, image_tokens

PAGE = mmap.PAGESIZE
KV_TYPES = {"f16": Q.F16, "q8_0": Q.Q8_0}

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
    "vision_bytes_per_pixel": 960,  # other projectors without MobileNetV5 stage-0 tensors
    # gemma4v (a ViT over 16 px patches, pooled 3 x 3): float32 activations per patch, in units of its width;
    # Gemma 4 E2B's 768-wide encoder measured +36/+130/+470 MiB for 81/256/920 tokens (bench/RESULTS.md)
    "vit_floats_per_patch_width": 19.3,
    # gemma4a (conformer): per audio token (25 per second), in units of its width; E2B's 1024-wide encoder measured
    # +4/+21 MiB for 2/5 s of speech (an upper bound for short clips)
    "conformer_floats_per_token_width": 58,
    # whisper.cpp (speech-to-text beside the model): its weights are read into anonymous memory, plus encoder and
    # decoder buffers; a whisper base.en-shaped model (141 MiB file) holds 240 MiB after a transcription
    "whisper_anon_per_file_byte": 1.7,
}


@dataclass(frozen=True)
class MediaUse:
    """The largest media one turn hands the projector: a square camera frame of `image_side` px
    (camera.input_size) and `audio_s` seconds of speech (vad.max_utterance_s)."""

    image_side: int = 768
    audio_s: float = 15.0


LARGEST_MEDIA = MediaUse()  # the defaults: the largest camera.input_size, the default vad.max_utterance_s


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
    swa_full: bool = True  # LocalModel keeps a full-size sliding-window cache (exact prefix reuse)

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
    speech: int = 0  # a speech-to-text model loaded beside it (whisper.cpp)
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
                + self.fixed + self.speech)

    @property
    def need(self) -> int:
        """Steady state: anonymous + hot file pages. While an image is encoded the hot file pages may be dropped
        (and read again afterwards), so that moment needs anonymous + the projector's transient bytes."""
        return max(self.anon + self.hot_file + self.code, self.anon + self.projector_transient)


def estimate(info: GgufInfo, setting: Setting, cpu: Cpu | None = None, baseline: int | None = None,
             projector: GgufInfo | None = None, n_tokens: int | None = None, n_kv: int | None = None,
             speech: int = 0, media: MediaUse = LARGEST_MEDIA) -> Estimate:
    """Predict the memory of `info` loaded with `setting`. `n_tokens` (default: a full ubatch) and `n_kv` (default:
    the whole context) size the compute buffer; `baseline` defaults to this process's anonymous memory now."""
    cpu = cpu or Cpu.detect()
    shape = Shape.of(info)
    est = Estimate(setting)
    est.baseline = python_baseline() if baseline is None else baseline
    est.speech = speech
    cal = CALIBRATION
    tied = not any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        start, end = info.data_offset + t.offset, info.data_offset + t.offset + t.nbytes
        table = t.name in GET_ROWS_TABLES  # read by rows: one row per token
        matmul = not table or (t.name == "token_embd.weight" and tied)  # read whole for every token
        row = row_bytes(t.type, t.shape[0])
        unused = unused_kv_weight(t.name, shape)  # loaded (and repacked), never read: cold once loaded
        if table:
            est.read_per_token += row
        if matmul and not unused:
            est.read_per_token += t.nbytes
        if not setting.mmap:  # everything is read into anonymous memory; a tied table is loaded twice
            est.repacked += t.nbytes * (2 if table and matmul else 1)
            continue
        if matmul and setting.repack and cpu.repacks(t):
            est.repacked += t.nbytes  # the copy is anonymous; the file pages are cold after the load
            est.cold_ranges.append((start, end))
            if table:
                est.hot_file += _pages(row)
        elif matmul and not unused:
            est.hot_file += t.nbytes
            est.hot_ranges.append((start, end))
        elif unused:
            est.cold_ranges.append((start, end))
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
        weights, compute = projector_bytes(projector, media)
        est.projector = weights if setting.projector_resident else 0
        est.projector_transient = compute + (0 if setting.projector_resident else weights)
    return est


def unused_kv_weight(name: str, shape: Shape) -> bool:
    """K/V projections of a layer that reads another layer's KV cache (Gemma 3n, Gemma 4: the published files keep
    them): llama.cpp loads them, its graph never multiplies them (models/gemma4.cpp has_kv)."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in ("attn_k", "attn_v", "attn_k_norm"):
        return False
    layer = int(parts[1])
    return layer < shape.n_layer and not shape.kv_layers[layer]


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
        total += cells * (row_bytes(kv_type, shape.head_k[il] * heads) + row_bytes(kv_type, shape.head_v[il] * heads))
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
                 * max(shape.head_k) + 2 * kv)  # + the causal masks (sliding and global)
    if not s.flash_attn:
        per_token += shape.n_head * kv  # the attention scores, materialized without flash attention
    return int(cal["turn_fixed_bytes"] + 4 * cal["act_width_fixed_floats"] * width + 4 * per_token * n)


def projector_bytes(info: GgufInfo, media: MediaUse = LARGEST_MEDIA) -> tuple[int, int]:
    """A libmtmd projector: (weights, compute while encoding the largest image or clip of `media`). clip.cpp
    reads every tensor into anonymous memory; its compute buffer is touched while an image or clip is encoded
    (one at a time: a projector with both encoders needs the larger of the two)."""
    weights = sum(t.nbytes for t in info.tensors)
    md, cal = info.metadata, CALIBRATION
    vision, audio = info.projector_types()
    size = int(md.get("clip.vision.image_size", 0) or 0)
    stage0 = [t.shape[3] for t in info.tensors if t.name.startswith("v.blk.0.") and t.name.endswith(
        "conv_exp.weight") and len(t.shape) == 4]
    compute = 0
    if stage0:
        compute = int(cal["vision_stage0_activations"] * (size // 4) ** 2 * max(stage0) * 4)
    elif vision == "gemma4v":
        patches = image_tokens(info, media.image_side) * PATCH_MERGE ** 2
        width = int(md.get("clip.vision.embedding_length", 0) or 0)
        compute = int(cal["vit_floats_per_patch_width"] * 4 * width * patches)
    elif vision:
        compute = int(cal["vision_bytes_per_pixel"] * size * size)
    if audio == "gemma4a":
        width = int(md.get("clip.audio.embedding_length", 0) or 0)
        clip = cal["conformer_floats_per_token_width"] * 4 * width * audio_tokens_for(info, media.audio_s)
        compute = max(compute, int(clip))
    return weights, compute


def whisper_bytes(file_size: int) -> int:
    """Anonymous memory of a whisper.cpp model of this file size, loaded and transcribing."""
    return int(CALIBRATION["whisper_anon_per_file_byte"] * file_size)


def describe_estimate(e: Estimate) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (MiB), for the bench."""
    out: dict[str, Any] = {k: round(v / MiB, 1) for k, v in dataclasses.asdict(e).items() if isinstance(v, int)}
    out.update(anon=round(e.anon / MiB, 1), need=round(e.need / MiB, 1), setting=e.setting.label())
    return out
