"""Which utterances become turns (listen.trigger): `always`; `wake_phrase` (the transcript starts with a configured
phrase, matched tolerantly; the rest is the question; a phrase alone opens a listening window); `mqtt` (a `listen`
command opens a window); `motion` (motion opens a window). After each answer a follow-up window takes speech
without a phrase.
"""

from __future__ import annotations

import difflib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import ListenConfig

_WORD = re.compile(r"[\w']+")
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

    def window_open(self) -> bool:
        with self._lock:
            return self._clock() < self._until

    def expects_turn(self) -> bool:
        """Whether speech starting now will become a turn whatever it says (no wake phrase needed)."""
        return self.cfg.trigger == "always" or self.window_open()

    def ignores_speech_now(self) -> bool:
        """Whether speech now is not for us and the trigger needs no transcript to tell (wake_word, mqtt, motion
        outside a window): then it need not be transcribed at all."""
        return self.cfg.trigger != "wake_phrase" and not self.expects_turn()

    def decide(self, transcript: str | None, peek: bool = False) -> Decision:
        """Whether an utterance becomes a turn, and its question. `peek`: decide without acting on it (a phrase
        alone opens no window): for a guess made before the utterance is over."""
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
            if not peek:
                self.open_window(why="wake_phrase")
            return Decision(False, "", "phrase_only")
        return Decision(True, rest, "wake_phrase")
