"""`gemma-agent models convert NAME --checkpoint DIR`: build a projector GGUF that nobody publishes (Gemma 3n's
MobileNetV5 `gemma3nv`) from the Hugging Face checkpoint, with llama.cpp's own converter, then check its header
before it goes into the models directory.

Run it on a bigger machine (the board needs only the result): the converter (`convert_hf_to_gguf.py --mmproj`)
imports torch and transformers, which are never dependencies of the daemon but the optional extra
`pip install 'gemma-agent[convert]'` (or any Python that has them: `--python`). The converter is the one
vendored in the llama-cpp-python release this package runs (so the file matches the board's libmtmd): the wheel
does not ship it, so it is taken from that release's source distribution on PyPI (`pip download --no-binary`,
76.6 MB for 0.3.36, kept under ~/.cache/gemma-agent/llama.cpp/VERSION), or from `--llama-cpp DIR`, a llama.cpp
checkout holding convert_hf_to_gguf.py, conversion/ and gguf-py/.

One fix is applied while converting, where the converter and libmtmd of 0.3.36 disagree: the converter writes
the MobileNetV5 blocks' `layer_scale.gamma` as 1-D vectors, and libmtmd multiplies them onto [W, H, C] maps,
which aborts the process at load (`GGML_ASSERT(ggml_can_repeat(b, a))`, seen on the tiny checkpoint of the
tests); they are written as [1, C, 1, 1], the shape the converter already gives the stem bias. The header check
below refuses any file that still has the 1-D shape.

The result is written to a hidden temporary file in the models directory, checked (arch `clip`, projector type
`gemma3nv`, image_size / patch_size = 256 image tokens as libmtmd counts them, the projection width libmtmd
reads, mm.input_projection.weight ne[0], equal to the text model's n_embd from the checkpoint's config and from
`--text-model GGUF` when given, every tensor libmtmd needs present and shaped to load) and only then renamed to
the catalog's file name; a failed conversion or check leaves nothing behind.

Exit codes of `models convert` (as for the other `models` actions):
   0  converted and checked; the path is printed
  64  the model is not one that can be converted, or a bad option value
  65  the converter failed on the checkpoint, or the result failed the header check (the message names the field)
  66  the checkpoint directory or one of its files (config.json, the safetensors weights) is missing
  69  no converter: torch / transformers missing from --python (install the `convert` extra), or the
      llama-cpp-python source distribution could not be downloaded and no --llama-cpp was given
  73  the target file exists (use --force), or the models directory cannot be written
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from agent.catalog.catalog import Catalog, FetchError
from agent.contract.exitcodes import ExitCode
from agent.gguf import GgufInfo, ModelFileError, inspect

log = logging.getLogger("agent.catalog")

IMAGE_TOKENS = 256  # MobileNetV5's fusion adapter outputs 16 x 16; libmtmd counts image_size / patch_size
EXTRA = "gemma-agent[convert]"
LLAMA_CPP_PACKAGE = "llama-cpp-python"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/gemma.py", "gguf-py/gguf/__init__.py")
MISSING_PACKAGES = 3  # the driver's exit status when torch / transformers cannot be imported


@dataclass(frozen=True)
class Convertible:
    source: str  # the Hugging Face repository of the checkpoint
    architecture: str  # config.json architectures[0] the converter handles
    projector_type: str


CONVERTIBLE = {
    "gemma-3n-e2b-it-mmproj": Convertible("google/gemma-3n-E2B-it", "Gemma3nForConditionalGeneration", "gemma3nv"),
    "gemma-3n-e4b-it-mmproj": Convertible("google/gemma-3n-E4B-it", "Gemma3nForConditionalGeneration", "gemma3nv"),
}

# Run by the converter's Python (--python): check the packages, apply the layer_scale fix, run the converter.
DRIVER = r"""
import sys
missing = []
for module in ("torch", "transformers", "numpy"):
    try:
        __import__(module)
    except ImportError as exc:
        missing.append(f"{module} ({exc})")
if missing:
    print("missing Python packages: " + ", ".join(missing), file=sys.stderr)
    sys.exit(MISSING_STATUS)
root = sys.argv[1]
sys.path.insert(0, root)
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
from conversion import gemma

