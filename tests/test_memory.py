"""The memory planner: budgets from real cgroup files, plans for full-size Gemma 3n headers, and predictions
checked against the RSS of real llama.cpp loads (tiny Gemma 3n, Gemma 3 270M), each in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType

from agent.config import MemoryConfig, ModelConfig
from agent.gguf import inspect
from agent.llm.local import LocalModel, ModelLoadError
from agent.memory import estimate as estimates
from agent.memory import plan as planner
from agent.memory import probe, shape
from tests.support import models as testmodels
from tests.support import synth, synth_gemma4, synth_gemma4v
from tests.support.daemon import DaemonProcess
from tests.support.fakes import fake_proc
from tests.support.mqtt import Broker, Client
from tests.support.paths import ROOT, run_agent

Q = GGMLQuantizationType
MiB = 1 << 20
X86 = shape.Cpu(frozenset({"AVX2", "REPACK"}))
PI5 = shape.Cpu(frozenset({"NEON", "DOTPROD", "REPACK"}))  # Cortex-A76: dotprod, no i8mm
TWO_GIB = planner.Budget(2048 * MiB, "test", 256 * MiB)
BASELINE = 60 * MiB  # a daemon's Python before the model (measured ~35 MiB after importing agent.app)


# --- budgets from cgroup files ------------------------------------------------------------------------------


@pytest.mark.fast
def test_cgroup_v2_limit_is_the_lowest_ancestor(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    leaf = root / "system.slice" / "gemma-agent.service"
    leaf.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "system.slice" / "memory.max").write_text(f"{1536 * MiB}\n")
    (leaf / "memory.max").write_text("max\n")
    proc = fake_proc(tmp_path, "0::/system.slice/gemma-agent.service\n", [(str(root), "cgroup2", "rw")])
    limit, where = probe.cgroup_limit(str(proc))
    assert limit == 1536 * MiB and "system.slice/memory.max" in where
    (leaf / "memory.max").write_text(f"{1024 * MiB}\n")
    assert probe.cgroup_limit(str(proc))[0] == 1024 * MiB
    (leaf / "memory.high").write_text(f"{900 * MiB}\n")  # MemoryHigh=: reclaim and throttling start there
    assert probe.cgroup_limit(str(proc)) == (900 * MiB, f"cgroup v2 {leaf}/memory.high")


@pytest.mark.fast
def test_cgroup_v1_limit_and_hierarchy(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    node = mem / "gemma"
    node.mkdir(parents=True)
    (node / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (node / "memory.stat").write_text(f"cache 0\nhierarchical_memory_limit {2048 * MiB}\n")
    proc = fake_proc(tmp_path, "4:memory:/gemma\n0::/\n",
                     [(str(tmp_path / "unified"), "cgroup2", "rw"), (str(mem), "cgroup", "rw,memory")])
    assert probe.cgroup_limit(str(proc)) == (2048 * MiB, f"cgroup v1 {node}/memory.limit_in_bytes")
    (node / "memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert probe.cgroup_limit(str(proc)) == (None, "cgroup v1: no limit")


@pytest.mark.fast
def test_budget_takes_the_lowest_limit(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    (mem / "svc").mkdir(parents=True)
    (mem / "svc" / "memory.limit_in_bytes").write_text(f"{1024 * MiB}\n")
    proc = fake_proc(tmp_path, "4:memory:/svc\n", [(str(mem), "cgroup", "rw,memory")])
    got = planner.budget(MemoryConfig(limit_mib=2048, margin_mib=100), str(proc))
    assert (got.limit, got.margin, got.usable) == (1024 * MiB, 100 * MiB, 924 * MiB)
    assert "cgroup v1" in got.source
    assert planner.budget(MemoryConfig(limit_mib=512), str(proc)).source == "memory.limit_mib"
    assert probe.cgroup_limit(str(tmp_path / "nowhere")) == (None, "no /proc/self/cgroup")


# --- plans for full-size Gemma 3n, from headers alone ----------------------------------------------------------


def _more_bits(i: int, n: int) -> bool:  # llama-quant.cpp's use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(t: synth.TensorSpec, n_layer: int, per_layer_table: GGMLQuantizationType = Q.Q6_K
                ) -> GGMLQuantizationType:
    """The type llama.cpp's Q4_K_M recipe gives a Gemma 3n / Gemma 4 tensor (the per-layer embedding table: Q6_K
    by default, Q5_K in the published files)."""
    if len(t.shape) < 2 or any(k in t.name for k in ("_norm.weight", "altup", "laurel", "per_layer_model_proj")):
        return t.qtype
    if t.name == "per_layer_token_embd.weight":
        return per_layer_table
    if t.name == "token_embd.weight":
        return Q.Q6_K
    if t.name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(int(t.name.split(".")[1]), n_layer):
        return Q.Q6_K
    return Q.Q4_K


def header_only(path: Path, shape: synth.TextShape) -> Path:
    """A Q4_K_M Gemma 3n GGUF with the published shapes: real header, sparse (unwritten) tensor data."""
    specs = [dataclasses.replace(t, qtype=q4_k_m_type(t, shape.n_layer))
             for t in synth.gemma3n_text_tensors(shape, 262_144)]
    return sparse_gguf(path, "gemma3n", synth.gemma3n_text_metadata(shape, synth.Tokenizer(), None), specs)


def sparse_gguf(path: Path, arch: str, kvs: list[synth.KV], specs: list[synth.TensorSpec]) -> Path:
    """A GGUF with this header and sparse (unwritten) tensor data: as large as the real file, nothing on disk."""
    writer = GGUFWriter(path, arch)
    for key, value, vtype, sub in kvs:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in specs:
        dtype = np.dtype(np.float16 if t.qtype == Q.F16 else np.float32)
        writer.add_tensor_info(t.name, tuple(reversed(t.shape)), dtype, t.nbytes,
                               raw_dtype=None if t.qtype in (Q.F16, Q.F32) else t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    end = path.stat().st_size
    end += -end % 32
    os.truncate(path, end + sum(t.nbytes + (-t.nbytes % 32) for t in specs))
    return path


@pytest.fixture(scope="module")
def e2b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return header_only(tmp_path_factory.mktemp("e2b") / "e2b-q4_k_m.gguf", synth.E2B)


@pytest.fixture(scope="module")
def e4b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return header_only(tmp_path_factory.mktemp("e4b") / "e4b-q4_k_m.gguf", synth.E4B)


@pytest.fixture(scope="module")
def gemma4_e2b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Gemma 4 E2B Q4_K_M as published: per-layer table Q5_K; its Q8_0 vision + audio projector), header only."""
    folder = tmp_path_factory.mktemp("gemma4")
    shape = synth_gemma4.GEMMA4_E2B
    specs = [dataclasses.replace(t, qtype=q4_k_m_type(t, shape.n_layer, Q.Q5_K))
             for t in synth_gemma4.gemma4_text_tensors(shape, 262_144)]
    text = sparse_gguf(folder / "gemma4-e2b-q4_k_m.gguf", "gemma4",
                       synth_gemma4.gemma4_text_metadata(shape, synth.Tokenizer(), None), specs)
    vision, audio = synth_gemma4v.E2B_V, synth_gemma4v.E2B_A
    projector = sparse_gguf(folder / "mmproj-q8_0.gguf", "clip",
                            synth_gemma4v.gemma4_projector_metadata(vision, audio, shape.n_embd, Q.Q8_0),
                            synth_gemma4v.gemma4_projector_tensors(shape.n_embd, vision, audio, Q.Q8_0))
    return text, projector


