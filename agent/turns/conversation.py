"""Conversation history: the last exchanges, kept while they fit the context, forgotten after a quiet spell
(conversation.idle_reset) or on a `reset` command. The newest exchange that showed an image keeps it, so a
follow-up question is about the same picture (and finds it in the KV cache); older exchanges keep only their
text. A question that shows the very picture already held (an unchanged view) leaves it where it is."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.turns.types import Media, Turn, same_images


class Conversation:
    def __init__(self, max_exchanges: int, idle_reset: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_exchanges = max_exchanges
        self.idle_reset = idle_reset
        self._clock = clock
        self._exchanges: list[tuple[Turn, Turn]] = []
        self._last = clock()
        self._lock = threading.Lock()

    def history(self) -> list[Turn]:
        """Earlier turns, oldest first; empty after idle_reset seconds without a turn."""
        with self._lock:
            if self._exchanges and self._clock() - self._last > self.idle_reset:
                self._exchanges.clear()
            return [turn for pair in self._exchanges for turn in pair]

    def record(self, question: str, answer: str, media: tuple[Media, ...] | list[Media] = ()) -> None:
        with self._lock:
            self._last = self._clock()
            if self.max_exchanges == 0 or not answer.strip():
                return
            images = tuple(m for m in media if m.kind == "image")
            if same_images(images, (m for q, _ in self._exchanges for m in q.media)):
                images = ()  # the picture in context already: it stays with the exchange that showed it
            elif images:
                self._exchanges = [(Turn("user", q.text), a) for q, a in self._exchanges]  # one picture in context
            self._exchanges.append((Turn("user", question, images), Turn("model", answer.strip())))
            del self._exchanges[: -self.max_exchanges]

    def forget_oldest(self) -> bool:
        """Drop the oldest exchange (when the context is full); False when there is none left."""
        with self._lock:
            if not self._exchanges:
                return False
            del self._exchanges[0]
            return True

    def reset(self) -> None:
        with self._lock:
            self._exchanges.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._exchanges)
