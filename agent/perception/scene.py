"""Has the camera's view changed? The test a frame prepared earlier passes to stand for the latest one.

A view is reduced as the motion detector reduces frames (`small_grey`: cfg.scale_width wide, grey, 5x5 Gaussian
blur); two views show the same scene when the pixels that differ by more than cfg.threshold grey levels cover
less than cfg.min_area of it: exactly what the motion detector would not call motion. `StillWatch` follows the
camera's frames and says how long its view has kept still; the router uses both to encode a still view once,
ahead of any question, and to reuse that image while the view stays the same.
"""

from __future__ import annotations

import cv2
import numpy as np

from agent.config import MotionConfig


def small_grey(image: np.ndarray, scale_width: int) -> np.ndarray:
    """A BGR (or grey) uint8 image shrunk to `scale_width` (aspect kept, never enlarged), grey, lightly blurred."""
    h, w = image.shape[:2]
    width = min(scale_width, w)
    height = max(1, round(h * width / w))
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) if width != w else image
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
    return cv2.GaussianBlur(grey, (5, 5), 0)


def changed_mask(a: np.ndarray, b: np.ndarray, threshold: int) -> np.ndarray:
    """The pixels of two reduced views (same shape) that differ by more than `threshold` grey levels."""
    return cv2.absdiff(a, b) > threshold


def share(mask: np.ndarray) -> float:
    """The share (0-1) of a mask's pixels that are set."""
    return float(np.count_nonzero(mask)) / mask.size


def moved(area: float, min_area: float) -> bool:
    """Whether a changed share is motion: something changed, over at least `min_area` of the view."""
    return area > 0.0 and area >= min_area


def same_scene(a: np.ndarray, b: np.ndarray, cfg: MotionConfig) -> bool:
    """Whether two reduced views show the same scene: what the motion detector would not call motion."""
    return a.shape == b.shape and not moved(share(changed_mask(a, b, cfg.threshold)), cfg.min_area)


class StillWatch:
    """Follows a camera's frames (feed it a frame's BGR image and monotonic capture time), looking at one at most
    every `every` seconds, and says how long its view has kept still. One thread feeds and asks it (the camera's
    grabber)."""

    def __init__(self, cfg: MotionConfig, every: float = 0.25) -> None:
        self.cfg, self.every = cfg, every
        self._grey: np.ndarray | None = None
        self._checked = float("-inf")
        self._still_since = 0.0

    def feed(self, image: np.ndarray, mono: float) -> np.ndarray | None:
        """Look at one frame; returns its reduced view when it was looked at (None: too soon after the last)."""
        if mono - self._checked < self.every:
            return None
        grey = small_grey(image, self.cfg.scale_width)
        if self._grey is None or not same_scene(grey, self._grey, self.cfg):
            self._still_since = mono
        self._grey, self._checked = grey, mono
        return grey

    def still_for(self, now: float) -> float:
        """Seconds the view has kept still as of `now` (0 before the first frame)."""
        return 0.0 if self._grey is None else now - self._still_since
