"""Faults injected into real processes: the broker killed mid-traffic, the daemon SIGKILLed mid-turn, a camera
that vanishes, a model that will not load. Loopback only; every wait is bounded."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.media import moving_square, write_video
from tests.support.mqtt import Broker, Client, payload_json
from tests.support.paths import ROOT
from tests.support.systemd import unit_settings


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, with persistence: kill and restart it freely."""
    broker = Broker(tmp_path, persistence=True)
    broker.start()
    yield broker
    broker.stop()


def ids_on(client: Client, topic: str) -> list[str]:
    return [payload_json(m)["id"] for m in client.on(topic)]


def test_broker_killed_and_restarted_while_100_asks_are_answered(own_broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(own_broker.port, gemma270m, "model.queue_size=128", "model.max_tokens=2",
                           "model.system_prompt=Be brief.", "limits.asks_per_minute=0",
                           "limits.sender_asks_per_minute=0")
    client = Client(own_broker.port, client_id=f"asker-{daemon.device_id}", persistent=True)
    client.subscribe(f"{daemon.base}/response", f"{daemon.base}/error", f"{daemon.base}/availability")
    daemon.start(client)
    asked = [f"q{n:03d}" for n in range(100)]
    for rid in asked:
        client.publish(f"{daemon.base}/ask", {"id": rid, "text": f"Say the number {rid[1:]}."})
    client.wait_for(f"{daemon.base}/response", count=15, timeout=120)
    own_broker.stop(signal.SIGTERM)  # mid-traffic: in-flight and queued messages in both directions
    time.sleep(2.0)
    own_broker.start()
    deadline = time.monotonic() + 400
    while set(ids_on(client, f"{daemon.base}/response")) != set(asked) and time.monotonic() < deadline:
        time.sleep(0.2)
    answered = ids_on(client, f"{daemon.base}/response")
    assert set(answered) == set(asked), f"missing: {sorted(set(asked) - set(answered))}"
    assert not ids_on(client, f"{daemon.base}/error")
    duplicates = len(answered) - len(set(answered))
    print(f"100 asks: delivered {len(set(answered))}, duplicates before dedup {duplicates}, lost 0")
    client.wait_for(f"{daemon.base}/availability", lambda m: m.payload == b"online", count=2, timeout=30)
    assert client.on(f"{daemon.base}/availability")[-1].payload == b"online"
    daemon.stop()
    client.close()


def test_responses_made_while_the_broker_is_down_are_delivered_from_the_outbox(own_broker: Broker,
                                                                            gemma270m: Path) -> None:
    daemon = DaemonProcess(own_broker.port, gemma270m, "model.max_tokens=300", "model.temperature=0.8",
                           "model.deadline=3")  # the turn surely ends while the broker is away
    client = Client(own_broker.port, client_id=f"waiter-{daemon.device_id}", persistent=True)
    client.subscribe(f"{daemon.base}/response", f"{daemon.base}/response/stream", f"{daemon.base}/availability")
    daemon.start(client)
    client.publish(f"{daemon.base}/ask", {"id": "during-outage", "text": "Tell me a long story about a ship."})
    client.wait_for(f"{daemon.base}/response/stream", lambda m: payload_json(m)["id"] == "during-outage")
    own_broker.stop(signal.SIGTERM)  # the broker goes away while the answer is being generated
    time.sleep(6.0)  # the answer completes while there is no broker: it waits in the daemon's outbox
    assert not [m for m in client.on(f"{daemon.base}/response")]
    restarted = time.time()
    own_broker.start()
    msg = client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "during-outage", timeout=60)
    body = payload_json(msg[0])
    assert body["text"] and body["ts"] < restarted  # made during the outage, delivered after it
    daemon.stop()
    client.close()


def test_daemon_sigkilled_mid_turn_reports_the_request_interrupted_after_restart(broker: Broker,
                                                                               gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m, "model.max_tokens=500", "model.temperature=0.8",
                           "model.deadline=5")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    client.publish(f"{daemon.base}/ask", {"id": "cut-short", "text": "Write a long essay about rivers."})
    client.wait_for(f"{daemon.base}/response/stream", lambda m: payload_json(m)["id"] == "cut-short")
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    client.wait_for(f"{daemon.base}/availability", lambda m: m.payload == b"offline", timeout=20)  # LWT
    assert "cut-short" not in ids_on(client, f"{daemon.base}/response")
    daemon.start(client, wait_online=False)  # same device id and outbox
    err = client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "cut-short", timeout=60)
    body = payload_json(err[0])
    assert body["error"] == "interrupted" and body["source"] == "ask"
    client.publish(f"{daemon.base}/ask", {"id": "after-restart", "text": "Hello again."})
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "after-restart")
    daemon.stop()
    client.close()


def test_outbox_survives_a_sigkill_while_the_broker_is_down(tmp_path: Path, gemma270m: Path) -> None:
    own = Broker(tmp_path)
    own.start()
    daemon = DaemonProcess(own.port, gemma270m, "model.max_tokens=300", "model.deadline=2")
    client = Client(own.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    client.publish(f"{daemon.base}/ask", {"id": "kept-1", "text": "Name a colour."})
    client.wait_for(f"{daemon.base}/response/stream", lambda m: payload_json(m)["id"] == "kept-1")
    own.stop()  # the final response is produced with no broker: it waits in the outbox ...
    client.close()
    time.sleep(4.0)
    daemon.signal(signal.SIGKILL)  # ... and the daemon dies before it could deliver it
    daemon.wait()
    own.start()
    late = Client(own.port)
    late.subscribe(f"{daemon.base}/response")
    daemon.start(late, wait_online=False)
    msg = late.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "kept-1", timeout=60)
    assert payload_json(msg[0])["done"] is True
    daemon.stop()
    late.close()
    own.stop()


