"""model.backend: remote against a real OpenAI-compatible server (llama-cpp-python's own, serving the Gemma 3
270M): answers stream over MQTT as with a local model; a server that is gone is an error, not a crash."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def model_server(gemma270m: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gemma270m), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--chat_format", "gemma"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
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
    daemon, client = remote_daemon(broker, model_server)
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
    proc = run_agent("--set", "model.backend=remote", "--set", f"remote.url={model_server}",
                     "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}", "check", timeout=60, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"remote {model_server}: reachable" in proc.stdout


def test_a_server_that_is_gone_is_an_error_and_the_daemon_stays(broker: Broker) -> None:
    daemon, client = remote_daemon(broker, f"http://127.0.0.1:{free_port()}")
    client.publish(f"{daemon.base}/ask", {"id": "gone", "text": "Hello?"})
    body = payload_json(client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "gone")[0])
    assert body["error"] == "remote_error" and "Connection refused" in body["detail"]
    client.publish(f"{daemon.base}/ask", {"id": "gone-2", "text": "Still there?"})
    client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "gone-2")
    daemon.stop()
    client.close()
