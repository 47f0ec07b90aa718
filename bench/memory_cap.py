"""Gemma 3n E2B under a 2 GiB memory cgroup: the gemma-agent engine vs raw llama-cpp-python, capped vs uncapped.

Every run is a fresh child process; the child joins the cgroup before it execs (so every page it touches is
charged there), and the model file's page cache is dropped first (pages are charged to the cgroup that reads
them first). Configurations are interleaved round by round; the summary gives medians and spread (min-max).

Per run (one JSON line): load seconds, prefill tok/s (a 256-token prompt), decode tok/s (128 tokens), peak
RssAnon / RssFile (polled every 50 ms), peak cgroup usage, major faults, OOM kills, and for engine runs the
planner's prediction next to the measurement (anonymous bytes; mapped file bytes uncapped; file bytes touched
per decoded token). Also: a memory-bandwidth probe and the roofline ratio (decode tok/s x bytes read per token /
bandwidth), an image turn through a same-shape synthetic vision projector (engine-image), and a soak of N turns.

Configurations: `engine` (agent.llm.local.LocalModel with the agent.memory plan for memory.limit_mib), `engine-passive`
(the same with OMP_WAIT_POLICY=PASSIVE: threads sleep at barriers), `engine-image` (plan with the projector, plus
an image turn), `raw` (llama_cpp.Llama with every default: n_ctx 512, n_ubatch 512, repack on, n_threads =
cpu_count // 2), `raw-threads` (raw with the engine's thread count and n_ctx 2048), `raw-norepack` / `raw-nommap`
(raw-threads without CPU repacking / without mmap). `capped`: in a cgroup of --limit-mib, else uncapped.

Needs root (cgroup v2 with the memory controller if mounted, else v1 at /sys/fs/cgroup/memory); the cgroup is
removed at the end. The synthetic models come from bench/synth_gemma3n.py. Examples:

    sudo .venv/bin/python -m bench.memory_cap                       # E2B Q4_0 + Q4_K_M, 3 rounds
    sudo .venv/bin/python -m bench.memory_cap --models q4_k_m --configs engine:capped,engine:uncapped --rounds 5
    sudo .venv/bin/python -m bench.memory_cap --soak 200 --models q4_k_m     # 200 turns under the cap
    sudo .venv/bin/python -m bench.memory_cap --set memory.repack=off ...    # any agent config override
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import load as load_config
from agent.gguf import inspect
from agent.llm import llama_shim
from agent.memory import apply, probe
from agent.memory import estimate as estimates
from agent.memory import plan as planner
from tests.support.cgroup import Cgroup

ROOT = Path(__file__).resolve().parent.parent

SYNTH = Path(os.environ.get("GEMMA_AGENT_SYNTH_CACHE", Path.home() / ".cache" / "gemma-agent" / "synth"))
MODELS = {"q4_0": "gemma3n-e2b-synthetic-q4_0.gguf", "q4_k_m": "gemma3n-e2b-synthetic-q4_k_m.gguf",
          "q4_k_m-published": "gemma3n-e2b-synthetic-q4_k_m-published.gguf",
          "e4b-q4_k_m": "gemma3n-e4b-synthetic-q4_k_m.gguf"}
PROJECTOR = SYNTH / "gemma3n-mobilenetv5-300m-synthetic-f16.gguf"
MiB = 1 << 20
SYSTEM = "You are a helpful assistant running on a small home device. Answer briefly and plainly."
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds",
         "sing", "about", "rivers", "mountains", "and", "old", "stone", "bridges", "near", "the", "quiet", "harbour"]


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------------ cgroups


def drop_page_cache(path: str) -> None:
    """Evict the file's clean pages (if no process maps them), so the next run reads it from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the parent: runs children, polls, summarizes


