"""The MQTT contract in agent/contract is the one README.md documents and Home Assistant is told about: the topic
table, payload keys, error codes, event types, stop reasons, sources and exit codes cannot drift apart."""

from __future__ import annotations

import json
import re
import time

import pytest

from agent.config import Config
from agent.contract.codes import ErrorCode, EventType, Source, StopReason
from agent.contract.exitcodes import MEANINGS, ExitCode
from agent.contract.topics import TOPICS, Direction, Topics
from agent.mqtt.discovery import EVENT_TYPES, discovery_payload
from tests.support.paths import ROOT

pytestmark = pytest.mark.fast
README = (ROOT / "README.md").read_text()


def table(header: str) -> list[list[str]]:
    """The rows of the README table whose header line starts with `header`."""
    block = README.split(header, 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in block.splitlines()[2:] if line.startswith("|")]


def one_of(name: str) -> list[str]:
    """The values README lists in its "`name` is one of: ..." paragraph (config keys and notes left out)."""
    paragraph = README.split(f"`{name}` is one of:", 1)[1].split("\n\n", 1)[0]
    return [v for v in re.findall(r"`([^`]+)`", paragraph) if re.fullmatch(r"[a-z_]+", v)]


def test_readme_topic_table_is_the_contract() -> None:
    rows = {row[0].strip("`").removeprefix(".../"): row for row in table("| topic | dir | QoS |")}
    rows.pop("homeassistant/device/<id>/config")
    assert set(rows) == set(TOPICS)
    for name, (_, direction, qos, retained, payload) in rows.items():
        spec = TOPICS[name]
        assert (direction, int(qos), retained == "yes") == (spec.direction.value, spec.qos, spec.retain), name
        missing = [key for key in spec.keys if f'"{key}"' not in payload]
        assert not missing, f"README's {name} row does not name {missing}"


def test_readme_lists_every_code_and_nothing_else() -> None:
    assert [row[0].strip("`") for row in table("| error code |")] == [c.value for c in ErrorCode]
    assert one_of("event_type") == [e.value for e in EventType]
    assert one_of("stop") == [s.value for s in StopReason]
    assert one_of("source") == [s.value for s in Source]


def test_readme_exit_code_table_is_the_contract() -> None:
    rows = table("| code | meaning |")
    assert [(int(code), text) for code, text in rows] == [(int(c), t) for c, t in MEANINGS.items()]
    assert set(MEANINGS) == set(ExitCode)


def test_home_assistant_is_told_the_contract() -> None:
    """Every topic discovery names is one of the contract's, in the direction the component uses it, and the event
    entity declares exactly the event types."""
    cfg = Config()
    cfg.camera.enabled = cfg.camera.snapshot = cfg.motion.enabled = cfg.microphone.enabled = True
    topics = Topics(cfg.mqtt.prefix, "dev")
    payload = discovery_payload(cfg, topics, "0", "model")
    assert [e.value for e in EventType] == EVENT_TYPES
    assert payload["cmps"]["events"]["evt_typ"] == EVENT_TYPES
    for key in ("avty_t",):
        assert topics.name(payload[key]) == "availability"
    for component in payload["cmps"].values():
        for key, want in (("cmd_t", Direction.IN), ("stat_t", Direction.OUT), ("json_attr_t", Direction.OUT),
                          ("t", Direction.OUT)):
            if key in component:
                name = topics.name(component[key])
                assert name is not None and TOPICS[name].direction is want, (key, component[key])


def test_each_outbound_message_is_what_the_contract_says_to_the_digit() -> None:
    from agent.contract.outbound import ErrorReply, Event, Response, StreamDelta, Transcript
    from tests.support.contract import violations

    tokens = {"prompt": 40, "cached": 12, "completion": 7, "image": 0, "audio": 0}
    answer = Response("r1", "Hi.", Source.ASK, StopReason.END, tokens, 1234.56, 99.94, 3.05, 0.0, 0.0, 0.0, 81.26,
                      12.34, ts=1.5)
    assert answer.to_json() == {
        "id": "r1", "text": "Hi.", "source": "ask", "done": True, "stop": "end", "tokens": tokens,
        "latency_ms": 1234.6, "ttft_ms": 99.9, "queue_ms": 3.0, "media_ms": 0.0, "projector_load_ms": 0.0,
        "encode_ms": 0.0, "prefill_tps": 81.3, "decode_tps": 12.3, "ts": 1.5}
    spoken = Response("r2", "Yes.", Source.SPEECH, StopReason.MAX_TOKENS, tokens, 1, 1, 1, 1, 1, 1, 1, 1, "is it?")
    assert spoken.to_json()["transcript"] == "is it?" and spoken.to_json()["stop"] == "max_tokens"
    assert StreamDelta("r1", "Hi", 3).to_json() == {"id": "r1", "delta": "Hi", "index": 3}
    refusal = ErrorReply(None, ErrorCode.QUEUE_FULL, "full", "ask", ts=2.0)
    assert refusal.to_json() == {"id": None, "error": "queue_full", "detail": "full", "source": "ask", "ts": 2.0}
    heard = Transcript("t1", None, 10.12345, 11.5, 12.25, 345.67)
    assert heard.to_json() == {"id": "t1", "text": None, "start": 10.123, "end": 11.5, "duration": 1.377,
                               "emitted": 12.25, "stt_ms": 345.7}
    event = Event(EventType.WAKE, {"model": "okay_nabu"}, ts=3.0)
    assert event.to_json() == {"event_type": "wake", "model": "okay_nabu", "ts": 3.0}
    assert abs(Event(EventType.RESET).ts - time.time()) < 60  # stamped when made
    for message in (answer, spoken, StreamDelta("r1", "Hi", 3), refusal, heard, event):
        spec = TOPICS[message.topic]
        wire = json.dumps(message.to_json()).encode()
        assert violations(f"gemma_agent/dev/{message.topic}", wire, spec.qos, spec.retain) == []


def test_topics_name_every_device_topic_and_nothing_else() -> None:
    topics = Topics("p", "dev")
    assert topics.full("response/stream") == "p/dev/response/stream" == topics.stream
    assert [topics.name(f"p/dev/{n}") for n in TOPICS] == list(TOPICS)
    assert topics.name("p/other/ask") is None and topics.name("p/dev/nope") is None and topics.name("p/dev") is None
    assert topics.command("p/dev/ask") == "ask" and topics.command("p/dev/response") is None
    assert topics.inbound == ("p/dev/ask", "p/dev/describe", "p/dev/listen", "p/dev/reset")
    with pytest.raises(KeyError, match="'bogus' is not a topic of the contract"):
        topics.full("bogus")
    assert {n for n, s in TOPICS.items() if s.durable} == {"response", "transcript", "event", "error"}


def test_prefixes_and_the_configuration_url_reach_topics_and_discovery() -> None:
    from agent.config import load
    from agent.mqtt.discovery import discovery_topic

    cfg = load(None, ["mqtt.prefix=house", "device.id=porch", "homeassistant.discovery_prefix=ha",
                      "homeassistant.configuration_url=http://porch.local:9100/"], environ={})
    topics = Topics(cfg.mqtt.prefix, cfg.device_id)
    assert topics.ask == "house/porch/ask" and discovery_topic(cfg) == "ha/device/porch/config"
    payload = discovery_payload(cfg, topics, "0", "model")
    assert payload["dev"]["cu"] == "http://porch.local:9100/" and payload["avty_t"] == "house/porch/availability"
    assert "cu" not in discovery_payload(Config(), Topics("gemma_agent", "x"), "0", "model")["dev"]
