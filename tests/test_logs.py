"""Log lines: journald's <priority> prefix only when stderr really is the journal's stream."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.fast
CHILD = "import logging\nfrom agent.ops import logs\nlogs.setup('info')\nlogging.getLogger('agent.x').warning('hi')\n"


def run_with_stderr_pipe(journal_stream: str | None) -> str:
    """The child's stderr, a pipe; JOURNAL_STREAM names that pipe when `journal_stream` is "pipe"."""
    read, write = os.pipe()
    st = os.fstat(read)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal_stream == "pipe" else journal_stream
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stderr=write, env=env, cwd=ROOT)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    assert proc.wait(30) == 0
    return out


def test_the_journal_gets_priorities_and_no_timestamp() -> None:
    assert run_with_stderr_pipe("pipe") == "<4>agent.x: hi\n"


@pytest.mark.parametrize("inherited", [None, "1:2", "garbage"])
def test_anything_else_gets_timestamped_lines(inherited: str | None) -> None:
    line = run_with_stderr_pipe(inherited)
    assert line.endswith(" WARNING agent.x: hi\n") and not line.startswith("<")
