"""Run `gemma-agent run` as a real subprocess against the test broker, as systemd would."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import ClassVar

from tests.support.contract import observe, observe_command
from tests.support.mqtt import Client
from tests.support.paths import ROOT, agent_cmd


class DaemonProcess:
    running: ClassVar[list[DaemonProcess]] = []  # every started daemon, so a failed test cannot leak one (see conftest)

    def __init__(self, broker_port: int, model: Path, *overrides: str, config: Path | None = None,
                 cwd: Path = ROOT, device_id: str | None = None, cgroup: Path | None = None) -> None:
        """`cgroup`: a cgroup.procs file the daemon joins before it starts (so all it loads is charged there)."""
        self.cgroup = cgroup
        self.device_id = device_id or f"t{uuid.uuid4().hex[:8]}"
        self.state_dir = Path(tempfile.mkdtemp(prefix="gemma-agent-state-"))
        self.base = f"gemma_agent/{self.device_id}"
        self.args = [
            "--config", str(config or ROOT / "config" / "agent.yaml"),
            "--set", f"model.path={model}", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker_port}",
            "--set", f"device.id={self.device_id}", "--set", "model.temperature=0", "--set", "model.max_tokens=16",
            "--set", "mqtt.keepalive=5", "--set", "mqtt.reconnect_max=2",
            "--set", f"outbox.path={self.state_dir / 'outbox.sqlite3'}",
        ]
        for item in overrides:
            self.args += ["--set", item]
        observe_command(self.args)
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.log = ""
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, client: Client | None, wait_online: bool = True, timeout: float = 60) -> None:
        """Start the daemon; `client` (needed to wait until it is online) must already be subscribed to the
        daemon's topics."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        command = agent_cmd(*self.args, "run")
        if self.cgroup is not None:
            command = ["sh", "-c", f'echo $$ > "{self.cgroup}" && exec "$@"', "join-cgroup", *command]
        self.proc = subprocess.Popen(command, cwd=self.cwd, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        # Read the log as it comes, as journald would: an unread pipe fills after ~64 KiB and the daemon's next
        # log line then blocks whichever thread writes it (a long soak stalled that way at turn ~400).
        self._lines = []
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        DaemonProcess.running.append(self)
        if wait_online:
            assert client is not None
            client.wait_for(f"{self.base}/availability", lambda m: m.payload == b"online", timeout=timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.append(line)

    def lines(self) -> list[str]:
        """The log so far."""
        return list(self._lines)

    def wait_log(self, text: str, timeout: float = 60) -> str:
        """The first log line containing `text`, waiting for it (the daemon keeps running)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [line for line in list(self._lines) if text in line]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r} within {timeout}s; last lines: {self._lines[-5:]}")

    def wait_for_camera(self, timeout: float = 60) -> None:
        """Wait for the camera's first frame: online comes before it, and a describe in between is answered
        no_frame (the camera's `ok` log line is the moment its state leaves `starting`)."""
        self.wait_log(": ok (", timeout)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None and self._reader is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(timeout=10)
            self.log = "".join(self._lines)
        observe("exit", self.proc.returncode)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.wait()