@pytest.mark.fast
def test_gemma4_shape_is_read_from_its_header(gemma4_e2b: tuple[Path, Path]) -> None:
    """Gemma 4's rules come from the header (models/gemma4.cpp): 15 of 35 layers own a KV cache (shared_kv_layers
    20), global layers have 512-wide heads and sliding ones 256, 256 per-layer input dims, no AltUp streams."""
    text, projector = (inspect(p) for p in gemma4_e2b)
    assert abs(text.size - 3_106_738_272) / 3_106_738_272 < 0.01  # the published Q4_K_M recipe, to 1 %
    assert abs(projector.size - 557_368_064) / 557_368_064 < 0.01  # the published Q8_0 projector
    s = shape.Shape.of(text)
    assert (s.n_layer, s.n_embd, s.n_altup, s.ple_width) == (35, 1536, 1, 256 * 35)
    assert sum(s.kv_layers) == 15 and s.kv_layers[:15] == (True,) * 15
    globals_ = [i for i in range(35) if not s.swa[i]]
    assert globals_ == [4, 9, 14, 19, 24, 29, 34]
    assert {s.head_k[i] for i in globals_} == {512} and {s.head_k[i] for i in range(35) if s.swa[i]} == {256}
    kv = estimates.kv_bytes(s, estimates.Setting(n_ctx=2048))
    assert kv == 2048 * 2 * 2 * (12 * 256 + 3 * 512)  # K and V, f16, 12 sliding + 3 global cache layers
    assert estimates.kv_bytes(s, estimates.Setting(n_ctx=2048, swa_full=False)) == 2048 * 2 * 2 * 3 * 512 + \
        1024 * 2 * 2 * 12 * 256  # sliding layers keep the window + a ubatch, padded to 256 cells


