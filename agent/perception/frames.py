"""Frame preparation: the square RGB image the vision model takes, made only for frames that are used.

The engine calls `FramePreparer(cfg)(frame)` when a turn needs the current image, never per captured frame.
- `letterbox`: the whole frame, scaled to fit size x size, centred and padded with black (keeps everything);
- `crop`: the centred square of the frame, scaled to size x size (fills the input, loses the sides).
Shrinking halves by 2x2 averaging while the frame is at least twice the target, then finishes bilinear (close to
full area averaging and ~5x cheaper: OpenCV's general area resize takes 3-4 ms at 720p); enlarging is bilinear.
The result is RGB uint8, C-contiguous (size * size * 3 bytes, what llama.cpp's mtmd bitmap takes).
cfg.snapshot adds JPEG bytes of that same image (Pillow, cfg.snapshot_quality) for publishing with a
description; off by default for privacy. OpenCV is used here only as an image library.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from agent.config import CameraConfig
from devices.camera import Frame

SIZES = (256, 512, 768)


@dataclass(frozen=True)
class ModelImage:
    """A prepared frame: RGB uint8 (size, size, 3), the frame's sequence number and capture time."""

    rgb: np.ndarray
    seq: int
    ts: float
    jpeg: bytes | None = None


def fit_square(bgr: np.ndarray, size: int, fit: Literal["letterbox", "crop"] = "letterbox") -> np.ndarray:
    """A BGR (or grey / BGRA) uint8 image -> RGB uint8 (size, size, 3), letterboxed or centre-cropped."""
    if bgr.dtype != np.uint8 or bgr.ndim not in (2, 3) or min(bgr.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 image (H, W) or (H, W, 3|4), got {bgr.shape} {bgr.dtype}")
    if fit not in ("letterbox", "crop"):
        raise ValueError(f"fit must be 'letterbox' or 'crop', got {fit!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    to_rgb = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    channels = 1 if bgr.ndim == 2 else bgr.shape[2]
    if channels not in to_rgb:
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")
    h, w = bgr.shape[:2]
    if fit == "crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        square = _resize(bgr[y0:y0 + side, x0:x0 + side], size, size)
        return np.ascontiguousarray(cv2.cvtColor(square, to_rgb[channels]))
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = cv2.cvtColor(_resize(bgr, nw, nh), to_rgb[channels])
    return out


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve by 2x2 averaging while the image is at least twice the target (OpenCV's fast area path, no
    aliasing), then bilinear for the last step (a ratio between 0.5 and 2)."""
    while img.shape[1] >= 2 * width and img.shape[0] >= 2 * height:
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        img = cv2.resize(img[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)


def jpeg_bytes(rgb: np.ndarray, quality: int = 80) -> bytes:
    """JPEG-encode an RGB uint8 image with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


class FramePreparer:
    """Prepares frames for the model per the camera config; preparing the same frame again is free."""

    def __init__(self, cfg: CameraConfig) -> None:
        if cfg.input_size not in SIZES:
            raise ValueError(f"camera.input_size must be one of {SIZES}, got {cfg.input_size!r}")
        self.cfg = cfg
        self._last: ModelImage | None = None

    def __call__(self, frame: Frame) -> ModelImage:
        last = self._last
        if last is not None and last.seq == frame.seq and last.ts == frame.ts:
            return last
        rgb = fit_square(frame.image, self.cfg.input_size, self.cfg.fit)
        rgb.flags.writeable = False
        jpeg = jpeg_bytes(rgb, self.cfg.snapshot_quality) if self.cfg.snapshot else None
        self._last = ModelImage(rgb, frame.seq, frame.ts, jpeg)
        return self._last
