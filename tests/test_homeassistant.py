"""Home Assistant against a real broker, read the way Home Assistant reads it: the discovery payload checked against
its MQTT integration's rules (tests/support/ha_schema.py), every state topic it announces carrying a message that
renders to a valid state, commands sent at the QoS discovery gives them, health, metrics, `ha remove`."""

from __future__ import annotations

import io
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from agent.config import Config
from agent.contract.topics import Topics
from agent.mqtt.discovery import discovery_payload
from tests.support import models as testmodels
from tests.support.daemon import DaemonProcess
from tests.support.ha_schema import problems, render, sensor_state
from tests.support.media import compose, espeak, moving_square, write_video, write_wav
from tests.support.mqtt import Broker, Client, free_port, payload_json
from tests.support.paths import ROOT, run_agent

Served = tuple[DaemonProcess, Client, int]


@pytest.fixture(scope="module")
def agent_with_ha(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every stage on (camera with snapshots and motion, microphone with whisper), so every component exists."""
    media = tmp_path_factory.mktemp("ha-media")
    video = write_video(media / "door.avi", 90, fps=15.0, frame=moving_square)
    pcm, _ = compose([(0.5, espeak("Hello there."))], total_s=3.0)
    wav = write_wav(media / "hello.wav", pcm)
    port = free_port()
    daemon = DaemonProcess(
        broker.port, testmodels.tiny_text(), "health.interval=1", f"health.prometheus_port={port}",
        "health.prometheus_bind=127.0.0.2",
        "device.name=Front door", f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true",
        f"camera.source={video}", "camera.snapshot=true", "camera.input_size=256", "motion.enabled=true",
        "motion.cooldown=1", "microphone.enabled=true", f"microphone.source={wav}",
        f"whisper.model={testmodels.tiny_whisper()}", "vision.max_frame_age=30")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#", f"homeassistant/device/{daemon.device_id}/config")
    daemon.start(client)
    yield daemon, client, port
    daemon.stop()
    client.close()


def discovery(client: Client, device_id: str) -> dict[str, Any]:
    topic = f"homeassistant/device/{device_id}/config"
    return dict(payload_json(client.wait_for(topic, lambda m: bool(m.payload))[-1]))


def test_discovery_is_what_home_assistant_accepts(agent_with_ha: Served) -> None:
    daemon, client, _ = agent_with_ha
    late = Client(int(client.client.port))  # a newcomer (Home Assistant starting later) gets the retained copy
    late.subscribe(f"homeassistant/device/{daemon.device_id}/config")
    msg = late.wait_for(f"homeassistant/device/{daemon.device_id}/config")[0]
    late.close()
    payload = payload_json(msg)
    assert msg.retain and problems(payload) == []
    assert payload["dev"]["name"] == "Front door" and payload["dev"]["ids"] == [f"gemma_agent_{daemon.device_id}"]
    cmps = payload["cmps"]
    assert all(set(c) != {"p"} for c in cmps.values())  # every stage is on: nothing removed
    assert {c["p"] for c in cmps.values()} == {"sensor", "binary_sensor", "event", "button", "text", "notify",
                                              "camera"}
    assert all(c["def_ent_id"].split(".")[1].startswith(daemon.device_id) for c in cmps.values())


@pytest.mark.fast
def test_stages_switched_off_remove_their_entities_and_boards_do_not_collide() -> None:
    plain, other = Config(), Config()
    plain.device.id, other.device.id = "hall", "porch"
    one = discovery_payload(plain, Topics("gemma_agent", "hall"), "0", "m")
    two = discovery_payload(other, Topics("gemma_agent", "porch"), "0", "m")
    assert problems(one) == [] and problems(two) == []
    removed = {k for k, c in one["cmps"].items() if set(c) == {"p"}}
    assert removed == {"describe", "listen", "transcript", "motion", "snapshot"}
    ids_one = {c["def_ent_id"] for c in one["cmps"].values() if "def_ent_id" in c}
    ids_two = {c["def_ent_id"] for c in two["cmps"].values() if "def_ent_id" in c}
    assert not ids_one & ids_two  # two boards with the same device name still get their own entity ids


def test_every_announced_state_renders_a_valid_state(agent_with_ha: Served) -> None:
    """Press the buttons and use the text entity as Home Assistant would, then read every state topic discovery
    names through its value template."""
    daemon, client, _ = agent_with_ha
    cmps = discovery(client, daemon.device_id)["cmps"]
    client.publish(cmps["prompt"]["cmd_t"], "What is the weather like?")  # the text entity sends plain text
    client.publish(cmps["describe"]["cmd_t"], cmps["describe"]["pl_prs"])
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["source"] == "describe", timeout=120)
    client.publish(cmps["listen"]["cmd_t"], cmps["listen"]["pl_prs"])
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "listening")
    for key, component in cmps.items():
        topic = component.get("stat_t") or component.get("t")
        if topic is None:  # buttons, the text and notify entities only send
            continue
        messages = client.wait_for(topic, timeout=60)
        if component["p"] == "camera":
            image = Image.open(io.BytesIO(messages[-1].payload))
            assert image.format == "JPEG" and image.size == (256, 256)
            late = Client(int(client.client.port))  # the camera entity shows the last frame after a restart too
            late.subscribe(topic)
            assert late.wait_for(topic)[0].retain
            late.close()
        elif component["p"] == "event":
            types = {payload_json(m)["event_type"] for m in messages}
            assert types <= set(component["evt_typ"]) and not any(m.retain for m in messages)
        else:
            states = [sensor_state(component, m.payload) for m in messages]
            assert any(s not in (None, "unknown") for s in states), (key, states)
            if component.get("stat_cla") == "measurement":
                assert all(float(s) >= 0 for s in states if s not in (None, "unknown")), (key, states)
            if "options" in component:
                assert {s for s in states if s is not None} <= set(component["options"]), (key, states)
        if "json_attr_tpl" in component:
            assert isinstance(json.loads(render(component["json_attr_tpl"], messages[-1].payload)), dict), key


def test_an_ask_sent_at_discoverys_qos_while_the_daemon_restarts_is_answered(broker: Broker) -> None:
    """Home Assistant sends at the component's qos: at 1, the broker keeps the press for the daemon's persistent
    session while it restarts."""
    daemon = DaemonProcess(broker.port, testmodels.tiny_text())
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#", f"homeassistant/device/{daemon.device_id}/config")
    daemon.start(client)
    prompt = discovery(client, daemon.device_id)["cmps"]["prompt"]
    daemon.stop()
    client.client.publish(prompt["cmd_t"], "Are you back?", qos=prompt["qos"]).wait_for_publish(5)
    daemon.start(client)
    body = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["source"] == "ask")[0])
    assert body["text"] is not None
    daemon.stop()
    client.close()


def test_reset_button_and_ha_restart(agent_with_ha: Served) -> None:
    daemon, client, _ = agent_with_ha
    cmps = discovery(client, daemon.device_id)["cmps"]
    client.publish(cmps["reset"]["cmd_t"], cmps["reset"]["pl_prs"])
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "reset")
    seen = {payload_json(m)["event_type"] for m in client.on(f"{daemon.base}/event")}
    assert seen <= set(cmps["events"]["evt_typ"])  # Home Assistant drops event types it was not told about
    before = len(client.on(f"homeassistant/device/{daemon.device_id}/config"))
    client.publish("homeassistant/status", "online")
    client.wait_for(f"homeassistant/device/{daemon.device_id}/config", count=before + 1, timeout=15)


def test_health_is_retained_and_complete(agent_with_ha: Served) -> None:
    daemon, client, port = agent_with_ha
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["uptime"] > 0)
    late = Client(int(client.client.port))
    late.subscribe(f"{daemon.base}/health")
    msg = late.wait_for(f"{daemon.base}/health")[0]
    late.close()
    health = payload_json(msg)
    assert msg.retain and health["state"] == "ok" and health["problems"] == []
    assert health["memory"]["rss"] > 0 and health["memory"]["rss_file"] > 0
    assert health["stages"]["mqtt"] == "ok" and health["mqtt"]["reconnects"] == 0
    assert health["outbox"]["dropped"] == 0
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as reply:  # prometheus_bind
        text = reply.read().decode()
    assert "gemma_agent_memory_rss " in text and "gemma_agent_mqtt_connected 1" in text
    with pytest.raises(ConnectionRefusedError):  # bound to that address only
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_home_assistant_off_publishes_no_discovery(broker: Broker) -> None:
    """homeassistant.enabled false: nothing on the discovery topic when the daemon connects (the health it publishes
    right after discovery, through the same connection, is the barrier), and it does not follow Home Assistant's
    status topic."""
    daemon = DaemonProcess(broker.port, testmodels.tiny_text(), "homeassistant.enabled=false")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#", f"homeassistant/+/{daemon.device_id}/#")
    daemon.start(client)
    client.wait_for(f"{daemon.base}/health")
    assert [m.topic for m in client.messages if m.topic.startswith("homeassistant/")] == []
    daemon.stop()
    assert "published Home Assistant discovery" not in daemon.log
    daemon.stop()
    client.close()


def test_ha_remove_clears_every_retained_message(broker: Broker) -> None:
    daemon = DaemonProcess(broker.port, testmodels.tiny_text())
    client = Client(broker.port)
    topic = f"homeassistant/device/{daemon.device_id}/config"
    client.subscribe(f"{daemon.base}/#", topic)
    daemon.start(client)
    client.wait_for(topic, lambda m: bool(m.payload))
    client.wait_for(f"{daemon.base}/health")
    daemon.stop()
    proc = run_agent(*daemon.args, "ha", "remove", timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    late = Client(broker.port)
    late.subscribe(f"{daemon.base}/#", topic, "barrier/#")
    late.publish("barrier/ha-remove", "b")  # retained messages arrive on subscribing, before this one
    late.wait_for("barrier/ha-remove")
    assert [m.topic for m in late.messages] == ["barrier/ha-remove"]
    late.close()
    client.close()
