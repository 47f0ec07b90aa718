"""`gemma-agent run`: the daemon, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from agent.config import Config


def add(sub: Any) -> None:
    sub.add_parser("run", help="run the daemon (MQTT in, model, MQTT out) until SIGTERM/SIGINT")


def main(cfg: Config, _args: argparse.Namespace) -> int:
    from agent import app

    stopping = threading.Event()
    app.install_signal_handlers(stopping)
    return app.run(cfg, stopping)
