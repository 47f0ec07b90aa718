"""Inbound payload parsing: what is accepted, and that every rejection names the field and keeps the id."""

from __future__ import annotations

import pytest

from agent.contract.codes import AgentError
from agent.contract.inbound import Ask, Describe, clean_text, parse_ask, parse_describe, parse_listen

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


@pytest.mark.parametrize(("payload", "detail", "request_id"), [
    (b'{"id": "a", "text": ', "invalid JSON at line 1, column 21: Expecting value", None),
    (b'["text"]', "expected a JSON object, got list", None),
    (b'{"id": "a"}', "field 'text' is required", "a"),
    (b'{"id": "a", "text": 5}', "field 'text' must be a string, got int", "a"),
    (b'{"id": "a", "text": " \\u0007 "}', "field 'text' is empty", "a"),
    (b'{"id": true, "text": "hi"}', "field 'id' must be a string, got bool", None),
    (b'{"id": "' + b"x" * 65 + b'", "text": "hi"}', "field 'id' must be 1-64 printable ASCII characters without spaces",
     None),
    (b'{"id": "a", "text": "hi", "image": "yesterday"}', "field 'image' must be \"latest\" or \"none\"", "a"),
    (b'{"id": "a", "text": "hi", "sender": "two words"}',
     "field 'sender' must be 1-64 printable ASCII characters without spaces", "a"),
    (b'{"id": "a", "text": "hi", "sender": 7}',
     "field 'sender' must be 1-64 printable ASCII characters without spaces", "a"),
    (b'{"id": "a", "text": "hi", "system": ""}', "field 'system' is empty", "a"),
    (b"ok \xc3\x28", "payload is not UTF-8 (byte 3)", None),
    (b"[" * 50_000, "JSON rejected: RecursionError", None),
])
def test_each_rejection_says_what_was_wrong(payload: bytes, detail: str, request_id: str | None) -> None:
    err = rejected(payload)
    assert (err.detail, err.request_id) == (detail, request_id)


def test_the_optional_fields_of_an_ask() -> None:
    ask = parse_ask(b'{"id": "q", "text": " hi ", "image": "none", "sender": "kitchen-panel", "system": " Be terse. "}',
                    LIMIT)
    assert ask == Ask(text="hi", id="q", image="none", sender="kitchen-panel", system="Be terse.")
    assert parse_ask(b'{"text": "hi"}', LIMIT) == Ask(text="hi")
    assert parse_ask(b"x" * LIMIT, LIMIT).text == "x" * LIMIT  # the limit itself is allowed
    assert parse_ask(b'  {"text": "json after spaces"}', LIMIT).text == "json after spaces"
    assert parse_ask(b"not { json", LIMIT).text == "not { json"
    assert parse_ask(b'{"id": "' + b"i" * 64 + b'", "text": "hi"}', LIMIT).id == "i" * 64


def test_describe_payloads() -> None:
    assert parse_describe(b"", LIMIT) == Describe()  # Home Assistant's button
    assert parse_describe(b"  \x00 ", LIMIT) == Describe()
    assert parse_describe(b" Who is there? ", LIMIT) == Describe(prompt="Who is there?")
    assert parse_describe(b'{"id": "d", "prompt": " Look. ", "sender": "ha"}', LIMIT) == \
        Describe(id="d", prompt="Look.", sender="ha")
    assert parse_describe(b'{"id": 5}', LIMIT) == Describe(id="5")
    with pytest.raises(AgentError) as caught:
        parse_describe(b'{"id": "d", "prompt": 3}', LIMIT)
    assert (caught.value.code, caught.value.request_id) == ("invalid_field", "d")
    with pytest.raises(AgentError) as caught:
        parse_describe(b"x" * (LIMIT + 1), LIMIT)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize(("payload", "seconds"), [(b"", 10.0), (b"  ", 10.0), (b"30", 30.0), (b" 2.5 ", 2.5),
                                                  (b'{"seconds": 60}', 60.0), (b"{}", 10.0), (b"1", 1.0),
                                                  (b"3600", 3600.0)])
def test_listen_payloads(payload: bytes, seconds: float) -> None:
    assert parse_listen(payload, LIMIT, 10.0) == seconds


@pytest.mark.parametrize("payload", [b"soon", b"0.5", b"3601", b'{"seconds": true}', b'{"seconds": "9"}',
                                     b'{"seconds": 0}'])
def test_listen_refusals(payload: bytes) -> None:
    with pytest.raises(AgentError) as caught:
        parse_listen(payload, LIMIT, 10.0)
    assert caught.value.code == "invalid_field" and caught.value.request_id is None
    assert caught.value.detail in ("field 'seconds' must be a number from 1 to 3600",
                                   'a listen payload is empty, a number of seconds, or {"seconds": N}')
