"""A memory cgroup made for a test or a benchmark (root): v2 if the memory controller is available there, else
v1; its limit, usage, peak and OOM kills."""

from __future__ import annotations

import time
from pathlib import Path

from agent.memory import probe


class Cgroup:
    """A memory cgroup with a limit: v2 if the memory controller is available there, else v1."""

    def __init__(self, name: str, limit: int) -> None:
        v2, v1 = probe._mounts("/proc/self/mountinfo")
        if v2 is not None and "memory" in _read(v2 / "cgroup.controllers").split():
            self.version, self.path = 2, v2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        elif v1 is not None:
            self.version, self.path = 1, v1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        else:
            raise SystemExit("no memory cgroup (v2 memory controller or v1 memory hierarchy) is mounted")
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        elif (self.path / "memory.peak").exists():
            with open(self.path / "memory.peak", "w") as f:  # kernel >= 6.12: a write resets the peak for us
                f.write("r")
        self.oom_before = self.oom_kills()

    def join_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def usage(self) -> int:
        return int(_read(self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")) or 0)

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = _read(self.path / name)
        return int(text) if text.strip().isdigit() else None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in _read(self.path / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
