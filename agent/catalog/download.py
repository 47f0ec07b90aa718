"""A resumable, checksum-verified downloader for the files of the model catalog; standard library only.

`gemma-agent models list | pull NAME | verify [NAME] | remove NAME` work on a models directory (default
`models`, relative to the working directory; `--dir` to change). A download is written to FILE.part, resumes
with an HTTP Range request after a dropped connection (or in a later run), starts again when a server ignores
Range, is hashed while it is written (a resumed prefix included) and is renamed into place only when its size
and checksums match. Mirrors are tried in order (Hugging Face, then ModelScope; `--mirrors` or
$GEMMA_AGENT_MODEL_MIRRORS to change); HF_ENDPOINT and MODELSCOPE_ENDPOINT replace the two hosts.

Exit codes of the `models` command (sysexits.h values, like agent/exitcodes.py):
   0  done
  64  unknown model name or bad option value (the message lists the known names)
  65  a file failed its size or checksum check (download rejected and removed, or `verify` found it corrupt)
  66  `verify NAME` / `remove NAME`: the model's files are not in the models directory
  69  nothing could be downloaded: every mirror failed (HTTP error, timeout, refused) or nothing is published
  73  not enough free disk space (checked before downloading), or the models directory cannot be written
  78  the catalog is invalid (the message names the key and the line)
 130  interrupted (Ctrl-C): the partial download is kept as FILE.part and resumes on the next `pull`
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from agent.catalog.catalog import MIRRORS, Catalog, FetchError, FileSpec, ModelSpec
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent.catalog")

DEFAULT_DIR = "models"
DEFAULT_MIRRORS = ("huggingface", "modelscope")
MIRRORS_ENV = "GEMMA_AGENT_MODEL_MIRRORS"
RESERVE = 64 << 20  # free space a download must leave behind
USER_AGENT = "gemma-agent-models/1"


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class FetchOptions:
    """How `pull` downloads. `disk_free` and `progress` exist so a caller (or a test) can redirect them."""

    mirrors: Sequence[str] = DEFAULT_MIRRORS
    timeout: float = 30.0  # seconds for the connection and for each read
    retries: int = 5  # more attempts per mirror after a transient failure (dropped connection, 5xx, timeout)
    backoff: float = 1.0  # first wait before a retry; doubles each time
    backoff_max: float = 30.0
    log_interval: float = 10.0  # seconds between progress log lines when stderr is not a terminal
    chunk_size: int = 1 << 20
    environ: Mapping[str, str] | None = None  # for HF_ENDPOINT / MODELSCOPE_ENDPOINT; default os.environ
    disk_free: Callable[[Path], int] = field(default=_disk_free)
    progress: IO[str] | None = None  # where progress goes; default sys.stderr


def parse_mirrors(text: str) -> tuple[str, ...]:
    """'modelscope,huggingface' -> ('modelscope', 'huggingface'); unknown or empty lists are an error."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in MIRRORS]
    if bad or not names:
        raise FetchError(f"mirrors {text!r}: expected a comma-separated list of {', '.join(MIRRORS)}",
                         ExitCode.EX_USAGE)
    return names


def resolve_url(mirror: str, url: str, environ: Mapping[str, str] | None = None) -> str:
    """Apply HF_ENDPOINT / MODELSCOPE_ENDPOINT: replace the mirror's host prefix of `url`."""
    env = os.environ if environ is None else environ
    base, variable = MIRRORS[mirror]
    override = env.get(variable, "").strip()
    if not override:
        return url
    if not override.startswith(("http://", "https://")) or any(c.isspace() for c in override):
        raise FetchError(f"{variable}={override!r}: expected an http(s):// URL", ExitCode.EX_USAGE)
    for prefix in (base, base.replace("://", "://www.", 1)):
        if url.startswith(prefix + "/"):
            return override.rstrip("/") + url[len(prefix):]
    return url


def human_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# --- downloading --------------------------------------------------------------------------------------------


