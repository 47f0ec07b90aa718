"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's notification socket."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.sdnotify import Heartbeat, Notifier, Watchdog
from tests.support.notify import Listener

pytestmark = pytest.mark.fast


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "notify.sock"
    if len(str(path)) < 100:  # sun_path holds 108 bytes; very long tmp_path names fall back to a short dir
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield os.path.join(short, "notify.sock")


@pytest.fixture
def listener(sock_path: str) -> Iterator[Listener]:
    lst = Listener(sock_path)
    yield lst
    lst.close()


def test_messages_arrive_byte_exact(listener: Listener, sock_path: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": sock_path})
    assert n.enabled
    assert n.status("loading model gemma-3n-E2B (3.1 GB)")
    assert n.extend_timeout(90)
    assert n.ready()
    assert n.ready(status="ready: 2 stages\nrunning")
    assert n.watchdog()
    assert n.stopping()
    expected = [b"STATUS=loading model gemma-3n-E2B (3.1 GB)", b"EXTEND_TIMEOUT_USEC=90000000", b"READY=1",
                b"READY=1\nSTATUS=ready: 2 stages running", b"WATCHDOG=1", b"STOPPING=1"]
    listener.wait_for(b"STOPPING=1")
    assert listener.snapshot() == expected


def test_abstract_namespace_socket() -> None:
    name = f"gemma-agent-test-{uuid.uuid4().hex}"
    lst = Listener("\0" + name)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready(status="up")
        lst.wait_for(b"READY=1\nSTATUS=up")
    finally:
        lst.close()


def test_unset_socket_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval() is None
    assert not n.ready() and not n.status("x") and not n.stopping() and not n.extend_timeout(5)
    assert not n.watchdog()
    threads = threading.active_count()
    with n.extending(1.0):
        assert threading.active_count() == threads  # no thread for nobody to listen to
    assert not Watchdog(n, {"a": lambda: True}).start()


def test_relative_socket_path_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.ops.sdnotify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "relative.sock"})
    assert not n.enabled
    assert "NOTIFY_SOCKET" in caplog.text


def test_vanished_socket_never_raises(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    lst = Listener(sock_path)
    n = Notifier.from_env({"NOTIFY_SOCKET": sock_path})
    assert n.ready()
    lst.wait_for(b"READY=1")
    lst.close()
    os.unlink(sock_path)
    with caplog.at_level(logging.DEBUG, logger="agent.ops.sdnotify"):
        assert not n.status("still here")
        assert not n.watchdog()
    assert "sd_notify to" in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_watchdog_interval_honours_watchdog_pid() -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "60000000"}).watchdog_interval() == 60.0
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval() == 30.0
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    # systemd sets the interval but the process was not started by it under Type=notify: still honoured
    assert Notifier.from_env({"WATCHDOG_USEC": "1000000"}).watchdog_interval() == 1.0


def test_watchdog_gates_pings_on_stage_health(listener: Listener, sock_path: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_env(env)
    n.status("ready: listening")
    camera_ok = threading.Event()
    camera_ok.set()
    beat = Heartbeat()
    wd = Watchdog(n, {"camera": camera_ok.is_set, "mqtt": beat.probe(max_age=60)})
    assert wd.interval == pytest.approx(0.05)
    with caplog.at_level(logging.WARNING, logger="agent.ops.sdnotify"):
        assert wd.start()
        try:
            # all healthy: pings arrive
            first = listener.wait_for(b"WATCHDOG=1")
            listener.wait_for(b"WATCHDOG=1", start=first + 1)

            # one stage stuck: a STATUS naming it, then no ping for a stretch of many intervals
            camera_ok.clear()
            stuck_at = listener.wait_for("STATUS=stuck: camera")
            time.sleep(0.6)
            after = listener.snapshot()[stuck_at + 1:]
            assert b"WATCHDOG=1" not in after
            assert wd.stuck == ("camera",)

            # recovery: the previous status comes back and pings resume
            camera_ok.set()
            back = listener.wait_for(b"STATUS=ready: listening", start=stuck_at + 1)
            listener.wait_for(b"WATCHDOG=1", start=back + 1)
        finally:
            wd.stop()
    stuck_logs = [r for r in caplog.records if "stage stuck: camera" in r.getMessage()]
    assert len(stuck_logs) == 1  # logged once, not once per interval
    assert sum(m.startswith(b"STATUS=stuck") for m in listener.snapshot()) == 1


def test_raising_or_stale_probe_counts_as_stuck(listener: Listener, sock_path: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "100000"})
    beat = Heartbeat()

    def broken() -> bool:
        raise RuntimeError("probe bug")

    wd = Watchdog(n, {"vad": beat.probe(max_age=-1.0), "brain": lambda: True})
    wd.add("publisher", broken)
    assert not wd.tick()
    assert wd.stuck == ("vad", "publisher")
    listener.wait_for(b"STATUS=stuck: vad, publisher (no progress; watchdog pings withheld)")
    wd.remove("publisher")
    wd.add("vad", lambda: True)
    assert wd.tick()
    listener.wait_for(b"WATCHDOG=1")
    assert b"WATCHDOG=1" not in listener.snapshot()[:-1]


def test_extending_sends_until_the_block_ends(listener: Listener, sock_path: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": sock_path})
    with n.extending(0.2):
        first = listener.wait_for(b"EXTEND_TIMEOUT_USEC=200000")
        listener.wait_for(b"EXTEND_TIMEOUT_USEC=200000", start=first + 1)  # repeated while the block runs
    n.ready()
    ready_at = listener.wait_for(b"READY=1")
    time.sleep(0.5)
    assert listener.snapshot()[ready_at + 1:] == []  # the thread has stopped


def test_extending_gives_up_after_its_limit(listener: Listener, sock_path: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": sock_path})
    with caplog.at_level(logging.WARNING, logger="agent.ops.sdnotify"), n.extending(0.1, limit=0.25) as ext:
        listener.wait_for(b"EXTEND_TIMEOUT_USEC=100000")
        assert ext._thread is not None
        ext._thread.join(timeout=10)  # ends by itself although the block is still running
        assert not ext._thread.is_alive()
    assert "no longer extending" in caplog.text
    with pytest.raises(ValueError, match="positive"):
        n.extending(0)
