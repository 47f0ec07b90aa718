"""One typed class per outbound message; `to_json()` is its payload exactly as it goes on the wire."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.contract.codes import ErrorCode, EventType, Source, StopReason


def _now() -> float:
    return round(time.time(), 3)


@dataclass(frozen=True)
class Response:
    """The final answer to one request (topic `response`)."""

    topic: ClassVar[str] = "response"
    id: str
    text: str
    source: Source
    stop: StopReason
    tokens: dict[str, int]  # prompt, cached, completion, image, audio
    latency_ms: float
    ttft_ms: float
    queue_ms: float  # waiting behind other turns
    media_ms: float  # encoding images/audio and evaluating them (part of ttft_ms)
    projector_load_ms: float  # loading the projector for this turn (part of ttft_ms)
    encode_ms: float  # the encoder's share of media_ms
    prefill_tps: float
    decode_tps: float
    transcript: str | None = None  # speech turns: what speech-to-text heard
    ts: float = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.transcript is None else {"transcript": self.transcript}
        return {"id": self.id, "text": self.text, "source": self.source, "done": True, "stop": self.stop, **extra,
                "tokens": self.tokens, "latency_ms": round(self.latency_ms, 1), "ttft_ms": round(self.ttft_ms, 1),
                "queue_ms": round(self.queue_ms, 1), "media_ms": round(self.media_ms, 1),
                "projector_load_ms": round(self.projector_load_ms, 1), "encode_ms": round(self.encode_ms, 1),
                "prefill_tps": round(self.prefill_tps, 1), "decode_tps": round(self.decode_tps, 1), "ts": self.ts}


@dataclass(frozen=True)
class StreamDelta:
    """A piece of an answer while it is generated (topic `response/stream`, QoS 0)."""

    topic: ClassVar[str] = "response/stream"
    id: str
    delta: str
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "delta": self.delta, "index": self.index}


@dataclass(frozen=True)
class ErrorReply:
    """A refused or failed request (topic `error`); `id` is None when the payload was unreadable."""

    topic: ClassVar[str] = "error"
    id: str | None
    code: ErrorCode
    detail: str
    source: str
    ts: float = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "error": self.code, "detail": self.detail, "source": self.source, "ts": self.ts}


@dataclass(frozen=True)
class Transcript:
    """One utterance (topic `transcript`); `text` is None when no speech-to-text ran. Times are wall-clock
    seconds: `emitted` is when the VAD let go of the utterance, `stt_ms` how long speech-to-text took."""

    topic: ClassVar[str] = "transcript"
    id: str
    text: str | None
    start: float
    end: float
    emitted: float
    stt_ms: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "start": round(self.start, 3), "end": round(self.end, 3),
                "duration": round(self.end - self.start, 3), "emitted": round(self.emitted, 3),
                "stt_ms": round(self.stt_ms, 1)}


@dataclass(frozen=True)
class Event:
    """A Home Assistant event entity message (topic `event`): {"event_type": ..., ...data, "ts"}."""

    topic: ClassVar[str] = "event"
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        return {"event_type": self.type, **self.data, "ts": self.ts}


@dataclass(frozen=True)
class Health:
    """The health snapshot (topic `health`, retained): agent.ops.health builds its fields."""

    topic: ClassVar[str] = "health"
    snapshot: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.snapshot


Outbound = Response | StreamDelta | ErrorReply | Transcript | Event | Health
