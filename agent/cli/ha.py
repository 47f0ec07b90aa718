"""`gemma-agent ha remove`: delete this device's retained messages from the broker: the Home Assistant discovery
(which removes the device from Home Assistant), availability, health and the snapshot."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from agent.config import Config
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent")


def add(sub: Any) -> None:
    p = sub.add_parser("ha", help="Home Assistant: remove this device (its retained discovery, availability, "
                       "health, snapshot) from the broker")
    p.add_argument("action", choices=["remove"])


def main(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.contract.topics import TOPICS, Topics
    from agent.mqtt.client import remove_retained
    from agent.mqtt.discovery import discovery_topic

    topics = Topics(cfg.mqtt.prefix, cfg.device_id)
    retained = (discovery_topic(cfg), *(topics.full(name) for name, spec in TOPICS.items() if spec.retain))
    problem = remove_retained(cfg.mqtt, f"gemma-agent-{cfg.device_id}", retained)
    if problem:
        log.error("%s", problem)
        return ExitCode.FAILURE
    print("removed retained: " + ", ".join(retained))
    return ExitCode.OK
