"""The perception stage the daemon runs: camera (+ motion detector) and microphone (+ VAD segmenter), each per
config, each owned by its own thread, none able to take the daemon down. Results leave through callbacks:
motion events and utterances (timestamps in wall-clock seconds)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import Config
from agent.perception.motion import MotionDetector, MotionEvent
from agent.perception.vad import Segmenter, Utterance
from devices.camera import Camera, CameraError, Frame
from devices.microphone import Microphone, MicrophoneError

log = logging.getLogger("agent.perception")


@dataclass(frozen=True)
class TimedUtterance:
    """An utterance with wall-clock times."""

    utterance: Utterance
    start: float
    end: float
    emitted: float = 0.0  # wall-clock time the VAD let go of it (end + hangover + queueing)


class Perception:
    """The camera, the motion detector and the microphone thread, per config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._on_utterance: Callable[[TimedUtterance], None] = lambda _u: None
        self.camera: Camera | None = None
        self.camera_error = ""
        self.motion: MotionDetector | None = None
        self.microphone: Microphone | None = None
        self.microphone_error = ""
        self.segmenter = Segmenter(cfg.vad)
        self.utterances = 0
        self._stop = threading.Event()
        self._mic_thread: threading.Thread | None = None
        self.mic_progress = time.monotonic()
        if cfg.camera.enabled:
            try:
                self.camera = Camera(cfg.camera)
            except CameraError as exc:
                self.camera_error = str(exc)
                log.error("camera disabled: %s", exc)

    def start(self, on_motion: Callable[[MotionEvent], None], on_utterance: Callable[[TimedUtterance], None]) -> None:
        """Start the camera (and motion detector) and the microphone thread; results go to the callbacks."""
        self._on_utterance = on_utterance
        if self.camera is not None and self.cfg.motion.enabled:
            self.motion = MotionDetector(self.cfg.motion, sink=on_motion)
            self.camera.subscribe(self.motion)
        if self.camera is not None:
            self.camera.start()
        if self.cfg.microphone.enabled:
            self._mic_thread = threading.Thread(target=self._run_microphone, name="microphone", daemon=True)
            self._mic_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.microphone is not None:
            self.microphone.stop()
        if self._mic_thread is not None:
            self._mic_thread.join(5.0)
        if self.camera is not None:
            self.camera.stop()

    def latest_frame(self) -> Frame | None:
        return self.camera.latest() if self.camera is not None else None

    # --- microphone thread: frames -> VAD -> utterances --------------------------------------------------

    def _run_microphone(self) -> None:
        """Open the microphone (retrying with backoff while it fails), segment speech until stopped or the replay
        ends."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.microphone = Microphone(self.cfg.microphone, frame_ms=self.cfg.vad.frame_ms)
                self.microphone.start()
                self.microphone_error = ""
                delay = 1.0
                self._segment(self.microphone)
                if self.microphone.at_end:
                    log.info("microphone replay ended after %d utterance(s)", self.utterances)
                    return
            except MicrophoneError as exc:
                self.microphone_error = str(exc)
                log.warning("microphone unavailable (%s); retrying in %.0fs", exc, delay)
            except Exception as exc:  # the microphone must never take the daemon down
                self.microphone_error = f"{type(exc).__name__}: {exc}"
                log.exception("microphone failed; retrying in %.0fs", delay)
            if self.microphone is not None:
                self.microphone.stop()
            self.mic_progress = time.monotonic()
            self._stop.wait(delay)
            delay = min(delay * 2, 60.0)

    def _segment(self, mic: Microphone) -> None:
        for frame in mic.frames():
            self.mic_progress = time.monotonic()
            for utterance in self.segmenter.push(frame.pcm, frame.ts):
                self._emit(utterance, mic.started_at)
            if self._stop.is_set():
                return
        for utterance in self.segmenter.flush():
            self._emit(utterance, mic.started_at)

    def _emit(self, utterance: Utterance, started_at: float) -> None:
        self.utterances += 1
        timed = TimedUtterance(utterance, started_at + utterance.start_ts, started_at + utterance.end_ts, time.time())
        try:
            self._on_utterance(timed)
        except Exception:
            log.exception("handling an utterance failed")

    # --- health ----------------------------------------------------------------------------------------

    def microphone_progressing(self) -> bool:
        """Watchdog probe: the microphone thread reads frames (or waits to retry), unless it has finished."""
        thread = self._mic_thread
        if thread is None or not thread.is_alive():
            return True
        return time.monotonic() - self.mic_progress < 30

    def health(self) -> dict[str, Any]:
        camera: dict[str, Any] = {"state": "disabled"}
        if self.camera is not None:
            camera = self.camera.stats()
        elif self.camera_error:
            camera = {"state": "error", "error": self.camera_error}
        microphone: dict[str, Any] = {"state": "disabled"}
        if self.cfg.microphone.enabled:
            microphone = self.microphone.stats() if self.microphone is not None else {"state": "starting"}
            if self.microphone_error:
                microphone = {**microphone, "state": "error", "error": self.microphone_error}
            microphone["utterances"] = self.utterances
            microphone["vad"] = self.segmenter.stats()
        return {"camera": camera, "microphone": microphone}
