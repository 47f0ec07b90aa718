"""Inbound MQTT payloads: bytes from anyone on the network become a typed command, or a clear AgentError.

Accepted on `ask`: plain UTF-8 text, or a JSON object {"id": str, "text": str, "image": "latest"|"none"}.
Unknown JSON fields are ignored (senders may add their own bookkeeping); every other problem names the field.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from agent.contract.codes import AgentError, ErrorCode

ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces: safe to echo in topics and logs


@dataclass(frozen=True)
class Ask:
    text: str
    id: str | None = None
    image: str | None = None
    sender: str = "anonymous"
    system: str | None = None


def clean_text(text: str) -> str:
    """Strip control characters (keeping newlines and tabs) and surrounding whitespace."""
    kept = (c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    return "".join(kept).strip()


def parse_ask(payload: bytes, max_payload: int) -> Ask:
    """Parse an `ask` payload (plain text or JSON), enforcing the size limit before anything else."""
    obj = _decode(payload, max_payload)
    if isinstance(obj, str):
        return Ask(text=_text(obj, "text", None))
    request_id = _id(obj)
    text = obj.get("text")
    if text is None:
        raise AgentError(ErrorCode.MISSING_FIELD, "field 'text' is required", request_id)
    image = obj.get("image")
    if image is not None and image not in ("latest", "none"):
        raise AgentError(ErrorCode.INVALID_FIELD, "field 'image' must be \"latest\" or \"none\"", request_id)
    system = obj.get("system")
    return Ask(text=_text(text, "text", request_id), id=request_id, image=image, sender=_sender(obj, request_id),
               system=None if system is None else _text(system, "system", request_id))


def _sender(obj: dict[str, Any], request_id: str | None) -> str:
    value = obj.get("sender", "anonymous")
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise AgentError(ErrorCode.INVALID_FIELD, "field 'sender' must be 1-64 printable ASCII characters without "
                         "spaces", request_id)
    return value


def _decode(payload: bytes, max_payload: int) -> str | dict[str, Any]:
    if len(payload) > max_payload:
        raise AgentError(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes; the limit (mqtt.max_payload) is "
                           f"{max_payload}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AgentError(ErrorCode.INVALID_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AgentError(ErrorCode.INVALID_JSON, f"invalid JSON at line {exc.lineno}, column {exc.colno}: "
                           f"{exc.msg}") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting, integers beyond Python's digit limit
        raise AgentError(ErrorCode.INVALID_JSON, f"JSON rejected: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise AgentError(ErrorCode.INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _id(obj: dict[str, Any]) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AgentError(ErrorCode.INVALID_FIELD, f"field 'id' must be a string, got {type(value).__name__}")
    value = str(value)
    if not ID_PATTERN.match(value):
        raise AgentError(ErrorCode.INVALID_FIELD, "field 'id' must be 1-64 printable ASCII characters without spaces")
    return value


def _text(value: Any, name: str, request_id: str | None) -> str:
    if not isinstance(value, str):
        raise AgentError(ErrorCode.INVALID_FIELD, f"field '{name}' must be a string, got {type(value).__name__}",
                           request_id)
    text = clean_text(value)
    if not text:
        raise AgentError(ErrorCode.EMPTY_TEXT, f"field '{name}' is empty", request_id)
    return text


@dataclass(frozen=True)
class Describe:
    id: str | None = None
    prompt: str | None = None
    sender: str = "anonymous"


def parse_describe(payload: bytes, max_payload: int) -> Describe:
    """A `describe` payload: empty (Home Assistant's button), plain text (a custom prompt) or JSON
    {"id": ..., "prompt": ...}."""
    obj = _decode(payload, max_payload)
    if isinstance(obj, str):
        text = clean_text(obj)
        return Describe(prompt=text or None)
    request_id = _id(obj)
    prompt = obj.get("prompt")
    return Describe(id=request_id, prompt=None if prompt is None else _text(prompt, "prompt", request_id),
                    sender=_sender(obj, request_id))


def parse_listen(payload: bytes, max_payload: int, default: float) -> float:
    """A `listen` payload: empty (listen.window seconds), a number, or JSON {"seconds": N}; 1-3600 s."""
    obj = _decode(payload, max_payload)
    value: Any = default
    if isinstance(obj, dict):
        value = obj.get("seconds", default)
    elif obj.strip():
        try:
            value = float(obj)
        except ValueError:
            raise AgentError(ErrorCode.INVALID_FIELD, "a listen payload is empty, a number of seconds, or "
                               '{"seconds": N}') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 3600:
        raise AgentError(ErrorCode.INVALID_FIELD, "field 'seconds' must be a number from 1 to 3600")
    return float(value)
