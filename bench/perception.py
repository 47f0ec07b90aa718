"""Perception costs on this machine: VAD, camera latency, frame preparation, and the whole stage's CPU share.
One JSON line per figure (media synthesized by tests/media.py: espeak-ng speech, MJPG videos).

- vad_frame_us: Segmenter.push per 30 ms frame over a minute of speech and noise, next to webrtcvad's own
  is_speech on the same frames (target < 100 us); vad_boundary_ms: worst start/end error against the truth.
- camera_age_ms: age of the frame latest() returns at random moments, replaying a file at 15 fps, at 640x480
  and 1280x720 (one frame period is 66.7 ms); camera_subscriber_ms: capture time to subscriber call.
- frame_prep_ms: FramePreparer per used frame at 640x480 and 1280x720 to 512x512, JPEG off / on (target
  < 10 ms at 720p).
- early_end_wasted: how often the early end (vad.early_end_ms 250, hangover 700) guesses that a question is over
  while the speaker only paused: espeak-ng questions in 8 voices, said in one breath and split in two halves with
  150-650 ms of silence between their speech; guesses, guesses speech made void (work thrown away), utterances.
- perception_cpu: process CPU time over wall time with the camera replaying a 640x480 file at 15 fps + motion
  detector subscribed + microphone replaying speech in real time + VAD (target < 10 % of one core).

    .venv/bin/python -m bench.perception [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webrtcvad

from agent.config import CameraConfig, MicrophoneConfig, MotionConfig, VadConfig
from agent.perception.frames import FramePreparer
from agent.perception.motion import MotionDetector
from agent.perception.vad import Segmenter, Utterance
from devices.camera import Camera, Frame
from devices.microphone import Microphone
from tests.support import media

SENTENCES = ["Turn on the kitchen lights please.", "What is the weather like tomorrow morning?",
             "Remind me to call my sister at six.", "Is the front door locked?"]


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"bench": "perception", "figure": name, "value": round(value, 4), "unit": unit, **extra}),
          flush=True)


def speech_stream(seconds: float, snr_db: float | None) -> tuple[np.ndarray, list[media.Truth]]:
    clips = [media.espeak(s) for s in SENTENCES]
    parts, t, i = [], 0.7, 0
    while t + 4.0 < seconds:
        parts.append((t, clips[i % len(clips)]))
        t += len(clips[i % len(clips)]) / media.RATE + 1.3
        i += 1
    return media.compose(parts, seconds, snr_db=snr_db)


def bench_vad() -> None:
    stream, truths = speech_stream(60.0, snr_db=20.0)
    frames = media.frames_of(stream, 480)
    vad = webrtcvad.Vad(2)
    raw, ours = [], []
    for _ in range(5):
        t = time.perf_counter()
        for f in frames:
            vad.is_speech(f.tobytes(), 16000)
        raw.append((time.perf_counter() - t) / len(frames))
        seg = Segmenter(VadConfig())
        found: list[Utterance] = []
        t = time.perf_counter()
        for f in frames:
            found += seg.push(f)
        ours.append((time.perf_counter() - t) / len(frames))
    us, raw_us = statistics.median(ours) * 1e6, statistics.median(raw) * 1e6
    emit("vad_frame_us", us, "us", frame_ms=30, webrtcvad_us=round(raw_us, 2), ratio=round(us / raw_us, 2),
         target=100, ok=us < 100)
    for snr in (None, 20.0):
        stream, truths = speech_stream(60.0, snr_db=snr)
        seg = Segmenter(VadConfig())
        found = [u for f in media.frames_of(stream, 480) for u in seg.push(f)] + seg.flush()
        starts = [abs(u.start_ts - t.start) * 1000 for u, t in zip(found, truths, strict=False)]
        ends = [abs(u.end_ts - t.end) * 1000 for u, t in zip(found, truths, strict=False)]
        worst = float(max(starts + ends))
        emit("vad_boundary_ms", worst, "ms", noise="silence" if snr is None else f"white {snr:g} dB",
             utterances=len(found), truths=len(truths), max_start_ms=round(float(max(starts)), 1),
             max_end_ms=round(float(max(ends)), 1), mean_start_ms=round(float(np.mean(starts)), 1),
             mean_end_ms=round(float(np.mean(ends)), 1), target=150, ok=len(found) == len(truths) and worst <= 150)


PAUSED = [("What is at the front door", "and is anyone there?"), ("Turn on the kitchen lights", "and the porch light."),
          ("Remind me to call my sister", "at six tomorrow."), ("Is it going to rain", "this afternoon?")]
VOICES = ["en-us", "en", "en+f3", "en+m3", "en-us+f2", "en+m7", "en-us+f4", "en+klatt"]


def bench_early_end() -> None:
    """Speculation at the early end: guessed, wasted and confirmed, per pause inside a question."""
    for pause_ms in (None, 150, 250, 350, 450, 550, 650):  # None: the question in one breath
        guesses = wasted = utterances = questions = 0
        for voice in VOICES:
            for first, second in PAUSED:
                if pause_ms is None:
                    clips = [(0.5, media.espeak(f"{first}, {second}", voice))]
                else:  # the silence between the two halves' speech is pause_ms (espeak-ng pads its clips)
                    a, b = media.espeak(first, voice), media.espeak(second, voice)
                    at = 0.5 + media.speech_extent(a)[1] + pause_ms / 1000 - media.speech_extent(b)[0]
                    clips = [(0.5, a), (at, b)]
                pcm, _ = media.compose(clips, total_s=clips[-1][0] + len(clips[-1][1]) / media.RATE + 2.0)
                seg = Segmenter(VadConfig(), on_pause=lambda _u: None)
                found = [u for f in media.frames_of(pcm, 480) for u in seg.push(f)] + seg.flush()
                guesses, wasted = guesses + seg.pauses, wasted + seg.resumes
                utterances, questions = utterances + len(found), questions + 1
        emit("early_end_wasted", wasted / guesses if guesses else 0.0, "share", pause_ms=pause_ms,
             questions=questions, guesses=guesses, wasted=wasted, confirmed=guesses - wasted,
             utterances=utterances)


def _recorder(delays: list[float]) -> Callable[[Frame], None]:
    """A subscriber that records how long after capture it was called."""
    return lambda frame: delays.append(time.monotonic() - frame.mono)


def bench_camera(workdir: Path) -> None:
    for width, height in ((640, 480), (1280, 720)):
        video = media.write_video(workdir / f"v{width}.avi", 150, 15.0, width, height,
                                  frame=lambda i, w, h: media.moving_square(i, w, h, size=96, step=8))
        cam = Camera(CameraConfig(enabled=True, source=str(video), fps=15.0))
        delays: list[float] = []
        cam.subscribe(_recorder(delays))
        cam.start()
        cam.wait_frame(timeout=10)
        ages = []
        rng = random.Random(0)
        for _ in range(60):
            time.sleep(rng.uniform(0.0, 0.1))
            frame = cam.latest()
            assert frame is not None
            ages.append((time.monotonic() - frame.mono) * 1000)
        cam.stop()
        emit("camera_age_ms", statistics.mean(ages), "ms", size=f"{width}x{height}", fps=15,
             p95=round(sorted(ages)[int(0.95 * len(ages))], 1), max=round(max(ages), 1), period_ms=66.7)
        emit("camera_subscriber_ms", statistics.mean(delays) * 1000, "ms", size=f"{width}x{height}",
             max=round(max(delays) * 1000, 2))
        frame = Frame(np.ascontiguousarray(media.moving_square(3, width, height)), time.time(), time.monotonic(), 1)
        for snapshot in (False, True):
            costs = []
            for i in range(40):
                prep = FramePreparer(CameraConfig(input_size=512, snapshot=snapshot))
                f = Frame(frame.image, frame.ts, frame.mono, i)
                t = time.perf_counter()
                prep(f)
                costs.append((time.perf_counter() - t) * 1000)
            ms = statistics.median(costs)
            emit("frame_prep_ms", ms, "ms", size=f"{width}x{height}", input_size=512, fit="letterbox",
                 jpeg=snapshot, target=10, ok=ms < 10)


def bench_cpu(workdir: Path, seconds: float) -> None:
    video = media.write_video(workdir / "cpu.avi", 150, 15.0, 640, 480,
                              frame=lambda i, w, h: media.moving_square(i, w, h, size=96, step=8))
    stream, _ = speech_stream(seconds + 5.0, snr_db=25.0)
    wav = media.write_wav(workdir / "speech.wav", stream)
    cam = Camera(CameraConfig(enabled=True, source=str(video), fps=15.0))
    motion = MotionDetector(MotionConfig(enabled=True, cooldown=1.0))
    cam.subscribe(motion)
    mic = Microphone(MicrophoneConfig(enabled=True, source=str(wav), realtime=True))
    seg = Segmenter(VadConfig())
    utterances: list[Utterance] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            frame = mic.read(timeout=0.2)
            if frame is not None:
                utterances.extend(seg.push(frame.pcm, frame.ts))

    listener = threading.Thread(target=listen, daemon=True)
    cam.start()
    mic.start()
    listener.start()
    time.sleep(1.0)  # past start-up
    wall0, cpu0, frames0 = time.monotonic(), time.process_time(), cam.frames
    time.sleep(seconds)
    wall, cpu, frames = time.monotonic() - wall0, time.process_time() - cpu0, cam.frames - frames0
    stop.set()
    listener.join()
    mic.stop()
    cam.stop()
    share = cpu / wall * 100
    emit("perception_cpu", share, "% of one core", seconds=round(wall, 1), camera="640x480 MJPG file @15 fps",
         camera_fps=round(frames / wall, 1), motion_events=motion.count, audio_frames=seg.frames,
         utterances=len(utterances), mic_overflows=mic.overflows, target=10, ok=share < 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="wall time of the CPU-share measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gemma-agent-bench-") as tmp:
        bench_vad()
        bench_early_end()
        bench_camera(Path(tmp))
        bench_cpu(Path(tmp), args.seconds)


if __name__ == "__main__":
    main()
