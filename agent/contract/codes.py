"""The closed vocabularies of the contract: error codes, event types, stop reasons, turn sources."""

from __future__ import annotations

from enum import Enum


class _Text(str, Enum):
    """A string enum that reads as its value everywhere (f-strings, str(), json.dumps)."""

    def __str__(self) -> str:
        return str(self.value)


class ErrorCode(_Text):
    """The `error` field of an `error` message (README "Error codes")."""

    TOO_LARGE = "too_large"  # payload over mqtt.max_payload
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    EMPTY_TEXT = "empty_text"
    FORBIDDEN_FIELD = "forbidden_field"  # `system` without mqtt.allow_remote_system_prompt
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    PROMPT_TOO_LONG = "prompt_too_long"
    NO_CAMERA = "no_camera"
    NO_FRAME = "no_frame"
    STALE_FRAME = "stale_frame"
    IMAGE_DISABLED = "image_disabled"
    NO_MICROPHONE = "no_microphone"  # `listen` while microphone.enabled is false
    NO_PROJECTOR = "no_projector"
    PROJECTOR_ERROR = "projector_error"
    SPEECH_BACKLOG = "speech_backlog"
    SPEECH_FAILED = "speech_failed"
    INTERRUPTED = "interrupted"  # the daemon stopped (crash, power cut) while it held the request
    SHUTTING_DOWN = "shutting_down"
    MODEL_ERROR = "model_error"
    REMOTE_ERROR = "remote_error"  # model.backend remote: the server failed or is unreachable
    INTERNAL_ERROR = "internal_error"


class EventType(_Text):
    """The `event_type` of an `event` message (declared to Home Assistant's event entity)."""

    TRANSCRIPT = "transcript"
    RESPONSE = "response"
    MOTION = "motion"
    ERROR = "error"
    LISTENING = "listening"
    WAKE = "wake"
    RESET = "reset"


class StopReason(_Text):
    """Why a response ended (`stop`)."""

    END = "end"  # the model finished
    MAX_TOKENS = "max_tokens"
    CONTEXT = "context"  # the context window is full
    DEADLINE = "deadline"  # model.deadline passed
    CANCELLED = "cancelled"  # the daemon is stopping


class Source(_Text):
    """Where a turn came from (`source`)."""

    ASK = "ask"
    DESCRIBE = "describe"
    SPEECH = "speech"
    MOTION = "motion"


class AgentError(Exception):
    """A request the agent refuses or cannot serve: published as an `error` message with `code`."""

    def __init__(self, code: ErrorCode, detail: str, request_id: str | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.request_id = code, detail, request_id
