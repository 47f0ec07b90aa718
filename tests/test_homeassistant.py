"""Home Assistant integration against a real broker: discovery, the entities' topics, health, metrics."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract.topics import Topics
from agent.mqtt.discovery import served_topics
from tests.support.daemon import DaemonProcess
from tests.support.mqtt import Broker, Client, free_port, payload_json
from tests.support.paths import ROOT, agent_cmd


@pytest.fixture(scope="module")
def agent_with_ha(broker: Broker, gemma270m: Path) -> Iterator[tuple[DaemonProcess, Client, int]]:
    port = free_port()
    daemon = DaemonProcess(broker.port, gemma270m, "health.interval=1", f"health.prometheus_port={port}",
                           "device.name=Front door")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#", f"homeassistant/device/{daemon.device_id}/config")
    daemon.start(client)
    yield daemon, client, port
    daemon.stop()
    client.close()


def daemon_port(client: Client) -> int:
    return int(client.client.port)


def discovery(client: Client, device_id: str) -> dict[str, object]:
    topic = f"homeassistant/device/{device_id}/config"
    return payload_json(client.wait_for(topic, lambda m: bool(m.payload))[-1])


def test_discovery_payload_names_only_served_topics(agent_with_ha: tuple[DaemonProcess, Client, int]) -> None:
    daemon, client, _ = agent_with_ha
    client.wait_for(f"homeassistant/device/{daemon.device_id}/config")
    late = Client(daemon_port(client))  # a newcomer (Home Assistant starting later) gets the retained copy
    late.subscribe(f"homeassistant/device/{daemon.device_id}/config")
    msg = late.wait_for(f"homeassistant/device/{daemon.device_id}/config")[0]
    late.close()
    assert msg.retain
    payload = payload_json(msg)
    assert payload["dev"]["name"] == "Front door" and payload["dev"]["ids"] == [f"gemma_agent_{daemon.device_id}"]
    assert payload["o"]["name"] == "gemma-agent" and payload["avty_t"] == f"{daemon.base}/availability"
    platforms = sorted(c["p"] for c in payload["cmps"].values())
    assert platforms == ["button", "button", "event", "notify", "sensor", "sensor", "text"]
    topics = Topics("gemma_agent", daemon.device_id)
    contract = {topics.availability, topics.ask, topics.describe, topics.reset, topics.listen, topics.response,
                topics.stream, topics.transcript, topics.event, topics.health, topics.error, topics.snapshot}
    assert served_topics(payload) <= contract
    unique = [c["uniq_id"] for c in payload["cmps"].values()]
    assert len(set(unique)) == len(unique)


def test_prompt_through_text_entity_answers_on_sensor_state(agent_with_ha: tuple[DaemonProcess, Client, int]) \
        -> None:
    daemon, client, _ = agent_with_ha
    cmps = discovery(client, daemon.device_id)["cmps"]
    assert isinstance(cmps, dict)
    client.publish(cmps["prompt"]["cmd_t"], "What is the weather like?")  # HA's text entity sends plain text
    state = client.wait_for(cmps["last_response"]["stat_t"])[0]
    body = payload_json(state)
    assert body["text"] and body["source"] == "ask"
    event = client.wait_for(cmps["events"]["stat_t"], lambda m: payload_json(m)["event_type"] == "response")[0]
    assert payload_json(event)["id"] == body["id"]
    assert "response" in cmps["events"]["evt_typ"]


def test_reset_button_and_ha_restart(agent_with_ha: tuple[DaemonProcess, Client, int]) -> None:
    daemon, client, _ = agent_with_ha
    cmps = discovery(client, daemon.device_id)["cmps"]
    assert isinstance(cmps, dict)
    client.publish(cmps["reset"]["cmd_t"], cmps["reset"]["pl_prs"])
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "reset")
    seen = {payload_json(m)["event_type"] for m in client.on(f"{daemon.base}/event")}
    assert seen <= set(cmps["events"]["evt_typ"])  # Home Assistant drops event types it was not told about
    before = len(client.on(f"homeassistant/device/{daemon.device_id}/config"))
    client.publish("homeassistant/status", "online")
    client.wait_for(f"homeassistant/device/{daemon.device_id}/config", count=before + 1, timeout=15)


def test_health_is_retained_and_complete(agent_with_ha: tuple[DaemonProcess, Client, int]) -> None:
    daemon, client, port = agent_with_ha
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["uptime"] > 0)
    late = Client(daemon_port(client))
    late.subscribe(f"{daemon.base}/health")
    msg = late.wait_for(f"{daemon.base}/health")[0]
    late.close()
    health = payload_json(msg)
    assert msg.retain and health["state"] == "ok"
    assert health["memory"]["rss"] > 0 and health["memory"]["rss_file"] > 0
    assert health["stages"]["mqtt"] == "ok" and health["mqtt"]["reconnects"] == 0
    assert health["queues"]["model"] == 0 and health["outbox"]["dropped"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert "gemma_agent_memory_rss " in text and "gemma_agent_mqtt_connected 1" in text


def test_ha_remove_clears_the_retained_discovery(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m)
    client = Client(broker.port)
    topic = f"homeassistant/device/{daemon.device_id}/config"
    client.subscribe(f"{daemon.base}/availability", topic)
    daemon.start(client)
    client.wait_for(topic, lambda m: bool(m.payload))
    daemon.stop()
    proc = subprocess.run(agent_cmd(*daemon.args, "ha", "remove"), capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    late = Client(broker.port)
    late.subscribe(topic)
    time.sleep(0.5)
    assert late.on(topic) == []  # no retained discovery left
    late.close()
    client.close()
