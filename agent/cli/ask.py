"""`gemma-agent ask TEXT`: one question to the configured model, the answer streamed to stdout; no MQTT."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from agent.config import Config
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent")


def add(sub: Any) -> None:
    p = sub.add_parser("ask", help="ask the model once and stream the answer to stdout (no MQTT)")
    p.add_argument("text", help="the question")


def main(cfg: Config, args: argparse.Namespace) -> int:
    from agent.contract.codes import AgentError
    from agent.contract.inbound import clean_text
    from agent.gguf import ModelFileError
    from agent.llm.loader import exit_code_for, open_backend
    from agent.llm.local import ModelLoadError
    from agent.turns.types import Request

    text = clean_text(args.text)
    if not text:
        print("gemma-agent: the question is empty", file=sys.stderr)
        return ExitCode.FAILURE
    try:
        model, _support = open_backend(cfg)
    except (ModelFileError, ModelLoadError, AgentError) as exc:
        log.error("%s", exc)
        return exit_code_for(exc)
    try:
        result = model.generate(Request(text=text), on_delta=lambda delta, _i: print(delta, end="", flush=True))
    except AgentError as exc:
        log.error("%s: %s", exc.code, exc.detail)
        return ExitCode.FAILURE
    finally:
        model.close()
    print()
    log.info("stop=%s prompt=%d completion=%d ttft=%.0fms decode=%.1f tok/s", result.stop, result.prompt_tokens,
             result.completion_tokens, result.ttft_ms, result.decode_tps)
    return ExitCode.OK
