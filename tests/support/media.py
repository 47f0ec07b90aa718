"""Test media synthesized here: espeak-ng speech placed at known offsets (with silence or white noise at a set
SNR), noise bursts, WAV files, and videos / image folders whose frames carry their own index.

Raw espeak-ng output is cached under $GEMMA_AGENT_TEST_CACHE (default ~/.cache/gemma-agent/test)/media, keyed
by the espeak-ng version, voice, speed and text; everything else is computed (and fast).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from devices.microphone import resample

RATE = 16000
CACHE = Path(os.environ.get("GEMMA_AGENT_TEST_CACHE", Path.home() / ".cache" / "gemma-agent" / "test")) / "media"


# --- audio ---------------------------------------------------------------------------------------------


def _espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def espeak(text: str, voice: str = "en-us", speed: int = 165) -> np.ndarray:
    """`text` spoken by espeak-ng, as int16 mono 16 kHz (resampled from its 22.05 kHz with our resampler)."""
    key = hashlib.sha256(f"{_espeak_version()}|{voice}|{speed}|{text}".encode()).hexdigest()[:16]
    path = CACHE / f"espeak-{key}.wav"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(tmp), text], check=True,
                       capture_output=True, timeout=60)
        os.replace(tmp, path)
    pcm, rate = read_wav(path)
    return resample(pcm, rate, RATE)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV as int16 samples ((n,) mono or (n, channels)) and its rate."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, f"{path}: expected 16-bit PCM"
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        channels, rate = w.getnchannels(), w.getframerate()
    return (data if channels == 1 else data.reshape(-1, channels)), rate


def write_wav(path: Path, pcm: np.ndarray, rate: int = RATE) -> Path:
    """Write int16 samples ((n,) mono or (n, channels)) as a 16-bit PCM WAV."""
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm, "<i2").tobytes())
    return path


def speech_extent(pcm: np.ndarray, rate: int = RATE, floor_db: float = -40.0) -> tuple[float, float]:
    """Start and end (s) of the non-silent part: first and last sample above floor_db of the peak."""
    level = np.abs(pcm.astype(np.float32))
    loud = np.flatnonzero(level > level.max() * 10 ** (floor_db / 20))
    return loud[0] / rate, (loud[-1] + 1) / rate


def active_rms(pcm: np.ndarray, rate: int = RATE) -> float:
    """RMS of a speech clip over its non-silent extent (the reference level for an SNR)."""
    a, b = speech_extent(pcm, rate)
    part = pcm[int(a * rate):int(b * rate)].astype(np.float64)
    return float(np.sqrt(np.mean(part**2)))


@dataclass(frozen=True)
class Truth:
    """Where a placed clip's sound really is in the composed stream (seconds)."""

    start: float
    end: float


def compose(parts: Iterable[tuple[float, np.ndarray]], total_s: float, snr_db: float | None = None,
            seed: int = 0) -> tuple[np.ndarray, list[Truth]]:
    """Place clips at offsets (s) in `total_s` of silence, optionally under white noise at `snr_db` relative to
    the clips' own active RMS; return the int16 stream and each clip's true extent."""
    out = np.zeros(int(total_s * RATE), np.float64)
    truths = []
    levels = []
    for offset, clip in parts:
        i = round(offset * RATE)
        if i + len(clip) > len(out):
            raise ValueError(f"clip at {offset} s runs past the end ({total_s} s)")
        out[i:i + len(clip)] += clip
        a, b = speech_extent(clip)
        truths.append(Truth(offset + a, offset + b))
        levels.append(active_rms(clip))
    if snr_db is not None:
        sigma = float(np.mean(levels)) / 10 ** (snr_db / 20)
        out += np.random.default_rng(seed).normal(0.0, sigma, len(out))
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16), truths


CHATTER = (  # room and television talk without the wake word ("okay", "now", "boo" among them)
    "Okay, so what time does the game start tonight?", "I think we should paint the kitchen a lighter colour.",
    "The weather will be cloudy with a chance of rain later in the afternoon.", "Did you feed the cat already?",
    "And now, the news at nine: markets closed higher after a quiet day of trading.",
    "Can you pass me the salt, please?", "No, I said the blue one, not the green one.",
    "We need to leave in ten minutes or we will miss the train.", "That film was much better than I expected.",
    "The children are playing in the garden.",
    "Remember to call your mother on Sunday.", "This recipe needs two eggs and a cup of flour.",
    "Nobody knows where the remote control went.", "A new bakery opened on the corner of our street.",
    "Turn left at the next light, then keep going straight.", "Boo! Did I scare you?",
    "The meeting has been moved to Thursday morning.", "I am not sure that is a good idea.",
    "Our team scored twice in the last five minutes of the match.", "Please close the window, it is getting cold.",
    "He finally fixed the leaking tap in the bathroom.", "What shall we cook for dinner tomorrow?",
    "The library closes early on Saturdays.",
)
NEAR_MISSES = (  # "okay" and a word like "nabu" after it: okay_nabu scores 0.54-0.89 on these (cutoff 0.85)
    "Okay, okay, I am coming, just give me a second.", "Okay, now let us try that one more time.",
)
CHATTER_VOICES = ("en-us", "en", "en-gb-x-rp", "en+m3", "en+f3", "en-us+m1", "en+m7", "en-gb-scotland")