def poll_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_child(spec: dict[str, Any], cgroup: Cgroup | None, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process; returns the child's result plus what the parent observed."""
    drop_page_cache(spec["model"])
    if cgroup is not None:
        cgroup.reset()
    join = cgroup.join_file() if cgroup is not None else None

    def enter_cgroup() -> None:  # runs in the child between fork and exec: everything it touches is charged
        if join:
            with open(join, "w") as f:
                f.write(str(os.getpid()))

    out = tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False)  # noqa: SIM115
    err = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    started = time.monotonic()
    env = dict(os.environ)
    if spec["mode"] == "engine-passive":  # OpenMP threads sleep at barriers instead of spinning
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.Popen([sys.executable, "-m", "bench.memory_cap", "--child", json.dumps(spec)], stdout=out,
                            stderr=err, preexec_fn=enter_cgroup, env=env)
    peak = {"RssAnon": 0, "RssFile": 0}
    usage_peak = 0
    status, rusage = 0, None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, value in poll_status(proc.pid).items():
            peak[key] = max(peak[key], value)
        if cgroup is not None:
            usage_peak = max(usage_peak, cgroup.usage())
        if time.monotonic() - started > timeout:
            proc.kill()
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    out.seek(0)
    lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
    out.close()
    os.unlink(out.name)
    err.seek(0)
    errors = [line for line in err.read().splitlines() if "Error" in line or "error" in line][-3:]
    err.close()
    os.unlink(err.name)
    result: dict[str, Any] = {}
    for line in lines:
        result.update(line)
    result.update(
        exit=code, wall_s=round(time.monotonic() - started, 1),
        peak_rss_anon_mib=round(peak["RssAnon"] / MiB, 1), peak_rss_file_mib=round(peak["RssFile"] / MiB, 1),
        major_faults=rusage.ru_majflt if rusage else None,
    )
    if code != 0:
        result["errors"] = errors
    if cgroup is not None:
        kernel_peak = cgroup.peak()
        result.update(cgroup_peak_mib=round((kernel_peak or usage_peak) / MiB, 1),
                      oom_kills=cgroup.oom_kills() - cgroup.oom_before)
    else:
        result.update(cgroup_peak_mib=None, oom_kills=0 if code != -signal.SIGKILL else None)
    return result


def bandwidth(threads: int, mib: int = 1024, repeat: int = 3) -> float:
    """Memory read bandwidth in GB/s: numpy's SIMD max over a float32 buffer far larger than the caches, split
    over `threads` threads (numpy releases the GIL); the best of `repeat`."""
    import numpy as np

    data = np.ones(mib * MiB // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeat):
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - started) / 1e9)
    return best


def summarize(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
                        "max": round(max(values), 2)}
    return out


