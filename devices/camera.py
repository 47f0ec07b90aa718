"""Camera: one latest-frame grabber over every OpenCV source, reconnecting on its own.

`CameraSettings.source` picks the source:

- `0` / `"0"`: a V4L2 device by index; `"/dev/video0"`: by path. width, height and fps are requested from it.
- an RTSP / HTTP(S) URL (`rtsp://user:pass@cam/stream`, an MJPEG `http://.../video`): FFmpeg, with open and
  read timeouts so a dead stream is noticed. Passwords are blanked in logs.
- a GStreamer pipeline (any source containing `!`), ending in `appsink`. `{width}`, `{height}` and `{fps}` are
  replaced from the config (`{fps}` as a GStreamer fraction such as `15/1`). This needs an OpenCV built with
  GStreamer: PyPI's opencv-python(-headless) is not, so on the boards use JetPack's OpenCV (Jetson) or the
  distribution's `python3-opencv` (Raspberry Pi OS) in a venv made with `--system-site-packages`.
  Jetson CSI camera (JetPack 5/6, nvarguscamerasrc; the sensor mode is chosen by the first caps)::

    nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! nvvidconv
    ! video/x-raw,width={width},height={height},format=BGRx ! videoconvert ! video/x-raw,format=BGR
    ! appsink drop=true max-buffers=1 sync=false

  Raspberry Pi camera (libcamera, Pi 4/5 on Bookworm; apt install gstreamer1.0-libcamera python3-opencv)::

    libcamerasrc ! video/x-raw,width={width},height={height},framerate={fps} ! videoconvert
    ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false

  (written here on several lines; in the config it is one line). `drop=true max-buffers=1` keeps GStreamer
  itself from queueing stale frames.
- a video file: replayed at cfg.fps (not the file's own rate), from the start again when cfg.loop.
- a folder of images (.jpg .jpeg .png .bmp .webp, in name order): replayed at cfg.fps, looped when cfg.loop;
  the folder is listed again on each pass.

One grabber thread per camera keeps only the latest frame (`latest()`), never a buffer. Live sources are read
as fast as they deliver; a grab that returns at once came from OpenCV's / the driver's queue, so the grabber
keeps grabbing (without decoding) until a grab has to wait, and decodes only that newest frame: the frame handed
out is at most one frame period old. Files and folders are paced by wall time: frame k is due k/fps after the
start and frames that fell behind are skipped, so "latest" advances with wall time as a live camera does.

On a read failure or a source that disappears (file or folder removed, /dev/video* unplugged, stream down) the
state becomes `lost` and the grabber reopens the source after reconnect_min seconds, doubling up to
reconnect_max; the state is `ok` again when frames return. Nothing raises out of the thread; a configuration
that can never work (empty source, GStreamer without GStreamer support) raises CameraError from the
constructor instead. States: `stopped` (not started, or stopped), `starting`, `ok`, `lost`, `ended` (a file or
folder replayed once with loop off).

Subscribers (`subscribe(callback)`) get every new Frame from the grabber thread, without a copy: the image is
read-only and shared, and the callback must return quickly (never block: hand work to a queue).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

log = logging.getLogger("devices.camera")

State = Literal["stopped", "starting", "ok", "lost", "ended"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
STREAM_TIMEOUT_MS = 10000  # FFmpeg open / read timeout for URLs
STALL_S = 5.0  # no frame for this long while `ok`: reported as `lost`
MAX_SKIP_S = 2.0  # a replay further behind than this restarts its clock instead of skipping


class CameraSettings(Protocol):
    """What the camera reads of its settings (the agent's `camera` config section satisfies it)."""

    @property
    def source(self) -> int | str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def fps(self) -> float: ...
    @property
    def loop(self) -> bool: ...
    @property
    def reconnect_min(self) -> float: ...
    @property
    def reconnect_max(self) -> float: ...


class CameraError(Exception):
    """A camera configuration that cannot work, worded for the person who wrote it."""


@dataclass(frozen=True)
class Frame:
    """One captured frame: a read-only BGR uint8 image and when it was captured."""

    image: np.ndarray
    ts: float  # time.time() at capture
    mono: float  # time.monotonic() at capture
    seq: int  # 1, 2, 3 ... per camera, across reconnects


@dataclass(frozen=True)
class Source:
    kind: Literal["index", "device", "gstreamer", "url", "path"]
    target: int | str
    display: str  # safe to log


class _Lost(Exception):
    """The source failed; reopen it after a backoff."""


class _Ended(Exception):
    """A replay without loop reached its end."""


class _Stopped(Exception):
    """stop() was called while waiting."""


def parse_source(cfg: CameraSettings) -> Source:
    """Classify cfg.source, or raise CameraError for one that can never work."""
    src = cfg.source
    if isinstance(src, bool):
        raise CameraError(f"camera.source: expected a device index, path, URL or pipeline, got {src!r}")
    if isinstance(src, int):
        if src < 0:
            raise CameraError(f"camera.source: a device index must be 0 or more, got {src}")
        return Source("index", src, f"V4L2 device {src}")
    text = src.strip()
    if not text:
        raise CameraError("camera.source is empty: set a device index (0), /dev/video0, rtsp://..., a GStreamer "
                          "pipeline, a video file or an image folder")
    if text.isdigit():
        return Source("index", int(text), f"V4L2 device {int(text)}")
    if "!" in text:
        if not _has_gstreamer():
            raise CameraError("camera.source is a GStreamer pipeline, but this OpenCV has no GStreamer support "
                              "(PyPI's opencv-python is built without it): use JetPack's OpenCV or the "
                              "distribution's python3-opencv")
        if "appsink" not in text:
            raise CameraError("camera.source: a GStreamer pipeline must end in appsink (e.g. '... ! videoconvert "
                              "! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false')")
        pipeline = expand_pipeline(text, cfg)
        return Source("gstreamer", pipeline, "GStreamer " + pipeline.split("!")[0].strip())
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return Source("url", text, re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", text))
    if text.startswith("/dev/video"):
        return Source("device", text, text)
    return Source("path", text, text)


def expand_pipeline(pipeline: str, cfg: CameraSettings) -> str:
    """Replace {width}, {height} and {fps} (as a GStreamer fraction, 15/1) in a pipeline from the config."""
    rate = Fraction(cfg.fps).limit_denominator(1001)
    return (pipeline.replace("{width}", str(cfg.width)).replace("{height}", str(cfg.height))
            .replace("{fps}", f"{rate.numerator}/{rate.denominator}"))


def _has_gstreamer() -> bool:
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER))
    except AttributeError:
        return "GStreamer:                   YES" in cv2.getBuildInformation()


