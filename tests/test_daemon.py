"""The daemon end to end: a real mosquitto, the daemon as a subprocess, the real Gemma 3 270M, a paho client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.contract.exitcodes import ExitCode
from tests.support.daemon import DaemonProcess
from tests.support.mqtt import Broker, Client, has_id, payload_json
from tests.support.paths import ROOT


@pytest.fixture(scope="module")
def served(broker: Broker, gemma270m: Path) -> Iterator[tuple[DaemonProcess, Client]]:
    """One daemon for the request/response tests of this module, and a client subscribed to all its topics."""
    daemon = DaemonProcess(broker.port, gemma270m, "model.queue_size=1", "model.max_tokens=12")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    yield daemon, client
    daemon.stop()
    client.close()


def finals(client: Client, base: str, request_id: str) -> list[dict[str, object]]:
    return [payload_json(m) for m in client.on(f"{base}/response") if payload_json(m)["id"] == request_id]


def ask(client: Client, base: str, payload: dict[str, object] | str | bytes) -> None:
    client.publish(f"{base}/ask", payload)


def test_ask_yields_exactly_one_final_response_with_the_id(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    ask(client, daemon.base, {"id": "q-1", "text": "What colour is the sky?"})
    msg = client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "q-1")[0]
    body = payload_json(msg)
    assert body["done"] is True and body["source"] == "ask" and body["text"].strip()
    assert body["tokens"]["completion"] > 0 and body["latency_ms"] > 0
    ask(client, daemon.base, {"id": "q-1-barrier", "text": "And the grass?"})  # through the same FIFO queue:
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "q-1-barrier")  # q-1 is done
    assert len(finals(client, daemon.base, "q-1")) == 1
    # stream partials concatenate to the final text, in order
    parts = [payload_json(m) for m in client.on(f"{daemon.base}/response/stream") if payload_json(m)["id"] == "q-1"]
    assert [p["index"] for p in parts] == list(range(len(parts)))
    assert "".join(p["delta"] for p in parts) == body["text"]
    assert not msg.retain


def test_health_reports_the_last_turn_as_its_answer_did(served: tuple[DaemonProcess, Client]) -> None:
    """health's last_turn (what the latency and speed sensors graph between answers) is the turn just answered:
    the health that goes out when the turn ends carries its speeds, first-token time and tokens."""
    daemon, client = served
    ask(client, daemon.base, {"id": "h-1", "text": "Name a colour."})
    body = payload_json(client.wait_for(f"{daemon.base}/response", has_id("h-1"))[0])
    def reports_it(m: Any) -> bool:  # the same first-token time to 0.1 ms: this turn (times out if none does)
        return (payload_json(m)["last_turn"] or {}).get("ttft_ms") == body["ttft_ms"]

    health = payload_json(client.wait_for(f"{daemon.base}/health", reports_it, timeout=30)[0])
    assert health["last_turn"] == {"prefill_tps": body["prefill_tps"], "decode_tps": body["decode_tps"],
                                   "ttft_ms": body["ttft_ms"],
                                   "tokens": body["tokens"]["prompt"] + body["tokens"]["completion"]}
    assert health["turns"] >= 1


def test_plain_text_ask_gets_a_generated_id(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    ask(client, daemon.base, "Say hello.")
    msg = client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["text"] is not None
                          and payload_json(m)["id"] not in ("q-1", "q-1-barrier", "h-1", "g-1", "g-2"))[0]
    assert len(payload_json(msg)["id"]) == 12


def test_greedy_answers_repeat_over_mqtt(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    for rid in ("g-1", "g-2"):
        ask(client, daemon.base, {"id": rid, "text": "Name a fruit."})
        client.wait_for(f"{daemon.base}/response", has_id(rid))
    assert finals(client, daemon.base, "g-1")[0]["text"] == finals(client, daemon.base, "g-2")[0]["text"]


def test_bad_payloads_get_errors_and_service_continues(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    ask(client, daemon.base, b'{"id": "bad-1", "text": ')
    ask(client, daemon.base, json.dumps({"id": "big-1", "text": "x" * 5000}))
    ask(client, daemon.base, {"id": "bad-2", "text": 17})
    ask(client, daemon.base, {"id": "bad-3", "text": "   "})
    errors = client.wait_for(f"{daemon.base}/error", count=4, timeout=30)
    codes = {(payload_json(m)["id"], payload_json(m)["error"]) for m in errors}
    assert {(None, "invalid_json"), (None, "too_large"), ("bad-2", "invalid_field"),
            ("bad-3", "empty_text")} <= codes
    assert all(payload_json(m)["detail"] for m in errors)
    ask(client, daemon.base, {"id": "after-bad", "text": "Are you still there?"})
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "after-bad")


def test_full_queue_answers_with_an_error(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    ids = [f"flood-{n}" for n in range(6)]
    for rid in ids:
        ask(client, daemon.base, {"id": rid, "text": "Tell me about the moon."})

    def settled(rid: str) -> bool:
        return any(payload_json(m)["id"] == rid for m in client.on(f"{daemon.base}/response")
                   + client.on(f"{daemon.base}/error"))

    deadline = time.monotonic() + 60
    while not all(settled(r) for r in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    full = [payload_json(m)["id"] for m in client.on(f"{daemon.base}/error")
            if payload_json(m)["error"] == "queue_full"]
    answered = [r for r in ids if finals(client, daemon.base, r)]
    assert full, "a queue of 1 must refuse some of 6 simultaneous asks"
    assert sorted(full + answered) == sorted(ids), "every ask gets exactly one response or one error"


def test_describe_without_camera_is_an_error(served: tuple[DaemonProcess, Client]) -> None:
    daemon, client = served
    client.publish(f"{daemon.base}/describe", b"")
    msg = client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["error"] == "no_camera")[0]
    assert payload_json(msg)["source"] == "describe"


def test_availability_online_then_offline_after_sigterm(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m, "model.max_tokens=400")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    online = client.on(f"{daemon.base}/availability")[-1]
    assert online.payload == b"online"
    ask(client, daemon.base, {"id": "long", "text": "Write a long story about a lighthouse keeper."})
    client.wait_for(f"{daemon.base}/response/stream", lambda m: payload_json(m)["id"] == "long")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    client.wait_for(f"{daemon.base}/availability", lambda m: m.payload == b"offline")
    # the running turn was cancelled and still answered (nothing lost silently)
    final = client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "long")[0]
    assert payload_json(final)["stop"] == "cancelled"
    # retained: a newcomer sees offline
    late = Client(broker.port)
    late.subscribe(f"{daemon.base}/availability")
    assert late.wait_for(f"{daemon.base}/availability")[0].payload == b"offline"
    late.close()
    client.close()


def test_last_will_offline_after_sigkill(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/availability")
    daemon.start(client)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    client.wait_for(f"{daemon.base}/availability", lambda m: m.payload == b"offline", timeout=20)
    client.close()


def test_missing_model_exits_66_with_a_clear_message(broker: Broker, tmp_path: Path) -> None:
    daemon = DaemonProcess(broker.port, tmp_path / "absent.gguf")
    client = Client(broker.port)
    daemon.start(client, wait_online=False)
    assert daemon.wait() == 66
    assert "absent.gguf: model file not found" in daemon.log and "Traceback" not in daemon.log
    client.close()


def test_not_a_gguf_exits_65(broker: Broker, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    daemon = DaemonProcess(broker.port, bogus)
    client = Client(broker.port)
    daemon.start(client, wait_online=False)
    assert daemon.wait() == 65
    assert "not a GGUF file" in daemon.log
    client.close()


def test_a_metrics_port_in_use_stops_the_start_before_anything_is_published(broker: Broker, gemma270m: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(broker.port, gemma270m, f"health.prometheus_port={port}")
        client = Client(broker.port)
        client.subscribe(f"{daemon.base}/#", f"homeassistant/device/{daemon.device_id}/#")
        daemon.start(client, wait_online=False)
        assert daemon.wait(60) == ExitCode.EX_CONFIG
    lines = [line for line in daemon.log.splitlines() if "prometheus_port" in line]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in daemon.log
    client.publish(f"{daemon.base}/barrier", "b")  # everything the daemon sent would have arrived before this
    client.wait_for(f"{daemon.base}/barrier")
    assert [m.topic for m in client.messages] == [f"{daemon.base}/barrier"]
    client.close()


def test_readmes_mosquitto_commands_talk_to_the_agent(broker: Broker, gemma270m: Path) -> None:
    """The two commands of README's "Try it with mosquitto's tools", run by bash with the test broker's port added:
    the subscriber prints the answer to the ask the publisher sent (device id: the host name, as there)."""
    block = (ROOT / "README.md").read_text().split("Try it with mosquitto's tools", 1)[1].split("```sh\n", 1)[1]
    sub_line, pub_line = block.split("```", 1)[0].strip().splitlines()
    assert sub_line.endswith(" &") and pub_line.startswith("mosquitto_pub ")
    daemon = DaemonProcess(broker.port, gemma270m, device_id=Config().device_id)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    port = f" -p {broker.port}"
    sub = subprocess.Popen(["bash", "-c", sub_line.removesuffix(" &") + port], text=True, stdout=subprocess.PIPE)
    assert sub.stdout is not None
    while sub.stdout.readline() != f"{daemon.base}/availability online\n":  # retained: mosquitto_sub has subscribed
        pass
    subprocess.run(["bash", "-c", pub_line + port], check=True, timeout=30)
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "1")
    lines: list[str] = []
    while not lines or not lines[-1].startswith(f"{daemon.base}/response {{"):
        lines.append(sub.stdout.readline())
    sub.terminate()
    sub.wait(10)
    assert any(line.startswith(f"{daemon.base}/ask {{") for line in lines)  # after the retained health
    assert f'{daemon.base}/response {{"id":"1","text":' in lines[-1]
    daemon.stop()
    client.close()
