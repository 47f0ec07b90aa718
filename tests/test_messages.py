"""Inbound payload parsing: what is accepted, and that every rejection names the field and keeps the id."""

from __future__ import annotations

import pytest

from agent.contract.codes import AgentError
from agent.contract.inbound import Ask, clean_text, parse_ask

pytestmark = pytest.mark.fast

LIMIT = 65536


def rejected(payload: bytes) -> AgentError:
    with pytest.raises(AgentError) as err:
        parse_ask(payload, LIMIT)
    return err.value


def test_plain_text() -> None:
    assert parse_ask(b"  What time is it?\n", LIMIT) == Ask(text="What time is it?")


def test_json_with_id_and_image() -> None:
    ask = parse_ask(b'{"id": "r-1", "text": "hi", "image": "latest", "extra": [1, 2]}', LIMIT)
    assert ask == Ask(text="hi", id="r-1", image="latest")


def test_numeric_id_becomes_string() -> None:
    assert parse_ask(b'{"id": 42, "text": "hi"}', LIMIT).id == "42"


@pytest.mark.parametrize(
    ("payload", "code", "request_id"),
    [
        (b'{"id": "a", "text": ', "invalid_json", None),
        (b'["text"]', "invalid_json", None),
        (b'{"id": "a"}', "missing_field", "a"),
        (b'{"id": "a", "text": 5}', "invalid_field", "a"),
        (b'{"id": "a", "text": "   "}', "empty_text", "a"),
        (b"   ", "empty_text", None),
        (b'{"id": {"x": 1}, "text": "hi"}', "invalid_field", None),
        (b'{"id": "has space", "text": "hi"}', "invalid_field", None),
        (b'{"id": "a", "text": "hi", "image": "yesterday"}', "invalid_field", "a"),
        (b"\xff\xfe bad", "invalid_utf8", None),
        (b"[" * 50_000, "invalid_json", None),
        (b'{"id": "a", "text": "hi", "n": ' + b"9" * 5000 + b"}", "invalid_json", None),
    ],
)
def test_rejections(payload: bytes, code: str, request_id: str | None) -> None:
    err = rejected(payload)
    assert (err.code, err.request_id) == (code, request_id)
    assert err.detail


def test_size_limit_is_checked_before_parsing() -> None:
    err = rejected(b'{"id": "big", "text": "' + b"x" * LIMIT + b'"}')
    assert err.code == "too_large" and str(LIMIT) in err.detail


def test_control_characters_are_stripped() -> None:
    assert clean_text("\x1b[31mred\x1b[0m\tok\nnext\x00") == "[31mred[0m\tok\nnext"