model_class = gemma.Gemma3nVisionAudioModel
modify_tensors = model_class.modify_tensors

def modify_tensors_4d_layer_scale(self, data_torch, name, bid):
    for new_name, tensor in modify_tensors(self, data_torch, name, bid):
        if new_name.startswith("v.blk.") and new_name.endswith(".layer_scale.gamma") and len(tensor.shape) == 1:
            tensor = tensor.unsqueeze(0).unsqueeze(-1).unsqueeze(-1)  # [1, C, 1, 1], as libmtmd multiplies it
        yield new_name, tensor

model_class.modify_tensors = modify_tensors_4d_layer_scale
convert_hf_to_gguf.main()
""".replace("MISSING_STATUS", str(MISSING_PACKAGES))


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-agent"


def llama_cpp_version() -> str:
    """The installed release, without a local build label (.ci/build-llama's `+gemmaagent.<patches>`): the
    source distribution on PyPI the converter comes from (the patches touch no converter file)."""
    try:
        return metadata.version(LLAMA_CPP_PACKAGE).split("+")[0]
    except metadata.PackageNotFoundError:
        raise FetchError(f"{LLAMA_CPP_PACKAGE} is not installed, so its converter cannot be fetched; "
                         "give a llama.cpp checkout with --llama-cpp DIR", ExitCode.EX_UNAVAILABLE) from None


def check_converter(directory: Path) -> Path:
    missing = [f for f in CONVERTER_FILES if not (directory / f).is_file()]
    if missing:
        raise FetchError(f"{directory}: not a llama.cpp converter directory (missing {', '.join(missing)})",
                         ExitCode.EX_UNAVAILABLE)
    return directory


def converter_dir(llama_cpp: Path | None = None, version: str | None = None) -> Path:
    """The llama.cpp directory holding the converter: `llama_cpp` if given, else the vendored llama.cpp of the
    installed llama-cpp-python release, extracted once from its source distribution into the cache."""
    if llama_cpp is not None:
        return check_converter(Path(llama_cpp))
    version = version or llama_cpp_version()
    target = cache_root() / "llama.cpp" / version
    if all((target / f).is_file() for f in CONVERTER_FILES):
        return target
    log.info("fetching the converter of llama.cpp as vendored in %s %s (its source distribution, ~77 MB)",
             LLAMA_CPP_PACKAGE, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", "--dest", tmp, f"{LLAMA_CPP_PACKAGE}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise FetchError(f"could not download the {LLAMA_CPP_PACKAGE} {version} source distribution for its "
                             f"converter ({' '.join(cmd[2:])}):\n{tail}\ngive a llama.cpp checkout with "
                             "--llama-cpp DIR instead", ExitCode.EX_UNAVAILABLE)
        staging = Path(tmp) / "llama.cpp"
        _extract_converter(sdists[0], staging)
        check_converter(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Unpack vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/, LICENSE} of the sdist into dest."""
    keep = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # NAME-VERSION / vendor / llama.cpp / rest
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not parts[3].startswith(keep):
                continue
            rel = Path(parts[3])
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is not None:
                with src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)


# ---------------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------------

def check_checkpoint(directory: Path, spec: Convertible) -> dict[str, Any]:
    """The checkpoint's config.json, once its files are there: config.json and the safetensors weights (one
    model.safetensors, or model.safetensors.index.json and every shard it names)."""
    if not directory.is_dir():
        raise FetchError(f"{directory}: checkpoint directory not found (download {spec.source} from Hugging Face, "
                         "e.g. `hf download " + spec.source + " --local-dir DIR`)", ExitCode.EX_NOINPUT)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FetchError(f"{config_path}: missing (not a Hugging Face checkpoint of {spec.source})",
                         ExitCode.EX_NOINPUT)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FetchError(f"{config_path}: unreadable: {exc}", ExitCode.EX_DATAERR) from None
    if not isinstance(config, dict) or spec.architecture not in (config.get("architectures") or []):
        found = config.get("architectures") if isinstance(config, dict) else None
        raise FetchError(f"{config_path}: architectures is {found!r}, expected {spec.architecture} "
                         f"(a checkpoint of {spec.source})", ExitCode.EX_DATAERR)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FetchError(f"{index}: unreadable weight map: {exc}", ExitCode.EX_DATAERR) from None
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise FetchError(f"{directory}: weight shard(s) named in {index.name} are missing: {', '.join(absent)}",
                             ExitCode.EX_NOINPUT)
    elif not (directory / "model.safetensors").is_file():
        raise FetchError(f"{directory}: no weights (model.safetensors, or model.safetensors.index.json and its "
                         "shards)", ExitCode.EX_NOINPUT)
    return config


