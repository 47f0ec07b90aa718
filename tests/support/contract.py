"""The contract, checked on the wire: every message a test client receives on a device topic is held to
agent/contract (QoS, retain flag, JSON keys, enumerated values), and what the tests saw of each enumeration (error
codes, event types, stop reasons, sources, exit codes, config keys set) is recorded for the coverage check that
ends a full run (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import typing
from collections import defaultdict
from enum import Enum
from typing import Any

from agent import config as config_module
from agent.contract.codes import ErrorCode, EventType, Source, StopReason
from agent.contract.topics import COMMANDS, TOPICS, Direction

OBSERVED: dict[str, set[str]] = defaultdict(set)  # kind -> values seen in this test session
ENUMS: dict[str, type[Enum]] = {"error": ErrorCode, "event_type": EventType, "stop": StopReason, "source": Source}
_FIELDS = {"response": ("source", "stop"), "error": ("error", "source"), "event": ("event_type", "error", "source")}


def observe(kind: str, value: object) -> None:
    OBSERVED[kind].add(str(value))


def observe_command(args: list[str] | tuple[str, ...]) -> None:
    """Note the config keys a command line sets: each `--set` key, and what its `--config` file changes."""
    for flag, value in itertools.pairwise(args):
        if flag == "--set" and "=" in value:
            observe("config", value.split("=", 1)[0].strip())
        if flag == "--config":  # loading it builds its sections, which note what it sets (record_config_sections)
            with contextlib.suppress(Exception):  # a broken file on purpose: what the CLI says is that test's job
                config_module.load(value, environ={})


def record_config_sections() -> None:
    """Make each config section's dataclass note the keys it is built with away from their defaults: by a config
    file or `--set` loaded here, or by a test building a section directly (`VadConfig(hangover_ms=300)`)."""
    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            sub = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(sub):
                walk(typing.cast(type, sub), f"{prefix}{f.name}.")
        if prefix:
            cls.__init__ = _recording(cls.__init__, prefix, cls)  # type: ignore[misc]

    walk(config_module.Config, "")


def _recording(init: Any, prefix: str, cls: type) -> Any:
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in dataclasses.fields(cls)  # lists such as wake_phrases
                 if f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(hints[f.name])}

    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name, default in defaults.items():
            if getattr(self, name) != default:
                observe("config", prefix + name)

    return recorded


def documented_config_keys(tree: dict[str, Any] | None = None, prefix: str = "") -> set[str]:
    """Every config key (each is documented in config/agent.yaml; tests/test_config.py holds them equal)."""
    tree = dataclasses.asdict(config_module.Config()) if tree is None else tree
    keys: set[str] = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            keys |= documented_config_keys(value, f"{prefix}{name}.")
        elif name != "source":
            keys.add(prefix + name)
    return keys


def topic_name(topic: str) -> str | None:
    """The contract's name of a device topic "<prefix>/<device id>/<name>", else None."""
    parts = topic.split("/")
    name = "/".join(parts[2:])
    return name if len(parts) >= 3 and name in TOPICS else None


def violations(topic: str, payload: bytes, qos: int, retain: bool) -> list[str]:
    """What is wrong with a message the agent published on `topic` (received by a client subscribed at QoS 1 with
    retain-as-published), by the contract; [] for other topics and for what tests themselves send."""
    name = topic_name(topic)
    if name is None or TOPICS[name].direction is Direction.IN:
        return []
    spec = TOPICS[name]
    problems = []
    if qos != spec.qos and not (payload == b"" and spec.retain and qos == 1):  # `ha remove`: deletions at QoS 1
        problems.append(f"QoS {qos}, the contract says {spec.qos}")
    if retain != spec.retain:
        problems.append(f"retain {retain}, the contract says {spec.retain}")
    if not payload:
        return problems + ([] if spec.retain else ["an empty payload on a topic that is not retained"])
    if not spec.json:
        return problems
    try:
        body: Any = json.loads(payload)
    except ValueError as exc:
        return [*problems, f"not JSON: {exc}"]
    if not isinstance(body, dict):
        return [*problems, f"not a JSON object: {type(body).__name__}"]
    missing = [key for key in spec.keys if key not in body]
    if missing:
        problems.append(f"missing keys {missing}")
    for field in _FIELDS.get(name, ()):
        if field in body and body[field] is not None:
            allowed = {e.value for e in ENUMS[field]}
            if field == "source" and (name == "error" or body.get("event_type") == "error"):
                allowed |= set(COMMANDS)  # a refused command: its name
            if str(body[field]) not in allowed:
                problems.append(f"{field} {body[field]!r} is not one of the contract's")
            observe(field, body[field])
    return problems


# Config keys no test sets to a value of its own yet: a debt, listed so it can only shrink. The check fails when a
# test sets one of these (take it off the list), as it fails for any other key nobody sets.
UNTESTED_CONFIG: frozenset[str] = frozenset()


def unobserved(documented_config: set[str]) -> dict[str, list[str]]:
    """Each enumeration's entries and each documented config key that no test of this session observed (config keys
    on UNTESTED_CONFIG excepted), and the keys of that list some test did set."""
    from agent.contract.exitcodes import ExitCode

    missing = {kind: sorted(e.value for e in enum if e.value not in OBSERVED[kind]) for kind, enum in ENUMS.items()}
    missing["exit code"] = sorted(str(int(c)) for c in ExitCode if str(int(c)) not in OBSERVED["exit"])
    missing["config key"] = sorted(k for k in documented_config - UNTESTED_CONFIG if not _set_by_a_test(k))
    missing["config key now tested (take it off UNTESTED_CONFIG)"] = sorted(k for k in UNTESTED_CONFIG
                                                                           if _set_by_a_test(k))
    missing["config key no longer documented (take it off UNTESTED_CONFIG)"] = sorted(UNTESTED_CONFIG -
                                                                                       documented_config)
    return {kind: values for kind, values in missing.items() if values}


def _set_by_a_test(key: str) -> bool:
    return key in OBSERVED["config"]