@pytest.mark.fast
def test_gemma4_e2b_fits_2_gib_with_its_projector_on_demand(gemma4_e2b: tuple[Path, Path]) -> None:
    """Under 2 GiB, Gemma 4 E2B + its 557 MB projector: the projector cannot stay resident beside the per-token
    weights, so it is loaded per image or clip; gemma4v's tokens (and so its encode memory) follow the frame size,
    gemma4a's the utterance's length."""
    text, projector = (inspect(p) for p in gemma4_e2b)
    plan = planner.plan(text, ModelConfig(path=str(gemma4_e2b[0])), MemoryConfig(), projector, cpu=X86,
                        baseline=BASELINE, limit=TWO_GIB, media=estimates.MediaUse(768, 15.0))
    assert plan.chosen is not None and plan.fits
    e = plan.chosen
    assert not e.setting.projector_resident and e.projector == 0
    assert any(t.setting.projector_resident and t.need > TWO_GIB.usable for t in plan.table)
    weights, at_768 = estimates.projector_bytes(projector, estimates.MediaUse(768, 1.0))
    assert weights == sum(t.nbytes for t in projector.tensors) and e.projector_transient >= weights + at_768
    _, at_256 = estimates.projector_bytes(projector, estimates.MediaUse(256, 1.0))
    assert at_256 * 256 == pytest.approx(at_768 * 81, rel=0.01)  # 81 vs 256 image tokens
    _, long_clip = estimates.projector_bytes(projector, estimates.MediaUse(256, 30.0))
    assert long_clip > at_256  # 750 audio tokens cost more than a small frame
    assert plan.release_cold  # 3.1 GB of file beside ~1 GiB of anonymous memory
    lines = plan.lines(rows=4)
    assert "proj on-demand" in next(line for line in lines if line.startswith(" *"))  # shown, marked


@pytest.mark.fast
def test_e2b_fits_2_gib_with_repacking(e2b: Path) -> None:
    info = inspect(e2b)
    plan = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE, limit=TWO_GIB)
    assert plan.chosen is not None and plan.fits
    s = plan.chosen.setting
    assert s.mmap and s.repack
    e = plan.chosen
    assert 850 * MiB < e.repacked < 880 * MiB  # the Q4_K layer matrices (Q6_K stays mapped on x86)
    assert e.kv == 20 * 2048 * 2 * 512 * 2 or s.kv_type == "q8_0"  # 20 of 30 layers own a KV cache
    assert e.need <= TWO_GIB.usable
    assert plan.release_cold  # the 3.1 GiB file does not fit beside the anonymous memory: drop the cold pages
    assert 1.5 * 2**30 < sum(b - a for a, b in e.cold_ranges) < 2.5 * 2**30  # per-layer table + repacked copy
    text = "\n".join(plan.lines())
    assert "memory plan mmap repack on" in text and "fits" in text


@pytest.mark.fast
def test_e4b_is_refused_at_2_gib_with_the_reason(e4b: Path) -> None:
    info = inspect(e4b)
    plan = planner.plan(info, ModelConfig(path=str(e4b)), MemoryConfig(), cpu=X86, baseline=BASELINE, limit=TWO_GIB)
    assert plan.chosen is None and not plan.fits
    refusal = plan.refusal()
    assert "does not fit the memory budget" in refusal and "REFUSED" in refusal
    assert "more than the whole budget" in refusal  # the reason: its per-token weights alone exceed 2 GiB
    rows = [line for line in refusal.splitlines() if "over by" in line]
    assert len(rows) == len(plan.table) >= 9  # every setting, each with what it lacks
    best = min(e.need for e in plan.table)
    assert best > TWO_GIB.usable + 300 * MiB  # not a near miss: E4B's hot set alone is ~2 GiB
    with pytest.raises(shape.MemoryPlanError, match="does not fit"):
        plan.load_options()
    with pytest.raises(ModelLoadError, match="REFUSED"):
        LocalModel(ModelConfig(path=str(e4b)), plan=plan)  # the engine refuses before llama.cpp reads a byte
    # what to do about it: a smaller model, or the limit it needs
    assert "a smaller model or quantization" in refusal
    assert f"a memory limit of at least {round((best + TWO_GIB.margin) / MiB)} MiB" in refusal


@pytest.mark.fast
def test_a_near_miss_says_which_change_would_fit(e2b: Path) -> None:
    """A budget just below what a 2048 context needs in every setting, but above what 1024 needs: the refusal
    names model.n_ctx: 1024 (with f16 forced, it first names the q8_0 cache)."""
    info = inspect(e2b)
    full = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE, limit=TWO_GIB)
    half = planner.plan(info, ModelConfig(path=str(e2b), n_ctx=1024), MemoryConfig(), cpu=X86, baseline=BASELINE,
                        limit=TWO_GIB)
    need_full, need_half = (min(e.need for e in p.table) for p in (full, half))
    assert need_half < need_full
    tight = planner.Budget(need_full - 1 + 256 * MiB, "test", 256 * MiB)
    refused = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE, limit=tight)
    assert refused.chosen is None
    assert "would fit: model.n_ctx: 1024" in refused.refusal()
    assert "smaller model" not in refused.refusal()  # the weights themselves fit
    only_f16 = MemoryConfig(kv_type="f16")
    need_f16 = min(e.need for e in planner.plan(info, ModelConfig(path=str(e2b)), only_f16, cpu=X86,
                                                baseline=BASELINE, limit=TWO_GIB).table)
    assert need_f16 > need_full  # q8_0 settings are smaller
    f16 = planner.plan(info, ModelConfig(path=str(e2b)), only_f16, cpu=X86, baseline=BASELINE,
                       limit=planner.Budget(need_f16 - 1 + 256 * MiB, "test", 256 * MiB))
    assert f16.chosen is None and "would fit: memory.kv_type: auto" in f16.refusal()


