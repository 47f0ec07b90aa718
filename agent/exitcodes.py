"""Exit codes of `gemma-agent` (sysexits.h values, so systemd and shells read them the usual way).

The systemd unit lists the permanent ones in RestartPreventExitStatus=: restarting cannot fix a bad config or a
bad model file, so the unit stops instead of crash-looping.
"""

OK = 0  # clean stop (SIGTERM/SIGINT), or the command succeeded
FAILURE = 1  # `check` found a problem that is not one of the below (e.g. the broker is unreachable)
EX_USAGE = 64  # `models`: unknown model name or bad option
EX_DATAERR = 65  # the model file is not a usable GGUF (bad header, truncated, checksum mismatch, load failed)
EX_NOINPUT = 66  # the model file does not exist or cannot be read
EX_UNAVAILABLE = 69  # a service the command needs is unavailable (demo: no broker could be started)
EX_SOFTWARE = 70  # an internal error (a bug): the traceback is in the log
EX_CANTCREAT = 73  # `run`: the outbox (state directory) cannot be created; `models`: no disk space or not writable
EX_CONFIG = 78  # the configuration is invalid: the message names the key and the line
