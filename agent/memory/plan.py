"""The memory plan: the fastest load setting whose predicted memory fits the budget, or a refusal with the table of
every setting and what it needs.

Two kinds of memory count against a memory cgroup's limit:
- anonymous (not reclaimable, there is no swap): CPU-repacked weights, KV cache, compute buffers, the vision
  projector, the vocabulary, Python itself;
- file-backed model pages (clean, reclaimable): llama.cpp maps the file. The pages read for every token (the
  weights left in place, the tied output head) must stay resident, or each token reads them from disk again
  (thrashing). The per-layer-embedding table (each token reads one row) and the file copy of repacked weights
  are cold: the kernel may drop them, and `apply.release_cold_pages` drops them right after loading.

A setting fits when anonymous + hot file bytes <= budget - margin, the budget being memory.limit_mib, the
cgroup's limit or MemTotal, whichever is lowest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from agent.config import MemoryConfig, ModelConfig
from agent.gguf import GgufInfo, inspect
from agent.memory.estimate import LARGEST_MEDIA, Estimate, MediaUse, Setting, estimate
from agent.memory.probe import MiB, cgroup_limit, mem_total, python_baseline
from agent.memory.shape import Cpu, MemoryPlanError

GGML_TYPE_IDS = {"f16": 1, "q8_0": 8}  # ggml_type values for llama_context_params.type_k / type_v


@dataclass(frozen=True)
class Budget:
    limit: int  # bytes
    source: str  # where the limit comes from
    margin: int

    @property
    def usable(self) -> int:
        return self.limit - self.margin

def budget(cfg: MemoryConfig, proc: str = "/proc/self") -> Budget:
    """memory.limit_mib, the cgroup's limit or the machine's RAM, whichever is lowest, less memory.margin_mib."""
    options: list[tuple[int, str]] = []
    if cfg.limit_mib:
        options.append((cfg.limit_mib * MiB, "memory.limit_mib"))
    limit, where = cgroup_limit(proc)
    if limit is not None:
        options.append((limit, where))
    total = mem_total()
    if total is not None:
        options.append((total, "MemTotal"))
    if not options:
        options.append((2048 * MiB, "default 2 GiB"))
    best = min(options)
    return Budget(best[0], best[1], cfg.margin_mib * MiB)


def candidates(model: ModelConfig, cfg: MemoryConfig, cpu: Cpu, info: GgufInfo, has_projector: bool) -> list[Setting]:
    """Every setting the config allows, best first (bench/RESULTS.md): repacking decodes faster; a resident
    projector saves its load on each image; an f16 cache (exact) over q8_0 (no measurable speed difference here);
    then the largest ubatch (prefill speed barely depends on it from 64 tokens up; it only costs memory)."""
    any_repack = any(cpu.repacks(t) for t in info.tensors)
    repacks = [True, False] if cfg.repack == "auto" else [bool(cfg.repack)]
    if not any_repack:
        repacks = [False]
    kv_types = ["f16", "q8_0"] if cfg.kv_type == "auto" else [cfg.kv_type]
    if cfg.flash_attn is False:  # a quantized V cache needs flash attention
        kv_types = [kv for kv in kv_types if kv == "f16"]
        if not kv_types:
            raise MemoryPlanError("memory.kv_type q8_0 needs flash attention: set memory.flash_attn to auto or true")
    ubatches = sorted({u for u in (model.n_ubatch, 512, 256, 128, 64) if u <= model.n_ubatch}, reverse=True)
    # a projector released when idle must still fit while it is loaded: it plans as resident
    residency = {"auto": [True, False], "on_demand": [False]}.get(str(cfg.projector), [True])
    if not has_projector:
        residency = [True]
    out = []
    for repack in repacks:
        for resident in residency:
            for kv in kv_types:
                for ub in ubatches:
                    out.append(Setting(True, repack, model.n_ctx, kv, ub, resident, _flash(cfg, kv)))
    out.append(Setting(False, False, model.n_ctx, kv_types[0], ubatches[0], residency[0], _flash(cfg, kv_types[0])))
    return out


def _flash(cfg: MemoryConfig, kv_type: str) -> bool:
    return cfg.flash_attn is True or (cfg.flash_attn == "auto" and kv_type != "f16")


def manual_setting(model: ModelConfig, cfg: MemoryConfig) -> Setting:
    kv = "f16" if cfg.kv_type == "auto" else cfg.kv_type
    if kv != "f16" and cfg.flash_attn is False:
        raise MemoryPlanError("memory.kv_type q8_0 needs flash attention: set memory.flash_attn to auto or true")
    return Setting(True, cfg.repack is not False, model.n_ctx, kv, model.n_ubatch, cfg.projector != "on_demand",
                   _flash(cfg, kv))


# --- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The chosen setting (None: nothing fits), the budget, and every setting considered."""

    model_path: str
    budget: Budget
    chosen: Estimate | None
    table: list[Estimate]
    mode: str
    release_cold: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.chosen is not None and self.chosen.need <= self.budget.usable

    def summary(self) -> str:
        if self.chosen is None:
            return f"nothing fits {_mib(self.budget.usable)} MiB"
        e = self.chosen
        return (f"{e.setting.label()}: anonymous {_mib(e.anon)} MiB + hot file {_mib(e.hot_file)} MiB = "
                f"{_mib(e.need)} MiB of {_mib(self.budget.usable)} MiB usable ({self.budget.source} "
                f"{_mib(self.budget.limit)} MiB less margin {_mib(self.budget.margin)} MiB)")

    def lines(self, rows: int = 8) -> list[str]:
        """Human-readable lines for `gemma-agent check` and the log."""
        b = self.budget
        out = [f"memory      budget {_mib(b.limit)} MiB ({b.source}), margin {_mib(b.margin)} MiB, "
               f"usable {_mib(b.usable)} MiB; mode {self.mode}"]
        if self.chosen is not None:
            e = self.chosen
            verdict = "fits" if self.fits else "DOES NOT FIT (manual mode: loading anyway)"
            out.append(f"memory plan {e.setting.label()} -> {verdict}")
            out.append(f"  anonymous {_mib(e.anon)} MiB = repacked weights {_mib(e.repacked)} + KV cache "
                       f"{_mib(e.kv)} + compute {_mib(e.compute)} + vocabulary {_mib(e.vocab)} + projector "
                       f"{_mib(e.projector)} + python {_mib(e.baseline)} + other {_mib(e.fixed)}"
                       + (f" + speech-to-text {_mib(e.speech)}" if e.speech else ""))
            out.append(f"  file-backed: hot {_mib(e.hot_file)} MiB read per token, "
                       f"{_mib(e.mapped_file - e.hot_file)} MiB cold; {_mib(e.read_per_token)} MiB read per "
                       f"decoded token in all" + ("; cold pages dropped after load" if self.release_cold else ""))
        else:
            out.append(f"memory plan REFUSED: no setting fits {_mib(b.usable)} MiB")
            if self.table:
                least = min(self.table, key=lambda e: e.need)
                weights = least.repacked + least.hot_file
                out.append(f"  reason: the smallest setting ({least.setting.label()}) needs {_mib(least.need)} MiB; "
                           f"the weights read for every token alone are {_mib(weights)} MiB (repacked "
                           f"{_mib(least.repacked)} + mapped {_mib(least.hot_file)}), "
                           + ("more than the whole budget" if weights > b.usable else
                              f"leaving {_mib(b.usable - weights)} MiB for KV cache, compute and Python"))
        out.extend(self.notes)
        shown = self.table if self.chosen is None else self.table[:rows]
        if self.chosen is not None and self.chosen not in shown:  # the chosen row, below faster ones that do not fit
            shown = [*shown[:rows - 1], self.chosen]
        out.append(f"  {'setting':<46} {'anon':>6} {'hot':>6} {'need':>6}  verdict (MiB)")
        for e in shown:
            verdict = "fits" if e.need <= b.usable else f"over by {_mib(e.need - b.usable)}"
            mark = "*" if e is self.chosen else " "
            out.append(f" {mark}{e.setting.label():<46} {_mib(e.anon):>6} {_mib(e.hot_file):>6} "
                       f"{_mib(e.need):>6}  {verdict}")
        if len(self.table) > len(shown):
            out.append(f"  ... {len(self.table) - len(shown)} more settings not shown")
        return out

    def refusal(self) -> str:
        return "\n".join([f"{self.model_path}: does not fit the memory budget", *self.lines()])

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for llama_cpp.Llama (use `model_params(repack=...)` around the constructor)."""
        if self.chosen is None:
            raise MemoryPlanError(self.refusal())
        s = self.chosen.setting
        return {"use_mmap": s.mmap, "n_ubatch": s.n_ubatch, "type_k": GGML_TYPE_IDS[s.kv_type],
                "type_v": GGML_TYPE_IDS[s.kv_type], "flash_attn": s.flash_attn}


def _mib(n: int) -> int:
    return round(n / MiB)


def plan(info: GgufInfo, model: ModelConfig, cfg: MemoryConfig, projector: GgufInfo | None = None,
         cpu: Cpu | None = None, baseline: int | None = None, limit: Budget | None = None, speech: int = 0,
         media: MediaUse = LARGEST_MEDIA) -> Plan:
    """The fastest setting that fits (auto), or the configured one with its prediction (manual); `speech`: the
    anonymous bytes of a speech-to-text model that runs beside it (estimate.whisper_bytes); `media`: the largest
    image and clip the projector encodes."""
    cpu = cpu or Cpu.detect()
    base = python_baseline() if baseline is None else baseline
    limit = limit or budget(cfg)
    notes: list[str] = []
    if cfg.mode == "manual":
        table = [estimate(info, manual_setting(model, cfg), cpu, base, projector, speech=speech, media=media)]
        chosen: Estimate | None = table[0]
    else:
        table = [estimate(info, s, cpu, base, projector, speech=speech, media=media)
                 for s in candidates(model, cfg, cpu, info, projector is not None)]
        chosen = next((e for e in table if e.need <= limit.usable), None)
    result = Plan(info.path, limit, chosen, table, cfg.mode, notes=notes)
    if chosen is not None:
        whole = chosen.anon + chosen.mapped_file
        result.release_cold = cfg.release_cold is True or (cfg.release_cold == "auto" and chosen.setting.mmap
                                                            and whole > limit.usable)
    if chosen is not None and chosen is not table[0] and cfg.mode == "auto":
        notes.append(f"  faster settings need more than {_mib(limit.usable)} MiB (first: "
                     f"{table[0].setting.label()}, {_mib(table[0].need)} MiB)")
    if chosen is None:
        notes.extend(what_would_fit(info, model, cfg, projector, cpu, base, limit, table, speech, media))
    return result


def what_would_fit(info: GgufInfo, model: ModelConfig, cfg: MemoryConfig, projector: GgufInfo | None, cpu: Cpu,
                   baseline: int, limit: Budget, table: list[Estimate], speech: int = 0,
                   media: MediaUse = LARGEST_MEDIA) -> list[str]:
    """For a refusal: the nearest changes that would fit (a smaller context, a q8_0 KV cache, the projector loaded
    per image), and the limit the model needs as configured, or that a smaller quantization is needed."""
    out = []
    variants: list[tuple[str, ModelConfig, MemoryConfig]] = []
    if cfg.kv_type == "f16" or cfg.flash_attn is False:
        variants.append(("memory.kv_type: auto (a q8_0 KV cache, half the size)", model,
                         replace(cfg, kv_type="auto", flash_attn="auto")))
    if projector is not None and cfg.projector != "on_demand":
        variants.append(("memory.projector: on_demand", model, replace(cfg, projector="on_demand")))
    n_ctx = model.n_ctx // 2
    while n_ctx >= 512 and n_ctx > model.max_tokens:
        variants.append((f"model.n_ctx: {n_ctx}", replace(model, n_ctx=n_ctx, n_ubatch=min(model.n_ubatch, n_ctx),
                                                           n_batch=min(model.n_batch, n_ctx)), cfg))
        n_ctx //= 2
    for label, m, c in variants:
        setting = next((e for e in (estimate(info, s, cpu, baseline, projector, speech=speech, media=media)
                                    for s in candidates(m, replace(c, mode="auto"), cpu, info, projector is not None))
                        if e.need <= limit.usable), None)
        if setting is not None:
            out.append(f"  would fit: {label} ({setting.setting.label()}, {_mib(setting.need)} MiB)")
            break
    least = min(table, key=lambda e: e.need)
    weights = least.repacked + least.hot_file
    if weights > limit.usable:
        out.append(f"  the weights read for every token are {_mib(weights)} MiB: a smaller model or quantization "
                   f"(e.g. Q4_0 / Q4_K_M, or E2B instead of E4B) is needed under {_mib(limit.limit)} MiB")
    out.append(f"  as configured it needs a memory limit of at least {_mib(least.need + limit.margin)} MiB "
               f"(memory.limit_mib, or the unit's MemoryMax=; {_mib(limit.margin)} MiB margin included)")
    return out


def plan_for(model: ModelConfig, cfg: MemoryConfig, baseline: int | None = None,
             media: MediaUse = LARGEST_MEDIA) -> Plan:
    """Read the model (and projector) headers named in the config and plan."""
    info = inspect(model.path)
    projector = inspect(model.mmproj) if model.mmproj else None
    return plan(info, model, cfg, projector, baseline=baseline, media=media)
