"""`gemma-agent models convert`: the vendored llama.cpp converter on a tiny checkpoint shaped like
google/gemma-3n-E2B-it (tests/support/checkpoint.py), run as a user runs it; the result checked by its header and
by libmtmd itself (loaded against a tiny text model of the same n_embd, one image encoded to 256 tokens); and the
clear errors. The converter's Python is a cached venv with the `convert` extra (torch CPU build, transformers), so
the daemon's venv stays without torch, as on the board."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.catalog import convert
from agent.catalog.catalog import load_catalog
from agent.gguf import inspect
from tests.support import checkpoint as ck
from tests.support import models as testmodels
from tests.support import synth
from tests.support.paths import ROOT, run_agent

NAME = "gemma-3n-e2b-it-mmproj"
FILE = "mmproj-gemma-3n-E2B-it-f16.gguf"


@pytest.fixture(scope="module")
def python() -> str:
    return str(ck.convert_python())


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """The vendored llama.cpp converter of the installed llama-cpp-python, fetched once (what the CLI does)."""
    return convert.converter_dir()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("gemma-3n-E2B-it"))


def models_convert(models: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent("models", "--dir", str(models), "convert", *args, timeout=600)


# Run apart: libmtmd aborts the process (SIGABRT) on a projector it cannot build a graph for.
ENCODE = """
import ctypes, json, sys
from pathlib import Path
import llama_cpp, numpy as np
from llama_cpp import mtmd_cpp as mtmd
from tests.support.mtmd import mtmd_context, rgb_bitmap, text_context, tokenize
with text_context(Path(sys.argv[2])) as (model, _ctx), mtmd_context(Path(sys.argv[1]), model) as ctx:
    bitmap = rgb_bitmap(640, 480)
    chunks, found = tokenize(ctx, mtmd.mtmd_default_marker(), bitmap)
    chunk = mtmd.mtmd_input_chunks_get(chunks, [t for t, _n in found].index(1))
    rc = mtmd.mtmd_encode_chunk(ctx, chunk)
    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
    width = llama_cpp.llama_model_n_embd(model)
    out = np.ctypeslib.as_array(ctypes.cast(mtmd.mtmd_get_output_embd(ctx), ctypes.POINTER(ctypes.c_float)),
                                shape=(n * width,))
    print(json.dumps({"found": found, "encode": rc, "tokens": n, "finite": bool(np.isfinite(out).all())}))