@pytest.mark.fast
def test_arm_repacks_q6_k_so_the_plan_changes(e2b: Path) -> None:
    """On a Pi 5 llama.cpp also repacks Q6_K (and the tied output head): the same file needs more anonymous
    memory, and the planner falls back to a setting that still fits."""
    info = inspect(e2b)
    x86 = estimates.estimate(info, estimates.Setting(), X86, BASELINE)
    arm = estimates.estimate(info, estimates.Setting(), PI5, BASELINE)
    assert arm.repacked > x86.repacked + 500 * MiB and arm.hot_file < x86.hot_file
    plan = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=PI5, baseline=BASELINE, limit=TWO_GIB)
    assert plan.chosen is not None and plan.chosen is not plan.table[0]
    assert plan.table[0].need > TWO_GIB.usable
    assert any("faster settings need more" in n for n in plan.notes)


@pytest.mark.fast
def test_settings_move_memory_the_expected_way(e2b: Path) -> None:
    info = inspect(e2b)
    base = estimates.Setting()
    est = {name: estimates.estimate(info, s, X86, BASELINE) for name, s in {
        "base": base, "norepack": dataclasses.replace(base, repack=False),
        "q8": dataclasses.replace(base, kv_type="q8_0", flash_attn=True),
        "ub128": dataclasses.replace(base, n_ubatch=128), "ctx8k": dataclasses.replace(base, n_ctx=8192),
        "nommap": dataclasses.replace(base, mmap=False), "swa": dataclasses.replace(base, swa_full=False),
    }.items()}
    # without repacking the repacked matrices are read from the file, all but the K/V projections of the layers
    # that share another layer's cache: llama.cpp loads those and never multiplies them
    kv_shape = shape.Shape.of(info)
    unused = sum(t.nbytes for t in info.tensors if estimates.unused_kv_weight(t.name, kv_shape) and X86.repacks(t))
    assert unused > 0 and all(not kv_shape.kv_layers[i] for i in range(20, 30))
    assert est["norepack"].repacked == 0
    assert est["norepack"].hot_file == est["base"].hot_file + est["base"].repacked - unused
    assert est["q8"].kv == est["base"].kv * 34 // 64  # q8_0: 34 bytes per 32 values
    assert est["ub128"].compute < est["base"].compute
    assert est["ctx8k"].kv == 4 * est["base"].kv
    assert est["swa"].kv < est["base"].kv  # 16 of the 20 cache layers slide over 512 tokens
    assert est["nommap"].hot_file == 0 and est["nommap"].anon > 3 * 2**30  # everything anonymous, tied table twice


@pytest.mark.fast
def test_manual_mode_predicts_the_configured_setting(e2b: Path) -> None:
    info = inspect(e2b)
    cfg = MemoryConfig(mode="manual", repack=False, kv_type="q8_0")
    plan = planner.plan(info, ModelConfig(path=str(e2b), n_ubatch=128), cfg, cpu=X86, baseline=BASELINE,
                       limit=TWO_GIB)
    assert plan.chosen is not None and len(plan.table) == 1
    s = plan.chosen.setting
    assert (s.repack, s.kv_type, s.flash_attn, s.n_ubatch) == (False, "q8_0", True, 128)
    assert plan.load_options() == {"use_mmap": True, "n_ubatch": 128, "type_k": 8, "type_v": 8, "flash_attn": True}


def test_not_a_text_model_is_a_clear_error() -> None:
    with pytest.raises(shape.MemoryPlanError, match=r"no clip.block_count"):
        planner.plan(inspect(testmodels.tiny_vision_projector()), ModelConfig(), MemoryConfig(), cpu=X86,
                    baseline=BASELINE, limit=TWO_GIB)


# --- predictions vs measured RSS of real loads ------------------------------------------------------------------

