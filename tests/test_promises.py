"""README's promises that no other test produced, each through the real daemon (or the installed CLI) and observed
on the wire: image refusals and `"image": "none"`, a camera without a frame, a projector that fails on demand, the
turns a stop cancels and refuses, the `context` and `deadline` stops, motion-triggered descriptions, and the exit
codes of a bad command, a bug and an interrupted download."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent import cli
from tests.support import models as testmodels
from tests.support.contract import observe
from tests.support.daemon import DaemonProcess
from tests.support.media import moving_square, write_video
from tests.support.mqtt import Broker, Client, payload_json
from tests.support.paths import run_agent


def start(broker: Broker, model: Path, *overrides: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, model, *overrides)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    return daemon, client


def reply(client: Client, base: str, request_id: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
    """("response" or "error", payload) of the reply to `request_id`."""
    def ours(m: mqtt.MQTTMessage) -> bool:
        return bool(m.topic in (f"{base}/response", f"{base}/error") and payload_json(m)["id"] == request_id)

    msg = client.wait_for(f"{base}/#", ours, timeout=timeout)[0]
    return msg.topic.rsplit("/", 1)[1], dict(payload_json(msg))


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("promises") / "door.avi", 90, fps=15.0, frame=moving_square)


def vision(door: Path, *more: str) -> tuple[str, ...]:
    return (f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true", f"camera.source={door}",
            "vision.max_frame_age=30", *more)


def test_vision_attach_never_refuses_a_frame_and_image_none_sends_none(broker: Broker, door: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision(door, "vision.attach=never"))
    client.publish(f"{daemon.base}/ask", {"id": "wants-frame", "text": "What is there?", "image": "latest"})
    kind, body = reply(client, daemon.base, "wants-frame")
    assert (kind, body["error"], body["source"]) == ("error", "image_disabled", "ask")
    client.publish(f"{daemon.base}/ask", {"id": "plain", "text": "What is there?"})
    assert reply(client, daemon.base, "plain")[1]["tokens"]["image"] == 0
    daemon.stop()
    daemon, client = start(broker, testmodels.tiny_text(), *vision(door, "vision.attach=always"))
    client.publish(f"{daemon.base}/ask", {"id": "none", "text": "What is there?", "image": "none"})
    assert reply(client, daemon.base, "none")[1]["tokens"]["image"] == 0
    client.publish(f"{daemon.base}/ask", {"id": "always", "text": "What is there?"})
    assert reply(client, daemon.base, "always")[1]["tokens"]["image"] == 256
    daemon.stop()


def test_a_camera_that_delivers_no_frame_answers_no_frame(broker: Broker, tmp_path: Path) -> None:
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF\0\0\0\0AVI " + bytes(4096))  # a video file no decoder can read a frame from
    daemon, client = start(broker, testmodels.tiny_text(), *vision(broken))
    client.publish(f"{daemon.base}/describe", {"id": "look"})
    kind, body = reply(client, daemon.base, "look")
    assert (kind, body["error"], body["source"]) == ("error", "no_frame", "describe")
    assert "the camera has no frame yet" in body["detail"]
    daemon.stop()


def test_a_projector_that_fails_to_load_on_demand_is_a_projector_error(broker: Broker, door: Path,
                                                                       tmp_path: Path) -> None:
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(testmodels.tiny_vision_projector().read_bytes())
    daemon, client = start(broker, testmodels.tiny_text(), *vision(door, f"model.mmproj={projector}",
                                                                   "memory.projector=on_demand",
                                                                   "camera.input_size=512"))  # its own size
    daemon.wait_for_camera()
    client.publish(f"{daemon.base}/describe", {"id": "first"})
    assert reply(client, daemon.base, "first")[1]["tokens"]["image"] == 256  # loaded, used, released
    projector.write_bytes(projector.read_bytes()[:4096])  # the file is damaged while the daemon runs
    client.publish(f"{daemon.base}/describe", {"id": "second"})
    kind, body = reply(client, daemon.base, "second")
    assert (kind, body["error"]) == ("error", "projector_error") and str(projector) in body["detail"]
    client.publish(f"{daemon.base}/reset", "")  # the conversation's picture needs the projector: forget it
    client.publish(f"{daemon.base}/ask", {"id": "text", "text": "Still there?"})
    assert reply(client, daemon.base, "text")[0] == "response"  # text turns go on
    daemon.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_cancels_the_running_turn_and_refuses_the_queued(broker: Broker, gemma270m: Path,
                                                               sig: signal.Signals) -> None:
    daemon, client = start(broker, gemma270m, "model.max_tokens=400", "model.temperature=0.8")
    for n in range(3):
        client.publish(f"{daemon.base}/ask", {"id": f"s{n}", "text": "Tell me a long story about the sea."})
    client.wait_for(f"{daemon.base}/response/stream", lambda m: payload_json(m)["id"] == "s0")
    daemon.signal(sig)
    assert daemon.wait(30) == 0
    kind, running = reply(client, daemon.base, "s0", timeout=10)
    assert (kind, running["stop"]) == ("response", "cancelled")
    for queued in ("s1", "s2"):
        kind, body = reply(client, daemon.base, queued, timeout=10)
        assert (kind, body["error"]) == ("error", "shutting_down")
    client.close()


def test_conversation_idle_reset_forgets_between_turns(broker: Broker) -> None:
    """conversation.idle_reset 0: every exchange is forgotten before the next turn, so the same question twice
    costs the same prompt; by default the second carries the first exchange."""
    prompts = {}
    for setting in ("conversation.idle_reset=0", "conversation.max_exchanges=6"):
        daemon, client = start(broker, testmodels.tiny_text(), setting)
        for n in range(2):
            client.publish(f"{daemon.base}/ask", {"id": f"same-{n}", "text": "Who is at the door?"})
        prompts[setting] = [reply(client, daemon.base, f"same-{n}")[1]["tokens"]["prompt"] for n in range(2)]
        daemon.stop()
        client.close()
    first, second = prompts["conversation.idle_reset=0"]
    assert first == second
    remembered = prompts["conversation.max_exchanges=6"]
    assert remembered[0] == first and remembered[1] > first


def test_a_full_context_stops_with_context(broker: Broker) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), "model.n_ctx=256", "model.max_tokens=250",
                           "model.system_prompt=Be brief.")
    client.publish(f"{daemon.base}/ask", {"id": "long", "text": "Talk."})
    kind, body = reply(client, daemon.base, "long")
    assert (kind, body["stop"]) == ("response", "context")
    assert body["tokens"]["prompt"] + body["tokens"]["completion"] >= 250  # the window filled up
    daemon.stop()


def test_model_deadline_stops_with_deadline(broker: Broker) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), "model.deadline=1", "model.n_ctx=16384",
                           "model.max_tokens=8000")  # random weights never say they are done
    client.publish(f"{daemon.base}/ask", {"id": "slow", "text": "Write a very long story about a ship."})
    kind, body = reply(client, daemon.base, "slow")
    assert (kind, body["stop"]) == ("response", "deadline") and body["tokens"]["completion"] < 8000
    assert body["latency_ms"] >= 1000
    daemon.stop()


def test_motion_describes_the_scene_with_source_motion(broker: Broker, door: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision(door, "motion.enabled=true",
                                                                   "vision.motion_describe=true",
                                                                   "vision.motion_cooldown=3600"))
    body = payload_json(client.wait_for(f"{daemon.base}/response", timeout=60)[0])
    assert body["source"] == "motion" and body["tokens"]["image"] == 256
    daemon.stop()


# --- exit codes of the CLI -----------------------------------------------------------------------------------


def test_an_unknown_command_exits_2_with_the_usage() -> None:
    proc = run_agent("frobnicate", timeout=60)
    assert proc.returncode == 2 and "usage: gemma-agent" in proc.stderr


def test_a_bug_exits_70_with_the_traceback_logged(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: Any) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli.SUBCOMMANDS["check"], "main", broken)
    code = cli.main(["check"])
    observe("exit", code)
    assert code == 70
    err = capsys.readouterr().err
    assert "internal error (a bug: please report it with this log)" in err and "ZeroDivisionError: a bug" in err