"""


def encode(projector: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", ENCODE, str(projector), str(testmodels.tiny_text())],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_convert_builds_a_projector_libmtmd_encodes_to_256_tokens(tmp_path: Path, python: str, checkpoint: Path,
                                                                   llama_cpp: Path) -> None:
    models = tmp_path / "models"
    proc = models_convert(models, NAME, "--checkpoint", str(checkpoint), "--python", python,
                          "--text-model", str(testmodels.tiny_text()))
    assert proc.returncode == 0, proc.stderr
    target = models / FILE
    assert proc.stdout.splitlines()[0] == str(target)
    assert "256 image tokens" in proc.stdout and "n_embd 32" in proc.stdout
    assert sorted(p.name for p in models.iterdir()) == [FILE]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # created as any file is, not a private temp file

    info = inspect(target)
    md = info.metadata
    assert info.arch == "clip" and info.projector_types()[0] == "gemma3nv" and md["clip.has_vision_encoder"]
    assert (md["clip.vision.image_size"], md["clip.vision.patch_size"]) == (768, 3)  # 768 / 3 = 256 tokens
    assert md["clip.vision.projection_dim"] == 32
    tensors = {t.name: t for t in info.tensors}
    assert tensors["mm.input_projection.weight"].shape == (32, 32)
    assert tensors["v.blk.3.1.layer_scale.gamma"].shape == (1, 1, 32, 1)  # the fix: 4-D, as libmtmd needs
    assert not any(n.startswith(("token_embd", "blk.", "model.")) for n in tensors)  # the text model left out
    # every tensor clip.cpp loads for gemma3nv (the synthetic projector's list) is there, with the same shape
    for spec in synth.gemma3nv_tensors(synth.TINY_VISION, 32):
        assert tensors[spec.name].shape == spec.shape, spec.name

    result = encode(target)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["encode"] == 0 and found["tokens"] == 256 and found["finite"]
    assert [1, 256] in found["found"]

    verify = run_agent("models", "--dir", str(models), "verify", NAME)
    assert verify.returncode == 0 and "mmproj-gemma-3n-E2B-it-f16.gguf" in verify.stdout

    again = models_convert(models, NAME, "--checkpoint", str(checkpoint), "--python", python)
    assert again.returncode == 73 and "--force" in again.stderr


def test_the_vendored_converter_alone_writes_what_libmtmd_aborts_on(tmp_path: Path, python: str, checkpoint: Path,
                                                                     llama_cpp: Path) -> None:
    """Why `convert` reshapes layer_scale.gamma: the unpatched converter's file fails the header check, naming the
    tensor, and libmtmd 0.3.36 does abort on it (SIGABRT while building the warm-up graph)."""
    raw = tmp_path / "raw.gguf"
    done = subprocess.run([python, str(llama_cpp / "convert_hf_to_gguf.py"), "--mmproj", "--outtype", "f16",
                           "--outfile", str(raw), str(checkpoint)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(convert.HeaderError, match=r"layer_scale\.gamma has shape \[\d+\], expected \[1, 1, C, 1\]"):
        convert.check_projector(raw)
    result = encode(raw)
    assert result.returncode == -6 and "ggml_can_repeat" in result.stderr


def test_a_width_libmtmd_would_refuse_fails_the_header_check_and_installs_nothing(
        tmp_path: Path, python: str, llama_cpp: Path) -> None:
    """A checkpoint whose text model is wider than its vision tower (E4B-like: libmtmd 0.3.36 takes the
    projector's width from mm.input_projection.weight ne[0], the vision width): converted, then refused."""
    wide = ck.write_checkpoint(tmp_path / "wide", n_embd_text=48)
    models = tmp_path / "models"
    proc = models_convert(models, NAME, "--checkpoint", str(wide), "--python", python)
    assert proc.returncode == 65, proc.stderr
    assert "mm.input_projection.weight ne[0] is 32" in proc.stderr and "n_embd 48" in proc.stderr
    assert list(models.iterdir()) == []


def test_missing_checkpoint_files_are_named(tmp_path: Path, checkpoint: Path) -> None:
    models = tmp_path / "models"
    proc = models_convert(models, NAME, "--checkpoint", str(tmp_path / "nowhere"))
    assert proc.returncode == 66 and "checkpoint directory not found" in proc.stderr
    assert "google/gemma-3n-E2B-it" in proc.stderr
    partial = tmp_path / "partial"
    partial.mkdir()
    proc = models_convert(models, NAME, "--checkpoint", str(partial))
    assert proc.returncode == 66 and "config.json: missing" in proc.stderr
    (partial / "config.json").write_text((checkpoint / "config.json").read_text())
    proc = models_convert(models, NAME, "--checkpoint", str(partial))
    assert proc.returncode == 66 and "no weights (model.safetensors" in proc.stderr
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    proc = models_convert(models, NAME, "--checkpoint", str(partial))
    assert proc.returncode == 66 and "model-00001-of-00002.safetensors, model-00002-of-00002" in proc.stderr
    (partial / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    proc = models_convert(models, NAME, "--checkpoint", str(partial))
    assert proc.returncode == 65 and "expected Gemma3nForConditionalGeneration" in proc.stderr
    assert not models.exists() or list(models.iterdir()) == []


def test_without_torch_the_extra_to_install_is_named(tmp_path: Path, checkpoint: Path, llama_cpp: Path) -> None:
    """The daemon's own venv has no torch (never a dependency): `convert` says which extra to install."""
    models = tmp_path / "models"
    proc = models_convert(models, NAME, "--checkpoint", str(checkpoint), "--python", sys.executable)
    assert proc.returncode == 69, proc.stderr
    assert "torch" in proc.stderr and "pip install 'gemma-agent[convert]'" in proc.stderr
    assert list(models.iterdir()) == []
    proc = models_convert(models, NAME, "--checkpoint", str(checkpoint), "--python", str(tmp_path / "no-python"))
    assert proc.returncode == 69 and "gemma-agent[convert]" in proc.stderr


def test_other_models_and_bad_converter_dirs_are_refused(tmp_path: Path, checkpoint: Path) -> None:
    proc = models_convert(tmp_path, "gemma-3n-e2b-it-q4_k_m", "--checkpoint", str(checkpoint))
    assert proc.returncode == 64 and "convertible: gemma-3n-e2b-it-mmproj, gemma-3n-e4b-it-mmproj" in proc.stderr
    proc = models_convert(tmp_path, NAME, "--checkpoint", str(checkpoint), "--llama-cpp", str(tmp_path))
    assert proc.returncode == 69 and "missing convert_hf_to_gguf.py" in proc.stderr


def test_the_catalog_tells_the_command(tmp_path: Path) -> None:
    for name, repo in (("gemma-3n-e2b-it-mmproj", "E2B"), ("gemma-3n-e4b-it-mmproj", "E4B")):
        text = load_catalog().get(name).unavailable or ""
        assert f"gemma-agent models convert {name} --checkpoint DIR" in text
        assert "gemma-agent[convert]" in text and f"google/gemma-3n-{repo}-it" in text
    proc = run_agent("models", "--dir", str(tmp_path), "pull", NAME)
    assert proc.returncode == 69 and f"gemma-agent models convert {NAME} --checkpoint DIR" in proc.stderr


def test_the_extra_is_not_a_dependency_of_the_daemon() -> None:
    from importlib import metadata
    base = [r for r in metadata.requires("gemma-agent") or [] if "extra ==" not in r]
    assert not any(r.split()[0].lower().startswith(("torch", "transformers")) for r in base)
    assert any(r.startswith("torch") for r in ck.convert_extra())
    assert any(r.startswith("transformers") for r in ck.convert_extra())
