"""`gemma-agent check`: validate the config, the model file and its memory plan, and the broker; print what
`run` would load."""

from __future__ import annotations

import argparse
from typing import Any

from agent.config import Config
from agent.contract.exitcodes import ExitCode


def add(sub: Any) -> None:
    sub.add_parser("check", help="validate config, model file and broker; print what would be loaded")


def main(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.contract.topics import Topics
    from agent.mqtt.client import probe_broker

    topics = Topics(cfg.mqtt.prefix, cfg.device_id)
    print(f"config      {cfg.source}: ok")
    print(f"device      {cfg.device_id}; topics {topics.base}/#")
    if cfg.model.backend == "remote":
        from agent.llm.remote import RemoteModel

        unreachable = RemoteModel(cfg.model, cfg.remote).check()
        print(f"model       remote {cfg.remote.url}: " + (f"PROBLEM: {unreachable}" if unreachable else "reachable"))
        code = ExitCode.FAILURE if unreachable else ExitCode.OK
    else:
        code = check_model_file(cfg)
    problem = probe_broker(cfg.mqtt, f"gemma-agent-{cfg.device_id}")
    print(f"broker      mqtt{'s' if cfg.mqtt.tls.enabled else ''}://{cfg.mqtt.host}:{cfg.mqtt.port}: "
          + (f"PROBLEM: {problem}" if problem else "reachable"))
    if problem and code == ExitCode.OK:
        code = ExitCode.FAILURE
    return code


def check_model_file(cfg: Config) -> ExitCode:
    """Print what `check` finds about the model file and its memory plan; the exit code it implies."""
    from agent.gguf import ModelFileError, describe, verify
    from agent.memory.plan import plan

    code = ExitCode.OK
    try:
        info = verify(cfg.model.path, cfg.model.sha256)
        print("\n".join(describe(info)))
        print(f"would load  n_ctx {cfg.model.n_ctx}, n_batch {cfg.model.n_batch}, n_ubatch {cfg.model.n_ubatch}, "
              f"threads {cfg.model.n_threads or 'all'}, mmap on" + (", sha256 pinned" if cfg.model.sha256 else ""))
        chosen = plan(info, cfg.model, cfg.memory, projector=verify(cfg.model.mmproj) if cfg.model.mmproj else None)
        print("\n".join(chosen.lines()))
        if chosen.chosen is None:
            code = ExitCode.EX_DATAERR  # the daemon would refuse to load it (ModelLoadError)
    except ModelFileError as exc:
        print(f"model       PROBLEM: {exc}")
        code = ExitCode.EX_NOINPUT if exc.missing else ExitCode.EX_DATAERR
    return code
