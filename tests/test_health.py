"""Health snapshot parts: process and cgroup memory from real files, Prometheus text over a real HTTP port."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from agent.memory.probe import cgroup_memory, process_memory
from agent.ops.metrics import MetricsServer, prometheus_text
from tests.support.fakes import fake_proc

pytestmark = pytest.mark.fast


def test_process_memory_reads_this_process() -> None:
    mem = process_memory()
    assert mem["rss"] > 10 << 20 and mem["rss_anon"] > 0 and mem["rss_file"] > 0
    assert mem["rss"] >= mem["rss_anon"]


def test_cgroup_v1_and_v2_layouts(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    leaf = v2 / "system.slice" / "gemma-agent.service"
    leaf.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    (leaf / "memory.current").write_text("123456\n")
    (leaf / "memory.max").write_text("2147483648\n")
    proc = fake_proc(tmp_path / "p2", "0::/system.slice/gemma-agent.service\n", [(str(v2), "cgroup2", "rw")])
    assert cgroup_memory(str(proc)) == {"usage": 123456, "limit": 2 << 30}
    (leaf / "memory.max").write_text("max\n")
    assert cgroup_memory(str(proc))["limit"] is None
    v1 = tmp_path / "v1"
    (v1 / "agent").mkdir(parents=True)
    (v1 / "agent" / "memory.usage_in_bytes").write_text("777\n")
    (v1 / "agent" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = fake_proc(tmp_path / "p1", "12:cpu,cpuacct:/\n4:memory:/agent\n", [(str(v1), "cgroup", "rw,memory")])
    assert cgroup_memory(str(proc)) == {"usage": 777, "limit": None}


def test_a_real_memory_cgroup_is_read_from_inside_it() -> None:
    """A process in a memory cgroup made here (root; v2 or v1, as this machine has) sees its limit and usage."""
    import json
    import subprocess
    import sys
    import uuid

    from tests.support.cgroup import Cgroup

    group = Cgroup(f"gemma-agent-test-{uuid.uuid4().hex[:8]}", 1 << 30)
    try:
        probe = "import json; from agent.memory.probe import cgroup_memory; print(json.dumps(cgroup_memory()))"
        out = subprocess.run(["sh", "-c", f'echo $$ > "{group.join_file()}" && exec "$@"', "join", sys.executable,
                              "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        mem = json.loads(out.stdout)
        assert mem["limit"] == 1 << 30 and mem["usage"] > 1 << 20  # a Python process uses more than a MiB
    finally:
        group.remove()


def test_prometheus_text_and_server() -> None:
    snapshot = {"uptime": 12.5, "memory": {"rss": 1000, "cgroup_limit": None}, "mqtt": {"connected": True},
                "state": "ok"}
    text = prometheus_text(snapshot)
    assert "gemma_agent_uptime 12.5\n" in text and "gemma_agent_memory_rss 1000\n" in text
    assert "gemma_agent_mqtt_connected 1\n" in text and "cgroup_limit" not in text and "state" not in text
    server = MetricsServer("127.0.0.1", 0)
    server.start(lambda: snapshot)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert reply.status == 200 and reply.read().decode() == text
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as err:
            assert err.code == 404
    finally:
        server.stop()
