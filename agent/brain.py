"""The model engine: one llama.cpp model, one turn at a time, behind a bounded request queue.

`Model` owns the llama-cpp-python `Llama` and runs a turn synchronously: format the prompt (prefix-stable, so
the system prompt's KV cache is reused), stream tokens, stop on end-of-turn / EOS / max_tokens / deadline /
cancel. `Engine` puts a worker thread and a bounded queue in front of it: a full queue refuses a request at
once, and every accepted request ends in exactly one result or one error for its sink.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent import memory
from agent.config import ModelConfig
from agent.conversation import Conversation
from agent.projector import Media, Projector, ProjectorError, Prompt
from agent.prompt import END, ChatTemplate, TemplateProblem, Turn, gemma_prompt

log = logging.getLogger("agent.brain")

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a new seed each turn


class EngineError(Exception):
    """A turn that cannot be served; `code` goes into the `error` payload."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class ModelLoadError(Exception):
    """The model file could not be loaded."""


def new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Request:
    """One turn asked of the model."""

    text: str
    id: str = field(default_factory=new_id)
    source: str = "ask"
    max_tokens: int | None = None
    remember: bool = True  # part of the conversation (False: a motion-triggered description, say)
    media: list[Media] = field(default_factory=list)  # images / audio evaluated before the text
    transcript: str | None = None  # what speech-to-text heard, for speech turns
    system: str | None = None  # replaces model.system_prompt for this turn (mqtt.allow_remote_system_prompt)
    created: float = field(default_factory=time.monotonic)


@dataclass
class Result:
    """What a turn produced, with the figures a user tunes by."""

    id: str
    text: str
    source: str
    stop: str  # "end" | "max_tokens" | "deadline" | "cancelled" | "context"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float
    latency_ms: float
    prefill_tps: float
    decode_tps: float
    image_tokens: int = 0
    audio_tokens: int = 0
    transcript: str | None = None
    queue_ms: float = 0.0  # waiting behind other turns
    media_ms: float = 0.0  # encoding images/audio and evaluating them (part of ttft_ms)

    def payload(self) -> dict[str, Any]:
        extra = {} if self.transcript is None else {"transcript": self.transcript}
        return {
            "id": self.id, "text": self.text, "source": self.source, "done": True, "stop": self.stop, **extra,
            "tokens": {"prompt": self.prompt_tokens, "cached": self.cached_tokens,
                       "completion": self.completion_tokens, "image": self.image_tokens,
                       "audio": self.audio_tokens},
            "latency_ms": round(self.latency_ms, 1), "ttft_ms": round(self.ttft_ms, 1),
            "queue_ms": round(self.queue_ms, 1), "media_ms": round(self.media_ms, 1),
            "prefill_tps": round(self.prefill_tps, 1), "decode_tps": round(self.decode_tps, 1),
        }


class Backend(Protocol):
    """What the Engine needs of a model: the local `Model` here, or `agent.remote.RemoteModel`."""

    cfg: ModelConfig
    projector_used: float

    @property
    def name(self) -> str: ...

    @property
    def projector_loaded(self) -> bool: ...

    def generate(self, request: Request, turns: list[Turn] | None = None,
                 on_delta: Callable[[str, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Result: ...

    def fits(self, turns: list[Turn], system: str | None, budget: int) -> bool: ...

    def release_projector(self) -> bool: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where a turn's output goes. Called from the engine's worker thread; must not block for long."""

    def on_delta(self, request: Request, delta: str, index: int) -> None: ...

    def on_result(self, request: Request, result: Result) -> None: ...

    def on_error(self, request: Request, code: str, detail: str) -> None: ...


def must_stop(cancel: threading.Event | None, deadline: float) -> str | None:
    """"cancelled" or "deadline" when a running turn has to stop now, else None."""
    if cancel is not None and cancel.is_set():
        return "cancelled"
    return "deadline" if time.monotonic() > deadline else None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_EXPECTED = ("using full-size SWA cache",)  # warnings about choices we make on purpose: logged at debug
_llama_log_state: dict[str, Any] = {}


def route_llama_logs() -> None:
    """Send llama.cpp's log lines (which arrive in pieces, on any thread) to the `llama.cpp` logger."""
    if _llama_log_state:
        return
    import llama_cpp

    logger = logging.getLogger("llama.cpp")
    pending: list[str] = []
    level = [logging.DEBUG]

    def callback(lvl: int, text: bytes, _data: Any) -> None:
        if lvl != 5:  # 5 = GGML_LOG_LEVEL_CONT: continues the previous line
            level[0] = _GGML_LEVELS.get(lvl, logging.DEBUG)
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            line = "".join(pending).rstrip()
            pending.clear()
            if line:
                logger.log(logging.DEBUG if any(e in line for e in _EXPECTED) else level[0], "%s", line)

    _llama_log_state["cb"] = llama_cpp.llama_log_callback(callback)  # keep a reference: C holds the pointer
    llama_cpp.llama_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))
    from llama_cpp import mtmd_cpp  # libmtmd (projectors) logs through its own hooks

    mtmd_cpp.mtmd_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))


