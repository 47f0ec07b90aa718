"""The motion detector on real (MJPG-compressed) synthetic videos: a moving square, a still scene with sensor
noise, cooldown and area limits; frames are fed with their video timestamps, so results do not depend on speed.
One test runs it live as a camera subscriber."""

from __future__ import annotations

import dataclasses
import itertools
import queue
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.config import CameraConfig, MotionConfig
from agent.perception.motion import MotionDetector, MotionEvent
from devices.camera import Camera
from tests.support.media import moving_square, still, write_video

pytestmark = pytest.mark.fast

FPS = 15.0


def video_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    return video_frames(write_video(tmp_path_factory.mktemp("m") / "moving.avi", 60, FPS, frame=moving_square))


@pytest.fixture(scope="module")
def static(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    return video_frames(write_video(tmp_path_factory.mktemp("s") / "still.avi", 60, FPS, frame=still))


def run(frames: list[np.ndarray], **overrides: Any) -> tuple[list[MotionEvent], MotionDetector]:
    det = MotionDetector(dataclasses.replace(MotionConfig(enabled=True), **overrides))
    events = []
    for i, img in enumerate(frames):
        event = det.feed(img, ts=1000.0 + i / FPS, mono=i / FPS, seq=i + 1)
        if event is not None:
            events.append(event)
    return events, det


def test_moving_square_raises_events_where_it_moves(moving: list[np.ndarray]) -> None:
    events, det = run(moving, cooldown=1.0)
    assert len(events) == 4  # 4 s of motion, one event per second of cooldown
    first = events[0]
    assert first.seq == 2  # the first comparison already sees it
    # the square (48 px of 320x240) moved 6 px: the changed area is the square and its new position
    assert 0.01 < first.area_fraction < 0.1
    x, y, w, h = first.bbox
    assert 0.0 <= x < 0.1 and 0.35 < y < 0.45 and 0.1 < w < 0.3 and 0.15 < h < 0.3
    assert det.events.qsize() == 4 and det.events.get_nowait() == first
    assert set(first.payload()) == {"ts", "area", "bbox"}


def test_still_scene_with_sensor_noise_raises_none(static: list[np.ndarray]) -> None:
    events, det = run(static, cooldown=0.0)
    assert events == [] and det.count == 0
    assert det.last_area < 0.001


def test_cooldown_spaces_events(moving: list[np.ndarray]) -> None:
    every, _ = run(moving, cooldown=0.0)
    assert len(every) == len(moving) - 1  # each comparison sees the square move
    spaced, _ = run(moving, cooldown=1.5)
    gaps = [b.mono - a.mono for a, b in itertools.pairwise(spaced)]
    assert len(spaced) == 3 and all(g >= 1.5 for g in gaps)


def test_min_area_and_threshold(moving: list[np.ndarray]) -> None:
    assert run(moving, min_area=0.5)[0] == []  # the square is far smaller than half the frame
    assert run(moving, threshold=250)[0] == []  # nothing changes by more than 250 grey levels


def test_motion_is_compared_at_scale_width(moving: list[np.ndarray]) -> None:
    """motion.scale_width sets the resolution frames are compared at (the 320 px video shrunk, aspect kept): at 40
    px the 48 px square still moves visibly every frame; at 16 px its 6 px steps vanish into the blur."""
    coarse, det = run(moving, cooldown=0.0, scale_width=40)
    assert det._prev is not None and det._prev.shape == (30, 40)
    assert len(coarse) == len(moving) - 1
    blurred, det = run(moving, cooldown=0.0, scale_width=16)
    assert det._prev is not None and det._prev.shape == (12, 16)
    assert len(blurred) <= 2


def test_events_go_to_a_sink_or_a_bounded_queue(moving: list[np.ndarray]) -> None:
    got: list[MotionEvent] = []
    det = MotionDetector(MotionConfig(cooldown=0.0), sink=got.append)
    for i, img in enumerate(moving[:5]):
        det.feed(img, ts=float(i), mono=float(i))
    assert len(got) == 4 and det.events.empty()
    det = MotionDetector(MotionConfig(cooldown=0.0), queue_size=2)
    for i, img in enumerate(moving[:6]):
        det.feed(img, ts=float(i), mono=float(i))
    assert det.events.qsize() == 2 and det.dropped == 3 and det.count == 5


def test_detector_subscribed_to_a_camera(tmp_path: Path) -> None:
    video = write_video(tmp_path / "moving.avi", 60, FPS, frame=moving_square)
    cam = Camera(CameraConfig(enabled=True, source=str(video), fps=30.0))
    det = MotionDetector(MotionConfig(enabled=True, cooldown=0.2))
    cam.subscribe(det)
    cam.start()
    try:
        event = det.events.get(timeout=15.0)
    except queue.Empty:
        event = None
    finally:
        cam.stop()
    assert event is not None and event.seq >= 2 and event.area_fraction > 0.01
