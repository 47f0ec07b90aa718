"""The systemd unit and its installer: `systemd-analyze verify` and `security --offline`, the unit's choices
checked against the code (exit codes, the MemoryDenyWriteExecute= decision), and install.sh for real into a
temporary root."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from agent.contract.exitcodes import ExitCode
from tests.support.mqtt import Broker, Client, payload_json
from tests.support.notify import Listener
from tests.support.systemd import unit_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gemma-agent.service"
INSTALL = ROOT / "systemd" / "install.sh"
SHIPPED_BINARY = "/opt/gemma-agent/venv/bin/gemma-agent"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
EXPOSURE_LIMIT = 2.0  # systemd-analyze calls <= 2.0 "OK"; the unit scores 1.4 with systemd 252


def verifiable_copy(unit_text: str, where: Path) -> Path:
    """The unit with only ExecStart's binary swapped for this checkout's real `gemma-agent` entry point, because
    verify (rightly) rejects a command that does not exist on this machine."""
    binary = Path(sys.executable).parent / "gemma-agent"
    assert binary.exists(), f"{binary} is missing: install the project into the venv (pip install -e .)"
    assert unit_text.count(f"ExecStart={SHIPPED_BINARY} ") == 1
    path = where / "gemma-agent.service"
    path.write_text(unit_text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={binary} "))
    return path


def analyze(*args: str, unit_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if unit_path is not None:  # also load drop-ins from <unit>.d/ next to the copy (the trailing ':' keeps defaults)
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60)


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    copy = verifiable_copy(UNIT.read_text(), tmp_path)
    result = analyze("verify", str(copy), unit_path=tmp_path)
    print(f"systemd-analyze verify: rc={result.returncode} output={result.stdout + result.stderr!r}")
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""  # verify exits 0 on unknown keys too: any output is a finding
    # The shipped file differs only by the binary, which verify does check:
    shipped = analyze("verify", str(UNIT))
    assert shipped.returncode != 0
    assert shipped.stderr.strip() == (f"gemma-agent.service: Command {SHIPPED_BINARY} is not executable: "
                                      "No such file or directory")


def test_security_exposure_is_low(tmp_path: Path) -> None:
    found = re.search(r"systemd (\d+)", analyze("--version").stdout)
    assert found, "systemd-analyze --version printed no version"
    version = int(found.group(1))
    if version < 250:
        pytest.skip(f"systemd {version}: `systemd-analyze security --offline` needs systemd >= 250")
    copy = verifiable_copy(UNIT.read_text(), tmp_path)
    result = analyze("security", "--offline=yes", f"--threshold={round(EXPOSURE_LIMIT * 10)}", str(copy))
    match = re.search(r"Overall exposure level for gemma-agent\.service: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd {version} security --offline exposure: {match.group(1)} {match.group(2)}")
    assert result.returncode == 0
    assert float(match.group(1)) <= EXPOSURE_LIMIT


def test_the_units_exec_start_brings_the_daemon_up(tmp_path: Path, broker: Broker, gemma270m: Path) -> None:
    """The unit's own ExecStart=, Environment= and WorkingDirectory=, with /etc, /opt and the state directory mapped
    into a temporary root: READY=1 comes, the device goes online with the installed config's relative model path,
    an ask is answered, the outbox is in the state directory, and SIGTERM ends it with STOPPING=1 and exit 0."""
    s = unit_settings(UNIT.read_text())
    etc, state = tmp_path / "etc" / "gemma-agent", tmp_path / "var" / "lib" / "gemma-agent"
    etc.mkdir(parents=True)
    (state / "models").mkdir(parents=True)
    device = f"unit{uuid.uuid4().hex[:6]}"
    config = yaml.safe_load((ROOT / "config" / "agent.yaml").read_text())  # what install.sh puts in /etc
    config["device"]["id"] = device
    config["mqtt"].update(host="127.0.0.1", port=broker.port)
    config["model"].update(max_tokens=8, temperature=0.0)
    (etc / "agent.yaml").write_text(yaml.safe_dump(config))
    (state / "models" / Path(config["model"]["path"]).name).symlink_to(gemma270m)  # the default, relative path
    binary = Path(sys.executable).with_name("gemma-agent")
    (command,) = s["Service.ExecStart"]
    argv = [str(binary) if arg == SHIPPED_BINARY else arg.replace("/etc/gemma-agent/", f"{etc}/")
            for arg in shlex.split(command)]
    assert argv[0] == str(binary) and str(etc / "agent.yaml") in argv
    (cwd,) = s["Service.WorkingDirectory"]
    assert cwd == "/var/lib/gemma-agent" and s["Service.StateDirectory"] == ["gemma-agent"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STATE_DIRECTORY": str(state),
           **dict(item.split("=", 1) for item in s["Service.Environment"])}
    client = Client(broker.port)
    client.subscribe(f"gemma_agent/{device}/#")
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        notify = Listener(os.path.join(short, "notify"))
        env["NOTIFY_SOCKET"] = notify.sock.getsockname()
        log = (tmp_path / "daemon.log").open("w")
        proc = subprocess.Popen(argv, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            notify.wait_for(b"READY=1\nSTATUS=ready: models/gemma-3-270m-q4_k_m.gguf on mqtt://127.0.0.1:"
                            + str(broker.port).encode() + f" as gemma_agent/{device}".encode(), timeout=120)
            client.wait_for(f"gemma_agent/{device}/availability", lambda m: m.payload == b"online")
            client.publish(f"gemma_agent/{device}/ask", {"id": "unit-1", "text": "Hello"})
            reply = client.wait_for(f"gemma_agent/{device}/response", lambda m: payload_json(m)["id"] == "unit-1")
            assert payload_json(reply[0])["done"] is True
            assert (state / f"outbox-{device}.sqlite3").is_file()  # the default outbox is in the state directory
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == ExitCode.OK, (tmp_path / "daemon.log").read_text()
            notify.wait_for(b"STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()
            client.close()
            log.close()


def test_unit_agrees_with_the_daemon() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Service.Type"] == ["notify"] and s["Service.NotifyAccess"] == ["main"]
    # permanent faults are not restarted: exactly the daemon's exit codes for bad model files and bad config
    prevent = {int(code) for code in s["Service.RestartPreventExitStatus"][0].split()}
    assert prevent == {ExitCode.EX_DATAERR, ExitCode.EX_NOINPUT, ExitCode.EX_CONFIG}
    assert ExitCode.EX_SOFTWARE not in prevent and ExitCode.FAILURE not in prevent
    assert s["Service.WorkingDirectory"] == ["/var/lib/gemma-agent"] and s["Service.StateDirectory"] == ["gemma-agent"]
    # the memory cap (bench/RESULTS.md): a hard 2 GiB the planner budgets for, no throttling below it, no swap
    assert s["Service.MemoryMax"] == ["2G"] and s["Service.MemoryHigh"] == ["infinity"]
    assert s["Service.MemorySwapMax"] == ["0"]


# The child runs under the filter systemd installs for MemoryDenyWriteExecute=yes (systemd.exec(5)): mmap() with
# PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() with PROT_EXEC and shmat() with SHM_EXEC fail with EPERM.
MDWE_CHILD = r"""
import ctypes, json, mmap, platform, struct, sys
AUDIT, MMAP, MPROTECT, PKEY_MPROTECT, SHMAT = {
    "x86_64": (0xC000003E, 9, 10, 329, 30), "aarch64": (0xC00000B7, 222, 226, 288, 196)}[platform.machine()]
