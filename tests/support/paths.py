"""Where the tests find the checkout and their cache, and how they run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.contract import observe, observe_command

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("GEMMA_AGENT_TEST_CACHE", Path.home() / ".cache" / "gemma-agent" / "test"))


GEMMA_AGENT = Path(sys.executable).with_name("gemma-agent")  # the console script pip installed


def agent_cmd(*args: str) -> list[str]:
    """The command line a user runs: the installed `gemma-agent` script (README's `.venv/bin/gemma-agent`)."""
    assert GEMMA_AGENT.exists(), f"{GEMMA_AGENT} is missing: install the project into the venv (pip install -e .)"
    return [str(GEMMA_AGENT), *args]


def run_agent(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the installed `gemma-agent` to its end (subprocess.run's keywords; output captured as text), noting the
    config keys it was given and its exit code for the coverage check."""
    observe_command(args)
    proc = subprocess.run(agent_cmd(*args), capture_output=True, text=True, **kwargs)
    observe("exit", proc.returncode)
    return proc
