"""Voice activity segmentation: 16 kHz int16 frames in, utterances out (webrtcvad; pure logic, no I/O).

Definitions, all in the stream's clock (seconds; frame i covers [ts_i, ts_i + frame)):

- onset: speech begins once `onset_voiced_ms` of the last `onset_window_ms` are voiced frames (default 150 of
  180 ms: 5 of 6 frames at 30 ms). webrtcvad keeps any click voiced for 80-120 ms (its own hangover: 3-4
  frames of 30 ms, 4-5 of 20, 8-9 of 10), so a lone click or knock never opens an utterance; speech does at
  once, and its onset is still the first voiced frame.
- `start_ts`: the start of the first voiced frame of that onset window (speech onset).
- `end_ts`: the end of the last voiced frame, once `hangover_ms` of unvoiced frames have followed it. Pauses
  shorter than the hangover stay inside one utterance: two sentences 400 ms apart with the default 700 ms
  hangover are one utterance. webrtcvad itself calls ~100 ms after speech voiced, so a pause splits only when
  it is longer than the hangover plus that (a 400 ms pause splits with a 200 ms hangover).
- `pcm`: `pre_roll_ms` of audio before `start_ts` (less at the start of a stream) so the first syllable is
  kept, the speech, and up to `pre_roll_ms` of the unvoiced audio after `end_ts`; `pcm_ts` is the time of
  `pcm[0]`.
- bursts with `end_ts - start_ts` below `min_speech_ms` (coughs, knocks) are dropped and counted.
- early end (`early_end_ms`, 0 = off): once that much unvoiced audio follows the last voiced frame, `on_pause`
  gets the utterance as it would end there (same `start_ts` and `end_ts` as the one the hangover will emit if
  speech does not resume), so speech-to-text and the answer can start before the hangover is over; when speech
  resumes inside the hangover, `on_resume` says that guess is void. Utterances are still cut by the hangover.
- `on_onset` gets `start_ts` as soon as speech begins (the frame can be prepared while the person speaks).
- `pcm` is never longer than `max_utterance_s`: at the limit, mid-speech, the utterance is emitted with
  `cut=True` and the speech goes on as the next utterance, which starts at the next voiced frame without
  pre-roll (contiguous audio, no overlap) and is kept even when shorter than `min_speech_ms`. Reaching the
  limit during a pause simply ends the utterance there.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from agent.config import VadConfig

RATE = 16000


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech: int16 mono 16 kHz samples and its times in the stream's clock."""

    pcm: np.ndarray
    start_ts: float
    end_ts: float
    pcm_ts: float
    cut: bool = False

    @property
    def duration(self) -> float:
        return self.end_ts - self.start_ts


_Frame = tuple[float, np.ndarray, bool]  # ts, pcm, voiced