CHILD = r"""
import json, mmap, statistics, sys
import llama_cpp
from agent.llm import llama_shim
from agent.memory import apply, probe, shape
from agent.memory import estimate as estimates
from agent.memory import plan as planner
from agent.llm.local import LocalModel
from agent.turns.types import Request
from agent.config import MemoryConfig, ModelConfig
from agent.gguf import inspect
spec = json.loads(sys.argv[1])
baseline = probe.python_baseline()
file_baseline = probe.rss()["rss_file"]
cfg = ModelConfig(path=spec["path"], n_ctx=spec["n_ctx"], n_ubatch=spec["n_ubatch"], n_threads=2,
                  temperature=0.0, max_tokens=8)
mem = MemoryConfig(**spec["memory"])
plan = planner.plan_for(cfg, mem, baseline=baseline)
model = LocalModel(cfg, plan=plan)
result = model.generate(Request(text="Tell me about the sea. " * spec["words"], max_tokens=8))
info = inspect(spec["path"])
turn = estimates.estimate(info, plan.chosen.setting, baseline=baseline, n_tokens=result.prompt_tokens,
                       n_kv=result.prompt_tokens)
measured = probe.rss()
model_file = probe.file_rss(spec["path"])
token = model.llm.tokenize(b" sea", add_bos=False)[0]
touched = []
for _ in range(3):
    apply.advise(spec["path"], [(0, info.size)], mmap.MADV_DONTNEED)
    before = probe.file_rss(spec["path"])
    model.llm.eval([token])
    touched.append(probe.file_rss(spec["path"]) - before)
print(json.dumps({
    "setting": plan.chosen.setting.label(), "release_cold": plan.release_cold, "prompt": result.prompt_tokens,
    "anon": measured["rss_anon"], "anon_predicted": turn.anon, "anon_worst": plan.chosen.anon,
    "file": measured["rss_file"], "model_file": model_file,
    "file_predicted": file_baseline + turn.code + (turn.hot_file if plan.release_cold else turn.mapped_file),
    "touched": statistics.median(touched), "hot_predicted": turn.hot_file,
    "hot_windows": estimates.mapped_after_touch(turn.hot_ranges) + 2 * estimates.FAULT_AROUND,
}))
"""


def measure(path: Path, n_ctx: int, n_ubatch: int, mem: dict[str, object], words: int = 40) -> dict[str, object]:
    """Load `path` with a plan in a fresh process, run a turn, and return predictions beside measurements."""
    spec = {"path": str(path), "n_ctx": n_ctx, "n_ubatch": n_ubatch, "words": words, "memory": mem}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def within(predicted: object, measured: object, tolerance: float = 0.10) -> bool:
    assert isinstance(predicted, (int, float)) and isinstance(measured, (int, float))
    return abs(predicted - measured) <= tolerance * measured


CASES: dict[str, tuple[str, int, int, dict[str, object]]] = {
    # tiny Gemma 3n: the tied Q4_0 table is repacked for the output head; cold pages dropped after the load
    "tiny-repack-released": ("tiny", 2048, 512, {"mode": "manual", "release_cold": True}),
    "tiny-norepack-q8": ("tiny", 4096, 128, {"mode": "manual", "repack": False, "kv_type": "q8_0",
                                             "release_cold": True}),
    # the real Gemma 3 270M: Q4_K matrices repacked; the whole file stays mapped (it fits)
    "270m-auto": ("270m", 2048, 512, {}),
    "270m-norepack-ub128": ("270m", 1024, 128, {"mode": "manual", "repack": False}),
}


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory, gemma270m: Path) -> dict[str, Path]:
    """Copies of the test models that no other process maps: dropping cold pages from the page cache (and so
    what a token faults in) must not depend on whoever else reads the shared test cache."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, source in (("tiny", testmodels.tiny_text()), ("270m", gemma270m)):
        out[name] = folder / source.name
        shutil.copyfile(source, out[name])
        with open(out[name], "rb+") as f:
            os.fsync(f.fileno())  # clean pages: only clean pages can be dropped from the page cache
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_predictions_match_measured_rss(case: str, private: dict[str, Path]) -> None:
    which, n_ctx, n_ubatch, mem = CASES[case]
    path = private[which]
    got = measure(path, n_ctx, n_ubatch, mem)
    assert within(got["anon_predicted"], got["anon"]), got  # RssAnon after a turn, within 10 %
    assert within(got["file_predicted"], got["file"]), got  # RssFile (libraries + the model's pages)
    assert isinstance(got["anon_worst"], int) and isinstance(got["anon"], int)
    assert got["anon_worst"] >= got["anon"], got  # the plan budgets for a full ubatch over the whole context
    if got["release_cold"] or which == "270m":  # (unreleased tiny: large page-cache folios map whole MiBs)
        # file bytes one decoded token maps: the hot bytes, at most widened to the kernel's fault-around windows
        hot, windows, touched = got["hot_predicted"], got["hot_windows"], got["touched"]
        assert isinstance(hot, int) and isinstance(windows, int) and isinstance(touched, (int, float))
        assert 0.9 * hot <= touched <= 1.1 * windows, got
        assert within(hot, touched) or touched < 2 * MiB, got  # 10 % once it is more than a few windows


IMAGE_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
from agent.llm import llama_shim
from agent.memory import apply, probe, shape
from agent.memory import estimate as estimates
from agent.memory import plan as planner
from agent.llm.local import LocalModel
from agent.turns.types import Request
from agent.config import MemoryConfig, ModelConfig
from agent.turns.types import Media
spec = json.loads(sys.argv[1])
baseline = probe.python_baseline()
cfg = ModelConfig(path=spec["path"], mmproj=spec["mmproj"], n_threads=2, temperature=0.0, max_tokens=8)
plan = planner.plan_for(cfg, MemoryConfig(mode="manual", projector=spec["projector"]), baseline=baseline)
model = LocalModel(cfg, plan=plan)
evaluated = []  # each llama.cpp evaluation of text in the turn (first: the text ahead of the image): projector loaded?
evaluate = model.llm.eval
def watched(tokens):
    evaluated.append(model.projector_loaded)
    return evaluate(tokens)
model.llm.eval = watched
turns = []
for seed in (0, 1, 2):  # later images: the projector is there again after being released
    image = np.random.default_rng(seed).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    result = model.generate(Request(text="What is this?", max_tokens=8, media=[Media("image", image)]))
    turns.append({"image_tokens": result.image_tokens, "anon": probe.rss()["rss_anon"],
                  "loaded": model.projector_loaded, "text_beside_projector": evaluated[:]})
    evaluated.clear()
model.release_projector()
print(json.dumps({"turns": turns, "released": probe.rss()["rss_anon"], "text_only": plan.chosen.anon,
                  "predicted": plan.chosen.anon + plan.chosen.projector_transient}))
"""


