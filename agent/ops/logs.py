"""Logging: one line per event, no colour. When stderr is the journal's stream (JOURNAL_STREAM names stderr's
device and inode, as systemd.exec(5) says to check) lines carry a <priority> prefix (sd-daemon(3)) so journald
keeps the level, and no timestamp, which journald adds itself. A JOURNAL_STREAM inherited by a process whose
stderr goes elsewhere (a shell started from a service, a pipe) gets the plain format."""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stderr_is_journal(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """True when `fd` is the stream JOURNAL_STREAM ("<device>:<inode>") names."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(fd)
        return bool(device and inode) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("agent.mqtt.paho").setLevel(max(logging.WARNING, root.level))
