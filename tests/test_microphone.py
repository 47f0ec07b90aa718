"""The microphone: WAV replay through the same interface as live capture, the resampler, and live capture through
real PortAudio: device listing, the clear error when no input device exists (this machine has none), and a
real input stream from an ALSA `file` device that plays back speech as a microphone would."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import sounddevice as sd

from agent.config import MicrophoneConfig, VadConfig
from agent.perception.vad import Segmenter, Utterance
from devices.microphone import (
    RATE,
    AudioFrame,
    Microphone,
    MicrophoneError,
    NoInputDevice,
    Resampler,
    _Framer,
    list_input_devices,
    resample,
)
from tests.support.media import compose, espeak, write_wav
from tests.support.paths import ROOT


def replay(path: Path, realtime: bool = False, queue_frames: int = 500) -> MicrophoneConfig:
    return MicrophoneConfig(enabled=True, source=str(path), realtime=realtime, queue_frames=queue_frames)


def read_all(mic: Microphone) -> list[AudioFrame]:
    mic.start()
    frames = list(mic.frames())
    mic.stop()
    return frames


def tone(freq: float, seconds: float, rate: int, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


# --- resampler -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate_in", [8000, 11025, 22050, 44100, 48000])
def test_resampler_keeps_the_speech_band(rate_in: int) -> None:
    out = resample(tone(1000, 1.0, rate_in), rate_in, RATE)
    assert len(out) == RATE
    expected = tone(1000, 1.0, RATE)
    assert np.abs(out - expected)[100:-100].max() < 2.0  # of 10000: no delay, no gain change


def test_resampler_removes_what_would_alias() -> None:
    out = resample(tone(12000, 1.0, 48000), 48000, RATE)  # 12 kHz would fold to 4 kHz
    assert np.sqrt(np.mean(out[100:-100] ** 2)) < 1.0  # of 7071 RMS in


def test_resampler_streams_in_any_block_sizes() -> None:
    x = np.random.default_rng(0).normal(0, 3000, 44100)
    whole = resample(x, 44100, RATE)
    r = Resampler(44100, RATE)
    parts, i = [], 0
    for n in np.random.default_rng(1).integers(1, 3000, 100):
        parts.append(r.process(x[i:i + n]))
        i += n
        if i >= len(x):
            break
    parts.append(r.flush())
    assert np.allclose(np.concatenate(parts), whole, atol=1e-2)


def test_framer_turns_48k_stereo_callback_blocks_into_16k_mono_frames() -> None:
    left = tone(440, 1.0, 48000)
    stereo = np.stack([left, left * 0.5], axis=1).astype(np.int16)
    framer = _Framer(48000, 480)
    frames = []
    for i in range(0, len(stereo), 1440):  # what a 30 ms PortAudio block at 48 kHz holds
        frames += framer.push(stereo[i:i + 1440])
    frames += framer.flush()
    assert all(f.pcm.dtype == np.int16 and f.pcm.shape == (480,) for f in frames)
    assert [f.ts for f in frames] == pytest.approx([i * 0.03 for i in range(len(frames))])
    got = np.concatenate([f.pcm for f in frames])[:RATE].astype(np.float64)
    want = resample(stereo.astype(np.float32).mean(axis=1), 48000, RATE)
    assert np.abs(got - want).max() <= 1.0


# --- WAV replay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_16k_mono_wav_replays_bit_exact(tmp_path: Path, frame_ms: int) -> None:
    pcm = (np.random.default_rng(2).normal(0, 3000, 16000 + 123)).astype(np.int16)
    mic = Microphone(replay(write_wav(tmp_path / "a.wav", pcm)), frame_ms=frame_ms)
    frames = read_all(mic)
    n = RATE * frame_ms // 1000
    assert all(f.pcm.shape == (n,) and f.pcm.dtype == np.int16 for f in frames)
    assert len(frames) == -(-len(pcm) // n)
    got = np.concatenate([f.pcm for f in frames])
    assert np.array_equal(got[:len(pcm)], pcm) and not got[len(pcm):].any()  # last frame zero-padded
    assert [f.ts for f in frames] == pytest.approx([i * frame_ms / 1000 for i in range(len(frames))])
    assert mic.at_end and mic.read(timeout=0.1) is None
    assert mic.overflows == 0


def test_other_rates_and_stereo_are_converted(tmp_path: Path) -> None:
    left = tone(500, 2.0, 44100).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    frames = read_all(Microphone(replay(write_wav(tmp_path / "s.wav", stereo, rate=44100))))
    got = np.concatenate([f.pcm for f in frames]).astype(np.float64)
    assert len(frames) == -(-2 * RATE // 480)
    assert np.abs(got[:2 * RATE] - tone(500, 2.0, RATE))[100:-100].max() < 3.0


@pytest.mark.parametrize("width", [1, 3])
def test_8_and_24_bit_wavs_are_converted(tmp_path: Path, width: int) -> None:
    x = tone(300, 0.5, RATE, amplitude=0.5)  # half scale
    if width == 1:
        raw = np.rint(128 + 127 * x).astype(np.uint8).tobytes()
    else:
        v = np.rint(x * 2**23).astype(np.int32)
        raw = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], axis=1).astype(np.uint8).tobytes()
    path = tmp_path / f"w{width}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(RATE)
        w.writeframes(raw)
    got = np.concatenate([f.pcm for f in read_all(Microphone(replay(path)))])[:len(x)].astype(np.float64)
    assert np.abs(got - x * 32768).max() < (300 if width == 1 else 2)


def test_fast_replay_is_lossless_with_a_small_queue(tmp_path: Path) -> None:
    pcm = (np.random.default_rng(3).normal(0, 2000, 3 * RATE)).astype(np.int16)
    mic = Microphone(replay(write_wav(tmp_path / "a.wav", pcm), queue_frames=10))
    mic.start()
    time.sleep(0.3)  # the reader waits on the full queue instead of dropping
    frames = list(mic.frames())
    mic.stop()
    assert len(frames) == 100 and mic.overflows == 0
    assert np.array_equal(np.concatenate([f.pcm for f in frames]), pcm)


def test_realtime_replay_drops_and_counts_when_the_consumer_is_slow(tmp_path: Path) -> None:
    pcm = (np.random.default_rng(4).normal(0, 2000, RATE)).astype(np.int16)  # 1 s: 34 frames of 30 ms
    mic = Microphone(replay(write_wav(tmp_path / "a.wav", pcm), realtime=True, queue_frames=10))
    mic.start()
    end = time.monotonic() + 20
    while mic.state != "ended" and time.monotonic() < end:  # nobody reads meanwhile
        time.sleep(0.05)
    assert mic.state == "ended"
    assert mic.overflows == 34 - 10  # like a live stream: the newest frames were dropped, never blocked on
    frames = list(mic.frames())
    assert [f.ts for f in frames] == pytest.approx([i * 0.03 for i in range(10)])
    assert mic.at_end
    mic.stop()


def test_replayed_speech_through_the_vad(tmp_path: Path) -> None:
    """The path the daemon runs: WAV (22.05 kHz, like espeak-ng writes) -> Microphone -> Segmenter."""
    a, b = espeak("Hello there how are you today"), espeak("Please open the garage door")
    stream, truths = compose([(0.8, a), (4.0, b)], 7.0, snr_db=25.0)
    path = write_wav(tmp_path / "speech.wav", resample(stream, RATE, 22050), rate=22050)
    mic = Microphone(replay(path))
    seg = Segmenter(VadConfig())
    found: list[Utterance] = []
    mic.start()
    for frame in mic.frames():
        found += seg.push(frame.pcm, frame.ts)
    found += seg.flush()
    mic.stop()
    assert len(found) == 2
    for u, t in zip(found, truths, strict=True):
        assert abs(u.start_ts - t.start) <= 0.15 and abs(u.end_ts - t.end) <= 0.15
    assert found[0].pcm_ts <= truths[0].start - 0.25  # the pre-roll before the first syllable


def test_bad_sources_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MicrophoneError, match=r"WAV file .*missing\.wav not found"):
        Microphone(replay(tmp_path / "missing.wav"))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(MicrophoneError, match=r"junk\.wav is not a readable PCM WAV"):
        Microphone(replay(junk))
    with pytest.raises(ValueError, match="frame_ms"):
        Microphone(replay(write_wav(tmp_path / "ok.wav", np.zeros(100, np.int16))), frame_ms=25)


# --- live capture (PortAudio) --------------------------------------------------------------------------


def test_list_input_devices_agrees_with_portaudio() -> None:
    devices = list_input_devices()
    portaudio = [d for d in sd.query_devices() if d["max_input_channels"] > 0]
    assert [d.name for d in devices] == [d["name"] for d in portaudio]
    assert all(d.channels > 0 and d.default_rate > 0 for d in devices)


@pytest.mark.parametrize("source", ["no-such-microphone-xyz", 99, "99"])
def test_unknown_input_device_is_a_clear_error(source: int | str) -> None:
    cfg = dataclasses.replace(MicrophoneConfig(), source=source)
    with pytest.raises(NoInputDevice, match=f"microphone.source '?{source}'?"):
        Microphone(cfg)


def test_default_device_opens_or_says_there_is_none() -> None:
    if list_input_devices():  # a machine with a microphone: capture a few real frames
        mic = Microphone(MicrophoneConfig(enabled=True))
        mic.start()
        frame = mic.read(timeout=5.0)
        mic.stop()
        assert frame is not None and frame.pcm.shape == (480,) and frame.pcm.dtype == np.int16
    else:  # this build machine: no input device, and the error says so
        with pytest.raises(NoInputDevice, match="no audio input device found"):
            Microphone(MicrophoneConfig(enabled=True))


LIVE = """
import json, sys, time
import numpy as np
from agent.config import MicrophoneConfig
from devices.microphone import Microphone, list_input_devices
names = [d.name for d in list_input_devices()]
mic = Microphone(MicrophoneConfig(enabled=True, source="gemma_test_mic", queue_frames=200))
mic.start()
end = time.monotonic() + 20
while mic.overflows == 0 and time.monotonic() < end:  # the null device has no clock: it outruns us
    time.sleep(0.01)