class Segmenter:
    """Feed frames with push(); it returns the utterances they complete. flush() at the end of a stream."""

    def __init__(self, cfg: VadConfig, onset_voiced_ms: int = 150, onset_window_ms: int = 180,
                 on_onset: Callable[[float], None] | None = None,
                 on_pause: Callable[[Utterance], None] | None = None,
                 on_resume: Callable[[], None] | None = None) -> None:
        if cfg.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad.frame_ms must be 10, 20 or 30, got {cfg.frame_ms!r}")
        self.cfg = cfg
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self.frame_s = cfg.frame_ms / 1000
        self.frame_len = RATE * cfg.frame_ms // 1000
        self.pre_frames = math.ceil(cfg.pre_roll_ms / cfg.frame_ms)
        self.hang_frames = max(1, math.ceil(cfg.hangover_ms / cfg.frame_ms))
        early = math.ceil(cfg.early_end_ms / cfg.frame_ms)
        self.early_frames = early if 0 < early < self.hang_frames else 0
        self.on_onset, self.on_pause, self.on_resume = on_onset, on_pause, on_resume  # may be set later
        self.pauses = self.resumes = 0  # early ends guessed, and guesses speech made void
        self.max_frames = max(1, int(cfg.max_utterance_s * 1000 // cfg.frame_ms))
        self.onset_n = max(1, math.ceil(onset_voiced_ms / cfg.frame_ms))
        self.onset_m = max(self.onset_n, math.ceil(onset_window_ms / cfg.frame_ms))
        self.frames = 0  # frames seen
        self.voiced = 0  # frames webrtcvad called speech
        self.dropped = 0  # bursts shorter than min_speech_ms
        self._clock = 0.0
        self._history: deque[_Frame] = deque(maxlen=self.pre_frames + self.onset_m)
        self._idle()

    @property
    def in_speech(self) -> bool:
        return self._speaking

    def stats(self) -> dict[str, int | bool]:
        """Figures for the health topic."""
        return {"frames": self.frames, "voiced": self.voiced, "dropped": self.dropped, "in_speech": self._speaking}

    def push(self, pcm: np.ndarray, ts: float | None = None) -> list[Utterance]:
        """Classify one frame (exactly frame_len int16 samples) starting at `ts` (default: right after the
        previous frame; the first is at 0.0)."""
        if pcm.dtype != np.int16 or pcm.shape != (self.frame_len,):
            raise ValueError(f"a VAD frame must be {self.frame_len} int16 samples ({self.cfg.frame_ms} ms at "
                             f"{RATE} Hz), got {pcm.shape} {pcm.dtype}")
        ts = self._clock if ts is None else float(ts)
        self._clock = ts + self.frame_s
        voiced = self._vad.is_speech(pcm.tobytes(), RATE)
        self.frames += 1
        self.voiced += voiced
        frame = (ts, pcm.copy(), voiced)  # the caller may reuse its buffer
        if not self._speaking:
            return self._wait_for_onset(frame)
        return self._continue(frame)

    def flush(self) -> list[Utterance]:
        """The stream ended: close the utterance in progress, if any."""
        out = self._finish() if self._speaking else []
        self._history.clear()
        return out

    # --- states ---

    def _idle(self) -> None:
        self._speaking = False
        self._buf: list[_Frame] = []
        self._start_ts: float | None = None
        self._last_voiced = -1
        self._silence = 0
        self._continued = False
        self._paused = False  # an early end was announced for the current pause

    def _wait_for_onset(self, frame: _Frame) -> list[Utterance]:
        self._history.append(frame)
        if not frame[2]:
            return []
        hist = list(self._history)
        window = hist[-self.onset_m:]
        if sum(f[2] for f in window) < self.onset_n:
            return []
        first = len(hist) - len(window) + next(i for i, f in enumerate(window) if f[2])
        self._buf = hist[max(0, first - self.pre_frames):]
        self._start_ts = hist[first][0]
        self._last_voiced = len(self._buf) - 1
        self._speaking = True
        self._history.clear()
        if self.on_onset is not None:
            self.on_onset(self._start_ts)
        return self._cut() if len(self._buf) >= self.max_frames else []

    def _continue(self, frame: _Frame) -> list[Utterance]:
        self._buf.append(frame)
        if frame[2]:
            if self._start_ts is None:
                self._start_ts = frame[0]
            self._last_voiced = len(self._buf) - 1
            self._silence = 0
            if self._paused:
                self._paused = False
                self.resumes += 1
                if self.on_resume is not None:
                    self.on_resume()
        else:
            self._silence += 1
            if self._silence == self.early_frames and self._start_ts is not None and not self._continued:
                self._announce_pause()
        if self._silence >= self.hang_frames:
            return self._finish()
        if len(self._buf) >= self.max_frames:
            return self._finish() if self._silence else self._cut()
        return []

    def _announce_pause(self) -> None:
        """The utterance as it would end here, for on_pause (when it is long enough to be one)."""
        assert self._start_ts is not None
        buf, last = self._buf, self._last_voiced
        end = buf[last][0] + self.frame_s
        if end - self._start_ts < self.cfg.min_speech_ms / 1000 or self.on_pause is None:
            return
        self._paused = True
        self.pauses += 1
        self.on_pause(_utterance(buf[:min(len(buf), last + 1 + self.pre_frames)], self._start_ts, end, cut=False))

    def _finish(self) -> list[Utterance]:
        """Speech ended at the last voiced frame; emit it (unless too short) and go back to idle."""
        start, last, continued = self._start_ts, self._last_voiced, self._continued
        buf = self._buf
        self._idle()
        if start is None or last < 0:
            self._history.extend(buf)
            return []
        keep = min(len(buf), last + 1 + self.pre_frames)  # tail: up to pre_roll_ms after end_ts
        self._history.extend(buf[keep:])
        end = buf[last][0] + self.frame_s
        if end - start < self.cfg.min_speech_ms / 1000 and not continued:
            self.dropped += 1
            return []
        return [_utterance(buf[:keep], start, end, cut=False)]

    def _cut(self) -> list[Utterance]:
        """The utterance reached max_utterance_s mid-speech: emit it and continue as a new one."""
        assert self._start_ts is not None
        buf = self._buf
        utt = _utterance(buf, self._start_ts, buf[-1][0] + self.frame_s, cut=True)
        self._idle()
        self._speaking = True
        self._continued = True
        return [utt]


def _utterance(frames: list[_Frame], start: float, end: float, cut: bool) -> Utterance:
    pcm = np.concatenate([f[1] for f in frames])
    return Utterance(pcm=pcm, start_ts=start, end_ts=end, pcm_ts=frames[0][0], cut=cut)
