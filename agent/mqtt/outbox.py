"""A bounded on-disk outbox: every response, transcript, event and error is written here before it is
published, and removed only when the broker acknowledges it (PUBACK). The same database remembers which
requests were accepted and not yet answered: after a crash or power cut those are reported failed (`error`
code `interrupted`), not silently forgotten and not retried (a request that crashed the daemon must not crash
it again in a loop).

SQLite, not an append-only journal: deleting acknowledged rows out of order, bounding by count, bytes and age, and
surviving a crash mid-write are what SQLite does well; a journal would need compaction and its own recovery.
Durability: WAL mode with synchronous=FULL, so a message whose put() returned survives SIGKILL and power loss
(one fsync of the WAL per message: a few per minute on a home device). Acks are not fsynced individually: after
a power cut an acknowledged message may be sent again; subscribers deduplicate by the payload's `id`.
Drops: when a bound is exceeded the oldest messages go first; every drop is counted and logged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.outbox")


@dataclass(frozen=True)
class Message:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox:
    """Thread-safe: called from the engine's worker and from paho's network thread."""

    def __init__(self, path: str | Path, max_messages: int = 1000, max_bytes: int = 8 << 20,
                 max_age: float = 7 * 86400) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_messages, self.max_bytes, self.max_age = max_messages, max_bytes, max_age
        self.dropped = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS accepted (id TEXT NOT NULL, source TEXT NOT NULL, "
                         "created REAL NOT NULL)")

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, settles: str | None = None) -> int:
        """Store a message durably; returns its sequence number. `settles`: the request id this message answers,
        marked answered in the same transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
                                   (topic, payload, qos, int(retain), time.time()))
            if settles is not None:
                self._settle(settles)
            self._prune()
            return int(cur.lastrowid or 0)

    def accept(self, request_id: str, source: str) -> None:
        """Remember a request until its answer (or error) is stored."""
        with self._lock:
            self._db.execute("INSERT INTO accepted (id, source, created) VALUES (?, ?, ?)",
                             (request_id, source, time.time()))

    def settle(self, request_id: str) -> None:
        with self._lock:
            self._settle(request_id)

    def _settle(self, request_id: str) -> None:
        self._db.execute("DELETE FROM accepted WHERE rowid = (SELECT rowid FROM accepted WHERE id = ? LIMIT 1)",
                         (request_id,))

    def interrupted(self) -> list[tuple[str, str]]:
        """(id, source) of requests accepted by an earlier run and never answered; forgets them."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            rows = self._db.execute("SELECT id, source FROM accepted ORDER BY rowid").fetchall()
            self._db.execute("DELETE FROM accepted")
        return [(str(r[0]), str(r[1])) for r in rows]

    def ack(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def pending(self) -> list[Message]:
        """Every unacknowledged message, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain, created FROM outbox ORDER BY seq").fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _prune(self) -> None:
        """Drop the oldest messages beyond the age, count and byte bounds (caller holds the lock)."""
        db = self._db
        expired = db.execute("DELETE FROM outbox WHERE created < ?", (time.time() - self.max_age,)).rowcount
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        over = 0
        while count > self.max_messages or size > self.max_bytes:
            seq, length = db.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq LIMIT 1").fetchone()
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            count, size, over = count - 1, size - length, over + 1
        if expired or over:
            self.dropped += expired + over
            log.warning("outbox full or stale: dropped %d expired and %d oldest message(s) (%d dropped in all)",
                        expired, over, self.dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()
