"""Motion detection by frame differencing, cheap enough to run on every captured frame in the grabber thread.

Each frame is shrunk to cfg.scale_width (aspect kept), made grey and lightly blurred (5x5 Gaussian, against
sensor noise and compression artefacts: scene.small_grey). A pixel has changed when it differs from the previous
frame's by more than cfg.threshold grey levels. When changed pixels cover at least cfg.min_area of the frame and
cfg.cooldown seconds have passed since the last event, a MotionEvent goes to `sink` (if given; it runs in the caller's
thread and must not block) or into the bounded `events` queue (full: the event is dropped and counted).
Subscribe it to a camera with `camera.subscribe(detector)`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.config import MotionConfig
from agent.perception.scene import changed_mask, moved, share, small_grey
from devices.camera import Frame

log = logging.getLogger("agent.motion")


@dataclass(frozen=True)
class MotionEvent:
    """Motion seen in one frame."""

    ts: float  # capture time (time.time) of the frame that showed it
    mono: float  # the same, time.monotonic
    seq: int  # that frame's sequence number
    area_fraction: float  # share of the frame that changed, 0-1
    bbox: tuple[float, float, float, float]  # x, y, width, height of the changed pixels, as fractions

    def payload(self) -> dict[str, object]:
        """The `motion` event's data."""
        return {"ts": round(self.ts, 3), "area": round(self.area_fraction, 4),
                "bbox": [round(v, 4) for v in self.bbox]}


class MotionDetector:
    """Feed frames (call it, or process()); motion comes out as MotionEvents (see the module docstring)."""

    def __init__(self, cfg: MotionConfig, sink: Callable[[MotionEvent], None] | None = None,
                 queue_size: int = 16) -> None:
        self.cfg = cfg
        self.sink = sink
        self.events: queue.Queue[MotionEvent] = queue.Queue(maxsize=queue_size)
        self.count = 0  # events emitted
        self.dropped = 0  # events lost to a full queue
        self.last_area = 0.0  # changed share in the latest comparison
        self._prev: np.ndarray | None = None
        self._last_event: float | None = None

    def __call__(self, frame: Frame) -> None:
        self.process(frame)

    def process(self, frame: Frame) -> MotionEvent | None:
        """Compare `frame` with the previous one; return (and emit) an event when it shows motion."""
        return self.feed(frame.image, frame.ts, frame.mono, frame.seq)

    def feed(self, image: np.ndarray, ts: float, mono: float, seq: int = 0) -> MotionEvent | None:
        """The same for a bare BGR (or grey) image with its capture times."""
        grey = small_grey(image, self.cfg.scale_width)
        prev, self._prev = self._prev, grey
        if prev is None or prev.shape != grey.shape:
            return None
        changed = changed_mask(grey, prev, self.cfg.threshold)
        area = share(changed)
        self.last_area = area
        if not moved(area, self.cfg.min_area):
            return None
        if self._last_event is not None and mono - self._last_event < self.cfg.cooldown:
            return None
        self._last_event = mono
        event = MotionEvent(ts, mono, seq, area, _bbox(changed))
        self.count += 1
        self._emit(event)
        return event

    def reset(self) -> None:
        """Forget the previous frame (e.g. after the camera reconnects)."""
        self._prev = None

    def _emit(self, event: MotionEvent) -> None:
        if self.sink is not None:
            try:
                self.sink(event)
            except Exception:
                log.exception("motion event sink failed")
            return
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.dropped += 1


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1 - cols[0]) / w, (rows[-1] + 1 - rows[0]) / h)
