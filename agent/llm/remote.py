"""model.backend: remote — turns go to an existing llama.cpp `llama-server` (or any OpenAI-compatible chat
server) instead of a model loaded here, so many small satellites can share one bigger machine.

Streaming is kept: the server's server-sent events become the same deltas a local turn produces. Images go as
PNG data URLs, audio as WAV `input_audio` parts (what llama-server accepts). Standard library only.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import time
import urllib.parse
import wave
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from agent.config import ModelConfig, RemoteConfig
from agent.contract.codes import AgentError, ErrorCode, StopReason
from agent.llm.engine import must_stop
from agent.turns.types import Flag, Media, Request, Result, Turn

log = logging.getLogger("agent.llm.remote")
CHARS_PER_TOKEN = 3  # a conservative estimate for history trimming: the server holds the tokenizer


class RemoteModel:
    """An OpenAI-compatible chat endpoint behind the Engine's Backend interface."""

    def __init__(self, cfg: ModelConfig, remote: RemoteConfig) -> None:
        self.cfg = cfg
        self.remote = remote
        url = urllib.parse.urlsplit(remote.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise AgentError(ErrorCode.REMOTE_ERROR, f"remote.url must be http(s)://host[:port], got {remote.url!r}")
        self._url = url
        self.projector_used = 0.0
        self.held = 0.0  # a remote turn keeps nothing between calls
        self.vision, self.audio = remote.vision, remote.audio

    @property
    def name(self) -> str:
        return self.remote.model or f"remote {self._url.netloc}"

    @property
    def projector_loaded(self) -> bool:
        return False

    def release_projector(self, why: str = "") -> bool:
        return False

    def release_held(self) -> None:
        """Nothing is kept for a remote turn."""

    def prepare(self, request: Request, turns: list[Turn]) -> None:
        """The server keeps its own cache: nothing to prepare here."""

    def close(self) -> None:
        pass

    def fits(self, turns: list[Turn], system: str | None, budget: int) -> bool:
        chars = len(system if system is not None else self.cfg.system_prompt) + sum(len(t.text) for t in turns)
        return chars // CHARS_PER_TOKEN + budget <= self.cfg.n_ctx

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname or "", self._url.port, timeout=self.remote.timeout)

    def check(self) -> str | None:
        """GET /v1/models: None when the server answers, else why not."""
        conn = self._connection()
        try:
            conn.request("GET", self._url.path.rstrip("/") + "/v1/models", headers=self._headers())
            reply = conn.getresponse()
            reply.read()
            return None if reply.status == 200 else f"{self.remote.url} answered HTTP {reply.status}"
        except OSError as exc:
            return f"cannot reach {self.remote.url}: {exc}"
        finally:
            conn.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.remote.api_key:
            headers["Authorization"] = f"Bearer {self.remote.api_key}"
        return headers

    def messages(self, request: Request, turns: list[Turn]) -> list[dict[str, Any]]:
        system = request.system if request.system is not None else self.cfg.system_prompt
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for turn in turns:
            role = "assistant" if turn.role == "model" else "user"
            if not turn.media:
                out.append({"role": role, "content": turn.text})
                continue
            parts: list[dict[str, Any]] = [_media_part(m) for m in turn.media]
            if turn.text:
                parts.append({"type": "text", "text": turn.text})
            out.append({"role": role, "content": parts})
        return out

    def generate(self, request: Request, turns: list[Turn] | None = None,
                 on_delta: Callable[[str, int], None] | None = None,
                 cancel: Flag | None = None) -> Result:
        cfg = self.cfg
        for media in request.media:
            if (media.kind == "image" and not self.vision) or (media.kind == "audio" and not self.audio):
                raise AgentError(ErrorCode.NO_PROJECTOR, f"the remote model takes no {media.kind} (remote.{media.kind} "
                                  "is false)")
        if request.media:
            self.projector_used = time.monotonic()
        body = {
            "model": self.remote.model or "default", "stream": True,
            "messages": self.messages(request, list(turns or [Turn("user", request.text, tuple(request.media))])),
            "max_tokens": request.max_tokens or cfg.max_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "min_p": cfg.min_p, "repeat_penalty": cfg.repeat_penalty,
            "stream_options": {"include_usage": True},
        }
        if cfg.seed >= 0:
            body["seed"] = cfg.seed
        started = time.monotonic()
        deadline = started + cfg.deadline
        conn = self._connection()
        pieces: list[str] = []
        first_at, stop = 0.0, StopReason.END
        usage: dict[str, Any] = {}
        try:
            conn.request("POST", self._url.path.rstrip("/") + "/v1/chat/completions", json.dumps(body).encode(),
                         self._headers())
            reply = conn.getresponse()
            if reply.status != 200:
                detail = reply.read(500).decode("utf-8", "replace")
                raise AgentError(ErrorCode.REMOTE_ERROR, f"{self.remote.url} answered HTTP {reply.status}: {detail}")
            for event in _events(reply):
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        first_at = first_at or time.monotonic()
                        pieces.append(text)
                        if on_delta is not None:
                            on_delta(text, len(pieces) - 1)
                    if choice.get("finish_reason") == "length":
                        stop = StopReason.MAX_TOKENS
                if halted := must_stop(cancel, deadline):
                    stop = halted
                    break
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise AgentError(ErrorCode.REMOTE_ERROR, f"{self.remote.url}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()  # also how a cancelled or overdue turn stops the server's generation
        ended = time.monotonic()
        first_at = first_at or ended
        completion = int(usage.get("completion_tokens", len(pieces)))
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        return Result(
            id=request.id, text="".join(pieces), source=request.source, stop=stop, prompt_tokens=prompt_tokens,
            cached_tokens=0, completion_tokens=completion, ttft_ms=(first_at - started) * 1000,
            latency_ms=(ended - started) * 1000, prefill_tps=prompt_tokens / max(first_at - started, 1e-6),
            decode_tps=(completion - 1) / (ended - first_at) if completion > 1 and ended > first_at else 0.0,
            transcript=request.transcript,
        )


def _events(reply: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """Server-sent events: `data: {json}` lines until `data: [DONE]`."""
    for raw in reply:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def png_data_url(pixels: np.ndarray) -> str:
    """An RGB frame as a `data:image/png;base64,...` URL (what OpenAI-style chat APIs take)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _media_part(media: Media) -> dict[str, Any]:
    if media.kind == "image":
        return {"type": "image_url", "image_url": {"url": png_data_url(media.data)}}
    buffer = io.BytesIO()
    pcm = media.data if media.data.dtype == np.int16 else (np.clip(media.data, -1, 1) * 32767).astype(np.int16)
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm.tobytes())
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(),
                                                   "format": "wav"}}