def parent(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates a memory cgroup (run it with sudo)")
    models = {name: str(SYNTH / MODELS[name]) if name in MODELS else name for name in args.models.split(",")}
    for name, path in models.items():
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: build it with `.venv/bin/python -m bench.synth_gemma3n` ({name})")
    configs = [c for c in args.configs.split(",") if c]
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else {}
    if variants:  # each engine config once per variant: CONFIG@NAME, interleaved like the rest
        configs = [f"{c}@{name}" if c.startswith("engine") else c for c in configs for name in variants
                   if c.startswith("engine") or name == next(iter(variants))]
    cgroup = Cgroup(f"gemma-agent-bench-{os.getpid()}", args.limit_mib * MiB)
    emit(event="setup", cgroup=str(cgroup.path), cgroup_version=cgroup.version, limit_mib=args.limit_mib,
         threads=args.threads or memory_threads(), models=models, configs=configs, rounds=args.rounds)
    try:
        bw = {n: round(bandwidth(n), 2) for n in sorted({1, args.threads or memory_threads()})}
        emit(event="bandwidth", gb_per_s=bw)
        if args.soak:
            return soak(args, models, cgroup)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for name, path in models.items():
                for config in configs:
                    kind, _, cap = config.partition(":")
                    cap, _, variant = cap.partition("@")
                    overrides = list(args.set) + [o for o in variants.get(variant, "").split(",") if o]
                    if kind == "engine-image":  # the plan then budgets for the projector too
                        overrides.append(f"model.mmproj={args.projector or PROJECTOR}")
                    spec = {"mode": kind, "model": path, "prompt_tokens": args.prompt_tokens,
                            "decode_tokens": args.decode_tokens, "threads": args.threads, "overrides": overrides,
                            "measure_hot": kind == "engine" and cap == "uncapped" and rnd == 0,
                            "image_px": args.image_px}
                    run = run_child(spec, cgroup if cap == "capped" else None, args.timeout)
                    run.update(model=name, config=config, round=rnd)
                    emit(event="run", **run)
                    results.setdefault((name, config), []).append(run)
        report(results, bw, args)
    finally:
        cgroup.remove()
    return 0


KEYS = ["load_s", "prefill_tps", "decode_tps", "peak_rss_anon_mib", "peak_rss_file_mib", "cgroup_peak_mib",
        "major_faults", "turn_major_faults", "oom_kills", "anon_error_pct", "file_error_pct", "hot_error_pct",
        "projector_peak_growth_mib", "after_turns_growth_mib"]


def report(results: dict[tuple[str, str], list[dict[str, Any]]], bw: dict[int, float],
           args: argparse.Namespace) -> None:
    threads = args.threads or memory_threads()
    for (name, config), runs in results.items():
        line = summarize(runs, KEYS)
        line.update(event="summary", model=name, config=config,
                    failed=sum(1 for r in runs if r.get("exit") != 0))
        decode = line.get("decode_tps", {}).get("median")
        per_token = next((r.get("read_per_token_mib") for r in runs if r.get("read_per_token_mib")), None)
        if decode and per_token and config.startswith("engine:"):
            line["roofline"] = round(decode * per_token * MiB / 1e9 / bw[max(bw)], 3)
            line["roofline_bandwidth_gb_s"] = bw[max(bw)]
        emit(**line)
    for name in {n for n, _ in results}:
        def med(config: str, key: str, model: str = name) -> float | None:
            runs = results.get((model, config), [])
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and r.get("exit") == 0]
            return statistics.median(values) if values else None

        ratios = {}
        for key in ("decode_tps", "prefill_tps"):
            capped, uncapped = med("engine:capped", key), med("engine:uncapped", key)
            raw = med("raw:capped", key)
            if capped and uncapped:
                ratios[f"{key}_capped_vs_uncapped"] = round(capped / uncapped, 3)
            if capped and raw:
                ratios[f"{key}_engine_vs_raw_default_capped"] = round(capped / raw, 3)
            raw_threads = med("raw-threads:capped", key)
            if capped and raw_threads:
                ratios[f"{key}_engine_vs_raw_same_threads_capped"] = round(capped / raw_threads, 3)
            passive = med("engine-passive:capped", key)
            if capped and passive:
                ratios[f"{key}_spinning_vs_sleeping_barriers_capped"] = round(capped / passive, 3)
        emit(event="ratios", model=name, threads=threads, **ratios)


