"""Topics: <prefix>/<device id>/<name>, each with its direction, QoS, retain flag and the keys of its payload."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Direction(str, Enum):
    IN = "in"  # the agent subscribes
    OUT = "out"  # the agent publishes


@dataclass(frozen=True)
class TopicSpec:
    name: str  # the part after <prefix>/<device id>/
    direction: Direction
    qos: int
    retain: bool
    keys: tuple[str, ...] = ()  # keys every JSON payload carries
    json: bool = True
    durable: bool = False  # written to the outbox before it is sent, deleted on the broker's PUBACK


_IN, _OUT = Direction.IN, Direction.OUT
TOPICS: dict[str, TopicSpec] = {spec.name: spec for spec in (
    TopicSpec("availability", _OUT, 1, True, json=False),
    TopicSpec("ask", _IN, 1, False, json=False),
    TopicSpec("describe", _IN, 1, False, json=False),
    TopicSpec("listen", _IN, 1, False, json=False),
    TopicSpec("reset", _IN, 1, False, json=False),
    TopicSpec("response", _OUT, 1, False, durable=True,
              keys=("id", "text", "source", "done", "stop", "tokens", "latency_ms", "ttft_ms", "queue_ms", "media_ms",
                    "projector_load_ms", "encode_ms", "prefill_tps", "decode_tps", "ts")),
    TopicSpec("response/stream", _OUT, 0, False, ("id", "delta", "index")),
    TopicSpec("transcript", _OUT, 1, False, durable=True,
              keys=("id", "text", "start", "end", "duration", "emitted", "stt_ms")),
    TopicSpec("event", _OUT, 1, False, durable=True, keys=("event_type", "ts")),
    # QoS 0: a snapshot is superseded every health.interval; a QoS 1 one published as the connection died was
    # sent again by paho after the fresh one of the reconnect, and stayed retained, stale
    TopicSpec("health", _OUT, 0, True, ("state", "uptime", "stages", "memory", "ts")),
    TopicSpec("error", _OUT, 1, False, durable=True, keys=("id", "error", "detail", "source", "ts")),
    TopicSpec("snapshot", _OUT, 1, True, json=False),
)}
COMMANDS = tuple(name for name, spec in TOPICS.items() if spec.direction is Direction.IN)
HA_STATUS = "homeassistant/status"  # Home Assistant's birth message: send discovery again


class Topics:
    """The full topic names of one device: `topics.ask` is "<prefix>/<device id>/ask"."""

    def __init__(self, prefix: str, device_id: str) -> None:
        self.base = base = f"{prefix}/{device_id}"
        self.availability = f"{base}/availability"
        self.ask = f"{base}/ask"
        self.describe = f"{base}/describe"
        self.listen = f"{base}/listen"
        self.reset = f"{base}/reset"
        self.response = f"{base}/response"
        self.stream = f"{base}/response/stream"
        self.transcript = f"{base}/transcript"
        self.event = f"{base}/event"
        self.health = f"{base}/health"
        self.error = f"{base}/error"
        self.snapshot = f"{base}/snapshot"

    def full(self, name: str) -> str:
        """The full topic of a TOPICS name ("response/stream" -> "<base>/response/stream")."""
        if name not in TOPICS:
            raise KeyError(f"{name!r} is not a topic of the contract")
        return f"{self.base}/{name}"

    def name(self, topic: str) -> str | None:
        """The TOPICS name of one of this device's topics, else None."""
        prefix = self.base + "/"
        name = topic[len(prefix):] if topic.startswith(prefix) else ""
        return name if name in TOPICS else None

    def command(self, topic: str) -> str | None:
        """The command name ("ask", "describe", "listen", "reset") of an inbound topic, else None."""
        name = self.name(topic)
        return name if name in COMMANDS else None

    @property
    def inbound(self) -> tuple[str, ...]:
        return tuple(self.full(name) for name in COMMANDS)
