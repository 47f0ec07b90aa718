"""Where the tests find the checkout and their cache, and how they run the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("GEMMA_AGENT_TEST_CACHE", Path.home() / ".cache" / "gemma-agent" / "test"))


def agent_cmd(*args: str) -> list[str]:
    """The command line that runs the CLI from this checkout, as a user would (python -m agent)."""
    return [sys.executable, "-m", "agent", *args]
