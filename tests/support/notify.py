"""A stand-in for systemd's notification socket: an AF_UNIX datagram socket that records what it receives."""

from __future__ import annotations

import socket
import threading
import time


class Listener:
    """Collects every datagram that arrives on a bound AF_UNIX socket, in a background thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data)

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate: str | bytes, start: int = 0, timeout: float = 10.0) -> int:
        """Index of the first message from `start` on that equals (bytes) or contains (str) `predicate`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, m in enumerate(self.snapshot()[start:], start):
                if (m == predicate) if isinstance(predicate, bytes) else (predicate in m.decode()):
                    return i
            time.sleep(0.01)
        raise AssertionError(f"no message matching {predicate!r} after index {start}: {self.snapshot()!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
