"""MQTT for the tests: a real mosquitto on a free loopback port, and a real paho client that records what it
receives and holds every message the agent published to the contract (tests/support/contract.py): QoS, retain
flag (MQTT 5 retain-as-published), JSON keys, enumerated values. Messages the tests publish carry a user property
that keeps them out of that check."""

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
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.cli.demo import free_port, wait_port
from tests.support.contract import violations

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


def paho_client(client_id: str | None = None) -> mqtt.Client:
    """A paho MQTT 5 client as the tests use it."""
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                       protocol=mqtt.MQTTv5)


def _tagged() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("origin", "test")
    return props


class Client:
    """A real paho client that records every message per topic and waits for the ones a test expects; what the
    agent published against the contract is listed in `violations` (conftest fails the test on any)."""

    instances: ClassVar[list[Client]] = []  # every client made, for conftest's contract check

    def __init__(self, port: int, client_id: str | None = None, persistent: bool = False) -> None:
        """`persistent`: a session the broker keeps across disconnects (and restarts, with persistence)."""
        self._setup(paho_client(client_id))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.client.loop_start()

    def _setup(self, client: mqtt.Client) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.violations: list[str] = []
        self._cond = threading.Condition()
        self.client = client
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._acked: set[int] = set()
        Client.instances.append(self)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _codes: Any, _props: Any = None) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        ours = ("origin", "test") in (getattr(props, "UserProperty", None) or [])
        problems = [] if ours else violations(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        with self._cond:
            self.messages.append(msg)
            self.violations += [f"{msg.topic}: {problem}" for problem in problems]
            self._cond.notify_all()

    def subscribe(self, *topics: str, timeout: float = 10.0) -> None:
        """Subscribe and return once the broker has acknowledged every subscription (SUBACK): from then on, all
        that is published on them reaches this client."""
        mids = set()
        for topic in topics:
            result, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
            assert result == mqtt.MQTT_ERR_SUCCESS
            mids.add(mid)
        with self._cond:
            if not self._cond.wait_for(lambda: mids <= self._acked, timeout):
                raise AssertionError(f"no SUBACK for {topics} within {timeout}s")

    def publish(self, topic: str, payload: str | bytes | dict[str, Any], retain: bool = False) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1, retain=retain, properties=_tagged()).wait_for_publish(5)

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


def has_id(request_id: str) -> Callable[[mqtt.MQTTMessage], bool]:
    """A wait_for filter: the JSON message about request `request_id`."""
    return lambda m: payload_json(m).get("id") == request_id
