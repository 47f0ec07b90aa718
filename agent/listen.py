"""Speech: what an utterance becomes for the model, and whether it becomes a turn at all.

- `SpeechToText`: whisper.cpp through pywhispercpp, for models whose projector takes no audio.
- Native audio: when the projector takes audio (`mtmd_support_audio`, Gemma 4 E2B/E4B today, Gemma 3n the day
  llama.cpp supports it), the PCM goes to the model as an audio chunk; no code here changes for that.
- `TurnPolicy` (listen.trigger): `always`; `wake_phrase` (the transcript starts with a configured phrase, matched
  tolerantly; the rest is the question; a phrase alone opens a listening window); `mqtt` (a `listen` command opens
  a window); `motion` (motion opens a window). After each answer a follow-up window takes speech without a phrase.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.brain import Request, new_id
from agent.config import ListenConfig, WhisperConfig
from agent.projector import Media
from agent.senses import Heard

log = logging.getLogger("agent.listen")
_WORD = re.compile(r"[\w']+")
WHISPER_MAGIC = b"lmgg"  # 0x67676d6c, little-endian: whisper.cpp's legacy ggml format
MATCH_RATIO = 0.75  # difflib similarity a phrase needs ("hey jemma" matches "hey gemma", "hello" does not)


@dataclass(frozen=True)
class Decision:
    accept: bool
    question: str  # the transcript without the wake phrase ("" when there is no transcript)
    reason: str  # always | window | follow_up | wake_phrase | phrase_only | no_wake_phrase | not_listening


def _normal(text: str) -> str:
    return " ".join(w.lower().replace("'", "") for w in _WORD.findall(text))


def split_wake_phrase(transcript: str, phrases: list[str]) -> str | None:
    """The text after a wake phrase at the start of `transcript` (maybe ""), or None when it has none.

    Tolerant: case, punctuation and small mishearings ("Hey, Jemma!") are accepted, and a phrase may be heard
    as one word more or fewer ("hey gem ma")."""
    words = list(_WORD.finditer(transcript))
    best: tuple[float, int] | None = None
    for phrase in phrases:
        target = _normal(phrase)
        size = len(target.split())
        for n in range(max(1, size - 1), min(len(words), size + 1) + 1):
            heard = _normal(" ".join(w.group() for w in words[:n]))
            ratio = difflib.SequenceMatcher(None, heard, target).ratio()
            if ratio >= MATCH_RATIO and (best is None or ratio > best[0]):
                best = (ratio, n)
    if best is None:
        return None
    end = words[best[1] - 1].end()
    return transcript[end:].lstrip(" ,.!?;:-").strip()


class TurnPolicy:
    """Decides which utterances become turns. Thread-safe; the clock is injectable for tests."""

    def __init__(self, cfg: ListenConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self._until = 0.0
        self._why = ""
        self._lock = threading.Lock()

    def open_window(self, seconds: float | None = None, why: str = "window") -> None:
        with self._lock:
            until = self._clock() + (self.cfg.window if seconds is None else seconds)
            if until > self._until:
                self._until, self._why = until, why

    def answered(self) -> None:
        """An answer went out: speech within listen.follow_up seconds needs no wake phrase."""
        if self.cfg.follow_up > 0:
            self.open_window(self.cfg.follow_up, "follow_up")

    def listening(self) -> bool:
        with self._lock:
            return self._clock() < self._until

    def decide(self, transcript: str | None) -> Decision:
        text = (transcript or "").strip()
        with self._lock:
            open_window = self._clock() < self._until
            why = self._why
        if self.cfg.trigger == "always":
            return Decision(True, text, "always")
        rest = split_wake_phrase(text, self.cfg.wake_phrases) if text else None
        if open_window:
            return Decision(True, rest if rest else text, why)
        if self.cfg.trigger != "wake_phrase":
            return Decision(False, text, "not_listening")
        if rest is None:
            return Decision(False, text, "no_wake_phrase")
        if not rest:
            self.open_window(why="wake_phrase")
            return Decision(False, "", "phrase_only")
        return Decision(True, rest, "wake_phrase")


class SpeechToTextError(Exception):
    """The whisper model cannot be loaded or run."""


class SpeechToText:
    """whisper.cpp (pywhispercpp): 16 kHz mono int16 in, text out."""

    def __init__(self, cfg: WhisperConfig, threads: int) -> None:
        path = Path(cfg.model)
        if not path.is_file():  # pywhispercpp would try to download a name it does not find: never let it
            raise SpeechToTextError(f"{cfg.model}: whisper model not found (whisper.model); "
                                    "`gemma-agent models pull whisper-base.en` fetches one")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != WHISPER_MAGIC:  # whisper.cpp does not fail cleanly on a bad file: check before it reads one
            raise SpeechToTextError(f"{cfg.model}: not a whisper.cpp ggml model (magic {magic!r}, expected "
                                    f"{WHISPER_MAGIC!r})")
        from pywhispercpp.model import Model

        try:
            self.model = Model(str(path), redirect_whispercpp_logs_to=None, n_threads=threads,
                               language=cfg.language, print_progress=False, print_realtime=False,
                               print_timestamps=False, no_context=True, single_segment=False)
        except Exception as exc:  # pywhispercpp raises bare RuntimeErrors and the like on a bad file
            raise SpeechToTextError(f"{cfg.model}: whisper.cpp could not load it: {exc}") from None
        self._lock = threading.Lock()
        log.info("speech-to-text: whisper.cpp with %s (%s, %d threads)", path, cfg.language, threads)

    def transcribe(self, pcm: np.ndarray) -> str:
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        with self._lock:
            segments = self.model.transcribe(audio)
        return " ".join(s.text.strip() for s in segments).strip()


class Listener:
    """Utterances in (bounded queue, its own thread, so speech-to-text never stalls the microphone); transcripts,
    events and turn requests out through callbacks."""

    def __init__(self, policy: TurnPolicy, stt: SpeechToText | None, native_audio: bool, audio_prompt: str,
                 on_transcript: Callable[[dict[str, Any]], None], on_turn: Callable[[Request], None],
                 on_event: Callable[[str, dict[str, Any]], None], queue_size: int = 4) -> None:
        self.policy = policy
        self.stt = stt
        self.native_audio = native_audio
        self.audio_prompt = audio_prompt
        self._on_transcript, self._on_turn, self._on_event = on_transcript, on_turn, on_event
        self._queue: queue.Queue[Heard | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="speech", daemon=True)
        self.backlog_drops = 0
        self.progress_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # the worker drains the queue; give it a few seconds
            self._queue.put(None, timeout=5.0)
        self._thread.join(5.0)

    def heard(self, heard: Heard) -> None:
        """Called on the microphone's thread: queue and return at once."""
        try:
            self._queue.put_nowait(heard)
        except queue.Full:
            self.backlog_drops += 1
            log.warning("speech backlog full: an utterance of %.1fs was not processed", heard.end - heard.start)
            self._on_event("error", {"error": "speech_backlog", "start": round(heard.start, 3),
                                     "detail": "speech-to-text could not keep up; the utterance was skipped"})

    def busy(self) -> bool:
        return not self._queue.empty()

    def _work(self) -> None:
        while (heard := self._queue.get()) is not None:
            self.progress_at = time.monotonic()
            try:
                self._process(heard)
            except Exception as exc:  # one bad utterance must not end speech handling
                log.exception("processing an utterance failed")
                self._on_event("error", {"error": "speech_failed", "detail": f"{type(exc).__name__}: {exc}"})
            self.progress_at = time.monotonic()

    def _process(self, heard: Heard) -> None:
        pcm = heard.utterance.pcm
        began = time.monotonic()
        transcript = self.stt.transcribe(pcm) if self.stt is not None else None
        stt_ms = (time.monotonic() - began) * 1000
        turn_id = new_id()
        decision = self.policy.decide(transcript)  # before the transcript goes out: what is heard next is later
        self._on_transcript({"id": turn_id, "text": transcript, "start": round(heard.start, 3),
                             "end": round(heard.end, 3), "duration": round(heard.end - heard.start, 3),
                             "emitted": round(heard.emitted, 3), "stt_ms": round(stt_ms, 1)})
        if decision.reason == "phrase_only":
            self._on_event("listening", {"reason": "wake_phrase", "seconds": self.policy.cfg.window})
        if not decision.accept:
            log.info("utterance %s not taken (%s): %r", turn_id, decision.reason, transcript)
            return
        if not self.native_audio and not decision.question:
            log.info("utterance %s: nothing was understood", turn_id)
            return
        media = [Media("audio", pcm)] if self.native_audio else []
        self._on_turn(Request(text=decision.question or self.audio_prompt, id=turn_id, source="speech",
                              media=media, transcript=transcript, remember=bool(decision.question)))