def image_turns(projector: str) -> dict[str, Any]:
    spec = {"path": str(testmodels.tiny_text()), "mmproj": str(testmodels.tiny_vision_projector()),
            "projector": projector}
    proc = subprocess.run([sys.executable, "-c", IMAGE_CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_projector_prediction_matches_an_image_turn() -> None:
    got = image_turns("resident")
    first = got["turns"][0]
    assert first["image_tokens"] == 256 and first["loaded"] and first["text_beside_projector"][0]
    assert within(got["predicted"], first["anon"]), got  # text model + projector + its encode, within 10 %
    assert got["released"] < first["anon"]  # releasing the projector gives its memory back


def test_an_on_demand_plan_frees_the_projector_before_decoding() -> None:
    got = image_turns("on_demand")
    assert [t["image_tokens"] for t in got["turns"]] == [256, 256, 256]  # loaded again for each image
    assert not any(t["loaded"] for t in got["turns"])  # freed by the engine itself, within the turn
    # the image is encoded first and the projector freed before the text ahead of it is evaluated too
    assert not any(got["turns"][0]["text_beside_projector"])
    first, second, third = (t["anon"] for t in got["turns"])
    assert max(first, second, third) <= 1.1 * got["text_only"], got  # what the text-only plan holds, no projector
    # and loading it again leaves nothing behind (malloc_trim): no growth over the turns before (a leak grows every
    # turn; one CI run saw the third 3 MiB above the second, its first not shown; 12 runs here: all within 0.2 MiB)
    assert third <= max(first, second) + MiB, got


def test_repack_switch_reaches_llama_cpp(private: dict[str, Path]) -> None:
    on = measure(private["270m"], 1024, 128, {"mode": "manual", "repack": True, "release_cold": True}, words=5)
    off = measure(private["270m"], 1024, 128, {"mode": "manual", "repack": False, "release_cold": True}, words=5)
    assert isinstance(on["anon"], int) and isinstance(off["anon"], int)
    assert 8 * MiB < on["anon"] - off["anon"] < 20 * MiB  # the 13 MiB of Q4_K matrices copied and repacked
    assert isinstance(on["touched"], int) and isinstance(off["touched"], int)
    assert off["touched"] - on["touched"] > 8 * MiB  # ... which without repacking are read from the file


GROWTH_CHILD = """
import json, sys
from agent.llm import llama_shim
from agent.memory import apply, probe, shape
from agent.memory import estimate as estimates
from agent.memory import plan as planner
from agent.llm.local import LocalModel
from agent.turns.types import Request
from agent.config import ModelConfig
model = LocalModel(ModelConfig(path=sys.argv[1], temperature=0.0, max_tokens=4, n_threads=2))
after = []
for i in range(16):
    model.generate(Request(text=f"Question {i}: what is the weather like?"))
    after.append(probe.rss()["rss_anon"])
print(json.dumps(after))
"""


def test_anonymous_memory_does_not_grow_from_turn_to_turn() -> None:
    """The plan's margin assumes a turn leaves nothing behind: llama-cpp-python's per-turn sampler (3 MiB for
    Gemma's vocabulary) sits in a reference cycle, which grew RssAnon 3 MiB a turn until the engine freed it itself;
    under a 2 GiB cap on E2B that growth pushed out the hot weights and decode fell to 0.11 tok/s."""
    proc = subprocess.run([sys.executable, "-c", GROWTH_CHILD, str(testmodels.tiny_text())], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = after[-1] - after[3]  # the first turns allocate the buffers that are then reused
    assert growth < 6 * MiB, f"RssAnon grew {growth / MiB:.1f} MiB over {len(after) - 4} turns: {after}"


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_check_prints_the_plan_and_fails_when_nothing_fits(tmp_path: Path) -> None:
    model = testmodels.tiny_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = ["--set", f"model.path={model}", "--set", "mqtt.port=1"]
    ok = run_agent(*base, "check", timeout=120, cwd=ROOT, env=env)
    assert "memory plan mmap repack on" in ok.stdout and "-> fits" in ok.stdout, ok.stdout
    small = run_agent(*base, "--set", "memory.limit_mib=64", "--set", "memory.margin_mib=0",
                      "check", timeout=120, cwd=ROOT, env=env)
    assert small.returncode == 65, small.stdout + small.stderr
    assert "memory plan REFUSED: no setting fits 64 MiB" in small.stdout
    assert "over by" in small.stdout


@pytest.mark.fast
def test_yaml_on_off_and_an_impossible_combination(e2b: Path) -> None:
    from agent.config import load

    assert load(None, ["memory.repack=off"], environ={}).memory.repack is False  # YAML 1.1: off is false
    cfg = load(None, ["memory.repack=on", "memory.release_cold=on", "memory.flash_attn=false"], environ={})
    assert (cfg.memory.repack, cfg.memory.release_cold, cfg.memory.flash_attn) == (True, True, False)
    info = inspect(e2b)
    with pytest.raises(shape.MemoryPlanError, match="q8_0 needs flash attention"):
        planner.plan(info, ModelConfig(path=str(e2b)), dataclasses.replace(cfg.memory, kv_type="q8_0"), cpu=X86,
                    baseline=BASELINE, limit=TWO_GIB)
    roomy = planner.Budget(2304 * MiB, "test", 256 * MiB)
    plan = planner.plan(info, ModelConfig(path=str(e2b)), cfg.memory, cpu=X86, baseline=BASELINE, limit=roomy)
    assert plan.chosen is not None and plan.chosen.setting.repack and not plan.chosen.setting.flash_attn
    assert plan.release_cold and all(e.setting.kv_type == "f16" and e.setting.repack for e in plan.table[:-1])


def test_daemon_loads_with_the_plan_and_refuses_what_does_not_fit(broker: Broker) -> None:
    model = testmodels.tiny_text()
    client = Client(broker.port)
    daemon = DaemonProcess(broker.port, model)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    daemon.stop()
    assert "memory plan mmap repack on" in daemon.log and "-> fits" in daemon.log, daemon.log
    assert "memory plan: mmap repack on" in daemon.log  # the local model applied it
    refused = DaemonProcess(broker.port, model, "memory.limit_mib=64", "memory.margin_mib=0")
    refused.start(client, wait_online=False)
    assert refused.wait(timeout=60) == 65
    assert "does not fit the memory budget" in refused.log and "over by" in refused.log, refused.log
    assert "Traceback" not in refused.log
    client.close()


@pytest.mark.fast
def test_candidates_are_every_allowed_setting_best_first(e2b: Path) -> None:
    info = inspect(e2b)
    model = ModelConfig(path=str(e2b), n_ubatch=256)

    def short(cfg: MemoryConfig, projector: bool = True, cpu: shape.Cpu = X86) -> list[str]:
        return [s.label() for s in planner.candidates(model, cfg, cpu, info, projector)]

    auto = short(MemoryConfig())
    assert len(auto) == 2 * 2 * 2 * 3 + 1  # repack x residency x kv x ubatch (256, 128, 64), then no-mmap
    assert auto[:4] == ["mmap repack on ctx 2048 kv f16 ub 256", "mmap repack on ctx 2048 kv f16 ub 128",
                        "mmap repack on ctx 2048 kv f16 ub 64", "mmap repack on ctx 2048 kv q8_0 fa ub 256"]
    assert auto[6] == "mmap repack on ctx 2048 kv f16 ub 256 proj on-demand"
    assert auto[12] == "mmap repack off ctx 2048 kv f16 ub 256"
    assert auto[-1] == "no-mmap repack off ctx 2048 kv f16 ub 256"
    assert short(MemoryConfig(), projector=False) == [a for a in auto if "on-demand" not in a]
    assert short(MemoryConfig(projector="on_demand"))[0].endswith("proj on-demand")
    assert all("kv f16" in s for s in short(MemoryConfig(flash_attn=False)))
    assert all(" fa " in s for s in short(MemoryConfig(flash_attn=True)))
    assert all("repack off" in s for s in short(MemoryConfig(repack=False))[:-1])
    assert all("repack off" in s for s in short(MemoryConfig(), cpu=shape.Cpu(frozenset())))  # nothing repacks
    assert short(MemoryConfig(kv_type="q8_0"))[0] == "mmap repack on ctx 2048 kv q8_0 fa ub 256"
    with pytest.raises(planner.MemoryPlanError, match=r"memory\.kv_type q8_0 needs flash attention"):
        planner.candidates(model, MemoryConfig(kv_type="q8_0", flash_attn=False), X86, info, True)
    with pytest.raises(planner.MemoryPlanError, match=r"memory\.kv_type q8_0 needs flash attention"):
        planner.manual_setting(model, MemoryConfig(kv_type="q8_0", flash_attn=False))
    assert planner.manual_setting(model, MemoryConfig(projector="on_demand")).label() == \
        "mmap repack on ctx 2048 kv f16 ub 256 proj on-demand"


@pytest.mark.fast
def test_the_plan_says_what_it_chose_and_why(e2b: Path) -> None:
    info = inspect(e2b)
    plan = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE,
                        limit=TWO_GIB)
    assert plan.chosen is not None and plan.fits
    lines = plan.lines(rows=3)
    assert lines[0] == "memory      budget 2048 MiB (test), margin 256 MiB, usable 1792 MiB; mode auto"
    assert lines[1] == f"memory plan {plan.chosen.setting.label()} -> fits"
    assert lines[2].startswith(f"  anonymous {round(plan.chosen.anon / MiB)} MiB = repacked weights ")
    assert f"  ... {len(plan.table) - 3} more settings not shown" == lines[-1]
    assert sum(line.startswith(" *") for line in plan.lines(rows=len(plan.table))) == 1
    assert plan.summary().endswith("MiB usable (test 2048 MiB less margin 256 MiB)")
    e = plan.chosen
    assert f"  file-backed: hot {round(e.hot_file / MiB)} MiB read per token, " \
        f"{round((e.mapped_file - e.hot_file) / MiB)} MiB cold; {round(e.read_per_token / MiB)} MiB read per " \
        "decoded token in all; cold pages dropped after load" in lines  # the file is bigger than the budget
    assert f"  {'setting':<46} {'anon':>6} {'hot':>6} {'need':>6}  verdict (MiB)" in lines
    full = plan.lines()
    assert len(full) == len(lines) + 5  # 8 rows by default
    rows = [line for line in plan.lines(rows=len(plan.table)) if line.startswith((" *", "  mmap", "  no-mmap"))]
    verdicts = [line.rsplit("  ", 1)[1] for line in rows]
    assert {v for v in verdicts if not v.startswith("over by ")} == {"fits"}
    assert [v == "fits" for v in verdicts] == [t.need <= plan.budget.usable for t in plan.table]
    hearing = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE,
                           limit=TWO_GIB, speech=30 * MiB)
    assert hearing.lines()[2].endswith(" + speech-to-text 30") and " + speech-to-text" not in lines[2]
    forced = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(mode="manual"), cpu=X86, baseline=BASELINE,
                          limit=planner.Budget(700 * MiB, "tiny", 256 * MiB))
    assert forced.lines()[1].endswith("-> DOES NOT FIT (manual mode: loading anyway)")
    refused = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE,
                           limit=planner.Budget(700 * MiB, "tiny", 256 * MiB))
    text = refused.refusal()
    assert text.startswith(f"{e2b}: does not fit the memory budget\n")
    assert "memory plan REFUSED: no setting fits 444 MiB" in text and "more than the whole budget" in text
    least = min(refused.table, key=lambda t: t.need)
    weights = round((least.repacked + least.hot_file) / MiB)
    assert f"the weights read for every token alone are {weights} MiB" in text
    near = planner.plan(info, ModelConfig(path=str(e2b)), MemoryConfig(), cpu=X86, baseline=BASELINE,
                        limit=planner.Budget((weights + 50) * MiB + 256 * MiB, "near", 256 * MiB))
    assert near.chosen is None and "leaving 50 MiB for KV cache, compute and Python" in near.refusal()
    assert "a smaller model or quantization" in text and refused.summary() == "nothing fits 444 MiB"
    assert "as configured it needs a memory limit of at least" in text
    with pytest.raises(planner.MemoryPlanError):
        refused.load_options()


