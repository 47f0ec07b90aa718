"""Random-weight Gemma 4 projector files: one mmproj GGUF carrying the vision (`gemma4v`) and the audio (`gemma4a`)
encoder, as the published Gemma 4 E2B / E4B mmproj files do (no real weights here).

A combined file leaves `clip.projector_type` unset and names one projector per modality instead:
`clip.vision.projector_type` = gemma4v and `clip.audio.projector_type` = gemma4a, with
`clip.has_vision_encoder` and `clip.has_audio_encoder` both true (vendored llama.cpp: conversion/gemma.py
`Gemma4VisionAudioModel`, tools/mtmd/clip.cpp load_hparams). libmtmd then opens one context that supports both.

- Vision: a ViT over 16 x 16 patches with learned x / y position tables, 2D RoPE, RMS norms before and after
  attention and FFN (gated), a per-layer output scale, then 3 x 3 average pooling, standardisation (`v.std_*`),
  an RMS norm without weights and `mm.input_projection`. Tokens depend on the bitmap: libmtmd resizes it (aspect
  kept, sides multiples of 48) into a budget of 70..1120 tokens (`mtmd_context_params.image_min_tokens` /
  `image_max_tokens` override it); tokens = (w / 48) x (h / 48).
- Audio: `synth.gemma4a_tensors`' conformer, with the published types and the output projection to
  `output_proj_dims` (+ bias) that the real file has, no `mm.a.soft_emb_norm` (Gemma 4's embedder norm has no
  weight). 25 tokens per second.
- Clipped linears: the E2B audio tower stores F32 scalars `<weight>.input_min/input_max/output_min/output_max`
  beside each clamped matrix; libmtmd clamps the matrix's input and output with them. Written here as wide
  (+-1e4) bounds so they cost what they cost without changing the random output much.
- Types as convert_hf_to_gguf writes them: 1-D tensors and norms F32; the position table F32; audio conv
  kernels (and, by the converter's substring rule, `a.input_projection`) F32; the patch embedding F16 in an F16
  file, F32 otherwise; every other matrix F16 or Q8_0. Q8_0 blocks are random int8 with one scale per block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType

from tests.support.synth import (
    KV,
    SEED,
    TINY_AUDIO,
    AudioShape,
    TensorSpec,
    _kv,
    audio_encoder_kvs,
    encoder_kvs,
    gemma4a_tensors,
    write_gguf,
)

Q = GGMLQuantizationType
CLAMP_BOUND = 1.0e4
_INT8_STD = 73.9  # standard deviation of uniform random int8: Q8_0 scale d = target std / this


@dataclass(frozen=True)
class VisionShape:
    """A Gemma 4 vision tower (`gemma4v`)."""

    name: str
    n_embd: int
    n_head: int
    n_ff: int
    n_layer: int
    patch_size: int = 16
    position_table: int = 10240  # rows per axis of the learned x / y position tables
    clipped: bool = True  # clamp scalars beside each attention / FFN matrix
    standardize: bool = True  # v.std_bias / v.std_scale


@dataclass(frozen=True)
class Gemma4Audio:
    """The audio half: synth's conformer shape plus the width of its output projection."""

    shape: AudioShape
    output_proj_dims: int | None = None  # None: the text width (E2B: 1536 = text n_embd)
    clipped: bool = True


TINY_V = VisionShape("tiny", n_embd=32, n_head=2, n_ff=64, n_layer=1, position_table=1024)
# google/gemma-4-E2B-it vision_config: 16 layers, width 768, 12 heads, FFN 3072, patch 16, 10240 positions.
E2B_V = VisionShape("E2B", n_embd=768, n_head=12, n_ff=3072, n_layer=16)
# google/gemma-4-E2B-it audio_config: 12 conformer layers, width 1024, 8 heads, FFN 4 x 1024, sub-sampling
# channels (128, 32), conv kernel 5, output_proj_dims 1536.
E2B_AUDIO_SHAPE = AudioShape("E2B", n_embd=1024, n_head=8, n_ff=4096, n_layer=12, sscp_channels=(128, 32))
TINY_A = Gemma4Audio(TINY_AUDIO)
E2B_A = Gemma4Audio(E2B_AUDIO_SHAPE, output_proj_dims=1536)
E2B_TEXT_N_EMBD = 1536  # google/gemma-4-E2B-it text_config.hidden_size
VISION_SHAPES = {s.name: s for s in (TINY_V, E2B_V)}
AUDIO_SHAPES = {"tiny": TINY_A, "E2B": E2B_A}
PUBLISHED_BYTES = {("E2B", "F16"): 985_654_080, ("E2B", "Q8_0"): 557_368_064}  # mmproj-gemma-4-E2B-it-*.gguf

