"""A tiny Hugging Face checkpoint shaped like google/gemma-3n-E2B-it, for `gemma-agent models convert`.

The vendored llama.cpp converter (`convert_hf_to_gguf.py --mmproj`, class Gemma3nVisionAudioModel in
conversion/gemma.py) reads a checkpoint directory: config.json (architectures Gemma3nForConditionalGeneration;
text_config.hidden_size is the projector's output width; vision_config / audio_config hold the encoders'
hyper-parameters, completed by transformers' AutoConfig), preprocessor_config.json (size.height = image_size,
image_seq_length = 256, so patch_size = image_size / 256) and the safetensors weights. It converts the tensors named
`model.vision_tower.timm_model.*` (MobileNetV5, timm layout) and `model.embed_vision.*` (the projection into the
text model), skips `model.language_model.*` and would convert `model.audio_tower.*` / `model.embed_audio.*`
(none here: libmtmd skips a gemma3nv file's audio part). No tokenizer is read for --mmproj.

The tensors are exactly those `synth.gemma3nv_tensors` lists on the GGUF side (what clip.cpp loads for gemma3nv),
named and shaped the way the checkpoint stores them: PyTorch order (the reverse of ggml's ne), BF16 like the
published weights, the conv-stem bias and every block's layer_scale.gamma as 1-D (C,) vectors (timm's
LayerScale2d), plus the two embed_vision tensors clip.cpp does not use and two language-model tensors the
converter must drop. Everything is written with numpy (no torch): the safetensors container is a JSON header
and raw little-endian bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np

from tests.support import synth
from tests.support.models import CACHE
from tests.support.paths import ROOT

VISION = "model.vision_tower.timm_model."
EMBED = "model.embed_vision."
IMAGE_SIZE = 768  # the published preprocessor's size (768 / 256 = patch 3); TINY_VISION outputs 16 x 16 at 768
SEED = 20250626


def hf_name(gguf_name: str) -> str:
    """The checkpoint name the converter maps to `gguf_name` (the inverse of its mapping for gemma3nv)."""
    if gguf_name == "mm.soft_emb_norm.weight":
        return EMBED + "soft_embedding_norm.weight"
    if gguf_name == "mm.input_projection.weight":
        return EMBED + "embedding_projection.weight"
    if gguf_name.startswith("v.blk."):
        return VISION + "blocks." + gguf_name[len("v.blk."):]
    if gguf_name.startswith("v."):
        return VISION + gguf_name[len("v."):]
    raise ValueError(f"no checkpoint name for {gguf_name!r}")


def hf_shape(gguf_name: str, ne: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch shape of the checkpoint tensor (the converter reverses it, and unsqueezes 1-D stem bias)."""
    if gguf_name.endswith(("conv_stem.conv.bias", "layer_scale.gamma")):
        return (int(np.prod(ne)),)
    return tuple(reversed(ne))


def _bf16(a: np.ndarray) -> bytes:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file holding every array as BF16 (the published checkpoint's dtype)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = _bf16(array)
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def vision_tensors(n_embd_text: int, arch: synth.VisionArch = synth.TINY_VISION) -> dict[str, np.ndarray]:
    """The checkpoint's vision tensors for a MobileNetV5 whose output (and the text model's width) is n_embd_text,
    except that `embedding_projection` maps vision width (synth's n_embd) to n_embd_text, as the real one does."""
    vision_width = synth.TINY.n_embd
    out: dict[str, np.ndarray] = {}
    for spec in synth.gemma3nv_tensors(arch, vision_width):
        name, shape = hf_name(spec.name), hf_shape(spec.name, spec.shape)
        if name == EMBED + "embedding_projection.weight":
            shape = (n_embd_text, vision_width)
        rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
        if spec.fill == "ones":
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.scale)
    # in the checkpoint, not used by clip.cpp for images: the vision soft-token embedding and its norm
    out[EMBED + "embedding.weight"] = np.random.default_rng(SEED).standard_normal((128, vision_width),
                                                                                  dtype=np.float32) * 0.02
    out[EMBED + "hard_embedding_norm.weight"] = np.ones(vision_width, np.float32)
    # the text model's tensors, which --mmproj must leave out
    out["model.language_model.embed_tokens.weight"] = np.zeros((16, n_embd_text), np.float32)
    out["model.language_model.norm.weight"] = np.ones(n_embd_text, np.float32)
    return out