@pytest.mark.fast
def test_the_plan_counts_the_projector_speech_to_text_and_drops_cold_pages_when_needed(e2b: Path) -> None:
    info, projector = inspect(e2b), inspect(testmodels.tiny_vision_projector())
    model = ModelConfig(path=str(e2b))

    def planned(cfg: MemoryConfig | None = None, limit: planner.Budget = TWO_GIB, **kw: Any) -> planner.Plan:
        return planner.plan(info, model, cfg or MemoryConfig(), cpu=X86, baseline=kw.pop("baseline", BASELINE),
                            limit=limit, **kw)

    plain, seeing, hearing = planned(), planned(projector=projector), planned(speech=50 * MiB)
    assert plain.table[0].projector == 0 and seeing.table[0].projector > 0
    assert all(e.setting.projector_resident for e in plain.table)
    assert any(not e.setting.projector_resident for e in seeing.table)
    assert hearing.table[0].speech == 50 * MiB and hearing.table[0].need == plain.table[0].need + 50 * MiB
    manual = planned(MemoryConfig(mode="manual"), projector=projector, speech=MiB, baseline=BASELINE + MiB)
    (only,) = manual.table
    assert only.projector > 0 and only.speech == MiB and only.baseline == BASELINE + MiB
    exact = planner.Budget(plain.table[0].need + 256 * MiB, "edge", 256 * MiB)  # needs exactly what is usable
    edge = planned(limit=exact)
    assert edge.chosen is not None and edge.chosen.setting == plain.table[0].setting and edge.notes == []
    roomy = planner.Budget(64 << 30, "roomy", 256 * MiB)
    assert plain.release_cold and not planned(limit=roomy).release_cold  # the whole file fits: keep its pages
    assert not planned(MemoryConfig(release_cold=False)).release_cold
    assert planned(MemoryConfig(release_cold=True), limit=roomy).release_cold
