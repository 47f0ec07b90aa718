"""model.backend: remote against a real OpenAI-compatible server (llama-cpp-python's own, serving the Gemma 3
270M behind an API key): answers stream over MQTT as with a local model; a wrong key, a server that is gone or one
that never answers is an error, not a crash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.mqtt import Broker, Client, free_port, payload_json
from tests.support.paths import ROOT, run_agent

API_KEY = "door-bell-7"
SERVED = ("remote.api_key=" + API_KEY, "remote.model=gemma-3-270m", "remote.timeout=120")


@pytest.fixture(scope="module")
def model_server(gemma270m: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gemma270m), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--chat_format", "gemma",
                             "--api_key", API_KEY, "--model_alias", "gemma-3-270m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers={
                    "Authorization": f"Bearer {API_KEY}"}), timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the model server did not start"
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)


def remote_daemon(broker: Broker, url: str, *extra: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, ROOT / "no-local-model.gguf", "model.backend=remote", f"remote.url={url}",
                           *extra)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    return daemon, client


def test_remote_turns_stream_over_mqtt(broker: Broker, model_server: str) -> None:
    daemon, client = remote_daemon(broker, model_server, *SERVED)
    client.subscribe(f"homeassistant/device/{daemon.device_id}/config")  # retained: Home Assistant's view of it
    discovery = payload_json(client.wait_for(f"homeassistant/device/{daemon.device_id}/config")[0])
    assert discovery["dev"]["mdl"] == "gemma-3-270m"  # remote.model names the model, as the server serves it
    client.publish(f"{daemon.base}/ask", {"id": "r1", "text": "Name a colour."})
    final = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "r1")[0])
    parts = [payload_json(m) for m in client.on(f"{daemon.base}/response/stream") if payload_json(m)["id"] == "r1"]
    assert final["text"] and "".join(p["delta"] for p in parts) == final["text"]
    assert final["tokens"]["completion"] > 0 and final["stop"] in ("end", "max_tokens")
    client.publish(f"{daemon.base}/describe", {"id": "r2"})
    assert payload_json(client.wait_for(f"{daemon.base}/error")[0])["error"] == "no_camera"
    daemon.stop()
    client.close()


def test_check_reports_the_remote_server(broker: Broker, model_server: str) -> None:
    proc = run_agent("--set", "model.backend=remote", "--set", f"remote.url={model_server}", "--set", SERVED[0],
                     "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}", "check", timeout=60, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"remote {model_server}: reachable" in proc.stdout


def test_remote_vision_decides_whether_a_frame_is_sent(broker: Broker, model_server: str, door_video: Path) -> None:
    """remote.vision false: a describe is refused here, naming the key; true: the frame goes to the server (this
    one serves a text-only model, so the server's own error comes back)."""
    for vision in (False, True):
        daemon, client = remote_daemon(broker, model_server, *SERVED, f"remote.vision={str(vision).lower()}",
                                       "camera.enabled=true", f"camera.source={door_video}")
        client.publish(f"{daemon.base}/describe", {"id": "v"})
        msg = client.wait_for(f"{daemon.base}/+", lambda m: m.topic.rsplit("/", 1)[1] in ("response", "error")
                              and payload_json(m).get("id") == "v", timeout=120)[0]
        body = payload_json(msg)
        if vision:
            assert msg.topic.endswith("/response") or body["error"] == "remote_error", body
        else:
            assert body["error"] == "no_projector" and "remote.vision" in body["detail"], body
        daemon.stop()
        client.close()


def test_a_wrong_api_key_is_refused_by_the_server_and_said_so(broker: Broker, model_server: str) -> None:
    daemon, client = remote_daemon(broker, model_server, "remote.api_key=not-the-key")
    client.publish(f"{daemon.base}/ask", {"id": "key", "text": "Hello?"})
    body = payload_json(client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "key")[0])
    assert body["error"] == "remote_error" and "401" in body["detail"], body
    daemon.stop()
    client.close()


def test_a_server_that_never_answers_times_out_after_remote_timeout(broker: Broker) -> None:
    """A server that accepts the connection and says nothing: the turn fails after remote.timeout seconds, not
    after the turn's own deadline, and the daemon keeps answering."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshake; nobody reads
        port = silent.getsockname()[1]
        daemon, client = remote_daemon(broker, f"http://127.0.0.1:{port}", "remote.timeout=1", "model.deadline=60")
        client.publish(f"{daemon.base}/ask", {"id": "mute", "text": "Hello?"})
        body = payload_json(client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "mute",
                                            timeout=30)[0])
        assert body["error"] == "remote_error" and "timed out" in body["detail"], body
        daemon.stop()
    client.close()


def test_a_server_that_is_gone_is_an_error_and_the_daemon_stays(broker: Broker) -> None:
    daemon, client = remote_daemon(broker, f"http://127.0.0.1:{free_port()}")
    client.publish(f"{daemon.base}/ask", {"id": "gone", "text": "Hello?"})
    body = payload_json(client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "gone")[0])
    assert body["error"] == "remote_error" and "Connection refused" in body["detail"]
    client.publish(f"{daemon.base}/ask", {"id": "gone-2", "text": "Still there?"})
    client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "gone-2")
    daemon.stop()
    client.close()
