"""The health snapshot as Prometheus text on a local HTTP port (health.prometheus_port)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("agent.ops.metrics")

Snapshot = Callable[[], dict[str, Any]]


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
    """GET /metrics -> Prometheus text of the current snapshot. Loopback by default. The socket is bound when this
    is built (a port in use fails then); requests are served from start()."""

    def __init__(self, bind: str, port: int) -> None:
        self._snapshot: Snapshot = dict
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = prometheus_text(server._snapshot()).encode()
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

    def start(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