def chatter(total_s: float, gap_s: float = 1.5, sentences: tuple[str, ...] = CHATTER) -> tuple[np.ndarray, int]:
    """`total_s` of `sentences` in turning voices, `gap_s` apart; the stream and the sentence count."""
    parts: list[tuple[float, np.ndarray]] = []
    at, n = 0.5, 0
    while True:
        clip = espeak(sentences[n % len(sentences)], voice=CHATTER_VOICES[n % len(CHATTER_VOICES)])
        if at + len(clip) / RATE > total_s:
            break
        parts.append((at, clip))
        at += len(clip) / RATE + gap_s
        n += 1
    return compose(parts, total_s)[0], n


def noise_burst(duration_s: float, rms: float, seed: int = 1) -> np.ndarray:
    """White noise of the given RMS and length (a cough- or knock-like burst)."""
    x = np.random.default_rng(seed).normal(0.0, rms, int(duration_s * RATE))
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def frames_of(pcm: np.ndarray, frame_len: int) -> list[np.ndarray]:
    """Cut a stream into whole frames (a partial last frame is zero-padded)."""
    pad = (-len(pcm)) % frame_len
    padded = np.concatenate([pcm, np.zeros(pad, np.int16)])
    return [padded[i:i + frame_len] for i in range(0, len(padded), frame_len)]


# --- video ---------------------------------------------------------------------------------------------

BITS = 12  # frame indices up to 4095


def numbered_frame(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    """A BGR frame whose top band encodes `index` in BITS large black/white cells (survives JPEG)."""
    img = np.full((height, width, 3), 90, np.uint8)
    cell = width // BITS
    for bit in range(BITS):
        if index >> bit & 1:
            img[: height // 4, bit * cell:(bit + 1) * cell] = 255
        else:
            img[: height // 4, bit * cell:(bit + 1) * cell] = 0
    cv2.putText(img, str(index), (10, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 200, 255), 2)
    return img


def frame_number(img: np.ndarray) -> int:
    """Read back the index numbered_frame() drew."""
    height, width = img.shape[:2]
    cell = width // BITS
    y = height // 8
    value = 0
    for bit in range(BITS):
        patch = img[y - 3:y + 4, bit * cell + cell // 2 - 3:bit * cell + cell // 2 + 4]
        if patch.mean() > 128:
            value |= 1 << bit
    return value


def write_video(path: Path, count: int, fps: float = 15.0, width: int = 320, height: int = 240,
                frame: Callable[[int, int, int], np.ndarray] = numbered_frame) -> Path:
    """An MJPG .avi of `count` frames made by frame(index, width, height)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), f"cv2.VideoWriter cannot write {path}"
    for i in range(count):
        writer.write(frame(i, width, height))
    writer.release()
    return path


def write_image_folder(folder: Path, count: int, width: int = 320, height: int = 240) -> Path:
    """`count` numbered PNG frames named so that sorting by name gives their order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"frame-{i:05d}.png"), numbered_frame(i, width, height))
    return folder


def scene(width: int, height: int) -> np.ndarray:
    """A fixed textured background (so differencing sees real image content, not a flat field)."""
    y, x = np.mgrid[0:height, 0:width]
    base = 100 + 40 * np.sin(x / 17.0) * np.cos(y / 23.0)
    return np.repeat(base[:, :, None], 3, axis=2).astype(np.uint8)


def moving_square(index: int, width: int = 320, height: int = 240, size: int = 48, step: int = 6) -> np.ndarray:
    """The scene with a white square moving left to right, `step` pixels a frame, plus mild sensor noise."""
    img = scene(width, height)
    x = (index * step) % (width - size)
    y = height // 2 - size // 2
    img[y:y + size, x:x + size] = 240
    return _sensor_noise(img, index)


def still(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    """The scene with nothing moving, plus the same mild sensor noise."""
    return _sensor_noise(scene(width, height), index)


def _sensor_noise(img: np.ndarray, index: int) -> np.ndarray:
    noise = np.random.default_rng(index).normal(0.0, 3.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)
