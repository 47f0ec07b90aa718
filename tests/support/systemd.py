"""Reading a systemd unit file as systemd does (enough of it for the tests)."""

from __future__ import annotations


def unit_settings(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> every value it is given (keys such as DeviceAllow= repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out