def soak(args: argparse.Namespace, models: dict[str, str], cgroup: Cgroup) -> int:
    for name, path in models.items():
        spec = {"mode": "soak", "model": path, "turns": args.soak, "threads": args.threads, "overrides": args.set,
                "decode_tokens": args.soak_tokens}
        run = run_child(spec, cgroup, args.timeout * max(1, args.soak // 10))
        run.update(model=name, config="engine:capped")
        emit(event="soak", **run)
    return 0


def memory_threads() -> int:
    from agent.config import available_cpus

    return available_cpus()


# ------------------------------------------------------------------ the children


def agent_config(overrides: list[str]) -> Any:
    return load_config(None, ["model.temperature=0", "model.max_tokens=128", *overrides], environ={})


def question(model: Any, prompt_tokens: int) -> tuple[str, int]:
    """A user question whose rendered prompt (system + turn format) is `prompt_tokens` long."""
    from agent.turns.types import Turn

    words = []
    i = 0
    while True:
        words.append(WORDS[i % len(WORDS)])
        i += 1
        n = len(model.tokenize(model.render([Turn("user", " ".join(words))])))
        if n >= prompt_tokens:
            return " ".join(words), n


def child_engine(spec: dict[str, Any]) -> None:
    from agent.llm.local import LocalModel
    from agent.turns.types import Request

    cfg = agent_config(spec["overrides"] + [f"model.path={spec['model']}", f"model.n_threads={spec['threads']}",
                                            f"model.max_tokens={spec['decode_tokens']}"])
    baseline = probe.python_baseline()
    media = estimates.MediaUse(image_side=spec.get("image_px", 768))
    plan = planner.plan_for(cfg.model, cfg.memory, baseline=baseline, media=media)
    emit(plan=plan.summary(), plan_lines=plan.lines())
    if plan.chosen is None:
        emit(refused=True)
        return
    model = LocalModel(cfg.model, plan=plan)
    text, n_prompt = question(model, spec["prompt_tokens"])
    model.llm.reset()
    faults = major_faults()
    result = model.generate(Request(text=text, max_tokens=spec["decode_tokens"]))
    faults = major_faults() - faults
    info = inspect(spec["model"])
    # what the planner predicts for this very turn (a prompt of n_prompt tokens, attending over them)
    turn = estimates.estimate(info, plan.chosen.setting, baseline=baseline, n_tokens=n_prompt, n_kv=n_prompt)
    measured = probe.rss()
    emit(load_s=round(model.load_seconds, 2), prompt_tokens=result.prompt_tokens,
         completion_tokens=result.completion_tokens, prefill_tps=round(result.prefill_tps, 2),
         decode_tps=round(result.decode_tps, 2), setting=plan.chosen.setting.label(),
         predicted_anon_mib=round(turn.anon / MiB, 1), measured_anon_mib=round(measured["rss_anon"] / MiB, 1),
         anon_error_pct=round(100 * (turn.anon - measured["rss_anon"]) / measured["rss_anon"], 1),
         read_per_token_mib=round(plan.chosen.read_per_token / MiB, 1),
         predicted_hot_mib=round(plan.chosen.hot_file / MiB, 1), release_cold=plan.release_cold,
         turn_major_faults=faults)
    if spec.get("measure_hot"):
        model_file = probe.file_rss(spec["model"])
        expected = turn.hot_file if plan.release_cold else turn.mapped_file  # dropped: only what turns touch
        emit(predicted_file_mib=round(expected / MiB, 1), measured_file_mib=round(model_file / MiB, 1),
             file_error_pct=round(100 * (expected - model_file) / model_file, 1))
        emit(**touched_per_token(model, spec["model"], turn))
    if spec["mode"] == "engine-image":
        emit(**image_turn(model, media))
    model.close()


def major_faults() -> int:
    """This process's major page faults so far (pages read from disk: the sign of thrashing)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[9])


def touched_per_token(model: Any, path: str, est: estimates.Estimate) -> dict[str, Any]:
    """File bytes one decoded token maps: unmap the whole model file (the pages stay cached), decode one token,
    read the file's resident share again. Compared with the planner's hot bytes."""
    import mmap

    info = inspect(path)
    token = model.llm.tokenize(b" sea", add_bos=False)[0]
    samples = []
    for _ in range(3):
        apply.advise(path, [(0, info.size)], mmap.MADV_DONTNEED)
        before = probe.file_rss(path)
        model.llm.eval([token])
        samples.append(probe.file_rss(path) - before)
    touched = statistics.median(samples)
    return {"touched_per_token_mib": round(touched / MiB, 1), "hot_error_pct": round(100 * (est.hot_file - touched)
                                                                                      / touched, 1)}


def image_turn(model: Any, media: estimates.MediaUse) -> dict[str, Any]:
    """Two square images of media.image_side px through the engine (model.mmproj: a same-shape Gemma 3n or Gemma 4
    projector; gemma3nv encodes 256 tokens whatever the size, gemma4v follows it), 16 tokens each. An on-demand
    plan loads the projector for each image and frees it before decoding; a resident one keeps it. RssAnon is
    sampled every 20 ms for the peak."""
    projector = model.cfg.mmproj
    if not Path(projector).exists():
        return {"image": f"skipped: {projector} not found (bench/synth_gemma3n.py --vision writes it)"}
    import numpy as np

    from agent.turns.types import Media, Request

    before = probe.rss()["rss_anon"]
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], probe.rss()["rss_anon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for seed in (0, 1):
        side = media.image_side
        pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        results.append(model.generate(Request(text="Describe this.", max_tokens=16, media=[Media("image", pixels)])))
    done.set()
    sampler.join()
    after = probe.rss()["rss_anon"]
    weights, compute = estimates.projector_bytes(inspect(projector), media)
    return {"image": "ok", "image_tokens": results[0].image_tokens,
            "image_ttft_s": [round(r.ttft_ms / 1000, 2) for r in results],
            "image_media_s": [round(r.media_ms / 1000, 2) for r in results],
            "image_decode_tps": [round(r.decode_tps, 2) for r in results],
            "projector_peak_growth_mib": round((peak[0] - before) / MiB, 1),
            "projector_predicted_mib": round((weights + compute) / MiB, 1),
            "projector_resident": model.projector_loaded,
            "after_turns_growth_mib": round((after - before) / MiB, 1)}


def child_raw(spec: dict[str, Any]) -> None:
    """llama-cpp-python as a user would call it: every default (n_ctx 512, threads = cpu_count // 2); raw-threads
    with the engine's threads and n_ctx 2048; raw-norepack / raw-nommap: raw-threads without CPU repacking /
    without mmap. The same rendered prompt as the engine's."""
    import llama_cpp

    from agent.llm.prompt import gemma_prompt
    from agent.turns.types import Turn

    kwargs: dict[str, Any] = {"verbose": False}
    mode = spec["mode"]
    if mode != "raw":
        threads = spec["threads"] or memory_threads()
        kwargs.update(n_threads=threads, n_threads_batch=threads, n_ctx=2048, use_mmap=mode != "raw-nommap")
    started = time.monotonic()
    with llama_shim.model_params(repack=mode != "raw-norepack"):
        llm = llama_cpp.Llama(model_path=spec["model"], **kwargs)
    load = time.monotonic() - started
    emit(load_s=round(load, 2), loaded_rss_anon_mib=round(probe.rss()["rss_anon"] / MiB, 1))

    class Shim:  # question() needs tokenize + render
        def tokenize(self, prompt: str) -> list[int]:
            return list(llm.tokenize(prompt.encode(), add_bos=False, special=True))

        def render(self, turns: list[Turn]) -> str:
            return gemma_prompt(SYSTEM, turns, "<bos>")

    shim = Shim()
    text, _n = question(shim, spec["prompt_tokens"])
    tokens = shim.tokenize(shim.render([Turn("user", text)]))
    n_out = 0
    started = time.monotonic()
    first = started
    for _token in llm.generate(tokens, temp=0.0, top_k=1):
        n_out += 1
        if n_out == 1:
            first = time.monotonic()
        if n_out >= spec["decode_tokens"]:
            break
    ended = time.monotonic()
    emit(load_s=round(load, 2), prompt_tokens=len(tokens), completion_tokens=n_out,
         prefill_tps=round(len(tokens) / (first - started), 2),
         decode_tps=round((n_out - 1) / (ended - first), 2) if n_out > 1 else 0.0,
         setting=f"llama-cpp-python defaults (n_ctx {llm.n_ctx()}, threads {llm.n_threads})")


def child_soak(spec: dict[str, Any]) -> None:
    """N consecutive turns of a growing conversation; when the context is full the oldest half is dropped (so
    prompts cycle between ~1000 and ~2000 tokens, with one full re-prefill per cycle rather than every turn)."""
    from agent.llm.local import LocalModel
    from agent.turns.types import Request, Turn

    cfg = agent_config(spec["overrides"] + [f"model.path={spec['model']}", f"model.n_threads={spec['threads']}",
                                            f"model.max_tokens={spec['decode_tokens']}"])
    plan = planner.plan_for(cfg.model, cfg.memory)
    emit(plan=plan.summary())
    model = LocalModel(cfg.model, plan=plan)
    history: list[Turn] = []
    decode, prefill, worst_anon, longest, resets = [], [], 0, 0, 0
    for i in range(spec["turns"]):
        q = f"Question {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i % 40))
        turns = [*history, Turn("user", q)]
        if len(model.tokenize(model.render(turns))) + spec["decode_tokens"] > cfg.model.n_ctx:
            history = history[len(history) // 4 * 2:]  # drop the oldest half, in whole exchanges
            turns = [*history, Turn("user", q)]
            resets += 1
        result = model.generate(Request(text=q, max_tokens=spec["decode_tokens"]), turns=turns)
        history += [Turn("user", q), Turn("model", result.text)]
        decode.append(result.decode_tps)
        prefill.append(result.prefill_tps)
        worst_anon = max(worst_anon, probe.rss()["rss_anon"])
        longest = max(longest, result.prompt_tokens)
        if (i + 1) % 20 == 0:
            emit(turn=i + 1, prompt_tokens=result.prompt_tokens, decode_tps=round(result.decode_tps, 2),
                 rss_anon_mib=round(worst_anon / MiB, 1))
    emit(turns=len(decode), longest_prompt=longest, context_resets=resets,
         decode_tps=round(statistics.median(decode), 2),
         decode_tps_min=round(min(decode), 2), prefill_tps=round(statistics.median(prefill), 2),
         predicted_anon_mib=round(plan.chosen.anon / MiB, 1) if plan.chosen else None,
         measured_anon_peak_mib=round(worst_anon / MiB, 1))
    model.close()


def child(spec: dict[str, Any]) -> int:
    modes = {"engine": child_engine, "engine-image": child_engine, "engine-passive": child_engine, "raw": child_raw,
             "raw-threads": child_raw, "raw-norepack": child_raw, "raw-nommap": child_raw, "soak": child_soak}
    modes[spec["mode"]](spec)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="q4_0,q4_k_m", help=f"comma-separated: {', '.join(MODELS)} or paths")
    ap.add_argument("--configs", default="engine:uncapped,engine:capped,raw:capped,raw-threads:capped",
                    help="comma-separated MODE:CAP, MODE engine | engine-image | engine-passive | raw | raw-threads "
                    "| raw-norepack | raw-nommap, "
                    "CAP capped | uncapped (engine-image: the plan includes the projector and an image turn follows; "
                    "engine-passive: OMP_WAIT_POLICY=PASSIVE, OpenMP threads sleep at barriers instead of spinning)")
    ap.add_argument("--limit-mib", type=int, default=2048, help="the cgroup's memory limit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0: every CPU this process may use)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="agent config override")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="run every engine config once per variant (its config overrides), interleaved: A/B tests")
    ap.add_argument("--projector", default="", help=f"vision projector GGUF (default {PROJECTOR})")
    ap.add_argument("--image-px", type=int, default=768, help="side of the square image of engine-image turns")
    ap.add_argument("--soak", type=int, default=0, help="run N consecutive turns under the cap instead")
    ap.add_argument("--soak-tokens", type=int, default=24, help="tokens per soak turn")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
