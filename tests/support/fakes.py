"""Stand-ins for files of the kernel's, written into a test's temporary directory."""

from __future__ import annotations

from pathlib import Path


def fake_proc(tmp: Path, cgroup: str, mounts: list[tuple[str, str, str]]) -> Path:
    """A /proc/self stand-in: its cgroup file and a mountinfo naming (mount point, fs type, options)."""
    proc = tmp / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 23 0:{28 + i} / {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (point, fstype, opts) in enumerate(mounts)]
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    return proc
