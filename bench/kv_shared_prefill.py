"""Prompt evaluation with and without .ci/llama-patches' KV-shared-layer cut, on the real model shapes.

Evaluates --tokens random prompt tokens (micro-batches of --ubatch, logits for the last token only, as a turn
does) with the installed llama-cpp-python and with another build of the same release (--baseline: a folder holding
its `llama_cpp` package, e.g. a plain 0.3.36 wheel unpacked), each in its own process, rounds interleaved. One
JSON line per model and build: prompt seconds median (min-max), tokens/s, and the last token's argmax (equal when
the builds agree on this model).

    .venv/bin/python -m bench.kv_shared_prefill --baseline /tmp/plain-wheel [--rounds 5] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SYNTH = Path.home() / ".cache" / "gemma-agent" / "synth"
MODELS = {"gemma3n-e2b": SYNTH / "gemma3n-e2b-synthetic-q4_k_m-published.gguf",
          "gemma4-e2b": SYNTH / "gemma4-e2b-synthetic-q4_k_m-published.gguf"}

CHILD = """
import json, sys, time
import numpy as np
import llama_cpp
path, n, ubatch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_ubatch=ubatch, n_threads=2, n_threads_batch=2, verbose=False,
                      swa_full=True)
tokens = [int(t) for t in np.random.default_rng(0).integers(100, 20000, size=n)]
llm.eval(tokens)  # once to fault the weights in
llm.reset()
began = time.monotonic()
llm.eval(tokens)
seconds = time.monotonic() - began
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
print(json.dumps({"seconds": seconds, "argmax": int(logits.argmax()), "version": llama_cpp.__version__}))
"""


def once(model: Path, tokens: int, ubatch: int, package_dir: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if package_dir is not None:
        env["PYTHONPATH"] = str(package_dir)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tokens), str(ubatch)], env=env,
                          capture_output=True, text=True, timeout=600, cwd="/")
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="folder holding an unpatched llama_cpp package")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--ubatch", type=int, default=128, help="n_ubatch (the 2 GiB plan's)")
    args = ap.parse_args()
    for name, model in MODELS.items():
        if not model.exists():
            print(json.dumps({"bench": "kv_shared_prefill", "model": name, "skipped": f"{model} is missing"}))
            continue
        runs: dict[str, list[dict[str, float]]] = {"installed": [], "baseline": []}
        for _ in range(args.rounds):
            runs["installed"].append(once(model, args.tokens, args.ubatch, None))
            runs["baseline"].append(once(model, args.tokens, args.ubatch, args.baseline))
        for build, got in runs.items():
            seconds = [r["seconds"] for r in got]
            print(json.dumps({"bench": "kv_shared_prefill", "model": name, "build": build,
                              "version": got[0]["version"], "tokens": args.tokens,
                              "seconds": round(statistics.median(seconds), 3), "min": round(min(seconds), 3),
                              "max": round(max(seconds), 3),
                              "tok_s": round(args.tokens / statistics.median(seconds), 1),
                              "argmax": sorted({r["argmax"] for r in got})}), flush=True)


if __name__ == "__main__":
    main()
