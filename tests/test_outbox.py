"""The on-disk outbox: durable until acknowledged, bounded by count, bytes and age, survives SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.app import open_outbox
from agent.config import load
from agent.mqtt.outbox import Outbox
from tests.support.paths import ROOT

pytestmark = pytest.mark.fast


def test_put_pending_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    first = box.put("a/b", b'{"id": "1"}')
    second = box.put("a/c", b'{"id": "2"}', qos=1, retain=True)
    assert [(m.seq, m.topic, m.payload, m.retain) for m in box.pending()] == [
        (first, "a/b", b'{"id": "1"}', False), (second, "a/c", b'{"id": "2"}', True)]
    box.ack(first)
    assert [m.seq for m in box.pending()] == [second] and len(box) == 1
    box.close()


def configured(tmp_path: Path, *overrides: str) -> Outbox:
    """The outbox the daemon opens (agent.app.open_outbox) for these config overrides."""
    return open_outbox(load(None, [f"outbox.path={tmp_path / 'o.sqlite3'}", *overrides], environ={}))


def test_bounds_drop_oldest_first_and_count(tmp_path: Path) -> None:
    box = configured(tmp_path, "outbox.max_messages=3", "outbox.max_bytes=10000")
    for n in range(5):
        box.put("t", f"message {n}".encode())
    assert [m.payload for m in box.pending()] == [b"message 2", b"message 3", b"message 4"]
    assert box.dropped == 2
    box.put("t", b"x" * 9_995)  # bytes bound: everything older has to go
    assert [len(m.payload) for m in box.pending()] == [9_995] and box.dropped == 5
    box.close()


def test_age_bound(tmp_path: Path) -> None:
    box = configured(tmp_path, "outbox.max_age=60")
    box.put("t", b"old")
    box._db.execute("UPDATE outbox SET created = created - 120")
    box.put("t", b"new")
    assert [m.payload for m in box.pending()] == [b"new"] and box.dropped == 1
    box.close()


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.put("t", b"kept")
    box.close()
    assert [m.payload for m in Outbox(path).pending()] == [b"kept"]


def test_survives_sigkill_right_after_put(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    code = (f"from agent.mqtt.outbox import Outbox\nimport os, signal\nbox = Outbox({str(path)!r})\n"
            "for n in range(50):\n    box.put('t', str(n).encode())\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL
    started = time.monotonic()
    assert [m.payload for m in Outbox(path).pending()] == [str(n).encode() for n in range(50)]
    assert time.monotonic() - started < 30