def config(n_embd_text: int, vision_width: int) -> dict[str, Any]:
    """config.json as published (the fields the converter and AutoConfig read), with tiny widths."""
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "torch_dtype": "bfloat16",
        "audio_soft_tokens_per_image": 188,
        "vision_soft_tokens_per_image": 256,
        "boi_token_id": 255999, "eoi_token_id": 262144, "image_token_id": 262145,
        "boa_token_id": 256000, "eoa_token_id": 262272, "audio_token_id": 262273,
        "text_config": {"model_type": "gemma3n_text", "hidden_size": n_embd_text, "vocab_size": 262400},
        "vision_config": {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc",
                          "hidden_size": vision_width, "vocab_size": 128, "vocab_offset": 262144,
                          "rms_norm_eps": 1e-06, "do_pooling": False},
        "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 1536, "input_feat_size": 128,
                         "conf_num_hidden_layers": 12, "conf_num_attention_heads": 8, "vocab_size": 128,
                         "vocab_offset": 262272},
    }


def write_checkpoint(directory: str | os.PathLike[str], n_embd_text: int = synth.TINY.n_embd,
                     image_size: int = IMAGE_SIZE) -> Path:
    """Write the tiny checkpoint into `directory` (created); return it. Deterministic bytes for fixed arguments.

    n_embd_text: the text model's width (text_config.hidden_size). The vision encoder's width stays
    synth.TINY.n_embd; a different n_embd_text makes a checkpoint whose projection widens, like E4B's
    (what libmtmd 0.3.36 reports as the projector's width is then the vision width)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vision_width = synth.TINY.n_embd
    (d / "config.json").write_text(json.dumps(config(n_embd_text, vision_width), indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessorFast", "processor_class": "Gemma3nProcessor",
        "size": {"height": image_size, "width": image_size}, "image_seq_length": 256,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_normalize": False,
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
    }, indent=2))
    (d / "processor_config.json").write_text(json.dumps(
        {"audio_seq_length": 188, "image_seq_length": 256, "processor_class": "Gemma3nProcessor"}, indent=2))
    write_safetensors(d / "model.safetensors", vision_tensors(n_embd_text))
    return d


# ---------------------------------------------------------------------------------------------------------
# The Python the converter runs in: the `convert` extra, in its own venv, built once
# ---------------------------------------------------------------------------------------------------------

# PyPI's plain `torch` is the CUDA build (several GB); the CPU build of 2.13.0 is what this machine kind's pip
# installs from its local wheel file (192 MB wheel, 1.1 GB venv). Elsewhere set this, e.g. to a pinned torch plus
# `--index-url` of PyTorch's CPU wheel index (split on spaces, passed to pip before the extra).
TORCH_ENV = "GEMMA_AGENT_CONVERT_TORCH"
TORCH_DEFAULT = "torch==2.13.0"


def convert_extra() -> list[str]:
    """The requirements of pyproject.toml's `convert` extra (what `pip install 'gemma-agent[convert]'` adds)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["project"]["optional-dependencies"]["convert"])


def convert_python() -> Path:
    """A venv with the `convert` extra (and nothing of gemma-agent's own), kept in the test cache: built once per
    requirement set and Python version (~1 min), then reused. Its interpreter is what --python gets."""
    torch = os.environ.get(TORCH_ENV, TORCH_DEFAULT).split()
    reqs = [*torch, *convert_extra()]
    key = hashlib.sha256(json.dumps([list(sys.version_info[:2]), reqs]).encode()).hexdigest()[:12]
    venv = CACHE.parent / f"convert-venv-{key}"
    python, done = venv / "bin" / "python", venv / ".complete"
    if done.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building it
        if not done.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            *torch], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            *reqs], check=True)
            done.write_text("\n".join(reqs) + "\n")
    return python
