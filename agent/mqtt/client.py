"""The MQTT connection: availability with a last will, a client that reconnects on its own, outbound messages
(durable ones through the outbox), inbound messages handed to one handler.

paho-mqtt 2.x (CallbackAPIVersion.VERSION2) runs its network loop in its own thread (`loop_start`), connects
asynchronously and reconnects with exponential backoff (reconnect_min doubling up to reconnect_max).
Subscriptions are renewed in on_connect. Inbound messages go to a handler that must not block: it parses and
queues work for the engine. A persistent session (clean_session False, stable client id) makes the broker keep
QoS 1 requests that arrive while we are away.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import ConfigError, MqttConfig, TlsConfig
from agent.contract.outbound import Outbound
from agent.contract.topics import TOPICS, Topics
from agent.mqtt.outbox import Outbox

log = logging.getLogger("agent.mqtt")

ONLINE, OFFLINE = "online", "offline"


Handler = Callable[[str, bytes], None]


def make_client(cfg: MqttConfig, client_id: str, persistent: bool = False,
                tls: ssl.SSLContext | None = None) -> mqtt.Client:
    """A paho client with the configured credentials and TLS (`tls`, else built from mqtt.tls; shared by the
    daemon and `check`)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=not persistent)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls.enabled:
        client.tls_set_context(tls or tls_context(cfg.tls))
    return client


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The broker connection's TLS: its CA (the system's when ca_file is empty), our certificate, the broker's host
    name checked against its certificate unless `insecure`. ConfigError naming the key of a file it cannot use."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            why = "no such file" if not os.path.exists(path) else "not a file" if not os.path.isfile(path) else \
                "permission denied"
            raise ConfigError(f"mqtt.tls.{key}: cannot read {path} ({why})")
    for key, holds, what in (("cert_file", "CERTIFICATE-----", "certificate"),
                             ("key_file", "PRIVATE KEY-----", "private key")):  # OpenSSL says only "PEM lib"
        path = getattr(tls, key)
        if path and holds not in Path(path).read_text(errors="replace"):
            raise ConfigError(f"mqtt.tls.{key}: {path} holds no PEM {what}")
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
    except ssl.SSLError as exc:
        raise ConfigError(f"mqtt.tls.ca_file: {tls.ca_file} holds no usable CA certificate ({exc})") from None
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"mqtt.tls.cert_file / mqtt.tls.key_file: {tls.key_file} is not the private key of "
                              f"{tls.cert_file} ({exc.reason or exc})") from None
    context.check_hostname = not tls.insecure
    return context


def _one_shot(cfg: MqttConfig, client_id: str, topics: tuple[str, ...], timeout: float) -> str | None:
    """Connect once, publish an empty retained message to each of `topics` (which deletes the retained one), and
    disconnect; None on success, else why not."""
    client = make_client(cfg, client_id)
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.append(str(reason) if reason.is_failure else "")
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=10)
    except ssl.SSLCertVerificationError as exc:
        return f"cannot connect to {cfg.host}:{cfg.port}: TLS: {certificate_problem(exc)}"
    except (OSError, ValueError) as exc:
        return f"cannot connect to {cfg.host}:{cfg.port}: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no answer from {cfg.host}:{cfg.port} within {timeout:.0f}s"
        if outcome[0]:
            return f"the broker refused us: {outcome[0]}"
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
        return None
    finally:
        client.disconnect()
        client.loop_stop()


def probe_broker(cfg: MqttConfig, client_id: str, timeout: float = 5.0) -> str | None:
    """Connect once and disconnect; None when the broker accepted us, else why not."""
    return _one_shot(cfg, f"{client_id}-check", (), timeout)


def remove_retained(cfg: MqttConfig, client_id: str, topics: tuple[str, ...], timeout: float = 5.0) -> str | None:
    """Delete retained messages (an empty retained payload replaces each)."""
    return _one_shot(cfg, f"{client_id}-admin", topics, timeout)