_FTYPE = {Q.F16: 1, Q.Q8_0: 7}  # general.file_type (LLAMA_FTYPE_MOSTLY_F16 / _Q8_0)


def _matrix(name: str, n_in: int, n_out: int, qtype: GGMLQuantizationType) -> TensorSpec:
    std = n_in ** -0.5
    return TensorSpec(name, (n_in, n_out), qtype, scale=std / _INT8_STD if qtype == Q.Q8_0 else std)


def _clamps(weight: str) -> list[TensorSpec]:
    base = weight.removesuffix(".weight")
    return [TensorSpec(f"{base}.{k}", (1,), Q.F32, "const", v) for k, v in
            (("input_max", CLAMP_BOUND), ("input_min", -CLAMP_BOUND),
             ("output_max", CLAMP_BOUND), ("output_min", -CLAMP_BOUND))]


def gemma4v_tensors(shape: VisionShape, text_n_embd: int, qtype: GGMLQuantizationType = Q.F16) -> list[TensorSpec]:
    """The tensors clip.cpp loads for a gemma4v projector (tools/mtmd/clip.cpp load_tensors, models/gemma4v.cpp)."""
    d, f32 = shape.n_embd, Q.F32
    dh = d // shape.n_head
    p = shape.patch_size

    def norm(name: str, n: int = d) -> TensorSpec:
        return TensorSpec(name, (n,), f32, "ones")

    patch_type = Q.F16 if qtype == Q.F16 else Q.F32  # conversion/base.py MmprojModel.tensor_force_quant
    out = [TensorSpec("v.patch_embd.weight", (p, p, 3, d), patch_type, scale=(3 * p * p) ** -0.5),
           TensorSpec("v.position_embd.weight", (d, shape.position_table, 2), f32, scale=0.02)]
    for i in range(shape.n_layer):
        b = f"v.blk.{i}."
        mats = [_matrix(b + "attn_q.weight", d, d, qtype), _matrix(b + "attn_k.weight", d, d, qtype),
                _matrix(b + "attn_v.weight", d, d, qtype), _matrix(b + "attn_out.weight", d, d, qtype),
                _matrix(b + "ffn_gate.weight", d, shape.n_ff, qtype),
                _matrix(b + "ffn_up.weight", d, shape.n_ff, qtype),
                _matrix(b + "ffn_down.weight", shape.n_ff, d, qtype)]
        out += [norm(b + "ln1.weight"), norm(b + "attn_q_norm.weight", dh), norm(b + "attn_k_norm.weight", dh),
                norm(b + "attn_post_norm.weight"), norm(b + "ln2.weight"), norm(b + "ffn_post_norm.weight"),
                TensorSpec(b + "out_scale.weight", (1,), f32, "ones")]
        for m in mats:
            out.append(m)
            if shape.clipped:
                out += _clamps(m.name)
    if shape.standardize:
        out += [TensorSpec("v.std_bias", (d,), f32, scale=0.01), TensorSpec("v.std_scale", (d,), f32, "ones")]
    out.append(_matrix("mm.input_projection.weight", d, text_n_embd, qtype))
    return out


_AUDIO_CLAMPED = ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ffn_up_1", "ffn_down_1",
                  "conv_pw1", "conv_pw2")


