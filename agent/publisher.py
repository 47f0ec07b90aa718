"""MQTT: the topic contract, availability with a last will, and a client that reconnects on its own.

paho-mqtt 2.x (CallbackAPIVersion.VERSION2) runs its network loop in its own thread (`loop_start`), connects
asynchronously and reconnects with exponential backoff (reconnect_min doubling up to reconnect_max).
Subscriptions are renewed in on_connect. Inbound messages go to a handler that must not block: it parses and
queues work for the engine. A persistent session (clean_session False, stable client id) makes the broker keep
QoS 1 requests that arrive while we are away.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig

log = logging.getLogger("agent.mqtt")

ONLINE, OFFLINE = "online", "offline"


class Topics:
    """Every topic the daemon serves: <prefix>/<device id>/<name> (the contract in README.md)."""

    def __init__(self, prefix: str, device_id: str) -> None:
        self.base = base = f"{prefix}/{device_id}"
        self.availability = f"{base}/availability"
        self.ask = f"{base}/ask"
        self.describe = f"{base}/describe"
        self.response = f"{base}/response"
        self.stream = f"{base}/response/stream"
        self.transcript = f"{base}/transcript"
        self.event = f"{base}/event"
        self.health = f"{base}/health"
        self.error = f"{base}/error"

    @property
    def inbound(self) -> tuple[str, ...]:
        return (self.ask, self.describe)


Handler = Callable[[str, bytes], None]


def make_client(cfg: MqttConfig, client_id: str, persistent: bool = False) -> mqtt.Client:
    """A paho client with the configured credentials and TLS (shared by the daemon and `check`)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=not persistent)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls.enabled:
        client.tls_set(ca_certs=cfg.tls.ca_file or None, certfile=cfg.tls.cert_file or None,
                       keyfile=cfg.tls.key_file or None)
        client.tls_insecure_set(cfg.tls.insecure)
    return client


def probe_broker(cfg: MqttConfig, client_id: str, timeout: float = 5.0) -> str | None:
    """Connect once and disconnect; None when the broker accepted us, else why not."""
    client = make_client(cfg, f"{client_id}-check")
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.append(str(reason) if reason.is_failure else "")
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=10)
    except (OSError, ValueError) as exc:
        return f"cannot connect to {cfg.host}:{cfg.port}: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no answer from {cfg.host}:{cfg.port} within {timeout:.0f}s"
        return f"the broker refused us: {outcome[0]}" if outcome[0] else None
    finally:
        client.disconnect()
        client.loop_stop()


class Publisher:
    """One MQTT connection: availability, inbound requests, outbound JSON."""

    def __init__(self, cfg: MqttConfig, device_id: str, handler: Handler) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.prefix, device_id)
        self.client_id = f"gemma-agent-{device_id}"
        self._handler = handler
        self.connected = threading.Event()
        self.connects = 0
        self.disconnects = 0
        self.last_error = ""
        self._closing = False
        client = make_client(cfg, self.client_id, persistent=True)
        client.enable_logger(logging.getLogger("agent.mqtt.paho"))
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min)),
                                   max_delay=max(1, round(cfg.reconnect_max)))
        client.max_queued_messages_set(1000)
        client.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once. Reconnects forever until stop()."""
        log.info("connecting to mqtt://%s:%d as %s (tls %s)", self.cfg.host, self.cfg.port, self.client_id,
                 "on" if self.cfg.tls.enabled else "off")
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 2.0) -> None:
        """Publish `offline` (retained), wait briefly for it to leave, then disconnect."""
        self._closing = True
        if self.connected.is_set():
            info = self.client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("disconnected from the broker")

    # --- outbound ----------------------------------------------------------------------------------

    def publish_json(self, topic: str, payload: dict[str, Any], qos: int = 1, retain: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    def publish_error(self, request_id: str | None, code: str, detail: str, **extra: Any) -> None:
        log.info("error reply id=%s %s: %s", request_id, code, detail)
        self.publish_json(self.topics.error, {"id": request_id, "error": code, "detail": detail, **extra,
                                              "ts": round(time.time(), 3)})

    # --- paho callbacks (paho's network thread: never block here) -----------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.last_error = str(reason)
            log.warning("broker refused the connection: %s", reason)
            return
        self.connects += 1
        client.subscribe([(topic, 1) for topic in self.topics.inbound])
        client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        self.connected.set()
        log.info("connected to the broker (connection %d); serving %s/#", self.connects, self.topics.base)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._closing:
            self.disconnects += 1
            self.last_error = str(reason)
            log.warning("lost the broker (%s); reconnecting with backoff", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, bytes(msg.payload))
        except Exception:  # a bad message must never kill paho's network thread
            log.exception("handling a message on %s failed", msg.topic)
