"""Token-bucket rate limits on requests: one global bucket (the hard bound) and one per sender.

MQTT 3.1.1 does not tell a subscriber who published a message, so "sender" is what the request says about itself
(the JSON `sender` field, else "anonymous"): per-sender limits keep one well-behaved automation from starving the
others, while the global limit bounds what a hostile client can do whatever it claims. Access control proper is
the broker's job (TLS, passwords, ACLs).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_SENDERS = 256  # per-sender buckets kept (least recently used dropped): memory stays bounded


class Bucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """`allow(sender)` is False when the global or that sender's budget is spent; 0 per minute = no limit."""

    def __init__(self, global_per_minute: int, sender_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._global = Bucket(global_per_minute, clock()) if global_per_minute else None
        self._sender_per_minute = sender_per_minute
        self._senders: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def allow(self, sender: str) -> bool:
        with self._lock:
            now = self._clock()
            if self._sender_per_minute:
                bucket = self._senders.pop(sender, None) or Bucket(self._sender_per_minute, now)
                self._senders[sender] = bucket
                if len(self._senders) > MAX_SENDERS:
                    self._senders.popitem(last=False)
                if not bucket.take(now):
                    self.refused += 1
                    return False
            if self._global is not None and not self._global.take(now):
                self.refused += 1
                return False
            return True
