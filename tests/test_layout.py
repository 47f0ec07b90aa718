"""The layout holds: data flows one way through the packages, devices/ knows nothing of the agent, nothing at top
level depends on test code, and importing the agent loads no llama.cpp until a model is loaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.fast

# Each stage of agent/ and what it may import besides the shared leaves (agent, agent.config, agent.yamlfile,
# agent.gguf) and itself. The order is the flow: devices -> perception -> turns -> llm -> mqtt, watched by ops.
ALLOWED = {
    "contract": set(),
    "perception": {"contract"},
    "turns": {"contract", "perception"},
    "memory": {"contract"},
    "llm": {"contract", "turns", "memory"},
    "mqtt": {"contract", "turns"},
    "ops": {"contract", "perception", "turns", "memory", "llm", "mqtt"},
    "catalog": {"contract"},
    "app": {"contract", "perception", "turns", "memory", "llm", "mqtt", "ops"},
    "cli": {"contract", "perception", "turns", "memory", "llm", "mqtt", "ops", "catalog", "app"},
}
LEAVES = {"agent", "agent.config", "agent.yamlfile", "agent.gguf"}
TOP = ("agent", "devices", "models", "bench", "tests")


def modules() -> dict[str, Path]:
    found = {}
    for top in ("agent", "devices", "models", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in out if name.split(".")[0] in TOP}


def stage(module: str) -> str | None:
    if module in LEAVES:
        return None
    if module == "agent.__main__":
        return "cli"
    return module.split(".")[1] if module.startswith("agent.") else None


def test_agent_stages_import_only_earlier_stages() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        if not module.startswith("agent"):
            continue
        own = stage(module)
        for target in imports(path):
            if target not in known and target.rsplit(".", 1)[0] in known:
                target = target.rsplit(".", 1)[0]  # `from agent.x import name`: the module is agent.x
            theirs = stage(target) if target.startswith("agent") else None
            if target.startswith(("tests", "bench")):
                wrong.append(f"{module} imports test code {target}")
            elif theirs is not None and theirs != own and theirs not in ALLOWED.get(own or "", set()):
                wrong.append(f"{module} ({own or 'leaf'}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_every_stage_is_declared() -> None:
    stages = {p.name for p in (ROOT / "agent").iterdir() if (p / "__init__.py").exists()}
    stages |= {p.stem for p in (ROOT / "agent").glob("*.py")} - {"__init__", "__main__", *(m.split(".")[-1]
                                                                                           for m in LEAVES)}
    assert stages == set(ALLOWED)


def test_no_cycle_between_top_level_packages() -> None:
    edges: dict[str, set[str]] = {top: set() for top in TOP}
    for module, path in modules().items():
        top = module.split(".")[0]
        edges[top] |= {t.split(".")[0] for t in imports(path)} - {top}
    assert edges["devices"] == set(), "devices/ must not import the agent"
    assert edges["models"] == set(), "models/ holds data only"
    assert "tests" not in edges["agent"] and "bench" not in edges["agent"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert not [top for top in TOP if reaches(top, top, set())]


def test_importing_any_agent_module_loads_no_llama_cpp() -> None:
    names = [m for m in modules() if m.startswith(("agent", "devices", "models")) and m != "agent.__main__"]
    code = (f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'pywhispercpp')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_test_scaffolding_is_not_installed() -> None:
    """The packages setuptools puts in the wheel, by the rule pyproject.toml gives it."""
    from setuptools import find_packages

    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]")[1].split("\n[")[0]
    include = ast.literal_eval(section.split("include =")[1].strip().splitlines()[0])
    shipped = set(find_packages(str(ROOT), include=include))
    assert {"agent", "agent.llm", "devices", "models"} <= shipped
    assert not [p for p in shipped if p.split(".")[0] in ("tests", "bench")]
    assert [p.name for p in (ROOT / "models").glob("*.py")] == ["__init__.py"]
