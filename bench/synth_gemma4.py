"""Full-size synthetic Gemma 4 E2B text GGUFs: random weights, the published shape, llama.cpp's own quantizer.

The Gemma 4 counterpart of bench/synth_gemma3n.py (whose helpers it reuses), for memory and speed benchmarks that
need files the size of the real ones. Steps, each cached in ~/.cache/gemma-agent/synth/ and skipped when its file
exists; each runs in a child process and prints one JSON line (seconds, bytes, peak RSS):

1. the F16 source (norms F32; 4.65 G parameters, 9.3 GB), written in slices so memory stays bounded;
2. Q4_0 and Q4_K_M (`llama_cpp.llama_model_quantize`), with llama.cpp's default recipe and a "published" one;
3. with --projector: the same-shape vision (gemma4v) + audio (gemma4a) projector, F16 and Q8_0, as published in
   one file each (tests/support/synth_gemma4v.py; within 0.003 % of the published sizes);
4. with --run: load the Q4_K_M (n_ctx 2048, 2 threads) and time a prompt and a short greedy generation.

Then each file's bytes per tensor type, the size predicted from llama.cpp's type rules, and the deviation from
the published files. Why the default recipe misses, and what the "published" recipes change:

- Q4_K_M, default: +10 %. As for Gemma 3n, today's quantizer files `per_layer_token_embd` (2.35 G of the 4.65 G
  parameters) with `token_embd`, and Gemma ties the output to `token_embd`, so both become Q6_K. The published
  unsloth Q4_K_M is matched by a 5.5 bit/weight per-layer table (Q5_K) with everything else as today: the
  "published" recipe `per_layer_token_embd -> Q5_K` (the same as bench/synth_gemma3n.py's).
- Q4_0, default: +18 %: both tables Q6_K again. The published ggml-org Q4_0 is matched by the per-layer table at
  the file's own type (Q4_0) and `token_embd` (the tied output) at Q8_0: the "published" recipe. (Q4_0 for the
  table with token_embd at Q6_K would leave ~100 MB unexplained; everything Q4_0 is 7 % too small.)

Usage: .venv/bin/python -m bench.synth_gemma4 [--types Q4_0,Q4_K_M] [--recipes default,published] [--projector]
       [--run]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from agent.gguf import inspect
from bench import synth_gemma3n as s3n
from bench.synth_gemma3n import CACHE, FTYPES, emit, report_types
from tests.support import synth_gemma4 as g4
from tests.support import synth_gemma4v as g4v

Q = GGMLQuantizationType
SHAPE = g4.GEMMA4_E2B
SOURCE = CACHE / "gemma4-e2b-synthetic-f16.gguf"
# Published Gemma 4 E2B-it GGUFs (bytes) and where they come from.
PUBLISHED: dict[str, tuple[int, str]] = {
    "Q4_K_M": (3_106_738_272, "unsloth/gemma-4-E2B-it-GGUF rev 0314792d"),
    "Q4_0": (2_841_481_184, "ggml-org/gemma-4-E2B-it-GGUF rev 858dcdf9"),
    "Q8_0": (4_967_497_152, "ggml-org/gemma-4-E2B-it-GGUF"),
}
# Tensor-type overrides (regex -> type) per recipe and file type.
RECIPES: dict[str, dict[str, dict[str, Q]]] = {
    "default": {},
    "published": {
        "Q4_K_M": {r"^per_layer_token_embd\.weight$": Q.Q5_K},
        "Q4_0": {r"^per_layer_token_embd\.weight$": Q.Q4_0, r"^token_embd\.weight$": Q.Q8_0},
    },
}
PROMPT_TOKENS, GEN_TOKENS = 128, 32


def overrides(recipe: str, qtype: str) -> dict[str, Q]:
    return RECIPES[recipe].get(qtype, {})


def projector_path(qtype: str) -> Path:
    return CACHE / f"gemma4-e2b-mmproj-synthetic-{qtype.lower()}.gguf"


def quant_path(qtype: str, recipe: str) -> Path:
    suffix = "" if recipe == "default" else f"-{recipe}"
    return CACHE / f"gemma4-e2b-synthetic-{qtype.lower()}{suffix}.gguf"


# ------------------------------------------------------------------ children (measured separately)

def child_write(out: str) -> None:
    g4.write_gemma4_text(out, SHAPE, s3n.tokenizer_source())


def child_projector(out: str, qtype: str) -> None:
    g4v.write_gemma4_projector(out, SHAPE.n_embd, g4v.E2B_V, g4v.E2B_A, Q.__members__[qtype])


def child_quantize(src: str, out: str, qtype: str, recipe: str, threads: int, max_buf_mib: int) -> None:
    # bench.synth_gemma3n's quantizer looks its overrides up by recipe name: lend it ours (in this child only)
    name = f"gemma4-{recipe}-{qtype}"
    s3n.RECIPES[name] = overrides(recipe, qtype)
    s3n.child_quantize(src, out, qtype, name, threads, max_buf_mib)


def _proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) // 1024
    return out


def child_run(model: str, threads: int, n_ctx: int) -> None:
    """Load `model` with llama-cpp-python defaults (mmap, repack), time a prompt and a greedy generation."""
    import llama_cpp
    import numpy as np

    started = time.monotonic()
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, seed=1, verbose=False)
    load_s = time.monotonic() - started
    after_load = _proc_status()
    prompt = [2, *range(1000, 1000 + PROMPT_TOKENS - 1)]  # BOS + ordinary tokens: random weights, text is moot
    started = time.monotonic()
    llm.eval(prompt)
    prefill_s = time.monotonic() - started
    started = time.monotonic()
    for _ in range(GEN_TOKENS):  # greedy, one token per eval: what the daemon's decode loop costs
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    produced = GEN_TOKENS
    decode_s = time.monotonic() - started
    llm.close()
    emit(event="run", file=Path(model).name, bytes=os.path.getsize(model), n_ctx=n_ctx, threads=threads,
         load_seconds=round(load_s, 2), prompt_tokens=len(prompt), prefill_tok_s=round(len(prompt) / prefill_s, 1),
         generated=produced, decode_tok_s=round(produced / decode_s, 2), after_load_mib=after_load,
         peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def run_child(step: str, *args: str) -> tuple[float, int]:
    """One step in a child process, its llama.cpp log to CACHE/<step>-gemma4.log; (seconds, peak RSS MiB)."""
    return s3n.run_child(step, *args, module="bench.synth_gemma4", log_name=f"{step}-gemma4")


# ------------------------------------------------------------------ size prediction from llama.cpp's rules

def predicted_types(qtype: str, over: dict[str, Q]) -> dict[str, Q]:
    """The type llama.cpp's quantizer (src/llama-quant.cpp) gives each Gemma 4 tensor for `qtype`: norms, 1-D
    tensors and per_layer_model_proj kept; both embedding tables Q6_K (Q8_0 for Q8_0) as the tied output; for
    Q4_K_M, attn_v and ffn_down Q6_K on use_more_bits layers; then the overrides."""
    default = {"Q4_0": Q.Q4_0, "Q8_0": Q.Q8_0, "Q4_K_M": Q.Q4_K}[qtype]
    out: dict[str, Q] = {}
    i_attn_v, n_attn_v = 0, SHAPE.n_layer  # every layer has attn_v (the shared layers' are unused but present)
    for t in g4.gemma4_text_tensors(SHAPE, 262_144):
        name = t.name
        if len(t.shape) < 2 or "_norm.weight" in name or "per_layer_model_proj" in name:
            out[name] = t.qtype
            continue
        new = default
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            new = Q.Q8_0 if default == Q.Q8_0 else Q.Q6_K
        elif qtype == "Q4_K_M" and name.endswith("attn_v.weight"):
            new = Q.Q6_K if s3n._use_more_bits(i_attn_v, n_attn_v) else default
            i_attn_v += 1
        elif qtype == "Q4_K_M" and name.endswith("ffn_down.weight"):
            new = Q.Q6_K if s3n._use_more_bits(int(name.split(".")[1]), SHAPE.n_layer) else default
        for pattern, forced in over.items():
            if re.search(pattern, name):
                new = forced
                break
        out[name] = new
    return out


def tensor_bytes(types: dict[str, Q]) -> int:
    total = 0
    for t in g4.gemma4_text_tensors(SHAPE, 262_144):
        block, size = GGML_QUANT_SIZES[types[t.name]]
        total += -(-(t.n_elements // block * size) // 32) * 32  # 32-byte aligned
    return total


def hypotheses(metadata_bytes: int) -> None:
    """Which recipe reproduces each published size, given our header size (the Gemma 3 tokenizer, ~6.5 MB)?"""
    cases: dict[str, dict[str, dict[str, Q]]] = {
        "Q4_K_M": {"llama.cpp today (both tables Q6_K)": {},
                   "per_layer_token_embd Q5_K": {r"^per_layer_token_embd": Q.Q5_K},
                   "per_layer_token_embd Q4_K": {r"^per_layer_token_embd": Q.Q4_K}},
        "Q4_0": {"llama.cpp today (both tables Q6_K)": {},
                 "per_layer_token_embd Q4_0": {r"^per_layer_token_embd": Q.Q4_0},
                 "per_layer_token_embd Q4_0, token_embd Q8_0": {r"^per_layer_token_embd": Q.Q4_0,
                                                                r"^token_embd": Q.Q8_0},
                 "everything Q4_0": {r"token_embd": Q.Q4_0}},
        "Q8_0": {"llama.cpp today": {}},
    }
    for qtype, by_label in cases.items():
        target, source = PUBLISHED[qtype]
        for label, over in by_label.items():
            size = metadata_bytes + tensor_bytes(predicted_types(qtype, over))
            emit(event="hypothesis", qtype=qtype, recipe=label, predicted_bytes=size, published_bytes=target,
                 published=source, deviation_pct=round(100 * (size - target) / target, 2))


# ------------------------------------------------------------------ reporting

def report(path: Path, qtype: str | None, recipe: str | None) -> None:
    info = report_types(path)
    line: dict[str, Any] = {"event": "size", "file": path.name, "bytes": info.size}
    if qtype is not None and recipe is not None:
        predicted = info.data_offset + tensor_bytes(predicted_types(qtype, overrides(recipe, qtype)))
        line.update(predicted_bytes=predicted, predicted_off_bytes=info.size - predicted)
        if qtype in PUBLISHED:
            published, source = PUBLISHED[qtype]
            line.update(published_bytes=published, published=source,
                        deviation_pct=round(100 * (info.size - published) / published, 2))
    emit(**line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_K_M", help="comma-separated: Q4_0, Q4_K_M, Q8_0")
    ap.add_argument("--recipes", default="default,published", help="comma-separated: default, published")
    ap.add_argument("--projector", action="store_true", help="also write the vision + audio projector (F16, Q8_0)")
    ap.add_argument("--run", action="store_true", help="load the Q4_K_M and time a short generation")
    ap.add_argument("--drop-source", action="store_true", help="delete the F16 source once quantized")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-buf-mib", type=int, default=1024, help="quantizer slab size (bounds its memory)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        step, *rest = args.child
        {"write": lambda: child_write(rest[0]), "projector": lambda: child_projector(rest[0], rest[1]),
         "quantize": lambda: child_quantize(rest[0], rest[1], rest[2], rest[3], int(rest[4]), int(rest[5])),
         "run": lambda: child_run(rest[0], int(rest[1]), int(rest[2]))}[step]()
        return 0

    types = [t for t in args.types.split(",") if t]
    recipes = [r for r in args.recipes.split(",") if r]
    if bad := [t for t in types if t not in FTYPES] + [r for r in recipes if r not in RECIPES]:
        ap.error(f"unknown type or recipe: {', '.join(bad)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    if not SOURCE.exists():
        seconds, rss = run_child("write", str(SOURCE))
        emit(event="write", file=SOURCE.name, bytes=SOURCE.stat().st_size, seconds=round(seconds, 1),
             peak_rss_mib=rss)
    report(SOURCE, None, None)
    hypotheses(inspect(SOURCE).data_offset)
    for qtype in types:
        for recipe in recipes:
            if recipe != "default" and not overrides(recipe, qtype):
                continue
            out = quant_path(qtype, recipe)
            if not out.exists():
                seconds, rss = run_child("quantize", str(SOURCE), str(out), qtype, recipe, str(args.threads),
                                         str(args.max_buf_mib))
                emit(event="quantize", file=out.name, qtype=qtype, recipe=recipe, bytes=out.stat().st_size,
                     seconds=round(seconds, 1), peak_rss_mib=rss)
            report(out, qtype, recipe)
    if args.projector:
        for qtype in ("F16", "Q8_0"):
            out = projector_path(qtype)
            if not out.exists():
                seconds, rss = run_child("projector", str(out), qtype)
                emit(event="projector", file=out.name, seconds=round(seconds, 1), peak_rss_mib=rss)
            published = g4v.PUBLISHED_BYTES[("E2B", qtype)]
            size = out.stat().st_size
            emit(event="size", file=out.name, bytes=size, published_bytes=published,
                 deviation_pct=round(100 * (size - published) / published, 4))
    if args.drop_source:
        SOURCE.unlink()
    if args.run:
        model = next((p for p in (quant_path("Q4_K_M", "published"), quant_path("Q4_K_M", "default"))
                      if p.exists()), None)
        if model is None:
            ap.error("--run needs a Q4_K_M file: include Q4_K_M in --types")
        seconds, rss = run_child("run", str(model), str(args.threads), str(args.n_ctx))
        emit(event="run_process", file=model.name, seconds=round(seconds, 1), peak_rss_mib=rss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