class MqttClient:
    """One MQTT connection: availability, inbound messages, outbound messages (durable through the outbox)."""

    def __init__(self, cfg: MqttConfig, device_id: str, outbox: Outbox | None = None,
                 extra_subscriptions: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.prefix, device_id)
        self.client_id = f"gemma-agent-{device_id}"
        self.outbox = outbox
        self._handler: Handler = _unhandled
        self._subscriptions = self.topics.inbound + extra_subscriptions
        self.connected = threading.Event()
        self.connects = 0
        self.disconnects = 0
        self.last_error = ""
        self._closing = False
        self._lock = threading.Lock()
        # Held while an outbox message is stored and handed to paho, and while the outbox is flushed on
        # (re)connect, so a message is never sent by both. Never taken inside a paho callback that paho calls
        # under its own locks (on_publish), so it cannot deadlock with paho.
        self._send_lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # paho mid -> outbox seq, until PUBACK
        self._early_acks: set[int] = set()  # PUBACKs that beat us to recording their mid
        self.on_connected: list[Callable[[], None]] = []
        self._tls = tls_context(cfg.tls) if cfg.tls.enabled else None  # also for saying why a handshake fails
        client = make_client(cfg, self.client_id, persistent=True, tls=self._tls)
        client.enable_logger(PAHO_LOG)
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min)),
                                   max_delay=max(1, round(cfg.reconnect_max)))
        client.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        self._unreachable_reported = False
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, handler: Handler) -> None:
        """Connect in the background and hand every inbound message to `handler` (on paho's thread: it must not
        block); returns at once. Reconnects forever until stop()."""
        self._handler = handler
        log.info("connecting to mqtt://%s:%d as %s (tls %s)", self.cfg.host, self.cfg.port, self.client_id,
                 "on" if self.cfg.tls.enabled else "off")
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 2.0) -> None:
        """Publish `offline` (retained), wait briefly for it and for in-flight messages, then disconnect."""
        self._closing = True
        if self.connected.is_set():
            info = self.client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
            end = time.monotonic() + timeout
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
            while self._in_flight and time.monotonic() < end:
                time.sleep(0.02)
        self.client.disconnect()
        self.client.loop_stop()
        left = len(self.outbox) if self.outbox is not None else 0
        waiting = f"; {left} message(s) wait in the outbox" if left else ""
        if self.connects:
            log.info("disconnected from the broker%s", waiting)
        else:
            log.info("stopped without ever reaching the broker (%s)%s", self.last_error or "not tried", waiting)

    # --- outbound ----------------------------------------------------------------------------------

    def publish_json(self, topic: str, payload: dict[str, Any], qos: int = 1, retain: bool = False,
                     durable: bool = False, settles: str | None = None) -> None:
        """Publish JSON. `durable`: written to the outbox first and kept until the broker acknowledges it;
        `settles`: the accepted request this message answers (see Outbox.accept)."""
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        if durable and self.outbox is not None and qos > 0:
            with self._send_lock:
                seq = self.outbox.put(topic, data, qos, retain, settles=settles)
                if self.connected.is_set():
                    self._send(seq, topic, data, qos, retain)
            return
        self.publish_bytes(topic, data, qos, retain)

    def publish(self, message: Outbound, settles: str | None = None) -> None:
        """A message of the contract, with its topic's QoS, retain flag and durability (contract.topics)."""
        spec = TOPICS[message.topic]
        self.publish_json(self.topics.full(message.topic), message.to_json(), qos=spec.qos, retain=spec.retain,
                          durable=spec.durable, settles=settles)

    def publish_bytes(self, topic: str, data: bytes, qos: int = 1, retain: bool = False) -> None:
        """A raw payload (a JPEG snapshot, say), not kept in the outbox."""
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    def _send(self, seq: int, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Hand an outbox message to paho; its PUBACK (on_publish) removes it from the outbox."""
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s; kept in the outbox", topic, mqtt.error_string(info.rc))
            return
        with self._lock:  # paho calls on_publish under its own lock: never call paho while holding ours
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                acked = True
            else:
                self._in_flight[info.mid] = seq
                acked = False
        if acked and self.outbox is not None:
            self.outbox.ack(seq)

    def _flush_outbox(self) -> None:
        """Send what the outbox holds that paho is not already retrying (left from outages and restarts)."""
        if self.outbox is None:
            return
        with self._lock:
            in_flight = set(self._in_flight.values())
        pending = [m for m in self.outbox.pending() if m.seq not in in_flight]
        if pending:
            log.info("delivering %d message(s) from the outbox", len(pending))
        for m in pending:
            self._send(m.seq, m.topic, m.payload, m.qos, m.retain)

    # --- paho callbacks (paho's network thread: never block here) -----------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.last_error = str(reason)
            log.warning("broker refused the connection: %s", reason)
            return
        self.connects += 1
        self._unreachable_reported = False
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        log.info("connected to the broker (connection %d); serving %s/#", self.connects, self.topics.base)
        with self._send_lock:
            self.connected.set()
            self._flush_outbox()
        for callback in self.on_connected:
            callback()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        """paho could not open the connection (it retries with backoff): say so once per outage, with why."""
        host, port = self.cfg.host, self.cfg.port
        if self._unreachable_reported:
            log.debug("still cannot reach %s:%d", host, port)
            return
        self._unreachable_reported = True
        self.last_error = why_unreachable(host, port, self._tls)
        log.warning("cannot reach %s:%d (%s); retrying in %.0f s, backing off up to %.0f s", host, port,
                    self.last_error, max(1, round(self.cfg.reconnect_min)), max(1, round(self.cfg.reconnect_max)))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._closing:
            self.disconnects += 1
            self.last_error = str(reason)
            log.warning("lost the broker (%s); reconnecting with backoff", reason)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._lock:
            seq = self._in_flight.pop(mid, None)
            if seq is None:
                self._early_acks.add(mid)
        if seq is not None and self.outbox is not None:
            self.outbox.ack(seq)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, bytes(msg.payload))
        except Exception:  # a bad message must never kill paho's network thread
            log.exception("handling a message on %s failed", msg.topic)


def why_unreachable(host: str, port: int, tls: ssl.SSLContext | None = None, timeout: float = 3.0) -> str:
    """The reason a connection to host:port fails now, in words (paho swallows its own exception): TCP, then
    the TLS handshake when `tls` is given."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if tls is not None:
                tls.wrap_socket(sock, server_hostname=host).close()
            return "the connection closed during the MQTT handshake"
    except socket.gaierror as exc:
        return f"cannot resolve the host name: {exc.strerror}"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: {certificate_problem(exc)}"
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def certificate_problem(exc: ssl.SSLCertVerificationError) -> str:
    """The broker's certificate was not accepted: why, and what to change when it names another host."""
    why = (exc.verify_message or str(exc)).rstrip(".")
    if "mismatch" in why:  # "Hostname mismatch" / "IP address mismatch": the chain is fine, the name is not
        why += ("; connect with mqtt.host set to a name the certificate carries, or set mqtt.tls.insecure "
                "true to skip the host name check")
    return why


class _QuietWhileDisconnected(logging.Filter):
    """paho logs an ERROR on every pass of its loop while it has no socket (between reconnect attempts, and once
    while stopping); the connection's state changes are logged by MqttClient instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


PAHO_LOG = logging.getLogger("agent.mqtt.paho")
PAHO_LOG.addFilter(_QuietWhileDisconnected())


def _unhandled(topic: str, _payload: bytes) -> None:
    log.warning("message on %s before the agent was ready: dropped", topic)
