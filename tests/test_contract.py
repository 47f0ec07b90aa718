"""The MQTT contract in agent/contract is the one README.md documents and Home Assistant is told about: the topic
table, payload keys, error codes, event types, stop reasons, sources and exit codes cannot drift apart."""

from __future__ import annotations

import re

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
