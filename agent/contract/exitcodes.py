"""Exit codes of `gemma-agent` (sysexits.h values, so systemd and shells read them the usual way).

The systemd unit lists the permanent ones in RestartPreventExitStatus=: restarting cannot fix a bad config or a
bad model file, so the unit stops instead of crash-looping. MEANINGS is README's "Exit codes" table, word for word
(tests/test_contract.py compares them).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # argparse: unknown subcommand or option
    EX_USAGE = 64
    EX_DATAERR = 65
    EX_NOINPUT = 66
    EX_UNAVAILABLE = 69
    EX_SOFTWARE = 70
    EX_CANTCREAT = 73
    EX_CONFIG = 78
    INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "clean stop (SIGTERM / SIGINT: the running turn is cancelled and answered, `offline` is "
                 "published), or the command succeeded",
    ExitCode.FAILURE: "`check` found a problem (e.g. broker unreachable); `ask` failed; the demo got no answer",
    ExitCode.USAGE: "unknown command or option (the usage line is printed)",
    ExitCode.EX_USAGE: "`models`: unknown model name or bad option",
    ExitCode.EX_DATAERR: "the model file or projector is not usable (bad header, truncated, sha256 mismatch, "
                         "llama.cpp refused it, it does not fit the memory budget)",
    ExitCode.EX_NOINPUT: "the model file does not exist or cannot be read",
    ExitCode.EX_UNAVAILABLE: "the demo could not start a broker; `models pull`: no mirror could deliver the file",
    ExitCode.EX_SOFTWARE: "internal error (a bug; the traceback is in the log)",
    ExitCode.EX_CANTCREAT: "`run`: the outbox cannot be created (`outbox.path`, the state directory); `models`: "
                           "not enough disk space, or the models directory is not writable",
    ExitCode.EX_CONFIG: "invalid configuration (the message names the key and the line), or a port the "
                        "configuration names is in use (`health.prometheus_port`)",
    ExitCode.INTERRUPTED: "`models pull` interrupted (Ctrl-C): the partial download resumes on the next pull",
}
