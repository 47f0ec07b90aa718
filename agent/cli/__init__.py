"""gemma-agent: run | ask | check | demo | ha | models. Exit codes: agent/contract/exitcodes.py (README's table).

One module per subcommand; each has `add(subparsers)` and `main(cfg, args) -> exit code`. `models` needs no agent
config (it works before one exists).
"""

from __future__ import annotations

import argparse
import logging
import sys

from agent import config as config_mod
from agent import package_version
from agent.cli import ask, check, demo, ha, models, run
from agent.config import Config, ConfigError
from agent.contract.exitcodes import ExitCode
from agent.ops import logs

log = logging.getLogger("agent")
SUBCOMMANDS = {"run": run, "ask": ask, "check": check, "demo": demo, "ha": ha}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-agent", description=__doc__.split("\n")[0] if __doc__ else "")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        module.add(sub)
    models.add(sub)
    for name, subparser in sub.choices.items():  # `gemma-agent run --config X` works as well as `--config X run`
        add_global_options(subparser, after=True, log_level_only=name == "models")
    return p


def add_global_options(p: argparse.ArgumentParser, after: bool = False, log_level_only: bool = False) -> None:
    """--config, --set and --log-level; `after`: on a subcommand, kept apart and merged by `parse` (given on
    both sides, --set accumulates and the later --config / --log-level wins)."""
    tail, default = ("_after", argparse.SUPPRESS) if after else ("", None)
    if not log_level_only:
        p.add_argument("--config", dest=f"config{tail}", default=default, metavar="PATH",
                       help="config file (default: $GEMMA_AGENT_CONFIG, /etc/gemma-agent/agent.yaml, "
                            "./config/agent.yaml, else built-in defaults)")
        p.add_argument("--set", dest=f"overrides{tail}", action="append", default=default if after else [],
                       metavar="KEY=VALUE", help="override a config key, e.g. --set model.n_ctx=4096 (repeatable)")
    p.add_argument("--log-level", dest=f"log_level{tail}", default=default,
                   choices=["debug", "info", "warning", "error"], help="override log.level")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line, global options merged from both sides of the subcommand."""
    args = parser().parse_args(argv)
    args.config = getattr(args, "config_after", None) or args.config
    args.overrides = [*args.overrides, *getattr(args, "overrides_after", [])]
    args.log_level = getattr(args, "log_level_after", None) or args.log_level
    return args


def load_config(args: argparse.Namespace) -> Config:
    path = args.config if args.config else config_mod.default_path()
    cfg = config_mod.load(path, args.overrides)
    if args.log_level:
        cfg.log.level = args.log_level
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "models":  # needs no agent config: works before one exists
        logs.setup(args.log_level or "info")
        return int(models.main(args))
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"gemma-agent: config error: {exc}", file=sys.stderr)
        return ExitCode.EX_CONFIG
    logs.setup(cfg.log.level)
    try:
        return int(SUBCOMMANDS[args.command].main(cfg, args))
    except KeyboardInterrupt:
        return ExitCode.OK
    except ConfigError as exc:  # found while running: a certificate file `ha remove` or `ask` cannot use
        log.error("config error: %s", exc)
        return ExitCode.EX_CONFIG
    except Exception:
        log.exception("internal error (a bug: please report it with this log)")
        return ExitCode.EX_SOFTWARE
