"""Random-weight model files with the real tensor layouts, for tests and benchmarks (no real weights here).

Gemma 3n weights cannot be obtained on the machines that build this project, yet the tests must run the real
llama.cpp / libmtmd / whisper.cpp loading, tokenizing and evaluation code. These writers produce files those
libraries accept, from fixed seeds (the same bytes every run):

- `write_gemma3n_text`: arch `gemma3n` with every tensor llama.cpp creates for it, the Gemma 3 tokenizer copied
  from a Gemma 3 GGUF, optionally a Gemma chat template. `TINY` (2 layers, n_embd 32, ~38 MiB) for tests;
  `E2B` / `E4B` (published shapes, F16 source written in slices so memory stays bounded) for the bench.
- `write_gemma3nv_projector`: a MobileNetV5 `gemma3nv` vision projector (256 tokens per image).
- `write_gemma4a_projector`: a Gemma 4 audio (conformer, `gemma4a`) projector; pairs with any text model of the
  same n_embd, here the Gemma 3n one (llama.cpp implements no Gemma 3n audio encoder).
- `write_whisper_ggml`: a whisper.cpp model in its legacy ggml format, for pywhispercpp.

Edges found (llama-cpp-python 0.3.36, pywhispercpp 1.5.1). Those that "abort" kill the process (SIGABRT), they
do not raise: keep them out of any test that must survive, or run them in a subprocess.

- Text: a sliding-window pattern without a sliding layer aborts (`GGML_ASSERT(hparams.is_swa_any())`); hence
  TINY has 2 layers (one sliding, one global). Embedding rows must equal the token count. llama.cpp hard-codes
  4 altup inputs, laurel rank 64 and 256 per-layer dims, so `per_layer_token_embd` is always
  {256 x n_layer, n_vocab}: the main size cost, kept small with TQ1_0.
- Vision: mtmd resizes every bitmap (any size, even 1 x 1) to the projector's own square `image_size`, so the
  number of image tokens does not depend on the bitmap; it is `image_size / patch_size` (not squared), and the
  network must output exactly that many (16 x 16 from MobileNetV5's fusion adapter), else
  `GGML_ABORT("Invalid number of output tokens")` aborts at the first encode (`mtmd_init_from_file` and
  `mtmd_tokenize` still succeed); `write_gemma3nv_projector` refuses such shapes. The output width is read from
  `mm.input_projection.weight` ne[0], the vision channel count, which must equal the text model's n_embd (else
  `mtmd_init_from_file` returns NULL). A 0 x 0 bitmap makes `mtmd_tokenize` return 2. Image embeddings are
  decoded causally in n_batch pieces, so n_batch below 256 works.
- Audio: `gemma3na` tensors in a projector are skipped (no audio support); the `gemma4a` conformer works with a
  Gemma 3n text model (mtmd checks only n_embd). Its tokens grow with the audio (25 per second, 30 s chunks of
  750 tokens, no padding to a fixed window). 0 samples: `mtmd_tokenize` returns 2; exactly 1 sample aborts
  (`GGML_ASSERT(buf.size() > sizeof(float))`); 2 samples give 1 token.
- whisper.cpp: matrices, conv kernels and the token embedding must be F16 (an all-F32 model aborts in
  whisper_full); norms, biases and positional embeddings F32. The vocabulary needs the lone-space token (looked
  up by text: `IndexError: map::at` without it) and valid UTF-8 strings.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

Q = GGMLQuantizationType
SEED = 20250626  # one fixed seed for every file; each tensor's stream is keyed by its name
SLICE_ELEMENTS = 1 << 24  # tensors are generated and written in slices of at most this many elements


# ---------------------------------------------------------------------------------------------------------
# Tensor specs and the streaming writer
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor: name, ggml shape (ne0 first), storage type and how to fill it."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    fill: str = "normal"  # normal (scaled by `scale`) | ones | const (every element = `scale`); quantized types:
    #                        random blocks with d = scale
    scale: float = 0.02

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        if self.shape[0] % block:
            raise ValueError(f"{self.name}: ne0 {self.shape[0]} is not a multiple of the {self.qtype.name} "
                             f"block size {block}")
        return self.n_elements // block * size


# byte offset of the f16 scale `d` inside one block, for the quantized types we fill directly
_SCALE_OFFSET = {Q.Q4_0: 0, Q.Q8_0: 0, Q.TQ1_0: 52, Q.TQ2_0: 64}


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def tensor_slices(spec: TensorSpec, seed: int = SEED) -> Iterator[np.ndarray]:
    """The tensor's bytes as arrays, slice by slice (deterministic: depends only on name, spec and seed)."""
    rng = _rng(spec.name, seed)
    block, size = GGML_QUANT_SIZES[spec.qtype]
    if spec.qtype in (Q.F32, Q.F16):
        dtype = np.float32 if spec.qtype == Q.F32 else np.float16
        left = spec.n_elements
        while left:
            n = min(left, SLICE_ELEMENTS)
            if spec.fill in ("ones", "const"):
                yield np.full(n, 1.0 if spec.fill == "ones" else spec.scale, dtype=dtype)
            else:
                yield (rng.standard_normal(n, dtype=np.float32) * np.float32(spec.scale)).astype(dtype)
            left -= n
        return
    if spec.qtype not in _SCALE_OFFSET:
        raise ValueError(f"{spec.name}: cannot fill {spec.qtype.name} directly; write F16 and quantize")
    scale = np.frombuffer(np.float16(spec.scale).tobytes(), dtype=np.uint8)
    off = _SCALE_OFFSET[spec.qtype]
    left = spec.n_elements // block
    per_slice = max(1, SLICE_ELEMENTS // block)
    while left:
        n = min(left, per_slice)
        blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
        blocks[:, off:off + 2] = scale  # random quants, one sane scale: no NaN or inf from random bits
        yield blocks.reshape(-1)
        left -= n


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


KV = tuple[str, Any, GGUFValueType, "GGUFValueType | None"]


def write_gguf(path: str | os.PathLike[str], arch: str, kvs: Sequence[KV], tensors: Sequence[TensorSpec],
               seed: int = SEED) -> Path:
    """Write a GGUF atomically, generating tensor data slice by slice (memory stays at one slice)."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            for key, value, vtype, sub in kvs:
                writer.add_key_value(key, value, vtype, sub_type=sub)
            for t in tensors:
                np_dtype = np.float16 if t.qtype == Q.F16 else np.float32
                raw = None if t.qtype in (Q.F32, Q.F16) else t.qtype
                writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np_dtype), t.nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            assert writer.fout is not None
            out = writer.fout[0]
            for t in tensors:
                writer.write_padding(out, out.tell())
                written = 0
                for chunk in tensor_slices(t, seed):
                    chunk.tofile(out)
                    written += chunk.nbytes
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
                writer.write_padding(out, t.nbytes)
        finally:
            writer.close()
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: copied from a Gemma 3 GGUF
# ---------------------------------------------------------------------------------------------------------

_SCALAR_FMT = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
               GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
               GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
               GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass
class Tokenizer:
    """The `tokenizer.*` metadata of a GGUF, in file order, ready to be written again."""

    kvs: list[KV] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.get("tokenizer.ggml.tokens"))

    def get(self, key: str) -> Any:
        for k, value, _t, _s in self.kvs:
            if k == key:
                return value
        raise KeyError(key)

    def padded(self, n_vocab: int) -> Tokenizer:
        """Append unused `[PAD<i>]` tokens (score -10000, type UNUSED) up to `n_vocab`."""
        extra = n_vocab - self.n_tokens
        if extra < 0:
            raise ValueError(f"cannot pad {self.n_tokens} tokens down to {n_vocab}")
        grown: dict[str, list[Any]] = {
            "tokenizer.ggml.tokens": [f"[PAD{i}]".encode() for i in range(self.n_tokens, n_vocab)],
            "tokenizer.ggml.scores": [-10000.0] * extra,
            "tokenizer.ggml.token_type": [5] * extra,  # 5 = UNUSED
        }
        return Tokenizer([(k, list(v) + grown[k] if k in grown else v, t, s) for k, v, t, s in self.kvs])


def read_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read every `tokenizer.*` key of a GGUF (gguf.GGUFReader takes ~15 s on a 262k vocabulary; this ~0.2 s)."""
    try:
        return _read_tokenizer(path)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: truncated or malformed GGUF header ({exc})") from None


def _read_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    if os.path.getsize(path) < 24:
        raise ValueError(f"{path}: not a GGUF file (only {os.path.getsize(path)} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        pos = 8
        _n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
        pos += 16
        tok = Tokenizer()

        def string(p: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            return bytes(buf[p + 8:p + 8 + n]), p + 8 + n

        def value(p: int, vtype: GGUFValueType) -> tuple[Any, int]:
            if vtype == GGUFValueType.STRING:
                return string(p)
            fmt = _SCALAR_FMT[vtype]
            return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)

        for _ in range(n_kv):
            key_b, pos = string(pos)
            key = key_b.decode()
            (vtype_i,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            vtype = GGUFValueType(vtype_i)
            sub: GGUFValueType | None = None
            if vtype == GGUFValueType.ARRAY:
                sub_i, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                sub = GGUFValueType(sub_i)
                if sub == GGUFValueType.STRING:
                    items = []
                    for _i in range(count):
                        item, pos = string(pos)
                        items.append(item)
                    val: Any = items
                else:
                    dtype = np.dtype(_SCALAR_FMT[sub])
                    val = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
                    pos += dtype.itemsize * count
            else:
                val, pos = value(pos, vtype)
                if vtype == GGUFValueType.STRING:
                    val = val.decode("utf-8")
            if key.startswith("tokenizer."):
                tok.kvs.append((key, val, vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in tok.kvs):
        raise ValueError(f"{path}: no tokenizer.ggml.tokens")
    return tok


# The Gemma turn format as a Jinja template (same text out as agent.llm.prompt.gemma_prompt for plain turns): BOS,
# the system prompt folded into the first user turn, "assistant" spoken as "model", user/model alternation
# enforced, text trimmed, image/audio parts as Gemma 3n's soft tokens, then an open model turn.
GEMMA3N_CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(prefix='', turns=messages) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set head = messages[0]['content'] -%}
  {%- set ns.prefix = (head if head is string else head[0]['text']) ~ '\\n\\n' -%}
  {%- set ns.turns = messages[1:] -%}
{%- endif -%}
{%- for turn in ns.turns -%}
  {%- set is_user = turn['role'] == 'user' -%}
  {%- if is_user != (loop.index0 is even) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ ('model' if turn['role'] == 'assistant' else turn['role']) ~ '\\n' -}}
  {%- if loop.first -%}{{- ns.prefix -}}{%- endif -%}
  {%- if turn['content'] is string -%}
    {{- turn['content'] | trim -}}
  {%- else -%}
    {%- for part in turn['content'] -%}
      {%- if part['type'] == 'image' -%}{{- '<image_soft_token>' -}}
      {%- elif part['type'] == 'audio' -%}{{- '<audio_soft_token>' -}}
      {%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""


# ---------------------------------------------------------------------------------------------------------
# Gemma 3n text model
# ---------------------------------------------------------------------------------------------------------

N_ALTUP, LAUREL_RANK, PER_LAYER_DIM = 4, 64, 256  # hard-coded in llama.cpp (llama-hparams.h)


@dataclass(frozen=True)
class TextShape:
    """Hyper-parameters of a Gemma 3n text model and the storage types of its tensors."""

    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    shared_kv_layers: int
    n_vocab: int | None = None  # None: the tokenizer's count; larger: pad with unused tokens
    per_layer_type: GGMLQuantizationType = Q.F16
    token_embd_type: GGMLQuantizationType = Q.F16
    matrix_type: GGMLQuantizationType = Q.F16
    context_length: int = 32768
    sliding_window: int = 512
    swa_period: int = 5  # every 5th layer global
    sparse_layers: int = 10  # activation sparsity on the first 10 layers (0.95 quantile)

    def sliding_pattern(self) -> list[bool]:
        return [(i + 1) % self.swa_period != 0 for i in range(self.n_layer)]


# Tiny test model: 2 layers (one sliding, one global: a pattern with no sliding layer aborts llama.cpp).
TINY = TextShape("tiny", n_layer=2, n_embd=32, n_ff=64, n_head=1, n_head_kv=1, head_dim=32, shared_kv_layers=0,
                 per_layer_type=Q.TQ1_0, token_embd_type=Q.Q4_0, swa_period=2, sparse_layers=1)
# Deep tiny model: 24 layers, so the last 4 reuse earlier layers' KV (llama.cpp fixes n_layer_kv_from_start at 20
# for gemma3n) as E2B's last 10 do; F32 matrices, so a row's result does not depend on the rows beside it.
DEEP = TextShape("deep", n_layer=24, n_embd=32, n_ff=64, n_head=1, n_head_kv=1, head_dim=32, shared_kv_layers=4,
                 per_layer_type=Q.TQ1_0, token_embd_type=Q.Q4_0, matrix_type=Q.F32, swa_period=2, sparse_layers=1)
# Published shapes (google/gemma-3n-E2B-it, -E4B-it config.json); 262,144 embedding rows as in the published
# GGUFs (their Q8_0 size matches 262,144 rows to the kilobyte, not the converter's newer 262,400 padding).
E2B = TextShape("E2B", n_layer=30, n_embd=2048, n_ff=8192, n_head=8, n_head_kv=2, head_dim=256, shared_kv_layers=10)
E4B = TextShape("E4B", n_layer=35, n_embd=2048, n_ff=16384, n_head=8, n_head_kv=2, head_dim=256,
                shared_kv_layers=15)
SHAPES = {s.name: s for s in (TINY, E2B, E4B)}


def gemma3n_text_tensors(shape: TextShape, n_vocab: int) -> list[TensorSpec]:
    """Every tensor llama.cpp creates for LLM_ARCH_GEMMA3N (src/models/gemma3n.cpp), in a converter-like order."""
    e, m, f32 = shape.n_embd, shape.matrix_type, Q.F32
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    plt = PER_LAYER_DIM * shape.n_layer
    out = [
        TensorSpec("token_embd.weight", (e, n_vocab), shape.token_embd_type, scale=0.01),
        TensorSpec("per_layer_token_embd.weight", (plt, n_vocab), shape.per_layer_type, scale=0.02),
        TensorSpec("per_layer_model_proj.weight", (e, plt), Q.F16),
        TensorSpec("per_layer_proj_norm.weight", (PER_LAYER_DIM,), f32, "ones"),
        TensorSpec("altup_proj.weight", (e, e, N_ALTUP - 1), Q.F16),
        TensorSpec("altup_unembd_proj.weight", (e, e, N_ALTUP - 1), Q.F16),
        TensorSpec("output_norm.weight", (e,), f32, "ones"),
    ]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out += [
            TensorSpec(b + "attn_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "attn_q.weight", (e, q_dim), m),
            TensorSpec(b + "attn_k.weight", (e, kv_dim), m),
            TensorSpec(b + "attn_v.weight", (e, kv_dim), m),
            TensorSpec(b + "attn_output.weight", (q_dim, e), m),
            TensorSpec(b + "attn_q_norm.weight", (shape.head_dim,), f32, "ones"),
            TensorSpec(b + "attn_k_norm.weight", (shape.head_dim,), f32, "ones"),
            TensorSpec(b + "post_attention_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "ffn_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "ffn_gate.weight", (e, shape.n_ff), m),
            TensorSpec(b + "ffn_up.weight", (e, shape.n_ff), m),
            TensorSpec(b + "ffn_down.weight", (shape.n_ff, e), m),
            TensorSpec(b + "post_ffw_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "inp_gate.weight", (e, PER_LAYER_DIM), m),
            TensorSpec(b + "proj.weight", (PER_LAYER_DIM, e), m),
            TensorSpec(b + "post_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "altup_correct_coef.weight", (N_ALTUP, N_ALTUP), Q.F16),
            TensorSpec(b + "altup_correct_scale.weight", (e,), f32, "ones"),
            TensorSpec(b + "altup_predict_coef.weight", (N_ALTUP, N_ALTUP * N_ALTUP), Q.F16),
            TensorSpec(b + "altup_router.weight", (e, N_ALTUP), Q.F16),
            TensorSpec(b + "altup_router_norm.weight", (e,), f32, "ones"),
            TensorSpec(b + "laurel_l.weight", (e, LAUREL_RANK), Q.F16),
            TensorSpec(b + "laurel_r.weight", (LAUREL_RANK, e), Q.F16),
            TensorSpec(b + "laurel_post_norm.weight", (e,), f32, "ones"),
        ]
    return out


def write_lora(path: str | os.PathLike[str], shape: TextShape, rank: int = 4, alpha: float = 8.0,
               targets: tuple[str, ...] = ("attn_q", "attn_v")) -> Path:
    """A LoRA adapter GGUF for a Gemma 3n text model of `shape`, laid out as llama.cpp's convert_lora_to_gguf.py
    writes one: `<tensor>.lora_a` {n_in, rank} and `<tensor>.lora_b` {rank, n_out}, F32."""
    outs = {"attn_q": shape.n_head * shape.head_dim, "attn_k": shape.n_head_kv * shape.head_dim,
            "attn_v": shape.n_head_kv * shape.head_dim}
    tensors = []
    for i in range(shape.n_layer):
        for target in targets:
            name = f"blk.{i}.{target}.weight"
            tensors += [TensorSpec(name + ".lora_a", (shape.n_embd, rank), Q.F32, scale=0.05),
                        TensorSpec(name + ".lora_b", (rank, outs[target]), Q.F32, scale=0.05)]
    kvs = [_kv("general.type", "adapter", GGUFValueType.STRING),
           _kv("adapter.type", "lora", GGUFValueType.STRING),
           _kv("adapter.lora.alpha", alpha, GGUFValueType.FLOAT32)]
    return write_gguf(path, "gemma3n", kvs, tensors)


def _kv(key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> KV:
    return (key, value, vtype, sub)


def gemma3n_text_metadata(shape: TextShape, tokenizer: Tokenizer, chat_template: str | None) -> list[KV]:
    """The keys a converted Gemma 3n GGUF carries (those llama.cpp reads plus the informative ones)."""
    a, U32, F32, B = "gemma3n", GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL
    sparsity = [1.6448536 if i < shape.sparse_layers else 0.0 for i in range(shape.n_layer)]  # Phi^-1(0.95)
    kvs = [
        _kv("general.type", "model", GGUFValueType.STRING),
        _kv("general.name", f"Gemma 3n {shape.name} (synthetic random weights)", GGUFValueType.STRING),
        _kv("general.description", "Random weights with the real tensor layout, written by tests/support/synth.py",
            GGUFValueType.STRING),
        _kv(f"{a}.context_length", shape.context_length, U32),
        _kv(f"{a}.embedding_length", shape.n_embd, U32),
        _kv(f"{a}.block_count", shape.n_layer, U32),
        _kv(f"{a}.feed_forward_length", shape.n_ff, U32),
        _kv(f"{a}.attention.head_count", shape.n_head, U32),
        _kv(f"{a}.attention.head_count_kv", shape.n_head_kv, U32),
        _kv(f"{a}.attention.key_length", shape.head_dim, U32),
        _kv(f"{a}.attention.value_length", shape.head_dim, U32),
        _kv(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, F32),
        _kv(f"{a}.rope.freq_base", 1_000_000.0, F32),
        _kv(f"{a}.rope.freq_base_swa", 10_000.0, F32),
        _kv(f"{a}.attention.sliding_window", shape.sliding_window, U32),
        _kv(f"{a}.attention.sliding_window_pattern", shape.sliding_pattern(), GGUFValueType.ARRAY, B),
        _kv(f"{a}.final_logit_softcapping", 30.0, F32),
        _kv(f"{a}.altup.active_idx", 0, U32),
        _kv(f"{a}.altup.num_inputs", N_ALTUP, U32),
        _kv(f"{a}.embedding_length_per_layer_input", PER_LAYER_DIM, U32),
        _kv(f"{a}.attention.shared_kv_layers", shape.shared_kv_layers, U32),
        _kv(f"{a}.activation_sparsity_scale", sparsity, GGUFValueType.ARRAY, F32),
    ]
    return kvs + text_model_tail((shape.per_layer_type, shape.token_embd_type, shape.matrix_type), tokenizer,
                                 chat_template)


def text_model_tail(types: Sequence[GGMLQuantizationType], tokenizer: Tokenizer, chat_template: str | None
                    ) -> list[KV]:
    """The keys every synthetic text model ends with: the file type when all its tensors are F16/F32, the
    tokenizer's, and the chat template if any."""
    kvs = [_kv("general.file_type", 1, GGUFValueType.UINT32)] if set(types) <= {Q.F16, Q.F32} else []  # MOSTLY_F16
    kvs += tokenizer.kvs
    if chat_template is not None:
        kvs.append(_kv("tokenizer.chat_template", chat_template, GGUFValueType.STRING))
    return kvs


def tokenizer_for(tokenizer_from: str | os.PathLike[str], n_vocab: int | None) -> Tokenizer:
    """The tokenizer of a Gemma 3 GGUF, padded with unused tokens to `n_vocab` when that is larger."""
    tokenizer = read_tokenizer(tokenizer_from)
    return tokenizer.padded(n_vocab) if n_vocab and n_vocab != tokenizer.n_tokens else tokenizer


def write_gemma3n_text(path: str | os.PathLike[str], shape: TextShape, tokenizer_from: str | os.PathLike[str],
                       chat_template: str | bool | None = None, seed: int = SEED) -> Path:
    """Write a random-weight Gemma 3n text GGUF with `shape`, the tokenizer of `tokenizer_from` (a Gemma 3 GGUF)
    and, if asked, a chat template (True: GEMMA3N_CHAT_TEMPLATE; a string: that template)."""
    if not any(shape.sliding_pattern()):
        raise ValueError(f"{shape.name}: no sliding-window layer; llama.cpp aborts loading such a model")
    if shape.n_layer < 1 or shape.n_head * shape.head_dim <= 0 or shape.n_head % shape.n_head_kv:
        raise ValueError(f"{shape.name}: inconsistent shape {shape}")
    tokenizer = tokenizer_for(tokenizer_from, shape.n_vocab)
    template = GEMMA3N_CHAT_TEMPLATE if chat_template is True else (chat_template or None)
    kvs = gemma3n_text_metadata(shape, tokenizer, template)
    return write_gguf(path, "gemma3n", kvs, gemma3n_text_tensors(shape, tokenizer.n_tokens), seed)


# ---------------------------------------------------------------------------------------------------------
# Gemma 3n vision projector (MobileNetV5, clip.projector_type gemma3nv)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One MobileNetV5 block: edge residual (`er`), universal inverted residual (`uir`) or attention (`mqa`)."""

    kind: str
    out: int = 0  # output channels (er, uir)
    exp: int = 0  # expanded channels (er, uir)
    dw_start: int = 0  # uir: depthwise kernel before the expansion, 0 = none
    dw_mid: int = 0  # uir: depthwise kernel after the expansion (the stride-2 one at a stage start), 0 = none
    heads: int = 0  # mqa
    key_dim: int = 0  # mqa
    kv_stride: bool = False  # mqa: keys and values down-sampled by a stride-2 depthwise conv


@dataclass(frozen=True)
class VisionArch:
    """A MobileNetV5 encoder: stem, four stages (fused after stages 2 and 3), fusion adapter (MSFA)."""

    name: str
    stem: int
    stages: tuple[tuple[Block, ...], ...]
    msfa_exp: int  # fusion adapter expansion channels; its output is the text model's n_embd

    def n_blocks(self) -> int:
        return sum(len(s) for s in self.stages)


def _mqa_pair(c: int, heads: int, key_dim: int, kv_stride: bool, exp: int) -> tuple[Block, Block]:
    return (Block("mqa", heads=heads, key_dim=key_dim, kv_stride=kv_stride), Block("uir", out=c, exp=exp))


# A small network with every block kind: stride 32 overall, 16 x 16 fused output at image_size 512 (or 256/768).
TINY_VISION = VisionArch("tiny", stem=8, msfa_exp=64, stages=(
    (Block("er", out=8, exp=16),),
    (Block("uir", out=16, exp=16, dw_start=3, dw_mid=3),),
    (Block("uir", out=24, exp=32, dw_start=3, dw_mid=3), Block("mqa", heads=2, key_dim=8, kv_stride=True)),
    (Block("uir", out=32, exp=48, dw_start=3, dw_mid=3), Block("mqa", heads=2, key_dim=8)),
))

# Gemma 3n's MobileNetV5-300M, as recalled from timm's mobilenetv5_300m_enc definition (block kinds, kernels,
# expansions and widths; ~294 M parameters here vs the published ~300 M): close in size and shape, not verified
# tensor by tensor against a published projector.
MNV5_300M = VisionArch("mobilenetv5-300m", stem=64, msfa_exp=3840, stages=(
    (Block("er", out=128, exp=256), Block("er", out=128, exp=512), Block("er", out=128, exp=512)),
    (Block("uir", out=256, exp=768, dw_start=3, dw_mid=5),
     *(Block("uir", out=256, exp=1024, dw_start=k) for k in (5, 3, 5, 3))),
    (Block("uir", out=640, exp=1536, dw_start=5, dw_mid=5),
     *(Block("uir", out=640, exp=2560, dw_start=5) for _ in range(7)),
     Block("uir", out=640, exp=640),
     *(b for _ in range(13) for b in _mqa_pair(640, 12, 64, True, 1280))),
    (Block("uir", out=1280, exp=3840, dw_start=5, dw_mid=5),
     *(b for _ in range(19) for b in _mqa_pair(1280, 16, 96, False, 2560))),
))
VISION_ARCHS = {a.name: a for a in (TINY_VISION, MNV5_300M)}
IMAGE_TOKENS = 256  # the fusion adapter's fixed 16 x 16 output


def gemma3nv_tensors(arch: VisionArch, n_embd: int) -> list[TensorSpec]:
    """The tensors clip.cpp loads for a gemma3nv projector whose output width is `n_embd`."""
    f16, f32 = Q.F16, Q.F32

    def conv(name: str, k: int, cin: int, cout: int) -> TensorSpec:
        return TensorSpec(name, (k, k, cin, cout), f16, scale=(1.0 / (k * k * cin)) ** 0.5)

    def norm(name: str, c: int) -> TensorSpec:
        return TensorSpec(name, (c,), f32, "ones")

    out = [TensorSpec("v.conv_stem.conv.weight", (3, 3, 3, arch.stem), f32, scale=0.2),
           TensorSpec("v.conv_stem.conv.bias", (1, 1, arch.stem, 1), f32, scale=0.01),
           norm("v.conv_stem.bn.weight", arch.stem)]
    c = arch.stem
    fused: list[int] = []
    for s, stage in enumerate(arch.stages):
        for i, blk in enumerate(stage):
            p = f"v.blk.{s}.{i}."
            if blk.kind == "er":
                out += [conv(p + "conv_exp.weight", 3, c, blk.exp), norm(p + "bn1.weight", blk.exp),
                        conv(p + "conv_pwl.weight", 1, blk.exp, blk.out), norm(p + "bn2.weight", blk.out)]
                c = blk.out
            elif blk.kind == "uir":
                if blk.dw_start:
                    out += [TensorSpec(p + "dw_start.conv.weight", (blk.dw_start, blk.dw_start, 1, c), f16, scale=0.2),
                            norm(p + "dw_start.bn.weight", c)]
                out += [conv(p + "pw_exp.conv.weight", 1, c, blk.exp), norm(p + "pw_exp.bn.weight", blk.exp)]
                if blk.dw_mid:
                    out += [TensorSpec(p + "dw_mid.conv.weight", (blk.dw_mid, blk.dw_mid, 1, blk.exp), f16,
                                       scale=0.2), norm(p + "dw_mid.bn.weight", blk.exp)]
                out += [conv(p + "pw_proj.conv.weight", 1, blk.exp, blk.out), norm(p + "pw_proj.bn.weight", blk.out),
                        TensorSpec(p + "layer_scale.gamma", (1, 1, blk.out, 1), f32, "ones")]
                c = blk.out
            elif blk.kind == "mqa":
                hd = blk.heads * blk.key_dim
                out += [norm(p + "norm.weight", c),
                        conv(p + "attn.query.proj.weight", 1, c, hd),
                        conv(p + "attn.key.proj.weight", 1, c, blk.key_dim),
                        conv(p + "attn.value.proj.weight", 1, c, blk.key_dim),
                        conv(p + "attn.output.proj.weight", 1, hd, c)]
                if blk.kv_stride:
                    out += [TensorSpec(p + "attn.key.down_conv.weight", (3, 3, 1, c), f16, scale=0.2),
                            norm(p + "attn.key.norm.weight", c),
                            TensorSpec(p + "attn.value.down_conv.weight", (3, 3, 1, c), f16, scale=0.2),
                            norm(p + "attn.value.norm.weight", c)]
                out.append(TensorSpec(p + "layer_scale.gamma", (1, 1, c, 1), f32, "ones"))
            else:
                raise ValueError(f"unknown block kind {blk.kind!r}")
        if s >= 2:
            fused.append(c)
    fin = sum(fused)
    out += [conv("v.msfa.ffn.pw_exp.conv.weight", 1, fin, arch.msfa_exp),
            norm("v.msfa.ffn.pw_exp.bn.weight", arch.msfa_exp),
            conv("v.msfa.ffn.pw_proj.conv.weight", 1, arch.msfa_exp, n_embd),
            norm("v.msfa.ffn.pw_proj.bn.weight", n_embd),
            norm("v.msfa.norm.weight", n_embd),
            norm("mm.soft_emb_norm.weight", n_embd),
            TensorSpec("mm.input_projection.weight", (n_embd, n_embd), f16, scale=n_embd ** -0.5)]
    return out


def write_gemma3nv_projector(path: str | os.PathLike[str], text_n_embd: int, image_size: int = 512,
                             patch_size: int | None = None, arch: VisionArch = TINY_VISION,
                             seed: int = SEED) -> Path:
    """Write a MobileNetV5 `gemma3nv` projector for a text model of width `text_n_embd`: 256 tokens per image.

    mtmd resizes every image to `image_size` (a multiple of 256), and counts image_size / patch_size tokens;
    patch_size defaults to image_size / 256, the only value that matches what the network outputs.
    """
    if image_size <= 0 or image_size % IMAGE_TOKENS:
        raise ValueError(f"image_size must be a positive multiple of {IMAGE_TOKENS}, got {image_size}")
    patch = image_size // IMAGE_TOKENS if patch_size is None else patch_size
    if patch <= 0 or image_size // patch != IMAGE_TOKENS or image_size % patch:
        raise ValueError(f"patch_size {patch}: image_size / patch_size must be {IMAGE_TOKENS} (the network's "
                         f"16 x 16 output); libmtmd aborts the process on a mismatch")
    if text_n_embd <= 0:
        raise ValueError(f"text_n_embd must be positive, got {text_n_embd}")
    V, U32, F32 = "clip.vision.", GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kvs = [
        _kv("general.name", f"Gemma 3n vision projector ({arch.name}, synthetic random weights)", GGUFValueType.STRING),
        _kv("clip.has_vision_encoder", True, GGUFValueType.BOOL),
        _kv("clip.projector_type", "gemma3nv", GGUFValueType.STRING),
        _kv(V + "embedding_length", text_n_embd, U32),
        _kv(V + "feed_forward_length", 4 * text_n_embd, U32),
        _kv(V + "block_count", arch.n_blocks(), U32),
        _kv(V + "projection_dim", text_n_embd, U32),
        _kv(V + "attention.head_count", 8, U32),
        _kv(V + "attention.layer_norm_epsilon", 1e-6, F32),
        _kv(V + "image_size", image_size, U32),
        _kv(V + "patch_size", patch, U32),
        _kv(V + "image_mean", [0.0, 0.0, 0.0], GGUFValueType.ARRAY, F32),
        _kv(V + "image_std", [1.0, 1.0, 1.0], GGUFValueType.ARRAY, F32),
    ]
    return write_gguf(path, "clip", kvs, gemma3nv_tensors(arch, text_n_embd), seed)


# ---------------------------------------------------------------------------------------------------------
# Audio projector: Gemma 4's conformer (clip.projector_type gemma4a)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioShape:
    """A Gemma 4 audio conformer: two stride-2 convs over 128 mel bins, then conformer layers."""

    name: str
    n_embd: int
    n_head: int
    n_ff: int
    n_layer: int
    sscp_channels: tuple[int, int]
    n_mel: int = 128
    conv_kernel: int = 5  # the depthwise conv of each conformer layer (llama.cpp pads by 4: kernel 5)


TINY_AUDIO = AudioShape("tiny", n_embd=32, n_head=2, n_ff=64, n_layer=1, sscp_channels=(8, 8))
AUDIO_TOKENS_PER_SECOND = 25  # 100 mel frames per second, two stride-2 convs


def gemma4a_tensors(shape: AudioShape, text_n_embd: int) -> list[TensorSpec]:
    """The tensors clip.cpp loads for a gemma4a projector (tools/mtmd/clip.cpp, models/gemma4a.cpp)."""
    d, f16, f32 = shape.n_embd, Q.F16, Q.F32
    c0, c1 = shape.sscp_channels
    freq = shape.n_mel
    for _ in range(2):
        freq = (freq - 1) // 2 + 1
    dh = d // shape.n_head

    def mat(name: str, n_in: int, n_out: int) -> TensorSpec:
        return TensorSpec(name, (n_in, n_out), f16, scale=n_in ** -0.5)

    def norm(name: str, n: int = d) -> TensorSpec:
        return TensorSpec(name, (n,), f32, "ones")

    out = [TensorSpec("a.conv1d.0.weight", (3, 3, 1, c0), f16, scale=0.3), norm("a.conv1d.0.norm.weight", c0),
           TensorSpec("a.conv1d.1.weight", (3, 3, c0, c1), f16, scale=(9 * c0) ** -0.5),
           norm("a.conv1d.1.norm.weight", c1), mat("a.input_projection.weight", c1 * freq, d)]
    for i in range(shape.n_layer):
        p = f"a.blk.{i}."
        out += [norm(p + "ffn_norm.weight"), mat(p + "ffn_up.weight", d, shape.n_ff),
                mat(p + "ffn_down.weight", shape.n_ff, d), norm(p + "ffn_post_norm.weight"),
                norm(p + "attn_pre_norm.weight"),
                mat(p + "attn_q.weight", d, d), mat(p + "attn_k.weight", d, d), mat(p + "attn_v.weight", d, d),
                mat(p + "attn_out.weight", d, d),
                TensorSpec(p + "per_dim_scale.weight", (dh,), f32, "ones"),
                TensorSpec(p + "per_dim_k_scale.weight", (dh,), f32, "ones"),
                mat(p + "attn_k_rel.weight", d, d), norm(p + "attn_post_norm.weight"),
                norm(p + "conv_norm.weight"), mat(p + "conv_pw1.weight", d, 2 * d),
                TensorSpec(p + "conv_dw.weight", (shape.conv_kernel, d), f32, scale=0.3),  # ggml_ssm_conv: F32
                norm(p + "norm_conv.weight"), mat(p + "conv_pw2.weight", d, d),
                norm(p + "ffn_norm_1.weight"), mat(p + "ffn_up_1.weight", d, shape.n_ff),
                mat(p + "ffn_down_1.weight", shape.n_ff, d), norm(p + "ffn_post_norm_1.weight"),
                norm(p + "ln2.weight")]
    out += [mat("a.pre_encode.out.weight", d, d), norm("mm.a.soft_emb_norm.weight"),
            mat("mm.a.input_projection.weight", d, text_n_embd)]
    return out


def encoder_kvs(prefix: str, n_embd: int, n_ff: int, n_layer: int, projection_dim: int, n_head: int) -> list[KV]:
    """The keys every clip encoder has (`prefix`: clip.vision. or clip.audio.)."""
    U32 = GGUFValueType.UINT32
    return [_kv(prefix + "embedding_length", n_embd, U32), _kv(prefix + "feed_forward_length", n_ff, U32),
            _kv(prefix + "block_count", n_layer, U32), _kv(prefix + "projection_dim", projection_dim, U32),
            _kv(prefix + "attention.head_count", n_head, U32),
            _kv(prefix + "attention.layer_norm_epsilon", 1e-6, GGUFValueType.FLOAT32)]


def audio_encoder_kvs(shape: AudioShape, text_n_embd: int) -> list[KV]:
    """A gemma4a conformer's keys."""
    return [*encoder_kvs("clip.audio.", shape.n_embd, shape.n_ff, shape.n_layer, text_n_embd, shape.n_head),
            _kv("clip.audio.num_mel_bins", shape.n_mel, GGUFValueType.UINT32)]


def write_gemma4a_projector(path: str | os.PathLike[str], text_n_embd: int, shape: AudioShape = TINY_AUDIO,
                            seed: int = SEED) -> Path:
    """Write a Gemma 4 audio (`gemma4a`) projector whose embeddings feed a text model of width `text_n_embd`."""
    if text_n_embd <= 0:
        raise ValueError(f"text_n_embd must be positive, got {text_n_embd}")
    if shape.n_embd % shape.n_head:
        raise ValueError(f"n_embd {shape.n_embd} is not a multiple of n_head {shape.n_head}")
    kvs = [
        _kv("general.name", f"Gemma 4 audio projector ({shape.name}, synthetic random weights)", GGUFValueType.STRING),
        _kv("clip.has_audio_encoder", True, GGUFValueType.BOOL),
        _kv("clip.projector_type", "gemma4a", GGUFValueType.STRING),
        *audio_encoder_kvs(shape, text_n_embd),
    ]
    return write_gguf(path, "clip", kvs, gemma4a_tensors(shape, text_n_embd), seed)


# ---------------------------------------------------------------------------------------------------------
# whisper.cpp model (legacy ggml format) for pywhispercpp
# ---------------------------------------------------------------------------------------------------------

GGML_FILE_MAGIC = 0x67676D6C  # "ggml"
WHISPER_N_VOCAB = 51865  # multilingual: whisper.cpp derives the special-token ids from this count
WHISPER_N_TEXT_TOKENS = 50257  # byte-pair tokens stored in the file; the specials are added by whisper.cpp


@dataclass(frozen=True)
class WhisperShape:
    n_state: int = 16
    n_head: int = 1
    n_audio_layer: int = 1
    n_text_layer: int = 1
    n_audio_ctx: int = 1500
    n_text_ctx: int = 448
    n_mels: int = 80


def whisper_tensors(shape: WhisperShape) -> list[TensorSpec]:
    """whisper.cpp's tensor list (src/whisper.cpp, whisper_model_load), ggml shapes, types for ftype 1 (F16)."""
    s, f16, f32 = shape.n_state, Q.F16, Q.F32

    def lin(name: str, n_in: int, n_out: int, bias: bool = True) -> list[TensorSpec]:
        w = [TensorSpec(name + ".weight", (n_in, n_out), f16, scale=n_in ** -0.5)]
        return w + ([TensorSpec(name + ".bias", (n_out,), f32, scale=0.01)] if bias else [])

    def ln(name: str) -> list[TensorSpec]:
        return [TensorSpec(name + ".weight", (s,), f32, "ones"), TensorSpec(name + ".bias", (s,), f32, scale=0.01)]

    def attn(p: str) -> list[TensorSpec]:
        return [*lin(p + ".query", s, s), *lin(p + ".key", s, s, bias=False), *lin(p + ".value", s, s),
                *lin(p + ".out", s, s)]

    out = [TensorSpec("encoder.positional_embedding", (s, shape.n_audio_ctx), f32, scale=0.1),
           TensorSpec("encoder.conv1.weight", (3, shape.n_mels, s), f16, scale=0.1),
           TensorSpec("encoder.conv1.bias", (1, s), f32, scale=0.01),
           TensorSpec("encoder.conv2.weight", (3, s, s), f16, scale=0.1),
           TensorSpec("encoder.conv2.bias", (1, s), f32, scale=0.01)]
    for i in range(shape.n_audio_layer):
        p = f"encoder.blocks.{i}"
        out += [*ln(p + ".attn_ln"), *attn(p + ".attn"), *ln(p + ".mlp_ln"), *lin(p + ".mlp.0", s, 4 * s),
                *lin(p + ".mlp.2", 4 * s, s)]
    out += ln("encoder.ln_post")
    out += [TensorSpec("decoder.positional_embedding", (s, shape.n_text_ctx), f32, scale=0.1),
            TensorSpec("decoder.token_embedding.weight", (s, WHISPER_N_VOCAB), f16, scale=0.1)]
    for i in range(shape.n_text_layer):
        p = f"decoder.blocks.{i}"
        out += [*ln(p + ".attn_ln"), *attn(p + ".attn"), *ln(p + ".cross_attn_ln"), *attn(p + ".cross_attn"),
                *ln(p + ".mlp_ln"), *lin(p + ".mlp.0", s, 4 * s), *lin(p + ".mlp.2", 4 * s, s)]
    out += ln("decoder.ln")
    return out


def whisper_vocab() -> list[bytes]:
    """50,257 printable, valid-UTF-8 token strings (the text whisper prints is nonsense anyway)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = []
    for i in range(WHISPER_N_TEXT_TOKENS):
        syllable, n = "", i
        while True:
            syllable += letters[n % len(letters)]
            n //= len(letters)
            if not n:
                break
        words.append((" " + syllable if i % 3 else syllable).encode())
    words[220] = b" "  # GPT-2's lone space: whisper.cpp looks it up by text (suppress_blank) and throws without it
    return words


def write_whisper_ggml(path: str | os.PathLike[str], shape: WhisperShape = WhisperShape(),
                       seed: int = SEED) -> Path:
    """Write a random-weight whisper.cpp model in the legacy ggml format (what pywhispercpp 1.5.1 loads)."""
    if shape.n_state % shape.n_head:
        raise ValueError(f"n_state {shape.n_state} is not a multiple of n_head {shape.n_head}")
    n_fft = 201
    filters = _rng("mel_filters", seed).random((shape.n_mels, n_fft), dtype=np.float32) * np.float32(0.01)
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        hparams = (WHISPER_N_VOCAB, shape.n_audio_ctx, shape.n_state, shape.n_head, shape.n_audio_layer,
                   shape.n_text_ctx, shape.n_state, shape.n_head, shape.n_text_layer, shape.n_mels, 1)  # ftype F16
        out.write(struct.pack("<I11i", GGML_FILE_MAGIC, *hparams))
        out.write(struct.pack("<ii", shape.n_mels, n_fft))
        out.write(filters.tobytes())
        vocab = whisper_vocab()
        out.write(struct.pack("<i", len(vocab)))
        out.write(b"".join(struct.pack("<I", len(w)) + w for w in vocab))
        for t in whisper_tensors(shape):
            name = t.name.encode()
            out.write(struct.pack(f"<iii{len(t.shape)}i", len(t.shape), len(name), int(t.qtype), *t.shape))
            out.write(name)
            for chunk in tensor_slices(t, seed):
                chunk.tofile(out)
    return Path(path)
