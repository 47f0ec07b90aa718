"""What flows between the stages: a `Request` for the model, the `Result` it produced, the `Media` a request
carries, and the two interfaces the turn stage talks through (`TurnQueue` in, `Output` out)."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from agent.contract.codes import AgentError, EventType, Source, StopReason
from agent.contract.outbound import Transcript

Role = Literal["user", "model"]


def new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Media:
    """One image (RGB uint8, HxWx3) or one audio clip (int16 or float32 mono at the projector's rate)."""

    kind: Literal["image", "audio"]
    data: np.ndarray

    @property
    def key(self) -> int:
        """A negative pseudo-token that stands for this exact content in the engine's token bookkeeping."""
        digest = hashlib.blake2b(np.ascontiguousarray(self.data).tobytes(), digest_size=4).digest()
        return -1 - (int.from_bytes(digest, "little") & 0x3FFFFFFF)


def same_images(a: Iterable[Media], b: Iterable[Media]) -> bool:
    """Whether two media lists show the very same pictures (by content), at least one."""
    keys_a = [m.key for m in a if m.kind == "image"]
    return bool(keys_a) and keys_a == [m.key for m in b if m.kind == "image"]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Role
    text: str
    media: tuple[Media, ...] = ()  # images / audio shown with this turn, before its text


@dataclass(frozen=True)
class MediaSupport:
    """What the model's projector takes (both False without one)."""

    vision: bool = False
    audio: bool = False

    def native_audio(self, speech: str) -> bool:
        """Speech goes to the model as audio, no speech-to-text: an audio projector and listen.speech `speech`
        auto or native."""
        return self.audio and speech in ("auto", "native")


class Flag(Protocol):
    """Something a running turn polls to know it must stop (a threading.Event, or several at once)."""

    def is_set(self) -> bool: ...


@dataclass
class Request:
    """One turn asked of the model."""

    text: str
    id: str = field(default_factory=new_id)
    source: Source = Source.ASK
    max_tokens: int | None = None
    remember: bool = True  # part of the conversation (False: a motion-triggered description, say)
    media: list[Media] = field(default_factory=list)  # images / audio evaluated before the text
    transcript: str | None = None  # what speech-to-text heard, for speech turns
    system: str | None = None  # replaces model.system_prompt for this turn (mqtt.allow_remote_system_prompt)
    spoken: tuple[float, float] | None = None  # speech turns: wall-clock start and end of the utterance
    audio_follows: bool = False  # a preparation whose turn will bring its speech as audio to the projector
    created: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)  # stops this turn (a speculation let go)


@dataclass
class Result:
    """What a turn produced, with the figures a user tunes by."""

    id: str
    text: str
    source: Source
    stop: StopReason
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float
    latency_ms: float
    prefill_tps: float
    decode_tps: float
    image_tokens: int = 0
    audio_tokens: int = 0
    transcript: str | None = None
    queue_ms: float = 0.0  # waiting behind other turns
    media_ms: float = 0.0  # encoding images/audio and evaluating them (part of ttft_ms)
    projector_load_ms: float = 0.0  # loading the projector for this turn (part of ttft_ms; 0 when it was loaded)
    encode_ms: float = 0.0  # the encoder's share of media_ms (0 when the media was already in the KV cache)


class Sink(Protocol):
    """Where one turn's output goes. Called from the engine's worker thread; must not block for long."""

    def on_delta(self, request: Request, delta: str, index: int) -> None: ...

    def on_result(self, request: Request, result: Result) -> None: ...

    def on_error(self, request: Request, error: AgentError) -> None: ...


class Output(Sink, Protocol):
    """Everything the agent says: a turn's output, plus refusals, events, transcripts and frames."""

    def accepted(self, request: Request) -> None:
        """A request was queued: journal it until it is answered (a crash then reports it `interrupted`)."""

    def refused(self, request_id: str | None, source: str, error: AgentError) -> None: ...

    def event(self, kind: EventType, data: dict[str, object]) -> None: ...

    def transcript(self, transcript: Transcript) -> None: ...

    def snapshot(self, jpeg: bytes) -> None:
        """The frame a turn was answered from (JPEG), when camera.snapshot is on."""


class TurnQueue(Protocol):
    """The model's request queue (agent.llm.engine.Engine)."""

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue a request, or raise AgentError (queue_full, shutting_down) at once."""

    def prepare(self, request: Request) -> None:
        """Evaluate the start of `request`'s prompt (its images included) ahead of the turn, when idle."""
