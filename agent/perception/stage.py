"""The perception stage the daemon runs: camera (+ motion detector) and microphone (+ wake word detector + VAD
segmenter), each per config, each owned by its own thread, none able to take the daemon down. Results leave
through callbacks: motion events, wake words and utterances (timestamps in wall-clock seconds); an utterance the
wake word was said in reaches the listener without it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import Config
from agent.perception.motion import MotionDetector, MotionEvent
from agent.perception.vad import Segmenter, Utterance
from agent.perception.wake import WakeWordDetector, after_wake
from devices.camera import Camera, CameraError, Frame
from devices.microphone import Microphone, MicrophoneError

log = logging.getLogger("agent.perception")


class SpeechListener(Protocol):
    """Who hears the microphone: called on the microphone's thread, so each call must return at once."""

    def on_onset(self, start: float) -> None:
        """Speech began at `start` (wall clock)."""

    def on_wake(self, at: float, details: dict[str, Any]) -> None:
        """The wake word was heard, ending at `at` (wall clock); `details`: model, phrase, probability."""

    def on_pause(self, utterance: TimedUtterance) -> None:
        """A short pause: the utterance as it would end here, if speech does not resume (vad.early_end_ms)."""

    def on_resume(self) -> None:
        """Speech resumed inside the hangover: the last on_pause is void."""

    def on_utterance(self, utterance: TimedUtterance) -> None:
        """An utterance the hangover ended."""


@dataclass(frozen=True)
class TimedUtterance:
    """An utterance with wall-clock times."""

    utterance: Utterance
    start: float
    end: float
    emitted: float = 0.0  # wall-clock time the VAD let go of it (end + hangover + queueing)


class Perception:
    """The camera, the motion detector and the microphone thread, per config."""

    def __init__(self, cfg: Config, wake: WakeWordDetector | None = None) -> None:
        self.cfg = cfg
        self.wake = wake
        self._wake_ts: float | None = None  # stream time of the last wake word
        self.wake_at: float | None = None  # ... in wall-clock time, for health
        self.wake_only = 0  # utterances that were the wake word and nothing else
        self._speech: SpeechListener | None = None
        self._mic_started = 0.0  # wall-clock time of the microphone stream's 0
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

    def start(self, on_motion: Callable[[MotionEvent], None], speech: SpeechListener | None) -> None:
        """Start the camera (and motion detector) and the microphone thread; what they find goes to `on_motion`
        and `speech`."""
        self._speech = speech
        if speech is not None:
            self.segmenter.on_onset = lambda ts: speech.on_onset(self._mic_started + ts)
            self.segmenter.on_pause = self._pause
            self.segmenter.on_resume = speech.on_resume
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
        self._mic_started = mic.started_at
        for frame in mic.frames():
            self.mic_progress = time.monotonic()
            if self.wake is not None:
                self._listen_for_wake(frame.pcm, frame.ts)
            for utterance in self.segmenter.push(frame.pcm, frame.ts):
                self._emit(utterance)
            if self._stop.is_set():
                return
        for utterance in self.segmenter.flush():
            self._emit(utterance)

    def _listen_for_wake(self, pcm: Any, ts: float) -> None:
        assert self.wake is not None
        detection = self.wake.push(pcm, ts)
        if detection is None:
            return
        self._wake_ts, self.wake_at = detection.ts, self._mic_started + detection.ts
        log.info("wake word %r heard (probability %.2f)", self.wake.model.phrase, detection.probability)
        if self._speech is not None:
            self._speech.on_wake(self.wake_at, {"model": self.wake.model.name, "phrase": self.wake.model.phrase,
                                                "probability": round(detection.probability, 3)})

    def _heard(self, utterance: Utterance) -> TimedUtterance | None:
        """The utterance as the listener gets it: without the wake word said in it (None if that was all)."""
        if self._wake_ts is not None:
            trimmed = after_wake(utterance, self._wake_ts, self.cfg.vad.min_speech_ms / 1000)
            if trimmed is None:
                return None
            utterance = trimmed
        start = self._mic_started
        return TimedUtterance(utterance, start + utterance.start_ts, start + utterance.end_ts, time.time())

    def _pause(self, utterance: Utterance) -> None:
        timed = self._heard(utterance)
        if timed is not None and self._speech is not None:
            self._speech.on_pause(timed)

    def _emit(self, utterance: Utterance) -> None:
        self.utterances += 1
        if self._speech is None:
            return
        try:
            timed = self._heard(utterance)
            if timed is None:
                self.wake_only += 1
                self._speech.on_resume()  # a guess made on it is void
                return
            self._speech.on_utterance(timed)
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
            if self.wake is not None:
                microphone["wake"] = {**self.wake.stats(), "last": self.wake_at, "wake_only": self.wake_only}
        return {"camera": camera, "microphone": microphone}
