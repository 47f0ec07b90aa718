"""`gemma-agent ha remove`: delete this device's Home Assistant discovery (retained) from the broker."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from agent.config import Config
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent")


def add(sub: Any) -> None:
    p = sub.add_parser("ha", help="Home Assistant: remove this device's discovery (retained) from the broker")
    p.add_argument("action", choices=["remove"])


def main(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.mqtt.client import remove_retained
    from agent.mqtt.discovery import discovery_topic

    problem = remove_retained(cfg.mqtt, f"gemma-agent-{cfg.device_id}", discovery_topic(cfg))
    if problem:
        log.error("%s", problem)
        return ExitCode.FAILURE
    print(f"removed Home Assistant discovery: {discovery_topic(cfg)}")
    return ExitCode.OK
