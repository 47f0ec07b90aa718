"""model.backend: remote against real OpenAI-compatible servers: llama-cpp-python's own, serving the Gemma 3 270M
behind an API key (answers stream over MQTT as with a local model; a wrong key, a server that is gone or one that
never answers is an error, not a crash), and llama.cpp's llama-server (built by .ci/build-llama-server from the
vendored llama.cpp) serving a tiny Gemma 4 with its vision + audio projector, which takes the frames and the
speech remote.vision and remote.audio send."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import models
from tests.support.daemon import DaemonProcess
from tests.support.models_gemma4 import tiny_gemma4_projector, tiny_gemma4_text
from tests.support.mqtt import Broker, Client, free_port, has_id, payload_json
from tests.support.paths import ROOT, run_agent

API_KEY = "door-bell-7"
SERVED = ("remote.api_key=" + API_KEY, "remote.model=gemma-3-270m", "remote.timeout=120")


@pytest.fixture(scope="module")
def model_server(gemma270m: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serving([sys.executable, "-m", "llama_cpp.server", "--model", str(gemma270m), "--host", "127.0.0.1",
                    "--port", str(port), "--n_ctx", "2048", "--chat_format", "gemma", "--api_key", API_KEY,
                    "--model_alias", "gemma-3-270m"], url, {"Authorization": f"Bearer {API_KEY}"})
    yield url
    proc.terminate()
    proc.wait(10)


def serving(command: list[str], url: str, headers: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a model server and wait until it lists its models."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{command[0]} did not start"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def media_server() -> Iterator[str]:
    """llama-server with a tiny Gemma 4 and its vision + audio projector (what a user's bigger machine runs)."""
    binary = os.environ.get("GEMMA_AGENT_LLAMA_SERVER") or subprocess.run(
        [str(ROOT / ".ci" / "build-llama-server")], env={**os.environ, "PYTHON": sys.executable}, check=True,
        capture_output=True, text=True).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serving([binary, "--model", str(tiny_gemma4_text(template=True)), "--mmproj", str(tiny_gemma4_projector()),
                    "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "2048", "--threads", "2",
                    "--alias", "gemma-4-tiny", "--no-warmup"], url, {})
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


def final_or_error(client: Client, base: str, request_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """The response or error that ends request `request_id` (or the first turn to end): (topic leaf, body)."""
    msg = client.wait_for(f"{base}/+", lambda m: m.topic.rsplit("/", 1)[1] in ("response", "error")
                          and request_id in (None, payload_json(m).get("id")), timeout=120)[0]
    return msg.topic.rsplit("/", 1)[1], payload_json(msg)


def test_remote_vision_decides_whether_a_frame_is_sent(broker: Broker, media_server: str, door_video: Path) -> None:
    """remote.vision false: a describe is refused here, naming the key; true: the frame goes to llama-server,
    whose projector turns it into image tokens (the prompt grows by them, against a text ask's)."""
    prompts = {}
    for vision in (False, True):
        daemon, client = remote_daemon(broker, media_server, "remote.model=gemma-4-tiny", "camera.enabled=true",
                                       f"camera.source={door_video}", "camera.input_size=256",
                                       f"remote.vision={str(vision).lower()}", "conversation.max_exchanges=0")
        daemon.wait_for_camera()
        client.publish(f"{daemon.base}/describe", {"id": "v"})
        leaf, body = final_or_error(client, daemon.base, "v")
        if vision:
            assert leaf == "response" and body["source"] == "describe", body
            client.publish(f"{daemon.base}/ask", {"id": "t", "text": "Describe what you see."})
            leaf, text_only = final_or_error(client, daemon.base, "t")
            assert leaf == "response", text_only
            prompts = {"image": body["tokens"]["prompt"], "text": text_only["tokens"]["prompt"]}
        else:
            assert leaf == "error" and body["error"] == "no_projector" and "remote.vision" in body["detail"], body
        daemon.stop()
        client.close()
    assert prompts["image"] - prompts["text"] >= 81  # gemma4v: a 256 px frame is 81 tokens


def test_remote_audio_sends_the_utterance_or_its_transcript(broker: Broker, media_server: str,
                                                          question_wav: Path) -> None:
    """remote.audio true: the utterance goes to llama-server as audio (no whisper here; the server's projector
    makes 25 tokens a second of it); false: whisper.cpp transcribes it here and the text goes."""
    hearing = ("microphone.enabled=true", f"microphone.source={question_wav}", "microphone.realtime=false",
               "remote.model=gemma-4-tiny", f"whisper.model={models.tiny_whisper()}", "conversation.max_exchanges=0")
    for audio in (True, False):
        daemon, client = remote_daemon(broker, media_server, *hearing, f"remote.audio={str(audio).lower()}")
        leaf, body = final_or_error(client, daemon.base)
        heard = payload_json(client.wait_for(f"{daemon.base}/transcript", has_id(body["id"]))[0])
        assert leaf == "response" and body["source"] == "speech", body
        health = payload_json(client.wait_for(f"{daemon.base}/health")[-1])
        if not audio:  # the transcript asked as text makes the same prompt: the text went, not the audio
            client.publish(f"{daemon.base}/ask", {"id": "same", "text": heard["text"]})
            leaf, asked = final_or_error(client, daemon.base, "same")
            assert heard["text"] and health["speech"] == "whisper"
            assert leaf == "response" and asked["tokens"]["prompt"] == body["tokens"]["prompt"], (asked, body)
        daemon.stop()
        client.close()
        if audio:
            assert heard["text"] is None and health["speech"] == "native audio"
            assert body["tokens"]["prompt"] >= 25 * heard["duration"]
            assert "speech-to-text: whisper.cpp" not in daemon.log


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