class _Transient(Exception):
    """Worth another try on the same mirror (dropped connection, timeout, 5xx, 429)."""


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file (404, wrong size): try the next one."""


class _Mismatch(_MirrorFailed):
    """The bytes arrived but are not the catalogued file (size or checksum)."""


class _Hasher:
    """sha256 (and sha1 where the catalog has one) of the bytes written so far."""

    def __init__(self, with_sha1: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(usedforsecurity=False) if with_sha1 else None
        self.count = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        self.count += len(data)


def _hash_file(path: Path, with_sha1: bool, chunk: int = 4 << 20) -> _Hasher:
    hasher = _Hasher(with_sha1)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return hasher


def _hash_prefix(fh: BinaryIO, length: int, with_sha1: bool, chunk: int) -> _Hasher:
    hasher = _Hasher(with_sha1)
    fh.seek(0)
    while hasher.count < length and (block := fh.read(min(chunk, length - hasher.count))):
        hasher.update(block)
    return hasher


class _Progress:
    """A progress bar on a terminal; otherwise a log line every `interval` seconds."""

    def __init__(self, label: str, total: int | None, start: int, stream: IO[str], interval: float) -> None:
        self.label, self.total, self.start = label, total, start
        self.stream, self.interval = stream, interval
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else self.interval):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-6) / (1 << 20)
        pct = f"{100 * done / self.total:5.1f}%" if self.total else "    ?%"
        if self.tty:
            filled = int(30 * done / self.total) if self.total else 0
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {pct} "
                              f"{human_size(done)} / {human_size(self.total)} {rate:.1f} MiB/s ")
            self.stream.flush()
        else:
            log.info("%s: %s of %s (%s), %.1f MiB/s", self.label, human_size(done), human_size(self.total),
                     pct.strip(), rate)

    def close(self, done: int) -> None:
        if self.tty:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


@contextmanager
def _locked_part(part: Path) -> Iterator[BinaryIO]:
    """Open FILE.part for appending, exclusively: two pulls into one directory must not share it."""
    try:
        fh = open(part, "a+b")  # noqa: SIM115 (closed below, after the lock)
    except OSError as exc:
        raise FetchError(f"cannot write {part}: {exc.strerror or exc}", ExitCode.EX_CANTCREAT) from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FetchError(f"{part} is locked: another download of this file is running",
                             ExitCode.EX_UNAVAILABLE) from None
        yield fh
    finally:
        try:  # an empty FILE.part (nothing received, or a rejected download emptied) is not worth keeping
            if os.fstat(fh.fileno()).st_size == 0 and os.stat(part).st_ino == os.fstat(fh.fileno()).st_ino:
                part.unlink()
        except OSError:
            pass
        fh.close()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); unparsable -> (None, None)."""
    m = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


