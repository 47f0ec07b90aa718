"""Frame preparation: square model input by letterbox or centre crop, RGB order, JPEG snapshots, per used frame."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import CameraConfig
from agent.perception.frames import FramePreparer, fit_square, jpeg_bytes
from devices.camera import Camera, Frame
from tests.support.media import write_video

pytestmark = pytest.mark.fast

RED, BLUE, GREEN = (0, 0, 255), (255, 0, 0), (0, 255, 0)  # BGR, as cameras deliver


def halves(width: int = 640, height: int = 480, band: int = 0) -> np.ndarray:
    """Left half red, right half blue; optional green bands `band` px wide at the left and right edges."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = RED
    img[:, width // 2:] = BLUE
    if band:
        img[:, :band] = GREEN
        img[:, width - band:] = GREEN
    return img


def frame(image: np.ndarray, seq: int = 1) -> Frame:
    return Frame(image, time.time(), time.monotonic(), seq)


@pytest.mark.parametrize("size", [256, 512, 768])
def test_letterbox_keeps_everything_and_pads(size: int) -> None:
    out = fit_square(halves(), size, "letterbox")
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    pad = size // 8  # 640x480 scaled to size x 3/4 size, centred
    assert not out[: pad - 1].any() and not out[size - pad + 1:].any()  # black bars top and bottom
    mid = size // 2
    assert tuple(out[mid, size // 4]) == (255, 0, 0)  # red, now in RGB order
    assert tuple(out[mid, 3 * size // 4]) == (0, 0, 255)  # blue
    assert tuple(out[pad + 1, 1]) == (255, 0, 0) and tuple(out[size - pad - 2, size - 2]) == (0, 0, 255)


def test_letterbox_portrait_pads_the_sides() -> None:
    img = np.zeros((640, 480, 3), np.uint8)
    img[:320] = RED
    img[320:] = BLUE
    out = fit_square(img, 256, "letterbox")
    assert not out[:, :31].any() and not out[:, 225:].any()
    assert tuple(out[64, 128]) == (255, 0, 0) and tuple(out[192, 128]) == (0, 0, 255)


def test_crop_keeps_the_centre_square_and_fills() -> None:
    out = fit_square(halves(band=80), 512, "crop")  # the 80 px bands are exactly what a 480 px square drops
    assert out.shape == (512, 512, 3)
    greenish = (out[:, :, 1] > 50).sum()
    assert greenish == 0
    assert (out[:, :255] == (255, 0, 0)).all() and (out[:, 257:] == (0, 0, 255)).all()


def test_small_grey_and_bgra_inputs() -> None:
    small = halves(100, 50)
    up = fit_square(small, 512, "crop")
    assert up.shape == (512, 512, 3) and tuple(up[256, 100]) == (255, 0, 0)
    grey = np.full((120, 160), 77, np.uint8)
    assert (fit_square(grey, 256, "crop") == 77).all()
    bgra = np.dstack([halves(), np.full((480, 640), 255, np.uint8)])
    assert tuple(fit_square(bgra, 256)[128, 64]) == (255, 0, 0)


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8 image"):
        fit_square(np.zeros((10, 10, 3), np.float32), 256)
    with pytest.raises(ValueError, match="uint8 image"):
        fit_square(np.zeros((0, 10, 3), np.uint8), 256)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        fit_square(np.zeros((10, 10, 2), np.uint8), 256)
    with pytest.raises(ValueError, match="letterbox"):
        fit_square(halves(), 256, "stretch")  # type: ignore[arg-type]


def test_preparer_works_once_per_used_frame_and_snapshots_only_when_asked() -> None:
    prep = FramePreparer(CameraConfig(input_size=256, fit="crop"))
    f = frame(halves())
    a = prep(f)
    assert a.rgb.shape == (256, 256, 3) and a.jpeg is None and a.seq == 1 and a.ts == f.ts
    assert prep(f) is a  # the same frame again: no new work
    assert prep(frame(halves(), seq=2)) is not a
    assert not a.rgb.flags.writeable

    snap = FramePreparer(CameraConfig(input_size=512, snapshot=True, snapshot_quality=90))(f)
    assert snap.jpeg is not None and snap.jpeg[:2] == b"\xff\xd8"
    decoded = np.asarray(Image.open(io.BytesIO(snap.jpeg)).convert("RGB"))
    assert decoded.shape == (512, 512, 3)
    assert np.abs(decoded.astype(int) - snap.rgb.astype(int)).mean() < 3
    assert len(jpeg_bytes(snap.rgb, 20)) < len(jpeg_bytes(snap.rgb, 95))


def test_preparer_refuses_an_unknown_input_size() -> None:
    with pytest.raises(ValueError, match="input_size"):
        FramePreparer(dataclasses.replace(CameraConfig(), input_size=300))  # type: ignore[arg-type]


def test_a_camera_frame_prepared_for_the_model(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", 10, width=640, height=480,
                        frame=lambda i, w, h: halves(w, h))
    cam = Camera(CameraConfig(enabled=True, source=str(video), fps=30.0))
    cam.start()
    try:
        f = cam.wait_frame(timeout=15.0)
    finally:
        cam.stop()
    assert f is not None
    img = FramePreparer(CameraConfig(input_size=512))(f)
    assert img.rgb.shape == (512, 512, 3)
    assert np.abs(img.rgb[256, 128].astype(int) - (255, 0, 0)).max() < 40  # through MJPG: red stays red
    assert not img.rgb[:60].any()