def text_width(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or {}
    value = text.get("hidden_size") if isinstance(text, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ---------------------------------------------------------------------------------------------------------
# The header check
# ---------------------------------------------------------------------------------------------------------

class HeaderError(Exception):
    """The projector's header is not what libmtmd needs; the message names the field."""


def check_projector(path: str | os.PathLike[str], text_n_embd: dict[str, int] | None = None) -> dict[str, Any]:
    """Check a gemma3nv projector GGUF the way libmtmd will use it; return a summary (the fields checked).

    text_n_embd: {where it comes from: n_embd} for each text model it must pair with."""
    try:
        info = inspect(path)
    except ModelFileError as exc:
        raise HeaderError(str(exc)) from None
    md = info.metadata
    if info.arch != "clip":
        raise HeaderError(f"general.architecture is {info.arch!r}, expected 'clip' (a projector file)")
    vision, _audio = info.projector_inputs()
    if not vision:
        raise HeaderError("clip.has_vision_encoder is not true")
    vtype = info.projector_types()[0]
    if vtype != "gemma3nv":
        raise HeaderError(f"clip.vision.projector_type / clip.projector_type is {vtype!r}, expected 'gemma3nv'")
    image_size, patch_size = md.get("clip.vision.image_size"), md.get("clip.vision.patch_size")
    for key, value in (("clip.vision.image_size", image_size), ("clip.vision.patch_size", patch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HeaderError(f"{key} is {value!r}, expected a positive integer")
    assert isinstance(image_size, int) and isinstance(patch_size, int)
    if image_size % patch_size or image_size // patch_size != IMAGE_TOKENS:
        raise HeaderError(f"clip.vision.image_size / clip.vision.patch_size is {image_size} / {patch_size}: libmtmd "
                          f"counts that many image tokens, but MobileNetV5 outputs {IMAGE_TOKENS} (it would abort "
                          "at the first image)")
    tensors = {t.name: t for t in info.tensors}
    for name in ("v.conv_stem.conv.weight", "v.msfa.ffn.pw_exp.conv.weight", "v.msfa.ffn.pw_proj.conv.weight",
                 "mm.soft_emb_norm.weight", "mm.input_projection.weight"):
        if name not in tensors:
            raise HeaderError(f"tensor {name} is missing")
    blocks = sorted(n for n in tensors if n.startswith("v.blk."))
    if not blocks:
        raise HeaderError("no MobileNetV5 block tensors (v.blk.*)")
    for name in [*blocks, "v.conv_stem.conv.bias"]:
        t = tensors.get(name)
        if (t is not None and name.endswith((".layer_scale.gamma", "conv_stem.conv.bias"))
                and (len(t.shape) != 4 or t.shape[0] != 1 or t.shape[1] != 1 or t.shape[3] != 1)):
            raise HeaderError(f"tensor {name} has shape {list(t.shape)}, expected [1, 1, C, 1]: libmtmd "
                              "multiplies it onto [W, H, C] maps and aborts the process on any other shape")
    width = tensors["mm.input_projection.weight"].shape[0]
    for source, n_embd in (text_n_embd or {}).items():
        if n_embd != width:
            raise HeaderError(f"mm.input_projection.weight ne[0] is {width}, the width libmtmd gives this "
                              f"projector's embeddings, but {source} has n_embd {n_embd}: libmtmd refuses the pair")
    return {"path": str(path), "size": info.size, "tensors": len(info.tensors), "projector_type": vtype,
            "image_size": image_size, "patch_size": patch_size, "image_tokens": image_size // patch_size,
            "n_embd": width, "projection_dim": md.get("clip.vision.projection_dim"),
            "audio_encoder": bool(md.get("clip.has_audio_encoder"))}


def _gguf_width(path: Path) -> int:
    try:
        info: GgufInfo = inspect(path)
    except ModelFileError as exc:
        raise FetchError(f"--text-model: {exc}", ExitCode.EX_NOINPUT if exc.missing else ExitCode.EX_DATAERR) from None
    width = info.key("embedding_length")
    if not isinstance(width, int) or width <= 0:
        raise FetchError(f"--text-model {path}: {info.arch}.embedding_length is {width!r}, not a text model",
                         ExitCode.EX_DATAERR)
    return width


# ---------------------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------------------

def convert(catalog: Catalog, name: str, checkpoint: Path, models_dir: Path, *, llama_cpp: Path | None = None,
            python: str | None = None, text_model: Path | None = None, outtype: str = "f16",
            force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Convert `checkpoint` into the catalog file of model `name` in `models_dir`; return (path, summary)."""
    model = catalog.get(name)
    spec = CONVERTIBLE.get(name)
    if spec is None or model.kind != "mmproj":
        raise FetchError(f"{name} is not built by `models convert` (convertible: {', '.join(CONVERTIBLE)})",
                         ExitCode.EX_USAGE)
    if outtype not in ("f16", "f32", "bf16"):
        raise FetchError(f"--outtype {outtype!r}: expected f16, f32 or bf16", ExitCode.EX_USAGE)
    final = Path(models_dir) / model.files[0].name
    if final.exists() and not force:
        raise FetchError(f"{final} exists; `models verify {name}` checks it, --force replaces it",
                         ExitCode.EX_CANTCREAT)
    config = check_checkpoint(Path(checkpoint), spec)
    widths: dict[str, int] = {}
    if (w := text_width(config)) is not None:
        widths[f"the checkpoint's text model (text_config.hidden_size in {Path(checkpoint) / 'config.json'})"] = w
    if text_model is not None:
        widths[f"--text-model {text_model}"] = _gguf_width(Path(text_model))
    root = converter_dir(llama_cpp)
    interpreter = python or sys.executable
    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
        writable = os.access(models_dir, os.W_OK | os.X_OK)
    except OSError as exc:
        raise FetchError(f"{models_dir}: cannot create the models directory: {exc.strerror}",
                         ExitCode.EX_CANTCREAT) from None
    if not writable:
        raise FetchError(f"{models_dir}: the models directory is not writable", ExitCode.EX_CANTCREAT)
    # hidden, unique, created by the converter itself (so with the usual permissions), renamed only when checked
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.converting")
    try:
        _run_converter(interpreter, root, Path(checkpoint), tmp, outtype)
        try:
            summary = check_projector(tmp, widths)
        except HeaderError as exc:
            raise FetchError(f"the converted projector failed the header check (nothing installed): {exc}",
                             ExitCode.EX_DATAERR) from None
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    summary["path"] = str(final)
    return final, summary


def _run_converter(python: str, root: Path, checkpoint: Path, out: Path, outtype: str) -> None:
    cmd = [python, "-c", DRIVER, str(root), "--mmproj", "--outtype", outtype, "--outfile", str(out),
           str(checkpoint)]
    log.info("converting %s with %s/convert_hf_to_gguf.py --mmproj --outtype %s (Python: %s)", checkpoint, root,
             outtype, python)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    except OSError as exc:
        raise FetchError(f"--python {python}: cannot run it: {exc.strerror}; it needs the packages of the "
                         f"convert extra: pip install '{EXTRA}'", ExitCode.EX_UNAVAILABLE) from None
    for line in done.stderr.splitlines():
        log.debug("converter: %s", line)
    if done.returncode == MISSING_PACKAGES:
        raise FetchError(f"{python}: {done.stderr.strip().splitlines()[-1]}: the converter needs torch and "
                         f"transformers, the optional extra: pip install '{EXTRA}' (a CPU build of torch is "
                         "enough), or give --python an interpreter that has them", ExitCode.EX_UNAVAILABLE)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise FetchError(f"the converter failed on {checkpoint} (exit status {done.returncode}):\n{tail}",
                         ExitCode.EX_DATAERR)