def gemma4a_e2b_tensors(audio: Gemma4Audio, text_n_embd: int, qtype: GGMLQuantizationType = Q.F16) -> list[TensorSpec]:
    """synth.gemma4a_tensors, retyped and completed as the published file has it."""
    d = audio.shape.n_embd
    out_dims = audio.output_proj_dims or text_n_embd
    out: list[TensorSpec] = []
    for t in gemma4a_tensors(audio.shape, text_n_embd):
        name = t.name
        if name == "mm.a.soft_emb_norm.weight":
            continue  # Gemma 4's multimodal embedder norm has no weight
        if name == "a.pre_encode.out.weight":
            out += [_matrix(name, d, out_dims, qtype),
                    TensorSpec("a.pre_encode.out.bias", (out_dims,), Q.F32, scale=0.01)]
            continue
        if name == "mm.a.input_projection.weight":
            out.append(_matrix(name, out_dims, text_n_embd, qtype))
            continue
        if name.startswith("a.conv1d.") or name == "a.input_projection.weight":
            out.append(replace(t, qtype=Q.F32))  # the converter forces audio "conv" names to F32
            continue
        if t.qtype == Q.F16 and len(t.shape) == 2:
            out.append(_matrix(name, t.shape[0], t.shape[1], qtype))
            if audio.clipped and name.split(".")[-2] in _AUDIO_CLAMPED:
                out += _clamps(name)
            continue
        out.append(t)
    return out


def gemma4_projector_metadata(vision: VisionShape | None, audio: Gemma4Audio | None, text_n_embd: int,
         qtype: GGMLQuantizationType) -> list[KV]:
    U32, F32, S, B = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL
    parts = [x for x in (vision and f"vision {vision.name}", audio and f"audio {audio.shape.name}") if x]
    kvs = [_kv("general.type", "mmproj", S),
           _kv("general.name", f"Gemma 4 projector ({', '.join(parts)}; synthetic random weights)", S),
           _kv("general.file_type", _FTYPE[qtype], U32),
           _kv("clip.has_vision_encoder", vision is not None, B),
           _kv("clip.has_audio_encoder", audio is not None, B)]
    if vision is not None:
        V = "clip.vision."
        kvs += [_kv(V + "projector_type", "gemma4v", S),
                *encoder_kvs(V, vision.n_embd, vision.n_ff, vision.n_layer, text_n_embd, vision.n_head),
                _kv(V + "image_size", 224, U32),  # unused by gemma4v; the converter writes 224
                _kv(V + "patch_size", vision.patch_size, U32),
                _kv(V + "image_mean", [0.0, 0.0, 0.0], GGUFValueType.ARRAY, F32),
                _kv(V + "image_std", [1.0, 1.0, 1.0], GGUFValueType.ARRAY, F32)]
    if audio is not None:
        kvs += [_kv("clip.audio.projector_type", "gemma4a", S), *audio_encoder_kvs(audio.shape, text_n_embd)]
    return kvs


def gemma4_projector_tensors(text_n_embd: int, vision: VisionShape | None = TINY_V, audio: Gemma4Audio | None = TINY_A,
                             qtype: GGMLQuantizationType = Q.F16) -> list[TensorSpec]:
    """Every tensor of a combined projector (audio first, then vision, as the converter orders them)."""
    tensors: list[TensorSpec] = []
    if audio is not None:
        tensors += gemma4a_e2b_tensors(audio, text_n_embd, qtype)
    if vision is not None:
        tensors += gemma4v_tensors(vision, text_n_embd, qtype)
    return tensors


def write_gemma4_projector(path: str | os.PathLike[str], text_n_embd: int, vision: VisionShape | None = TINY_V,
                           audio: Gemma4Audio | None = TINY_A, qtype: GGMLQuantizationType = Q.F16,
                           seed: int = SEED) -> Path:
    """Write one Gemma 4 mmproj with a vision and/or an audio encoder for a text model of width `text_n_embd`."""
    if qtype not in _FTYPE:
        raise ValueError(f"qtype must be F16 or Q8_0, got {qtype.name}")
    if vision is None and audio is None:
        raise ValueError("a projector needs a vision or an audio encoder")
    if text_n_embd <= 0:
        raise ValueError(f"text_n_embd must be positive, got {text_n_embd}")
    if vision is not None and (vision.n_embd % vision.n_head or (vision.n_embd // vision.n_head) % 2):
        raise ValueError(f"vision width {vision.n_embd} must split into {vision.n_head} heads of even size")
    if audio is not None and audio.shape.n_embd % audio.shape.n_head:
        raise ValueError(f"audio width {audio.shape.n_embd} is not a multiple of {audio.shape.n_head} heads")
    tensors = gemma4_projector_tensors(text_n_embd, vision, audio, qtype)
    return write_gguf(path, "clip", gemma4_projector_metadata(vision, audio, text_n_embd, qtype), tensors, seed)
