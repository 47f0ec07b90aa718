"""What this process and its memory cgroup hold and may hold: RSS by kind, the cgroup's usage and limit (v2 or
v1, hierarchical), the machine's RAM. Read by the planner (the budget) and by health (the gauges)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MiB = 1 << 20


def process_memory(status_path: str = "/proc/self/status") -> dict[str, int]:
    """This process's resident memory in bytes: rss, rss_anon (not reclaimable), rss_file (mapped model pages),
    rss_peak."""
    wanted = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "rss_peak"}
    out: dict[str, int] = {}
    try:
        for line in Path(status_path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key in wanted:
                out[wanted[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss(status: str = "/proc/self/status") -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of a process, in bytes (keys rss_anon, rss_file, rss, rss_peak)."""
    out = process_memory(status)
    return {k: out.get(k, 0) for k in ("rss_anon", "rss_file", "rss", "rss_peak")}


def python_baseline() -> int:
    """This process's anonymous memory now (what it holds before any model is loaded)."""
    return rss()["rss_anon"]


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    value = int(text)
    return None if value >= 1 << 60 else value  # v1 says "no limit" with a huge number


def _mounts(mountinfo: str) -> tuple[Path | None, Path | None]:
    """(cgroup v2 mount, cgroup v1 memory mount) from /proc/self/mountinfo."""
    v2 = v1 = None
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
        elif rest[0] == "cgroup" and "memory" in rest[2].split(",") and v1 is None:
            v1 = Path(fields[4])
    return v2, v1



def _cgroup(proc: str) -> tuple[str, Path, Path] | None:
    """("v2" or "v1", this process's memory cgroup directory, the hierarchy's mount point), or None."""
    v2, v1 = _mounts(f"{proc}/mountinfo")
    try:
        lines = Path(f"{proc}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and v2 is not None and (v2 / "cgroup.controllers").exists():
            return "v2", v2 / path.lstrip("/"), v2
        if "memory" in controllers.split(",") and v1 is not None:
            return "v1", v1 / path.lstrip("/"), v1
    return None


def cgroup_limit(proc: str = "/proc/self") -> tuple[int | None, str]:
    """The memory limit of this process's cgroup and its ancestors: (bytes or None, where it was read). v2: the
    lowest memory.max or memory.high (MemoryMax=, MemoryHigh=); v1: memory.limit_in_bytes, hierarchically."""
    if not Path(f"{proc}/cgroup").exists():
        return None, "no /proc/self/cgroup"
    found = _cgroup(proc)
    if found is None:
        return None, "no memory cgroup"
    version, node, root = found
    if version == "v2":
        best: tuple[int | None, str] = (None, "cgroup v2: no memory.max")
        while True:  # v2 limits are hierarchical: the lowest ancestor's memory.max binds
            for name in ("memory.max", "memory.high"):  # above memory.high the kernel reclaims and throttles
                limit = _read_limit(node / name)
                if limit is not None and (best[0] is None or limit < best[0]):
                    best = (limit, f"cgroup v2 {node}/{name}")
            if node == root or node.parent == node:
                break
            node = node.parent
        return best
    own = _read_limit(node / "memory.limit_in_bytes")
    hierarchical = None
    with contextlib.suppress(OSError, ValueError):
        for stat_line in (node / "memory.stat").read_text().splitlines():
            if stat_line.startswith("hierarchical_memory_limit "):
                hierarchical = _read_limit_text(stat_line.split()[1])
    limits = [x for x in (own, hierarchical) if x is not None]
    if limits:
        return min(limits), f"cgroup v1 {node}/memory.limit_in_bytes"
    return None, "cgroup v1: no limit"


def cgroup_memory(proc: str = "/proc/self") -> dict[str, int | None]:
    """Usage and limit of this process's memory cgroup, in bytes (None where unknown or unlimited)."""
    found = _cgroup(proc)
    if found is None:
        return {"usage": None, "limit": None}
    version, node, _ = found
    usage = _read_limit(node / ("memory.current" if version == "v2" else "memory.usage_in_bytes"))
    return {"usage": usage, "limit": cgroup_limit(proc)[0]}


def _read_limit_text(text: str) -> int | None:
    value = int(text)
    return None if value >= 1 << 60 else value


def mem_total(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def file_rss(path: str | os.PathLike[str], smaps: str = "/proc/self/smaps") -> int:
    """Bytes of `path` resident and mapped in this process (the file's share of RssFile)."""
    st = os.stat(path)
    total, inside = 0, False
    for line in Path(smaps).read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
            major, minor = (int(x, 16) for x in head[3].split(":"))
            inside = head[4].isdigit() and int(head[4]) == st.st_ino and os.makedev(major, minor) == st.st_dev
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
