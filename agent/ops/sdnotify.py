"""systemd notifications (sd_notify(3)) over $NOTIFY_SOCKET, and a watchdog that pings only while every
stage is healthy.

Without $NOTIFY_SOCKET (not started by systemd, or Type= is not notify) every call is a no-op. Sending never
raises: a vanished socket is logged at debug level, because the agent must keep working whatever systemd does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

log = logging.getLogger(__name__)

Probe = Callable[[], bool]
"""A stage's health check: True when the stage made progress recently (or has nothing to do)."""


class Notifier:
    """Sends sd_notify messages to an AF_UNIX datagram socket: a path, or '@name' (abstract namespace)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self.last_status: str | None = None  # the last STATUS= the daemon set; the watchdog restores it

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for $NOTIFY_SOCKET; the watchdog interval from $WATCHDOG_USEC if $WATCHDOG_PID is us."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor '@abstract': notifications are off",
                        address)
            address = None
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send 'KEY=value' lines as one datagram; True when it was sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete (Type=notify waits for it), optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        self.last_status = _one_line(status)
        return self.notify("READY=1", "STATUS=" + self.last_status)

    def status(self, text: str) -> bool:
        """STATUS=: the line `systemctl status` shows."""
        self.last_status = _one_line(text)
        return self.notify("STATUS=" + self.last_status)

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: the current start/stop may take `seconds` more before systemd gives up."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """WatchdogSec= in seconds, or None when systemd does not expect watchdog pings from this process."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def watchdog(self) -> bool:
        """WATCHDOG=1: one keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def extending(self, seconds: float, limit: float | None = None) -> Extender:
        """A context manager that keeps sending EXTEND_TIMEOUT_USEC=`seconds` while its block runs (a model
        load). After `limit` seconds it stops extending, so a hung load still runs into systemd's timeout."""
        return Extender(self, seconds, limit)


class Extender:
    """Sends EXTEND_TIMEOUT_USEC= at once and then every seconds/2 from a thread, until the block ends."""

    def __init__(self, notifier: Notifier, seconds: float, limit: float | None = None) -> None:
        if seconds <= 0:
            raise ValueError(f"extend timeout must be positive, got {seconds}")
        self.notifier, self.seconds, self.limit = notifier, seconds, limit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Extender:
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="sd-extend", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        end = None if self.limit is None else time.monotonic() + self.limit
        while True:
            if end is not None and time.monotonic() >= end:
                log.warning("still busy after %.0f s: no longer extending systemd's timeout", self.limit)
                return
            self.notifier.extend_timeout(self.seconds)
            if self._stop.wait(self.seconds / 2):
                return


class Watchdog:
    """Pings WATCHDOG=1 every WatchdogSec/2, but only while every named probe reports its stage healthy.

    When a stage is stuck the pings stop (so systemd's watchdog restarts the service), the stage is logged
    once and STATUS= names it; when all stages are healthy again the pings resume and the previous status
    returns.
    A probe that raises counts as stuck.
    """

    def __init__(self, notifier: Notifier, probes: Mapping[str, Probe] | None = None,
                 interval: float | None = None) -> None:
        self.notifier = notifier
        half = notifier.watchdog_interval()
        self.interval = interval if interval is not None else (None if half is None else half / 2)
        self._probes: dict[str, Probe] = dict(probes or {})
        self._lock = threading.Lock()
        self._stuck: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, probe: Probe) -> None:
        """Watch one more stage (replaces a probe of the same name)."""
        with self._lock:
            self._probes[name] = probe

    def remove(self, name: str) -> None:
        with self._lock:
            self._probes.pop(name, None)

    @property
    def stuck(self) -> tuple[str, ...]:
        """The stages found stuck by the last check."""
        return self._stuck

    def check(self) -> list[str]:
        """Run every probe; the names of the stages that are not healthy."""
        with self._lock:
            probes = list(self._probes.items())
        bad = []
        for name, probe in probes:
            try:
                healthy = bool(probe())
            except Exception as exc:
                log.debug("watchdog probe %r raised %r", name, exc)
                healthy = False
            if not healthy:
                bad.append(name)
        return bad

    def tick(self) -> bool:
        """One round: check the probes, then ping or report; True when a ping was sent."""
        stuck = tuple(self.check())
        previous, self._stuck = self._stuck, stuck
        if stuck:
            if stuck != previous:
                names = ", ".join(stuck)
                log.error("stage stuck: %s; withholding watchdog pings so that systemd restarts us", names)
                self.notifier.notify(f"STATUS=stuck: {names} (no progress; watchdog pings withheld)")
            return False
        if previous:
            log.warning("stages healthy again after being stuck: %s", ", ".join(previous))
            self.notifier.notify("STATUS=" + (self.notifier.last_status or "running"))
        return self.notifier.watchdog()

    def start(self) -> bool:
        """Start the pinging thread; False (and no thread) when systemd expects no watchdog pings."""
        if self.interval is None or not self.notifier.enabled or self._thread is not None:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self.interval is not None
        while True:
            try:
                self.tick()
            except Exception:  # a dead watchdog thread would get a healthy agent restarted
                log.exception("watchdog round failed")
            if self._stop.wait(self.interval):
                return


class Heartbeat:
    """A stage's progress marker: the stage calls beat(); probe(max_age) says whether the beat is fresh."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._last

    def probe(self, max_age: float) -> Probe:
        return lambda: self.age() <= max_age


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    try:
        usec = int(raw)
        if pid and int(pid) != os.getpid():
            return None  # meant for another process (e.g. our parent)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw, pid)
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    """A STATUS= value must not contain newlines: they would start a new assignment."""
    return " ".join(text.split())
