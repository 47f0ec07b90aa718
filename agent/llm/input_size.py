"""The vision encoder runs at `camera.input_size`.

libmtmd resizes every image for Gemma 3n's MobileNetV5 projector (`gemma3nv`) to the projector's
`clip.vision.image_size`, 768 in the published layout, whatever size it is handed: a 256 frame was scaled back up
and encoded at full cost (17-18 s on two x86 cores). The graph itself runs at 256, 512 and 768 (its fusion
adapter pools the highest-resolution feature map to 16 x 16, and the token count is image_size / patch_size =
256), so a copy of the projector whose header says image_size N, patch_size N / 256 encodes at N: 1.6 s at 256,
7-8 s at 512 on the same machine (bench/RESULTS.md).

The copy is made once per size, next to nothing the user owns: in $CACHE_DIRECTORY (the unit's CacheDirectory=)
or ~/.cache/gemma-agent/projectors, named after the original's path, size and mtime, written to a temporary file,
checked (every tensor the same, only those two values changed) and renamed into place, so a crash never leaves a
half-written projector that a later start would trust.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from agent.gguf import GgufInfo, ModelFileError, inspect

log = logging.getLogger("agent.llm.input_size")
RESIZABLE = ("gemma3nv",)  # projector types whose graph runs at any of SIZES with image_size / patch_size tokens
SIZES = (256, 512, 768)
RESERVE = 256 << 20  # free disk a copy must leave


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    systemd = env.get("CACHE_DIRECTORY", "").split(":")[0]
    return (Path(systemd) if systemd else Path.home() / ".cache" / "gemma-agent") / "projectors"


def resized(info: GgufInfo, size: int) -> GgufInfo | None:
    """The header a copy of projector `info` that encodes at `size` would have; None when `info` itself does (or
    its size cannot change). Raises ModelFileError for a size its token grid does not divide."""
    md = info.metadata
    if info.projector_types()[0] not in RESIZABLE:
        return None
    native, patch = int(md.get("clip.vision.image_size", 0)), int(md.get("clip.vision.patch_size", 0))
    if native == size or not native or not patch:
        return None
    tokens = native // patch
    if size % tokens:
        raise ModelFileError(f"{info.path}: {tokens} image tokens per side cannot be made from a {size} px input")
    return replace(info, metadata={**md, "clip.vision.image_size": size, "clip.vision.patch_size": size // tokens})


def projector_for(path: str, size: int, directory: Path | None = None) -> str:
    """The projector file to load so the encoder runs at `size`: `path` itself when it already does (or is not a
    projector whose size can change), else a header-patched copy, made on first use. Raises ModelFileError."""
    info = inspect(path)
    wanted = resized(info, size)
    if wanted is None:
        return path
    directory = directory or cache_dir()
    st = os.stat(path)
    key = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()[:12]
    target = directory / f"{Path(path).stem}.{size}px.{key}.gguf"
    if target.exists():
        try:
            _check_copy(wanted, inspect(target))
            return str(target)
        except ModelFileError as exc:
            log.warning("%s: %s; making it again", target, exc)
    _make_copy(info, wanted, target)
    return str(target)


def _make_copy(info: GgufInfo, wanted: GgufInfo, target: Path) -> None:
    from gguf import GGUFReader

    size = wanted.metadata["clip.vision.image_size"]
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < info.size + RESERVE:
        raise ModelFileError(f"{target.parent}: {free >> 20} MiB free, a {size} px copy of {info.path} needs "
                             f"{(info.size + RESERVE) >> 20} MiB (or set camera.input_size to "
                             f"{info.metadata.get('clip.vision.image_size')}, the projector's own size)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        log.info("making a %d px copy of the projector %s in %s (once)", size, info.path, target.parent)
        shutil.copyfile(info.path, tmp)
        reader = GGUFReader(tmp, "r+")
        for name in ("clip.vision.image_size", "clip.vision.patch_size"):
            field = reader.fields[name]
            field.parts[field.data[0]][0] = wanted.metadata[name]
        reader.data.flush()
        del reader
        _check_copy(wanted, inspect(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def _check_copy(wanted: GgufInfo, copy: GgufInfo) -> None:
    """The copy is byte for byte the original but for image_size and patch_size."""
    if copy.metadata != wanted.metadata or copy.tensors != wanted.tensors or copy.size != wanted.size:
        raise ModelFileError(f"{copy.path}: not a {wanted.metadata['clip.vision.image_size']} px copy of "
                             f"{wanted.path}")