ALLOW, EPERM = 0x7FFF0000, 0x00050001
LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
A, E = "allow", "eperm"
prog = [
    [LD, 0, 0, 4], [JEQ, 1, 0, AUDIT], [RET, 0, 0, ALLOW], [LD, 0, 0, 0],   # arch; syscall number
    [JEQ, 0, 3, MMAP], [LD, 0, 0, 32], [AND, 0, 0, 6], [JEQ, E, A, 6],      # mmap: prot & (W|X) == W|X
    [JEQ, 1, 0, MPROTECT], [JEQ, 0, 2, PKEY_MPROTECT], [LD, 0, 0, 32], [JSET, E, A, 4],  # prot & X
    [JEQ, 0, A, SHMAT], [LD, 0, 0, 32], [JSET, E, A, 0o100000],             # shmflg & SHM_EXEC
    [RET, 0, 0, ALLOW], [RET, 0, 0, EPERM]]
label = {A: len(prog) - 2, E: len(prog) - 1}
for i, ins in enumerate(prog):  # jumps to the labels become relative offsets
    ins[1:3] = [label[t] - i - 1 if t in label else t for t in ins[1:3]]
code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(len(prog), code)), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER

out = {}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx_mmap"] = "allowed"
except OSError as exc:
    out["wx_mmap"] = f"refused: {exc}"
