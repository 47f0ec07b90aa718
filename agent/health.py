"""Health: a snapshot of every stage and of memory, published retained on <prefix>/<id>/health every
health.interval seconds, and optionally served as Prometheus text on a local HTTP port."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("agent.health")

Snapshot = Callable[[], dict[str, Any]]


def process_memory(status_path: str = "/proc/self/status") -> dict[str, int]:
    """This process's resident memory in bytes: rss, rss_anon (not reclaimable), rss_file (mapped model pages)."""
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


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> dict[str, int | None]:
    """Usage and limit of this process's memory cgroup (v2, else v1); None where there is no limit."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return {"usage": None, "limit": None}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base = Path(root) / path.lstrip("/")
            if (base / "memory.current").exists():
                return {"usage": _read_int(base / "memory.current"), "limit": _read_int(base / "memory.max")}
        if "memory" in controllers.split(","):
            base = Path(root) / "memory" / path.lstrip("/")
            limit = _read_int(base / "memory.limit_in_bytes")
            return {"usage": _read_int(base / "memory.usage_in_bytes"),
                    "limit": None if limit is None or limit >= 1 << 60 else limit}  # v1 "no limit" is huge
    return {"usage": None, "limit": None}


def prometheus_text(snapshot: Mapping[str, Any], prefix: str = "gemma_agent") -> str:
    """Every number (and boolean) in the snapshot as a gauge named by its path: gemma_agent_memory_rss ..."""
    lines: list[str] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{name}_{key}")
        elif isinstance(node, bool):
            lines.append(f"{name} {int(node)}")
        elif isinstance(node, (int, float)):
            lines.append(f"{name} {node}")

    walk(snapshot, prefix)
    return "".join(f"# TYPE {line.split()[0]} gauge\n{line}\n" for line in lines)


class MetricsServer:
    """GET /metrics -> Prometheus text of the current snapshot. Loopback by default."""

    def __init__(self, bind: str, port: int, snapshot: Snapshot) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = prometheus_text(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