class Model:
    """A loaded GGUF model and the chat format it speaks. Not thread-safe: one owner (the Engine's worker)."""

    def __init__(self, cfg: ModelConfig, path: str | None = None, plan: memory.Plan | None = None) -> None:
        """`plan` (agent.memory.plan_for) picks mmap, repacking, ubatch, KV cache type and flash attention, and
        whether cold pages are dropped after loading; without one, llama.cpp's defaults and cfg.n_ubatch."""
        import llama_cpp

        self.cfg = cfg
        self.path = path or cfg.path
        self.plan = plan
        route_llama_logs()
        threads = cfg.n_threads or available_cpus()
        options: dict[str, Any] = {"n_ubatch": cfg.n_ubatch, "use_mmap": True}
        if plan is not None:
            if plan.chosen is None:
                raise ModelLoadError(plan.refusal())
            options.update(plan.load_options())
            log.info("memory plan: %s", plan.summary())
        started = time.monotonic()
        try:
            with memory.model_params(repack=plan is None or plan.chosen is None or plan.chosen.setting.repack):
                self.llm = llama_cpp.Llama(
                    model_path=self.path, n_ctx=cfg.n_ctx, n_batch=cfg.n_batch,
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=cfg.n_gpu_layers,
                    seed=RANDOM_SEED if cfg.seed < 0 else cfg.seed,
                    # A full-size sliding-window cache keeps every position, so a reused prefix stays exact after
                    # long turns (a pruned SWA cache would silently attend over missing positions).
                    swa_full=True, verbose=False, **options,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{self.path}: llama.cpp could not load the model: {exc}") from None
        if plan is not None and plan.release_cold and plan.chosen is not None:
            dropped = memory.release_cold_pages(self.path, plan.chosen)
            log.info("dropped %.0f MiB of cold model pages (per-layer embeddings, repacked weights' file copy)",
                     dropped / memory.MiB)
        self.load_seconds = time.monotonic() - started
        self._vocab = self.llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._end_of_turn = self._single_token(END)
        self._abort_deadline = float("inf")
        self._abort_event: threading.Event | None = None
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort_cb = llama_cpp.ggml_abort_callback()
        self._set_abort = llama_cpp.llama_set_abort_callback
        self.template = self._load_template()
        if cfg.lora:
            self._apply_lora(cfg.lora, cfg.lora_scale)
        self.threads = threads
        self._projector: Projector | None = None
        self.projector_used = 0.0
        # False when the memory plan loads the projector for each image and frees it before decoding
        self.projector_resident = plan is None or plan.chosen is None or plan.chosen.setting.projector_resident
        log.info("model loaded: %s in %.2fs (n_ctx %d, threads %d, chat format %s)", self.path,
                 self.load_seconds, cfg.n_ctx, threads, "GGUF template" if self.template else "built-in Gemma")

    def projector(self) -> Projector:
        """The model.mmproj projector, loaded on first use."""
        if self._projector is None:
            if not self.cfg.mmproj:
                raise EngineError("no_projector", "this model has no projector (model.mmproj is not set): it "
                                  "cannot take images or audio")
            try:
                self._projector = Projector(self.cfg.mmproj, self.llm, self.threads, self.cfg.n_gpu_layers != 0)
            except ProjectorError as exc:
                raise EngineError("projector_error", str(exc)) from None
        self.projector_used = time.monotonic()
        return self._projector

    @property
    def projector_loaded(self) -> bool:
        return self._projector is not None

    def release_projector(self, why: str = "") -> bool:
        """Free the projector's memory (it is loaded again on next use); True if one was loaded."""
        if self._projector is None:
            return False
        self._projector.close()
        self._projector = None
        memory.return_freed_heap()
        log.info("projector released (%s)", why or f"{time.monotonic() - self.projector_used:.0f}s unused")
        return True

    def _apply_lora(self, path: str, scale: float) -> None:
        """Load a GGUF LoRA adapter onto the model (freed with it) and enable it at `scale`. Done here rather
        than through Llama(lora_path=...), which would turn mmap off and load the whole model into RAM."""
        import llama_cpp

        adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode())
        if not adapter:
            raise ModelLoadError(f"{path}: llama.cpp could not load the LoRA adapter (it must be a GGUF LoRA made "
                                 f"for {self.path}'s architecture and shapes)")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale)):
            raise ModelLoadError(f"{path}: llama.cpp could not enable the LoRA adapter")
        log.info("LoRA adapter %s enabled at scale %.2f", path, scale)

    def _single_token(self, text: str) -> int | None:
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def _load_template(self) -> ChatTemplate | None:
        source = self.llm.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        try:
            return ChatTemplate(source, self._token_text(self.llm.token_bos()), self._token_text(self.llm.token_eos()))
        except TemplateProblem as exc:
            log.warning("%s; using the built-in Gemma turn format", exc)
            return None

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def name(self) -> str:
        return str(self.llm.metadata.get("general.name", "Gemma"))

    def fits(self, turns: list[Turn], system: str | None, budget: int) -> bool:
        """Whether these turns plus an answer of `budget` tokens fit the context window."""
        return len(self.tokenize(self.render(turns, system))) + budget <= self.n_ctx

    def render(self, turns: list[Turn], system: str | None = None) -> str:
        system = self.cfg.system_prompt if system is None else system
        if self.template is not None:
            try:
                return self.template.render(system, turns)
            except TemplateProblem as exc:
                log.warning("%s; using the built-in Gemma turn format", exc)
                self.template = None
        return gemma_prompt(system, turns, self._token_text(self.llm.token_bos()))

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` are already in the KV cache."""
        cached = self.llm.input_ids[: self.llm.n_tokens]
        n = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    def _should_abort(self, _data: Any) -> bool:
        event = self._abort_event
        return (event is not None and event.is_set()) or time.monotonic() > self._abort_deadline

    def generate(self, request: Request, turns: list[Turn] | None = None,
                 on_delta: Callable[[str, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Result:
        """Run one turn; `turns` defaults to the request's text as the only user turn."""
        cfg = self.cfg
        started = time.monotonic()
        deadline = started + cfg.deadline
        turns = list(turns or [Turn("user", request.text)])
        prompt: Prompt | None = None
        if request.media:
            projector = self.projector()
            marked = projector.marker * len(request.media) + turns[-1].text
            turns[-1] = Turn("user", marked)
            try:
                prompt = projector.prompt(self.render(turns, request.system), request.media)
            except ProjectorError as exc:
                raise EngineError("projector_error", str(exc)) from None
            tokens = prompt.tokens
        else:
            tokens = self.tokenize(self.render(turns, request.system))
        try:
            return self._run(request, tokens, prompt, started, deadline, on_delta, cancel)
        finally:
            if prompt is not None:
                prompt.close()

    def _run(self, request: Request, tokens: list[int], prompt: Prompt | None, started: float, deadline: float,
             on_delta: Callable[[str, int], None] | None, cancel: threading.Event | None) -> Result:
        cfg = self.cfg
        room = self.n_ctx - len(tokens)
        if room < 2:
            raise EngineError("prompt_too_long", f"the prompt is {len(tokens)} tokens; the context is {self.n_ctx}")
        budget = min(request.max_tokens or cfg.max_tokens, room - 1)
        cached = min(self.cached_prefix(tokens), len(tokens) - 1)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        n_out, first_at, stop, media_s = 0, 0.0, "max_tokens", 0.0
        self._abort_deadline, self._abort_event = deadline, cancel
        # The abort callback runs per graph node: armed for the prompt only, where one decode can take seconds.
        self._set_abort(self.llm._ctx.ctx, self._abort_cb, None)
        try:
            if prompt is not None:
                media_began = time.monotonic()
                self._feed_media(prompt)
                media_s = time.monotonic() - media_began
                if not self.projector_resident:  # the plan had no room for it beside decoding: free it now
                    prompt.close()
                    self.release_projector("an on-demand plan")
            for token in self.llm.generate(
                tokens, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, temp=cfg.temperature,
                repeat_penalty=cfg.repeat_penalty, reset=True,
            ):
                if n_out == 0:
                    first_at = time.monotonic()
                    self._set_abort(self.llm._ctx.ctx, self._no_abort_cb, None)
                if self._is_eog(self._vocab, token) or token == self._end_of_turn:
                    stop = "end"
                    break
                n_out += 1
                text = decoder.decode(self.llm.detokenize([token]))
                if text:
                    pieces.append(text)
                    if on_delta is not None:
                        on_delta(text, len(pieces) - 1)
                if halted := must_stop(cancel, deadline):
                    stop = halted
                    break
                if n_out >= budget:
                    stop = "max_tokens" if budget == (request.max_tokens or cfg.max_tokens) else "context"
                    break
        except RuntimeError as exc:  # llama_decode aborted (cancel/deadline during the prompt) or failed
            if not self._should_abort(None):
                raise EngineError("model_error", f"llama.cpp failed during the turn: {exc}") from None
            stop = "deadline" if time.monotonic() > deadline else "cancelled"
        finally:
            self._set_abort(self.llm._ctx.ctx, self._no_abort_cb, None)
            self._free_sampler()
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_delta is not None:
                on_delta(tail, len(pieces) - 1)
        ended = time.monotonic()
        first_at = first_at or ended
        prefill_s, decode_s = first_at - started, ended - first_at
        return Result(
            id=request.id, text="".join(pieces), source=request.source, stop=stop,
            prompt_tokens=len(tokens), cached_tokens=cached, completion_tokens=n_out,
            ttft_ms=prefill_s * 1000, latency_ms=(ended - started) * 1000,
            prefill_tps=(len(tokens) - cached) / prefill_s if prefill_s > 0 else 0.0,
            decode_tps=(n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0,
            queue_ms=(started - request.created) * 1000, media_ms=media_s * 1000,
            image_tokens=prompt.media_tokens("image") if prompt else 0,
            audio_tokens=prompt.media_tokens("audio") if prompt else 0,
            transcript=request.transcript,
        )

    def _free_sampler(self) -> None:
        """Free this turn's sampler chain now. llama-cpp-python's generate() makes one per call (12 bytes x
        vocabulary: 3 MiB for Gemma) whose only way out is a reference cycle, so RssAnon grew 3 MiB a turn until
        Python's cyclic GC happened to run (+75 MiB over 40 turns), which under a tight memory plan evicts the hot
        weights (bench/RESULTS.md finding 10). A full gc.collect() also works but costs ~10 ms a turn."""
        sampler, self.llm._sampler = self.llm._sampler, None  # generate() makes a new one; sample() copes with None
        if sampler is not None:
            sampler.close()

    def _feed_media(self, prompt: Prompt) -> None:
        """Evaluate every piece before the last text piece that the KV cache does not already hold.

        Media pieces stand in the token bookkeeping as a run of one negative pseudo-token derived from their
        content, so an identical image is reused and a different one never is; `llm.generate` then finds the
        whole prefix cached and evaluates only the final text.
        """
        llm = self.llm
        tokens = prompt.tokens
        keep = self.cached_prefix(tokens)
        pos = 0
        for piece in prompt.pieces:  # never keep half of a media chunk
            if piece.kind != "text" and pos < keep < pos + len(piece.tokens):
                keep = pos
            pos += len(piece.tokens)
        llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        llm.n_tokens = keep
        llm._requires_eval = True  # the logits are stale now: generate() must evaluate at least one token
        pos = 0
        for piece in prompt.pieces[:-1]:
            end = pos + len(piece.tokens)
            if end > keep:
                if piece.kind == "text":
                    llm.eval(piece.tokens[max(0, keep - pos):])
                else:
                    new_n_past = self.projector().evaluate(piece, llm._ctx.ctx, llm.n_tokens, llm.n_batch)
                    llm.input_ids[llm.n_tokens:new_n_past] = piece.tokens[0]
                    llm.n_tokens = new_n_past
            pos = end

    def close(self) -> None:
        self.llm.close()


_STOP = object()


class Engine:
    """A worker thread serving requests one at a time from a bounded queue."""

    def __init__(self, model: Backend, queue_size: int, conversation: Conversation | None = None,
                 projector_idle: float | None = None) -> None:
        """`projector_idle`: release the projector after this many seconds without a media turn (None: keep)."""
        self.model = model
        self.conversation = conversation
        self.projector_idle = projector_idle
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self.current: Request | None = None
        self.last_result: Result | None = None
        self.turns_served = 0
        self.progress_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue a request, or raise EngineError('queue_full') at once."""
        if self._cancel.is_set():
            raise EngineError("shutting_down", "the daemon is stopping")
        try:
            self._queue.put_nowait((request, sink))
        except queue.Full:
            raise EngineError(
                "queue_full", f"{self._queue.maxsize} requests are already waiting; try again later"
            ) from None

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=None if self.projector_idle is None else 1.0)
            except queue.Empty:
                self._release_idle_projector()
                continue
            if item is _STOP:
                return
            request, sink = item
            self.current = request
            self.progress_at = time.monotonic()
            try:
                if self._cancel.is_set():
                    sink.on_error(request, "shutting_down", "the daemon stopped before this request was served")
                    continue
                result = self.model.generate(request, turns=self._turns(request),
                                             on_delta=functools.partial(sink.on_delta, request), cancel=self._cancel)
                if self.conversation is not None and request.remember and result.stop != "cancelled":
                    self.conversation.record(request.text, result.text)
                self.last_result = result
                self.turns_served += 1
                sink.on_result(request, result)
            except EngineError as exc:
                sink.on_error(request, exc.code, exc.detail)
            except Exception as exc:  # a bug must not kill the worker: report it and keep serving
                log.exception("turn %s failed", request.id)
                sink.on_error(request, "internal_error", f"{type(exc).__name__}: {exc}")
            finally:
                self.current = None
                self.progress_at = time.monotonic()

    def _release_idle_projector(self) -> None:
        idle = self.projector_idle
        if idle is not None and self.model.projector_used and time.monotonic() - self.model.projector_used > idle:
            self.model.release_projector()
            self.model.projector_used = 0.0

    def _turns(self, request: Request) -> list[Turn]:
        """The conversation so far plus this question, dropping the oldest exchanges until the answer fits."""
        question = Turn("user", request.text)
        if self.conversation is None:
            return [question]
        budget = request.max_tokens or self.model.cfg.max_tokens
        while True:
            turns = [*self.conversation.history(), question]
            if self.model.fits(turns, request.system, budget):
                return turns
            if not self.conversation.forget_oldest():
                return turns

    def stop(self, timeout: float = 4.0) -> bool:
        """Cancel the running turn, fail the queued ones, and join the worker. True if it ended in time."""
        self._cancel.set()  # seen between tokens, and by llama.cpp's abort callback during the prompt
        while True:  # fail waiting requests now so their senders hear back before we go offline
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            request, sink = item
            sink.on_error(request, "shutting_down", "the daemon stopped before this request was served")
        if self._thread.ident is None:  # never started
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()