out["ctypes_callback"] = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(41)
try:
    import cffi
    out["cffi_callback"] = cffi.FFI().callback("int(int)", lambda x: x + 1)(41)
except MemoryError as exc:
    out["cffi_callback"] = f"MemoryError: {exc}"
import cv2, numpy, webrtcvad
ok, jpeg = cv2.imencode(".jpg", numpy.zeros((64, 64, 3), numpy.uint8))
out["opencv_numpy"] = bool(ok) and len(jpeg) > 0
out["webrtcvad"] = webrtcvad.Vad(2).is_speech(b"\0" * 960, 16000)
from agent.llm.local import LocalModel
from agent.turns.types import Request
from agent.config import ModelConfig
model = LocalModel(ModelConfig(n_ctx=512, max_tokens=8, temperature=0.0), path=sys.argv[1])
result = model.generate(Request("Say hello."))
out["llama_tokens"], out["llama_text"] = result.completion_tokens, result.text
print(json.dumps(out))
"""


def test_memory_deny_write_execute_decision(gemma270m: Path) -> None:
    """Run the agent's libraries under MemoryDenyWriteExecute='s seccomp rule; the unit must enable the setting
    exactly when everything the agent uses works under it."""
    result = subprocess.run([sys.executable, "-c", MDWE_CHILD, str(gemma270m)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print("under MemoryDenyWriteExecute's rule:", out)
    assert out["wx_mmap"].startswith("refused")  # the filter is really in force
    # llama.cpp (with its ctypes log and abort callbacks), numpy, OpenCV and webrtcvad are unaffected
    assert out["ctypes_callback"] == 42 and out["opencv_numpy"] is True and out["webrtcvad"] is False
    assert out["llama_tokens"] > 0
    # cffi's ABI-mode ffi.callback() is what sounddevice's PortAudio stream callback uses
    cffi_works = out["cffi_callback"] == 42
    assert unit_settings(UNIT.read_text())["Service.MemoryDenyWriteExecute"] == ["yes" if cffi_works else "no"]


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120)


def tree(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_text() if p.is_file() else "")
            for p in sorted(root.rglob("*"))}


def test_install_dry_run_changes_nothing() -> None:
    targets = [Path("/etc/gemma-agent"), Path("/etc/systemd/system/gemma-agent.service"), Path("/opt/gemma-agent")]
    before = {p: p.exists() for p in targets}
    result = run_install("--dry-run", "--no-enable")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("+ python3 -m venv /opt/gemma-agent/venv") for line in lines) or before[targets[2]]
    assert any(line.startswith("+ /opt/gemma-agent/venv/bin/pip install") and "<the wheel .ci/build-llama prints>"
               in line for line in lines)
    if not before[targets[0]]:
        assert f"+ install -m 0640 {ROOT}/config/agent.yaml /etc/gemma-agent/agent.yaml" in lines
    assert "(dry run: nothing was changed)" in lines
    assert {p: p.exists() for p in targets} == before


def test_install_into_a_root_twice(tmp_path: Path) -> None:
    root, dev = tmp_path / "root", tmp_path / "dev"
    (dev / "nvgpu" / "igpu0").mkdir(parents=True)
    for node in ("nvmap", "nvhost-ctrl-gpu", "nvgpu/igpu0/ctrl"):  # character devices, as on a Jetson
        (dev / node).symlink_to("/dev/null")
    (dev / "nvhost-notadevice").write_text("")  # not a character device: ignored
    args = ("--root", str(root), "--no-venv", "--prefix", "/opt/ga", "--dev", str(dev))

    first = run_install(*args)
    assert first.returncode == 0, first.stderr
    conf = root / "etc/gemma-agent"
    assert (conf / "agent.yaml").read_text() == (ROOT / "config/agent.yaml").read_text()
    assert (conf / "agent.yaml").stat().st_mode & 0o777 == 0o640
    assert (conf / "agent.yaml.dist").read_text() == (ROOT / "config/agent.yaml").read_text()
    assert (root / "var/lib/gemma-agent/models").is_dir()
    unit = root / "etc/systemd/system/gemma-agent.service"
    shipped, installed = UNIT.read_text().splitlines(), unit.read_text().splitlines()
    assert [(a, b) for a, b in zip(shipped, installed, strict=True) if a != b] == [
        (f"ExecStart={SHIPPED_BINARY} run --config /etc/gemma-agent/agent.yaml",
         "ExecStart=/opt/ga/venv/bin/gemma-agent run --config /etc/gemma-agent/agent.yaml")]
    dropin = root / "etc/systemd/system/gemma-agent.service.d/devices.conf"
    allowed = [v for k, vs in unit_settings(dropin.read_text()).items() if k == "Service.DeviceAllow" for v in vs]
    assert allowed == ["/dev/nvmap rw", "/dev/nvhost-ctrl-gpu rw", "/dev/nvgpu/igpu0/ctrl rw"]

    # the generated drop-in is valid systemd syntax, loaded with the unit
    check = tmp_path / "verify"
    check.mkdir()
    verifiable_copy(UNIT.read_text(), check)
    shutil.copytree(dropin.parent, check / "gemma-agent.service.d")
    result = analyze("verify", str(check / "gemma-agent.service"), unit_path=check)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    # second run: the user's edited config survives, the .dist copy is refreshed, nothing else changes
    edited = (conf / "agent.yaml").read_text().replace("host: localhost", "host: broker.lan")
    (conf / "agent.yaml").write_text(edited)
    (conf / "agent.yaml.dist").write_text("# an older release's defaults\n")
    before = tree(root)
    second = run_install(*args)
    assert second.returncode == 0, second.stderr
    assert (conf / "agent.yaml").read_text() == edited
    assert (conf / "agent.yaml.dist").read_text() == (ROOT / "config/agent.yaml").read_text()
    assert f"kept: {conf}/agent.yaml (compare with agent.yaml.dist after an upgrade)" in second.stdout
    assert f"unchanged: {unit}" in second.stdout and f"unchanged: {dropin}" in second.stdout
    after = tree(root)
    assert {k for k in before if before[k] != after.get(k)} == {"etc/gemma-agent/agent.yaml.dist"}
    assert set(after) == set(before)

    # the GPU nodes are gone (another board, a driver change): the drop-in goes too
    shutil.rmtree(dev)
    dev.mkdir()
    third = run_install(*args)
    assert third.returncode == 0, third.stderr
    assert not dropin.exists() and unit.exists()


def test_install_refuses_bad_options(tmp_path: Path) -> None:
    bad = run_install("--root", str(tmp_path), "--frobnicate")
    assert bad.returncode == 64 and "unknown option '--frobnicate'" in bad.stderr
    relative = run_install("--root", str(tmp_path), "--prefix", "opt/ga")
    assert relative.returncode == 64 and "--prefix must be an absolute path" in relative.stderr
    assert list(tmp_path.iterdir()) == []