state = mic.state
mic.stop()
frames = []
while (frame := mic.read(timeout=0)) is not None:
    frames.append(frame)
np.save(sys.argv[1], np.concatenate([f.pcm for f in frames]))
print(json.dumps({"names": names, "state": state, "frames": len(frames), "overflows": mic.overflows,
                  "lengths": sorted({len(f.pcm) for f in frames}), "ts": [f.ts for f in frames[:3]],
                  "rate": mic.capture_rate}))
"""


def test_live_capture_through_portaudio_from_an_alsa_device(tmp_path: Path) -> None:
    """A real PortAudio input stream: ALSA's `file` plugin plays the part of a microphone (capture reads a raw
    speech file, on the `null` device, which has no clock). ALSA_CONFIG_PATH must be set before PortAudio
    starts, hence a subprocess."""
    speech, _ = compose([(0.3, espeak("Testing the live microphone path"))], 3.0)
    raw = tmp_path / "speech.raw"
    raw.write_bytes(speech.astype("<i2").tobytes())
    conf = tmp_path / "asound.conf"
    conf.write_text(f"</usr/share/alsa/alsa.conf>\npcm.gemma_test_mic {{\n  type file\n  slave.pcm \"null\"\n"
                    f"  file \"/dev/null\"\n  infile \"{raw}\"\n  format \"raw\"\n}}\n")
    out = tmp_path / "captured.npy"
    env = {**os.environ, "ALSA_CONFIG_PATH": str(conf)}
    proc = subprocess.run([sys.executable, "-c", LIVE, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "gemma_test_mic" in result["names"]
    assert result["state"] == "ok" and result["rate"] == RATE
    assert result["frames"] == 200 and result["lengths"] == [480]
    assert result["ts"] == pytest.approx([0.0, 0.03, 0.06])
    assert result["overflows"] > 0  # counted when the queue was full; the callback never waited
    captured = np.load(out)
    assert np.array_equal(captured[:len(speech)], speech)  # what the "microphone" heard, sample for sample
