"""What the agent says, as the contract's messages: a turn's stream and its one final response or error, refusals,
events, transcripts and snapshots. Every `error` and `response` also goes out as the matching Home Assistant
event."""

from __future__ import annotations

import logging

from agent.contract.codes import AgentError, EventType
from agent.contract.outbound import ErrorReply, Event, Response, StreamDelta, Transcript
from agent.mqtt.client import MqttClient
from agent.turns.types import Request, Result

log = logging.getLogger("agent.mqtt.sink")


def response_of(result: Result) -> Response:
    return Response(id=result.id, text=result.text, source=result.source, stop=result.stop,
                    tokens={"prompt": result.prompt_tokens, "cached": result.cached_tokens,
                            "completion": result.completion_tokens, "image": result.image_tokens,
                            "audio": result.audio_tokens},
                    latency_ms=result.latency_ms, ttft_ms=result.ttft_ms, queue_ms=result.queue_ms,
                    media_ms=result.media_ms, projector_load_ms=result.projector_load_ms,
                    encode_ms=result.encode_ms, prefill_tps=result.prefill_tps, decode_tps=result.decode_tps,
                    transcript=result.transcript)


class MqttOutput:
    """The agent's `Output` (agent.turns.types) on one MQTT connection."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.client.publish(StreamDelta(request.id, delta, index))

    def on_result(self, request: Request, result: Result) -> None:
        log.info("answered id=%s source=%s stop=%s tokens=%d+%d ttft=%.0fms decode=%.1ftok/s", result.id,
                 result.source, result.stop, result.prompt_tokens, result.completion_tokens, result.ttft_ms,
                 result.decode_tps)
        self.client.publish(response_of(result), settles=request.id)
        self.event(EventType.RESPONSE, {"id": result.id, "text": result.text, "source": result.source})

    def on_error(self, request: Request, error: AgentError) -> None:
        """A request that was accepted (journalled) ends in this error."""
        self._error(request.id, str(request.source), error, settles=True)

    def accepted(self, request: Request) -> None:
        if self.client.outbox is not None:
            self.client.outbox.accept(request.id, request.source)

    def refused(self, request_id: str | None, source: str, error: AgentError) -> None:
        self._error(request_id, source, error, settles=False)

    def event(self, kind: EventType, data: dict[str, object]) -> None:
        self.client.publish(Event(kind, data))

    def transcript(self, transcript: Transcript) -> None:
        self.client.publish(transcript)
        self.event(EventType.TRANSCRIPT, transcript.to_json())

    def snapshot(self, jpeg: bytes) -> None:
        self.client.publish_bytes(self.client.topics.snapshot, jpeg, retain=True)

    def _error(self, request_id: str | None, source: str, error: AgentError, settles: bool) -> None:
        log.info("error reply id=%s %s: %s", request_id, error.code, error.detail)
        reply = ErrorReply(request_id, error.code, error.detail, source)
        self.client.publish(reply, settles=request_id if settles else None)
        self.event(EventType.ERROR, {k: v for k, v in reply.to_json().items() if k != "ts"})
