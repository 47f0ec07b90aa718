"""The camera grabber on real sources: MJPG videos written by cv2.VideoWriter, image folders, an MJPEG stream from
an HTTP server on loopback, and V4L2 devices this machine does not have. Every frame carries its index in its
pixels (media.numbered_frame), so a test can tell which frame it was handed."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import pytest

from agent.config import CameraConfig
from devices.camera import Camera, CameraError, Frame, expand_pipeline, parse_source
from tests.support.media import frame_number, numbered_frame, write_image_folder, write_video

pytestmark = pytest.mark.fast

WAIT = 15.0  # generous deadline for anything the grabber should do soon
Start = Callable[[CameraConfig], Camera]


def config(source: int | str, **overrides: Any) -> CameraConfig:
    cfg = CameraConfig(enabled=True, source=source, reconnect_min=0.05, reconnect_max=0.2)
    return dataclasses.replace(cfg, **overrides)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def camera() -> Iterator[Start]:
    started: list[Camera] = []

    def make(cfg: CameraConfig) -> Camera:
        cam = Camera(cfg)
        cam.start()
        started.append(cam)
        return cam

    yield make
    for cam in started:
        cam.stop()


def test_video_file_hands_out_the_latest_frame_not_a_backlog(tmp_path: Path, camera: Start) -> None:
    video = write_video(tmp_path / "v.avi", 300, fps=30)
    cam = camera(config(str(video), fps=30.0))
    first = cam.wait_frame(timeout=WAIT)
    assert first is not None and cam.state == "ok"
    time.sleep(0.7)  # a slow consumer
    later = cam.latest()
    assert later is not None and later.seq > first.seq
    a, b = frame_number(first.image), frame_number(later.image)
    # latest, not next: the replay went on in the meantime, and which frame it is follows the frames' own clock
    assert b - a >= 2
    assert abs((b - a) - round((later.mono - first.mono) * 30)) <= 1
    assert later.ts == pytest.approx(time.time() - (time.monotonic() - later.mono), abs=0.01)
    # frames handed out are immutable snapshots
    assert not first.image.flags.writeable and frame_number(first.image) == a
    assert first.image.shape == (240, 320, 3) and first.image.dtype == "uint8"


def test_image_folder_replays_in_name_order_and_loops(tmp_path: Path, camera: Start) -> None:
    folder = write_image_folder(tmp_path / "imgs", 12)
    seen: list[int] = []
    cam = Camera(config(str(folder), fps=40.0))
    cam.subscribe(lambda f: seen.append(frame_number(f.image)))  # from the grabber thread, never blocking
    cam.start()
    try:
        wait_until(lambda: len(seen) >= 30, "30 frames")
    finally:
        cam.stop()
    steps = [(b - a) % 12 for a, b in itertools.pairwise(seen)]
    assert all(s >= 1 for s in steps), seen  # always forward, never repeated
    assert any(b < a for a, b in itertools.pairwise(seen)), seen  # wrapped around: looped
    assert cam.frames == len(seen) and cam.state == "stopped"


def test_camera_can_be_stopped_and_started_again(tmp_path: Path) -> None:
    cam = Camera(config(str(write_video(tmp_path / "v.avi", 30)), fps=30.0))
    for _ in range(2):
        cam.start()
        last = cam.latest()
        seq = last.seq if last else 0
        assert cam.wait_frame(after=seq, timeout=WAIT) is not None and cam.state == "ok"
        cam.stop()
        assert cam.state == "stopped"
    assert cam.wait_frame(after=cam.frames, timeout=0.2) is None  # stopped: no new frames


def test_replay_without_loop_ends(tmp_path: Path, camera: Start) -> None:
    cam = camera(config(str(write_image_folder(tmp_path / "imgs", 5)), fps=50.0, loop=False))
    wait_until(lambda: cam.state == "ended", "the end of the replay")
    last = cam.latest()
    assert last is not None and frame_number(last.image) == 4
    assert cam.frames + cam.dropped == 5


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_source_removed_then_restored_goes_lost_then_ok(tmp_path: Path, camera, kind: str) -> None:
    src = write_video(tmp_path / "v.avi", 60) if kind == "file" else write_image_folder(tmp_path / "imgs", 10)
    cam = camera(config(str(src), fps=30.0))
    assert cam.wait_frame(timeout=WAIT) is not None
    aside = tmp_path / "aside"
    shutil.move(str(src), str(aside))
    wait_until(lambda: cam.state == "lost", "state lost")
    assert str(src) in cam.last_error
    wait_until(lambda: cam.reconnects >= 2, "two reconnect attempts")  # backing off, not giving up
    before = cam.latest()
    assert before is not None
    shutil.move(str(aside), str(src))
    wait_until(lambda: cam.state == "ok", "state ok again")
    after = cam.wait_frame(after=before.seq, timeout=WAIT)
    assert after is not None and cam.losses == 1 and cam.last_error == ""


def test_unreadable_video_is_lost_not_raised(tmp_path: Path, camera: Start) -> None:
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video" * 100)
    cam = camera(config(str(bad)))
    wait_until(lambda: cam.state == "lost", "state lost")
    assert "bad.avi" in cam.last_error and cam.latest() is None


def test_missing_v4l2_device_is_lost_and_retried(camera: Start) -> None:
    cam = camera(config("/dev/video97"))
    wait_until(lambda: cam.reconnects >= 2, "reconnect attempts")
    assert cam.state == "lost" and cam.last_error == "/dev/video97 is not present"
    cam2 = camera(config(97))
    wait_until(lambda: cam2.state == "lost", "state lost")
    assert cam2.last_error == "/dev/video97 is not present"


def test_subscriber_errors_do_not_stop_the_grabber(tmp_path: Path, camera: Start) -> None:
    cam = Camera(config(str(write_video(tmp_path / "v.avi", 30)), fps=50.0))
    calls: list[int] = []

    def broken(frame: Frame) -> None:
        calls.append(frame.seq)
        raise RuntimeError("subscriber bug")

    unsubscribe = cam.subscribe(broken)
    cam.start()
    try:
        wait_until(lambda: len(calls) >= 5, "5 frames")
        assert cam.state == "ok"
        unsubscribe()
        n = len(calls)
        seq = cam.latest().seq  # type: ignore[union-attr]
        assert cam.wait_frame(after=seq + 3, timeout=WAIT) is not None
        assert len(calls) <= n + 1  # at most one call was already under way
    finally:
        cam.stop()


# --- a live stream: MJPEG over HTTP on loopback ----------------------------------------------------------


class MjpegServer:
    """Serves numbered frames as multipart/x-mixed-replace at `fps`, like an IP camera; stop() drops clients."""

    def __init__(self, fps: float = 30.0, port: int = 0) -> None:
        self.fps = fps
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i, start = 0, time.monotonic()
                while not server.stopping.is_set():
                    _, jpg = cv2.imencode(".jpg", numbered_frame(i, 192, 96))
                    head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                    try:
                        self.wfile.write(head + jpg.tobytes() + b"\r\n")
                    except OSError:
                        return
                    i += 1
                    time.sleep(max(0.0, start + i / server.fps - time.monotonic()))

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_mjpeg_stream_is_read_live_drained_and_reconnected() -> None:
    server = MjpegServer(fps=30.0)
    cam = Camera(config(f"http://127.0.0.1:{server.port}/video.mjpg", fps=30.0))
    numbers: list[int] = []
    stall = threading.Event()

    def subscriber(frame: Frame) -> None:
        numbers.append(frame_number(frame.image))
        if len(numbers) == 10:
            stall.set()
            time.sleep(0.6)  # deliberately breaks the must-not-block rule once: frames pile up meanwhile

    cam.subscribe(subscriber)
    cam.start()
    try:
        wait_until(lambda: len(numbers) >= 12, "frames from the stream")
        assert cam.state == "ok"
        # after the stall the grabber skipped the queued frames: the next frame is ~18 newer, not the next one
        assert numbers[10] - numbers[9] >= 6, numbers[:14]
        assert cam.dropped >= 5
        server.stop()
        wait_until(lambda: cam.state == "lost", "state lost after the server went away")
        seq = cam.latest().seq  # type: ignore[union-attr]
        server = MjpegServer(fps=30.0, port=server.port)
        wait_until(lambda: cam.state == "ok", "state ok after the server came back")
        assert cam.wait_frame(after=seq, timeout=WAIT) is not None and cam.losses == 1
    finally:
        cam.stop()
        server.stop()


# --- configuration ---------------------------------------------------------------------------------------


def test_source_kinds() -> None:
    assert parse_source(config(0)).kind == "index"
    assert parse_source(config("2")).target == 2
    assert parse_source(config("/dev/video1")).kind == "device"
    assert parse_source(config("movie.mp4")).kind == "path"
    url = parse_source(config("rtsp://admin:secret@10.0.0.5:554/stream1"))
    assert url.kind == "url" and "secret" not in url.display and "admin:***@" in url.display


def test_impossible_sources_raise_camera_error() -> None:
    with pytest.raises(CameraError, match=r"camera\.source is empty"):
        Camera(config(""))
    with pytest.raises(CameraError, match="index must be 0 or more"):
        Camera(config(-1))
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        with pytest.raises(CameraError, match="must end in appsink"):
            Camera(config("videotestsrc ! videoconvert"))
    else:  # PyPI's OpenCV, as here
        with pytest.raises(CameraError, match="no GStreamer support"):
            Camera(config("videotestsrc ! videoconvert ! appsink"))


def test_pipeline_placeholders_come_from_the_config() -> None:
    cfg = config("", width=1280, height=720, fps=7.5)
    text = "libcamerasrc ! video/x-raw,width={width},height={height},framerate={fps} ! appsink"
    assert expand_pipeline(text, cfg) == \
        "libcamerasrc ! video/x-raw,width=1280,height=720,framerate=15/2 ! appsink"
    assert "framerate=15/1" in expand_pipeline("framerate={fps}", config("", fps=15.0))
