"""MQTT for the tests: a real mosquitto on a free loopback port, and a real paho client that records what it
receives."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli.demo import free_port, wait_port

__all__ = ["Broker", "Client", "free_port", "payload_json"]


class Broker:
    """A real mosquitto process; stop() and start() again on the same port for fault tests."""

    def __init__(self, workdir: Path, extra_conf: str = "", persistence: bool = False) -> None:
        self.port = free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        # run as root, mosquitto switches to its own user unless told not to: then it cannot save into workdir
        saved = "persistence false\n"
        if persistence:
            saved = f"persistence true\npersistence_location {workdir}/\nuser root\n"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{saved}{extra_conf}")
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        if not wait_port(self.port):
            raise TimeoutError(f"mosquitto did not listen on 127.0.0.1:{self.port}; see {self.log}")

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill the broker (SIGKILL: a crash; SIGTERM: mosquitto saves its persistence database first)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Client:
    """A real paho client that records every message per topic and waits for the ones a test expects."""

    def __init__(self, port: int, client_id: str | None = None, persistent: bool = False) -> None:
        """`persistent`: a session the broker keeps across disconnects (and restarts, with persistence)."""
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=not persistent)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            result, _mid = self.client.subscribe(topic, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)  # SUBACK

    def publish(self, topic: str, payload: str | bytes | dict[str, Any], retain: bool = False) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if mqtt.topic_matches_sub(topic, m.topic)]

    def wait_for(self, topic: str, match: Callable[[mqtt.MQTTMessage], bool] = lambda m: True,
                 timeout: float = 60.0, count: int = 1) -> list[mqtt.MQTTMessage]:
        """Wait until `count` messages on `topic` satisfy `match`; return them."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if mqtt.topic_matches_sub(topic, m.topic) and match(m)]
                if len(found) >= count:
                    return found
                left = end - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:120]) for m in self.messages[-10:]]
                    raise AssertionError(f"timed out waiting for {count} message(s) on {topic}; last seen {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def payload_json(msg: mqtt.MQTTMessage) -> Any:
    return json.loads(msg.payload)