def test_camera_vanishes_and_returns_while_text_asks_are_answered(broker: Broker, gemma270m: Path,
                                                                 tmp_path: Path) -> None:
    video = write_video(tmp_path / "cam.avi", 45, fps=15.0, frame=moving_square)
    daemon = DaemonProcess(broker.port, gemma270m, "camera.enabled=true", f"camera.source={video}",
                           "camera.reconnect_min=0.2", "camera.reconnect_max=0.5", "health.interval=1")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["camera"]["state"] == "ok")
    hidden = video.with_suffix(".hidden")
    video.rename(hidden)
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["camera"]["state"] == "lost", timeout=30)
    client.publish(f"{daemon.base}/ask", {"id": "camera-lost", "text": "Are you there?"})
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "camera-lost")
    hidden.rename(video)
    health = client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["camera"]["state"] == "ok"
                             and payload_json(m)["camera"]["reconnects"] > 0, timeout=30)
    assert payload_json(health[-1])["state"] == "ok"
    daemon.stop()
    client.close()


def test_a_model_that_fails_to_load_exits_65_with_a_status_and_is_not_restarted(broker: Broker,
                                                                               tmp_path: Path,
                                                                               gemma270m: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(gemma270m, "rb") as src:
        truncated.write_bytes(src.read(50 << 20))
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.1)
    os.environ["NOTIFY_SOCKET"] = str(notify)
    try:
        daemon = DaemonProcess(broker.port, truncated)
        client = Client(broker.port)
        daemon.start(client, wait_online=False)
        assert daemon.wait() == 65
    finally:
        del os.environ["NOTIFY_SOCKET"]
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    sock.close()
    assert any(m.startswith("STATUS=failed:") and "truncated" in m for m in messages), messages
    assert "READY=1" not in messages
    assert "truncated.gguf: truncated" in daemon.log and "Traceback" not in daemon.log
    unit = unit_settings((ROOT / "systemd" / "gemma-agent.service").read_text())
    prevent = {int(code) for code in unit["Service.RestartPreventExitStatus"][0].split()}
    assert 65 in prevent  # the exit code this daemon gave: systemd does not restart into the same failure
    client.close()


def test_an_outbox_that_cannot_be_created_exits_73(broker: Broker, gemma270m: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    daemon = DaemonProcess(broker.port, gemma270m, f"outbox.path={blocker / 'outbox.sqlite3'}")
    client = Client(broker.port)
    daemon.start(client, wait_online=False)
    assert daemon.wait() == 73
    assert "cannot open the outbox" in daemon.log and "Traceback" not in daemon.log
    client.close()


def test_a_broker_that_is_not_there_yet_is_reported_once_and_joined_when_it_comes(tmp_path: Path,
                                                                                  gemma270m: Path) -> None:
    later = Broker(tmp_path)  # its port is free: nothing listens there yet
    daemon = DaemonProcess(later.port, gemma270m, "mqtt.reconnect_min=0.2", "mqtt.reconnect_max=1",
                           "log.level=debug")
    daemon.start(None, wait_online=False)
    line = daemon.wait_log(f"cannot reach 127.0.0.1:{later.port}")
    assert "(Connection refused); retrying in 1 s" in line
    daemon.wait_log("ready: ")
    end = time.monotonic() + 30
    while sum("still cannot reach" in x for x in daemon.lines()) < 3:  # three more failed attempts (debug)
        assert time.monotonic() < end, daemon.lines()[-5:]
        time.sleep(0.05)
    assert sum("WARNING agent.mqtt: cannot reach" in x for x in daemon.lines()) == 1
    assert not [x for x in daemon.lines() if " ERROR " in x]
    later.start()
    client = Client(later.port)
    client.subscribe(f"{daemon.base}/availability")
    client.wait_for(f"{daemon.base}/availability", lambda m: m.payload == b"online", timeout=30)
    daemon.stop()
    assert "disconnected from the broker" in daemon.log
    client.close()
    later.stop()


def test_no_stale_health_is_replayed_after_an_outage(own_broker: Broker, gemma270m: Path) -> None:
    """Retained state is published only while connected: after an outage the retained health is the fresh one,
    and the live ones come in order (a health queued during the outage used to arrive after the fresh one and
    stay retained)."""
    daemon = DaemonProcess(own_broker.port, gemma270m, "health.interval=1", "mqtt.reconnect_max=1")
    client = Client(own_broker.port)
    client.subscribe(f"{daemon.base}/availability", f"{daemon.base}/health")
    daemon.start(client)
    client.wait_for(f"{daemon.base}/health")
    client.close()
    stopped = time.time()
    own_broker.stop(signal.SIGTERM)
    daemon.wait_log("lost the broker")
    time.sleep(3.5)  # three health intervals while the broker is away
    restarted = time.time()
    own_broker.start()
    watcher = Client(own_broker.port)
    watcher.subscribe(f"{daemon.base}/health")
    healths = watcher.wait_for(f"{daemon.base}/health", count=4, timeout=30)  # the retained one, 3 live ones
    stamps = [payload_json(m)["ts"] for m in healths]
    assert not [ts for ts in stamps if stopped < ts < restarted], stamps  # nothing made during the outage
    assert stamps == sorted(stamps)
    late = Client(own_broker.port)
    late.subscribe(f"{daemon.base}/health")
    assert payload_json(late.wait_for(f"{daemon.base}/health")[0])["ts"] > restarted  # the retained one is fresh
    late.close()
    daemon.stop()
    watcher.close()
