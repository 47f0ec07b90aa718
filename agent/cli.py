"""gemma-agent: run | ask | check | demo | ha | models. Exit codes are listed in agent/exitcodes.py."""

from __future__ import annotations

import argparse
import logging
import sys

from agent import config as config_mod
from agent import exitcodes, logs, package_version
from agent.config import Config, ConfigError

log = logging.getLogger("agent")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("--config", metavar="PATH", help="config file (default: $GEMMA_AGENT_CONFIG, "
                   "/etc/gemma-agent/agent.yaml, ./config/agent.yaml, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_ctx=4096 (repeatable)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon (MQTT in, model, MQTT out) until SIGTERM/SIGINT")
    ask = sub.add_parser("ask", help="ask the model once and stream the answer to stdout (no MQTT)")
    ask.add_argument("text", help="the question")
    sub.add_parser("check", help="validate config, model file and broker; print what would be loaded")
    demo = sub.add_parser("demo", help="self-contained demo: local broker + daemon + one question over MQTT")
    demo.add_argument("question", nargs="?", default="Write one sentence about the sea.",
                      help="the question to publish")
    ha = sub.add_parser("ha", help="Home Assistant: remove this device's discovery (retained) from the broker")
    ha.add_argument("action", choices=["remove"])
    from models.fetch import add_cli

    add_cli(sub)
    return p


def load_config(args: argparse.Namespace) -> Config:
    path = args.config if args.config else config_mod.default_path()
    cfg = config_mod.load(path, args.overrides)
    if args.log_level:
        cfg.log.level = args.log_level
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "models":  # needs no agent config: works before one exists
        from models.fetch import run_cli

        logs.setup(args.log_level or "info")
        return int(run_cli(args))
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"gemma-agent: config error: {exc}", file=sys.stderr)
        return exitcodes.EX_CONFIG
    logs.setup(cfg.log.level)
    try:
        return COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt:
        return exitcodes.OK
    except Exception:
        log.exception("internal error (a bug: please report it with this log)")
        return exitcodes.EX_SOFTWARE


def cmd_run(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.daemon import Daemon, install_signal_handlers

    daemon = Daemon(cfg)
    install_signal_handlers(daemon)
    return daemon.run()


def cmd_ask(cfg: Config, args: argparse.Namespace) -> int:
    from agent.brain import EngineError, ModelLoadError, Request
    from agent.daemon import model_exit_code, open_backend
    from agent.messages import clean_text
    from agent.modelfile import ModelFileError

    text = clean_text(args.text)
    if not text:
        print("gemma-agent: the question is empty", file=sys.stderr)
        return exitcodes.FAILURE
    try:
        model, _caps = open_backend(cfg)
    except (ModelFileError, ModelLoadError, EngineError) as exc:
        log.error("%s", exc)
        return model_exit_code(exc)
    try:
        result = model.generate(Request(text=text, source="cli"),
                                on_delta=lambda delta, _i: print(delta, end="", flush=True))
    except EngineError as exc:
        log.error("%s: %s", exc.code, exc.detail)
        return exitcodes.FAILURE
    finally:
        model.close()
    print()
    log.info("stop=%s prompt=%d completion=%d ttft=%.0fms decode=%.1f tok/s", result.stop, result.prompt_tokens,
             result.completion_tokens, result.ttft_ms, result.decode_tps)
    return exitcodes.OK


def cmd_check(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.publisher import Topics, probe_broker

    topics = Topics(cfg.mqtt.prefix, cfg.device_id)
    print(f"config      {cfg.source}: ok")
    print(f"device      {cfg.device_id}; topics {topics.base}/#")
    if cfg.model.backend == "remote":
        from agent.remote import RemoteModel

        unreachable = RemoteModel(cfg.model, cfg.remote).check()
        print(f"model       remote {cfg.remote.url}: " + (f"PROBLEM: {unreachable}" if unreachable else "reachable"))
        code = exitcodes.FAILURE if unreachable else exitcodes.OK
    else:
        code = check_model_file(cfg)
    problem = probe_broker(cfg.mqtt, f"gemma-agent-{cfg.device_id}")
    print(f"broker      mqtt{'s' if cfg.mqtt.tls.enabled else ''}://{cfg.mqtt.host}:{cfg.mqtt.port}: "
          + (f"PROBLEM: {problem}" if problem else "reachable"))
    if problem and code == exitcodes.OK:
        code = exitcodes.FAILURE
    return code


def check_model_file(cfg: Config) -> int:
    """Print what `check` finds about the model file and its memory plan; the exit code it implies."""
    from agent import memory
    from agent.modelfile import ModelFileError, describe, verify

    code = exitcodes.OK
    try:
        info = verify(cfg.model.path, cfg.model.sha256)
        print("\n".join(describe(info)))
        print(f"would load  n_ctx {cfg.model.n_ctx}, n_batch {cfg.model.n_batch}, n_ubatch {cfg.model.n_ubatch}, "
              f"threads {cfg.model.n_threads or 'all'}, mmap on" + (", sha256 pinned" if cfg.model.sha256 else ""))
        plan = memory.plan(info, cfg.model, cfg.memory,
                           projector=verify(cfg.model.mmproj) if cfg.model.mmproj else None)
        print("\n".join(plan.lines()))
        if plan.chosen is None:
            code = exitcodes.EX_DATAERR  # the daemon would refuse to load it (brain.ModelLoadError)
    except ModelFileError as exc:
        print(f"model       PROBLEM: {exc}")
        code = exitcodes.EX_NOINPUT if exc.missing else exitcodes.EX_DATAERR
    return code


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(cfg, args.question)


def cmd_ha(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.discovery import discovery_topic
    from agent.publisher import remove_retained

    problem = remove_retained(cfg.mqtt, f"gemma-agent-{cfg.device_id}", discovery_topic(cfg))
    if problem:
        log.error("%s", problem)
        return exitcodes.FAILURE
    print(f"removed Home Assistant discovery: {discovery_topic(cfg)}")
    return exitcodes.OK


COMMANDS = {"run": cmd_run, "ask": cmd_ask, "check": cmd_check, "demo": cmd_demo, "ha": cmd_ha}