class Camera:
    """A latest-frame grabber; see the module docstring for sources, states and the subscriber contract."""

    def __init__(self, cfg: CameraSettings) -> None:
        self.cfg = cfg
        self.source = parse_source(cfg)
        self._state: State = "stopped"
        self.frames = 0  # frames delivered
        self.dropped = 0  # frames skipped to stay current (queued live frames, late replay frames)
        self.losses = 0  # times the source was lost
        self.reconnects = 0  # attempts to reopen it after a loss
        self.last_error = ""
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._subscribers: list[Callable[[Frame], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._times: deque[float] = deque(maxlen=31)
        self._callback_errors = 0

    # --- public interface ---

    @property
    def state(self) -> State:
        if self._state == "ok" and self._latest is not None and time.monotonic() - self._latest.mono > max(
                STALL_S, 5.0 / self.cfg.fps):
            return "lost"  # the source stopped delivering without failing (yet)
        return self._state

    def start(self) -> None:
        """Start the grabber thread (returns at once; frames follow when the source opens)."""
        if self._thread is not None:
            if self._thread.is_alive():
                return  # running, or a previous grabber still stuck in the driver
            self._thread = None
        self._stop.clear()
        self._state = "starting"
        self._thread = threading.Thread(target=self._run, name="camera-grabber", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the grabber; `latest()` keeps returning the last frame."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("camera %s: grabber still blocked in the driver after %.0f s; left to exit on its own",
                            self.source.display, timeout)
            else:
                self._thread = None
        self._state = "stopped"
        with self._cond:
            self._cond.notify_all()

    def latest(self) -> Frame | None:
        """The newest frame (None before the first)."""
        return self._latest

    def wait_frame(self, after: int = 0, timeout: float | None = None) -> Frame | None:
        """The first frame with seq > after, waiting up to `timeout` seconds (None on timeout or stop)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.seq <= after:
                left = None if end is None else end - time.monotonic()
                if (left is not None and left <= 0) or self._stop.is_set():
                    return None
                self._cond.wait(left)
            return self._latest

    def subscribe(self, callback: Callable[[Frame], None]) -> Callable[[], None]:
        """Call `callback(frame)` from the grabber thread for every new frame; returns an unsubscribe function.
        The callback must not block and must not modify the (read-only, shared) image."""
        self._subscribers = [*self._subscribers, callback]

        def unsubscribe() -> None:
            self._subscribers = [c for c in self._subscribers if c is not callback]

        return unsubscribe

    @property
    def fps(self) -> float:
        """Frames per second delivered over the last (up to) 30 frames; 0.0 when stalled."""
        times = list(self._times)
        if len(times) < 2 or time.monotonic() - times[-1] > max(2.0, 3.0 / self.cfg.fps):
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def stats(self) -> dict[str, Any]:
        """Figures for the health topic."""
        frame = self._latest
        return {"state": self.state, "source": self.source.display, "fps": round(self.fps, 2),
                "frames": self.frames, "dropped": self.dropped, "losses": self.losses,
                "reconnects": self.reconnects, "age_s": None if frame is None else
                round(time.monotonic() - frame.mono, 3), "error": self.last_error}

    # --- grabber thread ---

    def _run(self) -> None:
        delay = self.cfg.reconnect_min
        attempts = 0
        try:
            while not self._stop.is_set():
                if self._state == "lost":
                    self.reconnects += 1
                    attempts += 1
                try:
                    reader = self._open()
                except _Lost as exc:
                    self._lose(str(exc), delay, quiet=attempts > 0)
                else:
                    try:
                        while not self._stop.is_set():
                            image, mono = reader.read()
                            self._publish(image, mono)
                            delay, attempts = self.cfg.reconnect_min, 0
                            self.dropped += reader.take_dropped()
                    except _Ended:
                        self._state = "ended"
                        log.info("camera %s: end of replay (loop is off)", self.source.display)
                        return
                    except _Stopped:
                        return
                    except _Lost as exc:
                        self._lose(str(exc), delay, quiet=False)
                    except Exception as exc:
                        log.exception("camera %s: unexpected error", self.source.display)
                        self._lose(f"{type(exc).__name__}: {exc}", delay, quiet=False)
                    finally:
                        reader.close()
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.cfg.reconnect_max)
        except Exception:  # never let the thread die with an exception; the daemon reads `state`
            log.exception("camera %s: grabber failed", self.source.display)
            self._state = "lost"

    def _lose(self, reason: str, delay: float, quiet: bool) -> None:
        if self._stop.is_set():
            return
        if self._state != "lost":
            self.losses += 1
        changed = reason != self.last_error
        self._state = "lost"
        self._times.clear()
        self.last_error = reason
        level = logging.DEBUG if quiet and not changed else logging.WARNING
        log.log(level, "camera %s lost: %s; retrying in %.1f s", self.source.display, reason, delay)

    def _publish(self, image: np.ndarray, mono: float) -> None:
        if self._stop.is_set():  # stop() gave up waiting for us: report nothing more
            return
        image.flags.writeable = False
        now = time.monotonic()
        with self._cond:
            frame = Frame(image, time.time() - (now - mono), mono, (self._latest.seq + 1) if self._latest else 1)
            if self._state != "ok":
                log.info("camera %s: ok (%dx%d)", self.source.display, image.shape[1], image.shape[0])
                self.last_error = ""
            self._latest = frame
            self._state = "ok"
            self.frames += 1
            self._times.append(mono)
            self._cond.notify_all()
        for callback in self._subscribers:
            try:
                callback(frame)
            except Exception:
                self._callback_errors += 1
                if self._callback_errors in (1, 10, 100) or self._callback_errors % 1000 == 0:
                    log.exception("camera frame subscriber failed (%d times)", self._callback_errors)

    def _open(self) -> _Reader:
        src, cfg = self.source, self.cfg
        if src.kind == "path":
            path = Path(str(src.target))
            if path.is_dir():
                return _FolderReader(path, cfg.fps, cfg.loop, self._stop)
            if path.is_file():
                return _FileReader(path, cfg.fps, cfg.loop, self._stop)
            raise _Lost(f"{path} does not exist")
        node = f"/dev/video{src.target}" if src.kind == "index" else str(src.target)
        if src.kind in ("index", "device") and sys.platform.startswith("linux") and not os.path.exists(node):
            raise _Lost(f"{node} is not present")  # checked first: OpenCV would log a warning on every retry
        if src.kind in ("index", "device"):
            cap = cv2.VideoCapture(src.target, cv2.CAP_V4L2)
            if cap.isOpened():
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
                cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        elif src.kind == "gstreamer":
            cap = cv2.VideoCapture(str(src.target), cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(str(src.target), cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
        if not cap.isOpened():
            cap.release()
            raise _Lost(f"OpenCV cannot open {src.display}")
        rate = cap.get(cv2.CAP_PROP_FPS)
        return _LiveReader(cap, rate if 0 < rate < 1000 else cfg.fps)


# --- readers: read() -> (BGR image, monotonic capture time), or raise _Lost / _Ended / _Stopped ---------


class _Reader:
    dropped = 0

    def read(self) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n


class _LiveReader(_Reader):
    """A device or stream: grab until a grab has to wait (the queue is empty), then decode that frame."""

    def __init__(self, cap: Any, fps: float) -> None:
        self.cap = cap
        self.period = 1.0 / fps
        self.quick = 0.25 * self.period  # a grab faster than this came from a queue

    def read(self) -> tuple[np.ndarray, float]:
        start = time.monotonic()
        ok = self.cap.grab()
        mono = time.monotonic()
        limit = mono + self.period  # drain for at most one frame period
        while ok and mono - start < self.quick and mono < limit:
            start = mono
            ok = self.cap.grab()
            mono = time.monotonic()
            self.dropped += 1
        if not ok:
            raise _Lost("no frame from the source (grab failed)")
        ok, image = self.cap.retrieve()
        if not ok or image is None:
            raise _Lost("the frame could not be decoded")
        return image, mono

    def close(self) -> None:
        self.cap.release()


class _Pacer:
    """Wall-clock pacing of a replay: frame k is due k/fps after the start."""

    def __init__(self, fps: float, stop: threading.Event) -> None:
        self.fps, self.stop = fps, stop
        self.start = time.monotonic()
        self.next = 0

    def wait(self) -> tuple[int, float]:
        """Sleep until the next frame is due; return (frames to skip, due time)."""
        while True:
            now = time.monotonic()
            due = math.floor((now - self.start) * self.fps)
            if due >= self.next:
                break
            if self.stop.wait(self.start + self.next / self.fps - now):
                raise _Stopped
        skip = due - self.next
        if skip > MAX_SKIP_S * self.fps:  # suspended or starved for long: start the clock again
            self.start, skip, due = now, 0, 0
        self.next = due + 1
        return skip, self.start + due / self.fps


class _FileReader(_Reader):
    def __init__(self, path: Path, fps: float, loop: bool, stop: threading.Event) -> None:
        self.path, self.loop = path, loop
        self.pacer = _Pacer(fps, stop)
        self.cap = self._open()
        self.pos = 0  # frames read in this pass

    def _open(self) -> Any:
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise _Lost(f"OpenCV cannot open the video file {self.path}")
        return cap

    def read(self) -> tuple[np.ndarray, float]:
        skip, due = self.pacer.wait()
        for _ in range(skip):
            self._next(decode=False)
        self.dropped += skip
        image = self._next(decode=True)
        assert image is not None
        return image, due

    def _next(self, decode: bool) -> np.ndarray | None:
        if not self.path.exists():
            raise _Lost(f"{self.path} disappeared")
        for _ in range(2):
            if decode:
                ok, image = self.cap.read()
            else:
                ok, image = self.cap.grab(), None
            if ok:
                self.pos += 1
                return image
            if self.pos == 0:
                raise _Lost(f"no frames could be read from {self.path}")
            if not self.loop:
                raise _Ended
            self.cap.release()
            self.cap = self._open()
            self.pos = 0
        raise _Lost(f"no frames could be read from {self.path}")

    def close(self) -> None:
        self.cap.release()


class _FolderReader(_Reader):
    def __init__(self, path: Path, fps: float, loop: bool, stop: threading.Event) -> None:
        self.path, self.loop = path, loop
        self.pacer = _Pacer(fps, stop)
        self.files = self._list()
        self.pos = 0

    def _list(self) -> list[Path]:
        try:
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise _Lost(f"cannot list {self.path}: {exc.strerror}") from None
        if not files:
            raise _Lost(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.path}")
        return files

    def read(self) -> tuple[np.ndarray, float]:
        skip, due = self.pacer.wait()
        self.dropped += skip
        self.pos += skip
        for _ in range(len(self.files) + 1):
            if self.pos >= len(self.files):
                if not self.loop:
                    raise _Ended
                passed = len(self.files)
                self.files = self._list()  # pick up images added or removed since the last pass
                self.pos = (self.pos - passed) % len(self.files)
            image = cv2.imread(str(self.files[self.pos]), cv2.IMREAD_COLOR)
            self.pos += 1
            if image is not None:
                return image, due
            if not self.path.is_dir():
                raise _Lost(f"{self.path} disappeared")
            log.debug("camera: skipping unreadable image %s", self.files[self.pos - 1])
        raise _Lost(f"no readable images in {self.path}")