class _Download:
    """One catalogued file into one directory, from the mirrors in order."""

    def __init__(self, spec: FileSpec, directory: Path, opts: FetchOptions) -> None:
        self.spec, self.opts = spec, opts
        self.final = directory / spec.name
        self.part = directory / (spec.name + ".part")
        self.directory = directory
        self.opener = urllib.request.build_opener()
        self.hasher: _Hasher | None = None

    def run(self) -> Path:
        spec = self.spec
        mirrors = [m for m in self.opts.mirrors if m in spec.urls]
        if not mirrors:
            have = ", ".join(spec.urls) or "none"
            raise FetchError(f"{spec.name}: no URL for mirrors {', '.join(self.opts.mirrors)} "
                             f"(catalog has: {have})", ExitCode.EX_UNAVAILABLE)
        failures: list[str] = []
        mismatch = False
        with _locked_part(self.part) as fh:
            for i, mirror in enumerate(mirrors):
                url = resolve_url(mirror, spec.urls[mirror], self.opts.environ)
                log.info("%s: downloading %s from %s: %s", spec.name, human_size(spec.size), mirror, url)
                try:
                    self.from_mirror(url, fh)
                except _MirrorFailed as exc:
                    if isinstance(exc, _Mismatch):  # FILE.part is not a prefix of the catalogued file
                        mismatch = True
                        self.restart(fh)
                    failures.append(f"{mirror}: {exc}")
                    nxt = f"; trying {mirrors[i + 1]}" if i + 1 < len(mirrors) else ""
                    log.warning("%s: %s failed: %s%s", spec.name, mirror, exc, nxt)
                    continue
                os.replace(self.part, self.final)
                _fsync_dir(self.directory)
                return self.final
            keep = os.fstat(fh.fileno()).st_size
            if keep:
                log.info("%s: keeping %s of partial download in %s; `pull` again resumes it",
                         spec.name, human_size(keep), self.part)
        code = ExitCode.EX_DATAERR if mismatch else ExitCode.EX_UNAVAILABLE
        raise FetchError(f"{spec.name}: download failed from every mirror: {'; '.join(failures)}", code)

    def from_mirror(self, url: str, fh: BinaryIO) -> None:
        attempt = 0
        while True:
            try:
                self.attempt(url, fh)
                return
            except _Transient as exc:
                attempt += 1
                if attempt > self.opts.retries:
                    raise _MirrorFailed(f"gave up after {attempt} attempt(s), last: {exc}") from None
                delay = min(self.opts.backoff * 2 ** (attempt - 1), self.opts.backoff_max)
                log.warning("%s: %s; retry %d of %d in %.1f s (%s already in %s)", self.spec.name, exc,
                            attempt, self.opts.retries, delay, human_size(os.fstat(fh.fileno()).st_size),
                            self.part.name)
                time.sleep(delay)

    def restart(self, fh: BinaryIO) -> None:
        fh.truncate(0)
        self.hasher = None

    def attempt(self, url: str, fh: BinaryIO) -> None:
        spec = self.spec
        offset = os.fstat(fh.fileno()).st_size
        if spec.size is not None and offset > spec.size:
            log.warning("%s: %s is larger than the file (%d > %d bytes); starting again", spec.name,
                        self.part.name, offset, spec.size)
            self.restart(fh)
            offset = 0
        if offset and offset == spec.size:
            log.info("%s: %s already holds all %d bytes; checking it", spec.name, self.part.name, offset)
            if self.finish_existing(fh, offset):
                return
            offset = 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = self.opener.open(urllib.request.Request(url, headers=headers), timeout=self.opts.timeout)
        except urllib.error.HTTPError as exc:
            status, reason, content_range = exc.code, exc.reason, exc.headers.get("Content-Range")
            exc.close()
            if status == 416 and offset:
                self.range_refused(fh, offset, content_range)
                return
            if status in (408, 425, 429) or status >= 500:
                raise _Transient(f"HTTP {status} {reason}") from None
            raise _MirrorFailed(f"HTTP {status} {reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, socket.gaierror):  # no DNS (no network): retrying will not help
                raise _MirrorFailed(f"cannot resolve {urllib.parse.urlsplit(url).hostname} ({exc.reason.strerror}):"
                                    " no network or no DNS?") from None
            raise _Transient(_why(exc)) from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, bad status
            raise _Transient(_why(exc)) from None
        with resp:
            total = self.check_response(resp, fh, offset)
            offset = os.fstat(fh.fileno()).st_size  # 0 if check_response started over
            self.receive(resp, fh, offset, total)

    def range_refused(self, fh: BinaryIO, offset: int, content_range: str | None) -> None:
        """HTTP 416: the partial file is already complete, or it is not a prefix of this file at all."""
        _, total = _content_range(content_range)
        if total is not None and total == offset and self.spec.size in (None, total):
            log.info("%s: the server says %s is already complete (%d bytes); checking it", self.spec.name,
                     self.part.name, offset)
            if self.finish_existing(fh, offset):
                return
            raise _Transient("the complete partial file was not the catalogued file")
        log.warning("%s: the server refused the range bytes=%d- (HTTP 416, file size %s); starting again",
                    self.spec.name, offset, total if total is not None else "not given")
        self.restart(fh)
        raise _Transient("HTTP 416 range not satisfiable; partial file discarded")

    def check_response(self, resp: Any, fh: BinaryIO, offset: int) -> int | None:
        """Check the status and length against the request and the catalog; return the file's total size."""
        spec = self.spec
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if total is None and length is not None:
                total = offset + length
            if start != offset:
                log.warning("%s: asked for bytes=%d- but the server sent a range from %s; starting again",
                            spec.name, offset, start)
                self.restart(fh)
                raise _Transient("server answered a different range")
        elif resp.status == 200:
            if offset:
                log.warning("%s: the server ignored the Range request and sent the whole file; starting "
                            "again from byte 0 (%s discarded)", spec.name, human_size(offset))
                self.restart(fh)
                offset = 0
            total = length
        else:
            raise _MirrorFailed(f"unexpected HTTP status {resp.status}")
        if spec.size is not None and total is not None and total != spec.size:
            raise _Mismatch(f"the server's file is {total:,} bytes but the catalog says {spec.size:,}: "
                            "not the catalogued file (re-uploaded upstream?)")
        total = spec.size if spec.size is not None else total
        if spec.size is None and total is not None:
            _check_space(self.directory, total - offset, self.opts)
        return total

    def receive(self, resp: Any, fh: BinaryIO, offset: int, total: int | None) -> None:
        spec = self.spec
        if self.hasher is None or self.hasher.count != offset:
            if offset:
                log.info("%s: resuming after interruption at byte %d of %s (hashing the %s already in %s)",
                         spec.name, offset, total if total is not None else "?", human_size(offset),
                         self.part.name)
            self.hasher = _hash_prefix(fh, offset, spec.sha1 is not None, self.opts.chunk_size)
        elif offset:
            log.info("%s: resuming after interruption at byte %d of %s", spec.name, offset,
                     total if total is not None else "?")
        hasher = self.hasher
        progress = _Progress(spec.name, total, offset, self.opts.progress or sys.stderr,
                             self.opts.log_interval)
        done = offset
        try:
            while True:
                try:
                    block = resp.read(self.opts.chunk_size)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(f"connection lost after {done:,} bytes ({_why(exc)})") from None
                if not block:
                    break
                if total is not None and done + len(block) > total:
                    self.restart(fh)
                    raise _Mismatch(f"the server sent more than the {total:,} bytes announced")
                try:
                    fh.write(block)
                except OSError as exc:
                    raise FetchError(f"cannot write {self.part}: {exc.strerror or exc}",
                                     ExitCode.EX_CANTCREAT) from None
                hasher.update(block)
                done += len(block)
                progress.update(done)
        finally:
            progress.close(done)
            fh.flush()
        if total is not None and done < total:
            raise _Transient(f"connection closed after {done:,} of {total:,} bytes")
        self.finish(fh, done)

    def finish_existing(self, fh: BinaryIO, size: int) -> bool:
        """Check a FILE.part left complete by an earlier run; False (and emptied) when it is not this file."""
        try:
            self.finish(fh, size)
        except _Mismatch as exc:
            log.warning("%s: the partial file left by an earlier run is complete but wrong (%s); "
                        "starting again", self.spec.name, exc)
            return False
        return True

    def finish(self, fh: BinaryIO, size: int) -> None:
        """Size and checksums of the complete FILE.part; a mismatch empties it (it is not this file)."""
        spec = self.spec
        fh.flush()
        os.fsync(fh.fileno())
        hasher = self.hasher
        if hasher is None or hasher.count != size:
            hasher = _hash_prefix(fh, size, spec.sha1 is not None, self.opts.chunk_size)
        problem = None
        if spec.size is not None and size != spec.size:
            problem = f"got {size:,} bytes, the catalog says {spec.size:,}"
        elif spec.sha256 and hasher.sha256.hexdigest() != spec.sha256:
            problem = f"sha256 is {hasher.sha256.hexdigest()}, the catalog pins {spec.sha256}"
        elif spec.sha1 and hasher.sha1 is not None and hasher.sha1.hexdigest() != spec.sha1:
            problem = f"sha1 is {hasher.sha1.hexdigest()}, the catalog pins {spec.sha1}"
        if problem:
            self.restart(fh)
            raise _Mismatch(f"checksum mismatch: {problem}; download rejected")
        if spec.sha256:
            log.info("%s: complete, %d bytes, sha256 verified", spec.name, size)
        else:
            log.warning("%s: complete, %d bytes; the catalog publishes no sha256, so only the size was "
                        "checked; sha256 of this download: %s", spec.name, size, hasher.sha256.hexdigest())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_space(directory: Path, needed: int, opts: FetchOptions) -> None:
    """Refuse before writing anything when `needed` bytes plus the reserve do not fit."""
    if needed <= 0:
        return
    free = opts.disk_free(directory)
    if needed + RESERVE > free:
        raise FetchError(f"not enough free disk space in {directory}: the download needs {needed:,} bytes "
                         f"({human_size(needed)}) plus a {human_size(RESERVE)} reserve, but only {free:,} bytes "
                         f"({human_size(free)}) are free", ExitCode.EX_CANTCREAT)


def _present(directory: Path, spec: FileSpec) -> bool:
    path = directory / spec.name
    return path.is_file() and (spec.size is None or path.stat().st_size == spec.size)


def pull(catalog: Catalog, name: str, models_dir: str | os.PathLike[str] = DEFAULT_DIR,
         options: FetchOptions | None = None) -> list[Path]:
    """Download the files of model `name` that are not already present; return their paths."""
    opts = options or FetchOptions()
    model = catalog.get(name)
    if model.unavailable:
        raise FetchError(f"{name}: cannot be downloaded: {model.unavailable}", ExitCode.EX_UNAVAILABLE)
    unknown = [m for m in opts.mirrors if m not in MIRRORS]
    if unknown or not opts.mirrors:
        raise FetchError(f"unknown mirror(s) {unknown or '(none given)'}; known: {', '.join(MIRRORS)}",
                         ExitCode.EX_USAGE)
    directory = Path(models_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the models directory {directory}: {exc.strerror or exc}",
                         ExitCode.EX_CANTCREAT) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FetchError(f"the models directory {directory} is not writable", ExitCode.EX_CANTCREAT)
    todo = []
    for spec in model.files:
        if _present(directory, spec):
            log.info("%s: already present in %s (`verify %s` checks its checksum)", spec.name, directory,
                     name)
            continue
        if (directory / spec.name).exists():
            log.warning("%s: the file in %s has the wrong size; downloading it again", spec.name, directory)
        todo.append(spec)
    needed = 0
    for spec in todo:
        part = directory / (spec.name + ".part")
        if spec.size is not None:
            needed += max(spec.size - (part.stat().st_size if part.is_file() else 0), 0)
    _check_space(directory, needed, opts)
    for spec in todo:
        _Download(spec, directory, opts).run()
    return [directory / spec.name for spec in model.files]


# --- verify, remove, status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    model: str
    path: Path
    status: str  # ok | unpinned (size ok, no checksum published) | missing | corrupt
    detail: str


def verify_model(model: ModelSpec, models_dir: str | os.PathLike[str] = DEFAULT_DIR) -> list[FileCheck]:
    """Check size and checksums of each file of `model` in the directory (reads every byte)."""
    checks = []
    for spec in model.files:
        path = Path(models_dir) / spec.name
        if not path.is_file():
            checks.append(FileCheck(model.name, path, "missing", "not downloaded"))
            continue
        size = path.stat().st_size
        if spec.size is not None and size != spec.size:
            checks.append(FileCheck(model.name, path, "corrupt",
                                    f"{size:,} bytes, the catalog says {spec.size:,}"))
            continue
        got = _hash_file(path, spec.sha1 is not None)
        if spec.sha256 and got.sha256.hexdigest() != spec.sha256:
            checks.append(FileCheck(model.name, path, "corrupt",
                                    f"sha256 {got.sha256.hexdigest()}, the catalog pins {spec.sha256}"))
        elif spec.sha1 and got.sha1 is not None and got.sha1.hexdigest() != spec.sha1:
            checks.append(FileCheck(model.name, path, "corrupt",
                                    f"sha1 {got.sha1.hexdigest()}, the catalog pins {spec.sha1}"))
        elif not spec.sha256:
            checks.append(FileCheck(model.name, path, "unpinned", f"{size:,} bytes; no published sha256 "
                                    f"(this file's: {got.sha256.hexdigest()})"))
        else:
            checks.append(FileCheck(model.name, path, "ok", f"{size:,} bytes, sha256 matches"))
    return checks


def remove(catalog: Catalog, name: str, models_dir: str | os.PathLike[str] = DEFAULT_DIR) -> list[Path]:
    """Delete the files of model `name` (and partial downloads of them); return what was removed."""
    model = catalog.get(name)
    removed = []
    for spec in model.files:
        for path in (Path(models_dir) / spec.name, Path(models_dir) / (spec.name + ".part")):
            if path.is_file() or path.is_symlink():
                try:
                    path.unlink()
                except OSError as exc:
                    raise FetchError(f"cannot remove {path}: {exc.strerror or exc}", ExitCode.EX_CANTCREAT) from None
                removed.append(path)
    if not removed:
        raise FetchError(f"{name}: nothing to remove in {models_dir}", ExitCode.EX_NOINPUT)
    return removed


def status(model: ModelSpec, models_dir: str | os.PathLike[str] = DEFAULT_DIR) -> str:
    """present | partial NN% | missing | not published, from file sizes only (no hashing)."""
    directory = Path(models_dir)
    if all(_present(directory, f) for f in model.files):
        return "present"
    if model.unavailable:
        return "not published"
    have, parts = 0, 0
    for f in model.files:
        for path in (directory / f.name, directory / (f.name + ".part")):
            if path.is_file():
                have += path.stat().st_size
                parts += path.suffix == ".part"
    if not have:
        return "partial (0 bytes)" if parts else "missing"
    total = model.size
    return f"partial {100 * have / total:.0f}%" if total else "partial"
