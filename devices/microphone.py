"""Microphone: 16 kHz mono int16 frames of exactly the VAD frame length, from an input device or a WAV file.

`MicrophoneSettings.source` picks the source:

- `""`: the default input device; `3` or `"3"`: the device with that index; any other string that is not a
  `.wav` file: a device name, or a unique part of it (any case). `list_input_devices()` lists them.
- a path ending in `.wav` (or any existing file): WAV replay through the same interface, at real-time speed when
  `cfg.realtime` (a live microphone's timing, frames dropped when the consumer is slow) or as fast as the
  consumer reads (no drops). WAVs in other rates, widths (8/16/24/32-bit PCM) or channel counts are converted.

Live capture runs a sounddevice `InputStream` whose callback never blocks: it mixes to mono, resamples when the
device cannot do 16 kHz, cuts frames and `put_nowait`s them into a bounded queue (`cfg.queue_frames`); a full
queue drops the frame and counts it in `overflows` (PortAudio's own overruns are in `input_overflows`).

Resampling is a polyphase windowed-sinc filter (Kaiser window, beta 8.6, 16 zero crossings, cut-off at 0.9 x
the lower Nyquist rate: flat to 6 kHz, -3 dB at 7 kHz, > 85 dB rejection of what would alias) for any integer
rate ratio. Chosen over linear interpolation because a 48 kHz microphone has energy above 8 kHz that plain
interpolation folds back into the speech band (hiss, and noise the VAD can take for speech); the sinc filter is
the anti-alias low-pass and the interpolator in one, has no delay (outputs are centred on their input instant,
so timestamps stay exact), and costs ~110 multiply-adds per output sample (~60 us per 30 ms frame from 48 kHz).
The filter table is computed once per rate pair.

Every frame carries `ts`: the stream time of its first sample in seconds since the stream started. Dropped
frames still advance it, so utterance timestamps stay true after an overflow.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import typing
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

log = logging.getLogger("devices.microphone")

RATE = 16000
FRAME_MS = (10, 20, 30)
State = Literal["starting", "ok", "ended", "lost", "stopped"]


class MicrophoneSettings(Protocol):
    """What the microphone reads of its settings (the agent's `microphone` config section satisfies it)."""

    @property
    def source(self) -> int | str: ...
    @property
    def realtime(self) -> bool: ...
    @property
    def queue_frames(self) -> int: ...


class MicrophoneError(Exception):
    """The microphone source cannot be used (bad WAV file, PortAudio missing, stream failed to open)."""


class NoInputDevice(MicrophoneError):
    """No input device matches the configured source (or the machine has none)."""


@dataclass(frozen=True)
class AudioFrame:
    """One VAD frame: int16 mono 16 kHz samples, exactly frame_ms long, and the stream time of its start."""

    pcm: np.ndarray
    ts: float


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    default_rate: float
    hostapi: str
    is_default: bool


# --- resampling ----------------------------------------------------------------------------------------


class Resampler:
    """Streaming rational-ratio resampler (polyphase windowed sinc); float samples in, float samples out.

    Output sample n is the band-limited input evaluated at input position n * rate_in / rate_out, so the output
    has no delay relative to the input. `flush()` returns the last samples once the input has ended.
    """

    def __init__(self, rate_in: int, rate_out: int, zero_crossings: int = 16, rolloff: float = 0.9,
                 beta: float = 8.6) -> None:
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        g = math.gcd(int(rate_in), int(rate_out))
        self.up, self.down = int(rate_out) // g, int(rate_in) // g
        scale = min(1.0, rate_out / rate_in)
        cutoff = 0.5 * scale * rolloff  # cycles per input sample
        self.half = math.ceil(zero_crossings / (2 * cutoff))  # taps either side, in input samples
        offsets = np.arange(-self.half + 1, self.half + 1)  # input sample j relative to floor(position)
        frac = np.arange(self.up)[:, None] / self.up  # fractional position of each phase
        u = frac - offsets[None, :]
        x = np.clip(u / self.half, -1.0, 1.0)
        taps = 2 * cutoff * np.sinc(2 * cutoff * u) * np.i0(beta * np.sqrt(1.0 - x * x)) / np.i0(beta)
        self.table = (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32)  # unit gain at DC
        self._buf = np.zeros(self.half - 1, np.float32)  # zeros before the first sample
        self._buf_start = -(self.half - 1)  # absolute input index of _buf[0]
        self._n = 0  # next output index
        self._in = 0  # input samples seen

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed input samples; return every output sample whose filter window is now complete."""
        if self.up == self.down:
            return np.asarray(x, np.float32)
        self._buf = np.concatenate([self._buf, np.asarray(x, np.float32)])
        self._in += len(x)
        return self._emit()

    def flush(self) -> np.ndarray:
        """Input ended: return the remaining outputs up to the input's end (zeros assumed after it)."""
        if self.up == self.down:
            return np.zeros(0, np.float32)
        before = self._n
        self._buf = np.concatenate([self._buf, np.zeros(self.half, np.float32)])
        out = self._emit()
        keep = max(0, -(-self._in * self.up // self.down) - before)  # ceil(n_in * up / down) in all
        return out[:keep]

    def _emit(self) -> np.ndarray:
        last = self._buf_start + len(self._buf) - 1  # absolute index of the newest input sample
        end = -(-(last - self.half + 1) * self.up // self.down)  # outputs n < end have a full window
        if end <= self._n:
            return np.zeros(0, np.float32)
        n = np.arange(self._n, end, dtype=np.int64)
        base = n * self.down // self.up
        phase = n * self.down % self.up
        windows = np.lib.stride_tricks.sliding_window_view(self._buf, 2 * self.half)
        out = np.einsum("ij,ij->i", windows[base - self.half + 1 - self._buf_start], self.table[phase])
        self._n = end
        next_first = (end * self.down // self.up) - self.half + 1  # first input the next output needs
        drop = next_first - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out.astype(np.float32, copy=False)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole signal (float or int16; int16 in gives int16 out) to rate_out."""
    r = Resampler(rate_in, rate_out)
    y = np.concatenate([r.process(x.astype(np.float32)), r.flush()])
    return to_int16(y) if x.dtype == np.int16 else y


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


class _Framer:
    """(n, channels) blocks at the capture rate -> AudioFrames of frame_len samples at 16 kHz."""

    def __init__(self, rate_in: int, frame_len: int) -> None:
        self.frame_len = frame_len
        self.resampler = Resampler(rate_in, RATE) if rate_in != RATE else None
        self._pending = np.zeros(0, np.int16)
        self._samples = 0  # 16 kHz samples framed so far (the stream clock)

    def push(self, block: np.ndarray) -> list[AudioFrame]:
        if block.ndim == 2:
            block = block[:, 0] if block.shape[1] == 1 else block.astype(np.float32).mean(axis=1)
        if self.resampler is not None:
            mono = to_int16(self.resampler.process(block.astype(np.float32, copy=False)))
        else:
            mono = block if block.dtype == np.int16 else to_int16(block)
        return self._cut(mono)

    def flush(self) -> list[AudioFrame]:
        """End of input: the resampler's tail and the last partial frame, zero-padded to full length."""
        frames = self._cut(to_int16(self.resampler.flush())) if self.resampler is not None else []
        if len(self._pending):
            pad = np.zeros(self.frame_len - len(self._pending), np.int16)
            frames += self._cut(pad)
        return frames

    def _cut(self, mono: np.ndarray) -> list[AudioFrame]:
        data = np.concatenate([self._pending, mono]) if len(self._pending) else np.array(mono, np.int16)
        count = len(data) // self.frame_len
        frames = []
        for i in range(count):
            pcm = data[i * self.frame_len:(i + 1) * self.frame_len]
            frames.append(AudioFrame(pcm, self._samples / RATE))
            self._samples += self.frame_len
        self._pending = data[count * self.frame_len:]
        return frames


# --- devices -------------------------------------------------------------------------------------------


def _sd() -> Any:
    """sounddevice, imported on first use so WAV replay works where PortAudio is missing."""
    try:
        import sounddevice
    except OSError as exc:  # the PortAudio shared library is missing
        raise MicrophoneError(f"PortAudio is not available ({exc}); install libportaudio2") from None
    return sounddevice


def list_input_devices() -> list[InputDevice]:
    """Every device PortAudio can record from (empty when there is none)."""
    sd = _sd()
    try:
        devices = sd.query_devices()
        default = sd.default.device[0]
        apis = sd.query_hostapis()
    except sd.PortAudioError as exc:
        log.warning("cannot list audio devices: %s", exc)
        return []
    return [
        InputDevice(index=i, name=d["name"], channels=int(d["max_input_channels"]),
                    default_rate=float(d["default_samplerate"]), hostapi=apis[d["hostapi"]]["name"],
                    is_default=(i == default))
        for i, d in enumerate(devices) if d["max_input_channels"] > 0
    ]


def is_wav_source(source: int | str) -> bool:
    return isinstance(source, str) and (source.lower().endswith(".wav") or os.path.isfile(source))


def find_input_device(source: int | str) -> InputDevice:
    """The input device named by `source` ("" = default, index, or name / part of a name), or NoInputDevice."""
    inputs = list_input_devices()
    known = "; ".join(f"{d.index}: {d.name}" for d in inputs) or "none"
    if source == "":
        chosen = [d for d in inputs if d.is_default] or inputs[:1]
        if not chosen:
            raise NoInputDevice("no audio input device found (PortAudio lists none); connect a microphone, or "
                                "set microphone.source to a .wav file to replay")
        return chosen[0]
    if isinstance(source, int) or source.strip().isdigit():
        index = int(source)
        for d in inputs:
            if d.index == index:
                return d
        raise NoInputDevice(f"microphone.source {source!r}: no input device with index {index} "
                            f"(input devices: {known})")
    matches = [d for d in inputs if d.name == source] or [d for d in inputs if source.lower() in d.name.lower()]
    if len(matches) != 1:
        what = "matches no" if not matches else "matches more than one"
        raise NoInputDevice(f"microphone.source {source!r} {what} input device (input devices: {known})")
    return matches[0]


# --- the microphone ------------------------------------------------------------------------------------


_END = object()


class Microphone:
    """Frames from a live input device or a WAV file, through one interface (see the module docstring)."""

    def __init__(self, cfg: MicrophoneSettings, frame_ms: int = 30) -> None:
        if frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {frame_ms!r}")
        self.cfg = cfg
        self.frame_ms = frame_ms
        self.frame_len = RATE * frame_ms // 1000
        self.state: State = "stopped"
        self.overflows = 0  # frames dropped because the queue was full
        self.input_overflows = 0  # overruns PortAudio reported
        self.at_end = False  # the consumer has read past the last frame of a replay
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=cfg.queue_frames)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._reported = 0
        self.wav: Path | None = None
        self.device: InputDevice | None = None
        self.capture_rate = RATE
        self.channels = 1
        self.started_at = 0.0
        if is_wav_source(cfg.source):
            self.wav = Path(str(cfg.source))
            self.capture_rate, self.channels = _check_wav(self.wav)
        else:
            self.device = find_input_device(cfg.source)
        self._framer = _Framer(self.capture_rate, self.frame_len)

    @property
    def name(self) -> str:
        if self.wav is not None:
            return f"wav:{self.wav}"
        assert self.device is not None
        return f"{self.device.index}: {self.device.name}"

    def start(self) -> None:
        """Start capturing (or replaying); frames then wait in the queue for read()/frames()."""
        if self.state not in ("stopped",):
            return
        self._stop.clear()
        self.state = "starting"
        self._queue = queue.Queue(maxsize=self.cfg.queue_frames)  # nothing left over from a previous run
        self._framer = _Framer(self.capture_rate, self.frame_len)  # the stream clock starts at 0 again
        self.at_end = False
        self.started_at = time.time()  # wall time of stream time 0: frame/utterance ts + this = wall clock
        if self.wav is not None:
            self._thread = threading.Thread(target=self._replay, name="mic-replay", daemon=True)
            self._thread.start()
        else:
            self._open_stream()
        log.info("microphone %s: capturing at %d Hz, %d channel(s), %d ms frames", self.name,
                 self.capture_rate, self.channels, self.frame_ms)

    def stop(self) -> None:
        """Stop capturing; frames already queued can still be read."""
        self._stop.set()
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except Exception as exc:  # a device that vanished can fail to close; nothing left to do
                log.debug("closing the audio stream: %s", exc)
            self._stream = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self.state = "stopped"

    def read(self, timeout: float | None = None) -> AudioFrame | None:
        """The next frame, or None on timeout or at the end of a replay (then `at_end` is True)."""
        if self.at_end:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._report_overflows()
        if item is _END:
            self.at_end = True
            return None
        return typing.cast(AudioFrame, item)

    def frames(self, poll: float = 0.5) -> Iterator[AudioFrame]:
        """Yield frames until the replay ends or stop() is called and the queue is drained."""
        while not self.at_end:
            frame = self.read(timeout=poll)
            if frame is not None:
                yield frame
            elif self._stop.is_set() and self._queue.empty():
                return

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "source": self.name, "rate": self.capture_rate, "queued": self.queued,
                "overflows": self.overflows, "input_overflows": self.input_overflows}

    def _offer(self, frame: AudioFrame) -> None:
        """Queue a frame without ever blocking; a full queue drops it and counts the overflow."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.overflows += 1

    def _report_overflows(self) -> None:
        if self.overflows != self._reported:
            log.warning("microphone %s: %d frame(s) dropped because the consumer fell behind (%d in all)",
                        self.name, self.overflows - self._reported, self.overflows)
            self._reported = self.overflows

    # --- live capture ---

    def _open_stream(self) -> None:
        sd = _sd()
        assert self.device is not None
        dev = self.device
        settings = [(RATE, 1), (int(dev.default_rate), 1), (int(dev.default_rate), dev.channels)]
        for rate, channels in settings:
            try:
                sd.check_input_settings(device=dev.index, channels=channels, dtype="int16", samplerate=rate)
                break
            except Exception as exc:
                log.debug("input device %s cannot do %d Hz x %d: %s", dev.name, rate, channels, exc)
        else:
            raise MicrophoneError(f"input device {self.name} accepts neither {RATE} Hz nor its own "
                                  f"{dev.default_rate:g} Hz as 16-bit input")
        self.capture_rate, self.channels = rate, channels
        self._framer = _Framer(rate, self.frame_len)
        try:
            self._stream = sd.InputStream(
                device=dev.index, samplerate=rate, channels=channels, dtype="int16",
                blocksize=rate * self.frame_ms // 1000, callback=self._callback,
                finished_callback=self._finished)
            self._stream.start()
        except Exception as exc:
            self.state = "stopped"
            raise MicrophoneError(f"cannot open input device {self.name}: {exc}") from None
        self.state = "ok"

    def _callback(self, indata: np.ndarray, _frames: int, _time: Any, status: Any) -> None:
        """PortAudio's thread: convert and queue, never block, never raise (that would end the stream)."""
        try:
            if status.input_overflow:
                self.input_overflows += 1
            for frame in self._framer.push(indata):
                self._offer(frame)
        except Exception as exc:
            log.error("microphone callback failed: %s", exc)

    def _finished(self) -> None:
        if not self._stop.is_set():
            log.error("microphone %s: the input stream ended (device gone?)", self.name)
            self.state = "lost"

    # --- WAV replay ---

    def _replay(self) -> None:
        assert self.wav is not None
        try:
            self._replay_file(self.wav)
        except Exception as exc:  # the file changed under us; end the stream rather than die
            log.error("microphone replay of %s failed: %s", self.wav, exc)
        if not self._stop.is_set():
            self.state = "ended"
            self._put(_END)

    def _replay_file(self, path: Path) -> None:
        frame_s = self.frame_ms / 1000
        t0 = time.monotonic()
        self.state = "ok"
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            chunk = max(1, rate // 10)
            while not self._stop.is_set():
                raw = w.readframes(chunk)
                frames = self._framer.push(_decode(raw, width, channels)) if raw else self._framer.flush()
                for frame in frames:
                    if self.cfg.realtime:
                        due = t0 + frame.ts + frame_s  # when a live microphone would have delivered it
                        if self._stop.wait(max(0.0, due - time.monotonic())):
                            return
                        self._offer(frame)
                    elif not self._put(frame):
                        return
                if not raw:
                    return

    def _put(self, item: Any) -> bool:
        """Blocking put that gives up when stopped (fast replay is lossless)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False


def _check_wav(path: Path) -> tuple[int, int]:
    """Rate and channels of a PCM WAV, or a MicrophoneError naming the file and the problem."""
    if not path.is_file():
        raise MicrophoneError(f"microphone.source: WAV file {path} not found")
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
    except (wave.Error, EOFError, OSError) as exc:
        raise MicrophoneError(f"microphone.source: {path} is not a readable PCM WAV file ({exc})") from None
    if width not in (1, 2, 3, 4) or channels < 1 or rate < 1000:
        raise MicrophoneError(f"microphone.source: {path}: unsupported WAV ({width * 8}-bit, {channels} "
                              f"channel(s), {rate} Hz)")
    return rate, channels


def _decode(raw: bytes, width: int, channels: int) -> np.ndarray:
    """PCM bytes -> (n, channels) samples in int16 scale (int16 for 16-bit, float32 otherwise)."""
    if width == 2:
        data: np.ndarray = np.frombuffer(raw, "<i2")
    elif width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) * 256.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 256.0
    else:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 65536.0
    return data.reshape(-1, channels)
