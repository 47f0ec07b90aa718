"""A GGUF model loaded here through llama-cpp-python, running one turn at a time.

`LocalModel` formats the prompt (prefix-stable, so the system prompt's KV cache is reused), evaluates images and
audio through the projector, streams tokens and stops on end-of-turn / EOS / max_tokens / deadline / cancel. Every
use of llama-cpp-python beyond its public API goes through `llama_shim`.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import ModelConfig, available_cpus
from agent.contract.codes import AgentError, ErrorCode, StopReason
from agent.llm import llama_shim
from agent.llm.engine import must_stop
from agent.llm.native_logs import route_llama_logs
from agent.llm.projector import (
    Encoded,
    Piece,
    Projector,
    ProjectorError,
    Prompt,
    Tokenized,
    decode_embeddings,
    media_marker,
)
from agent.llm.prompt import END, ChatTemplate, TemplateProblem, completion_prompt, gemma_prompt, prompt_format
from agent.memory import apply
from agent.memory.plan import Plan
from agent.turns.types import Flag, Media, Request, Result, Turn

log = logging.getLogger("agent.llm")

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a new seed each turn


class ModelLoadError(Exception):
    """The model file could not be loaded."""


def media_positions(media: Media) -> int:
    """The positions a media item takes in the context, for fitting a conversation: an image 256 (Gemma's
    projectors), audio 25 a second (Gemma 4's) and some slack."""
    return 256 if media.kind == "image" else int(len(media.data) / 16000 * 25) + 8


def one_line(pieces: list[str], text: str) -> tuple[str, bool]:
    """`text` cut to what continues the answer line so far (no blanks before the answer starts, nothing past a
    newline), and whether the line ended in it."""
    if not any(p.strip() for p in pieces):
        text = text.lstrip()  # a newline left after this ends a line that has started
    cut = text.find("\n")
    return (text, False) if cut < 0 else (text[:cut], True)


@dataclass(frozen=True)
class OwnAnswer:
    """The model's last answer as it produced it. A follow-up's prompt carries that answer re-tokenized from its
    text, which can cut it into other tokens than the model produced (always so for random weights, and for any
    model where the turn format puts a blank before the answer): the KV cache then misses from there and the whole
    answer is evaluated again. Put back as produced, the cache still holds it and only the new question is."""

    after: list[int]  # the prompt the answer followed
    produced: list[int]  # what the model produced, in the KV cache after `after`
    text: str  # the answer as the conversation records it (blanks around it stripped)

    def put_back(self, tokens: list[int], detokenize: Callable[[list[int]], bytes], start: int = 0) -> list[int] | None:
        """`tokens` with the answer as produced, when they carry its text right after its prompt (at or past
        position `start`); None when they do not, or already carry it as produced."""
        n = len(self.after)
        if n < start or tokens[:n] != self.after:
            return None
        spelled = b""
        for end in range(n, min(len(tokens), n + len(self.text.encode()) + 4)):
            spelled += detokenize([tokens[end]])
            if spelled.decode("utf-8", errors="replace").strip() == self.text:
                if tokens[n:end + 1] == self.produced:
                    return None
                return [*self.after, *self.produced, *tokens[end + 1:]]
        return None


class LocalModel:
    """A loaded GGUF model and the chat format it speaks. Not thread-safe: one owner (the Engine's worker)."""

    def __init__(self, cfg: ModelConfig, path: str | None = None, plan: Plan | None = None) -> None:
        """`plan` (agent.memory.plan.plan_for) picks mmap, repacking, ubatch, KV cache type and flash attention, and
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
            with llama_shim.model_params(repack=plan is None or plan.chosen is None or plan.chosen.setting.repack):
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
            dropped = apply.release_cold_pages(self.path, plan.chosen)
            log.info("dropped %.0f MiB of cold model pages (per-layer embeddings, repacked weights' file copy)",
                     dropped / apply.MiB)
        self.load_seconds = time.monotonic() - started
        self._vocab = llama_shim.vocab_handle(self.llm)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._end_of_turn = self._single_token(END)
        self._abort_deadline = float("inf")
        self._abort_event: Flag | None = None
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort_cb = llama_cpp.ggml_abort_callback()
        self._set_abort = llama_cpp.llama_set_abort_callback
        self.prompt_format, why = prompt_format(cfg.prompt_format, self.llm.metadata)
        self.template = self._load_template() if self.prompt_format == "chat" else None
        if cfg.lora:
            self._apply_lora(cfg.lora, cfg.lora_scale)
        self.threads = threads
        self._projector: Projector | None = None
        self._tokenized: Tokenized | None = None  # the last media prompt, to cut a follow-up without the projector
        self.answers: list[OwnAnswer] = []  # recent answers as produced, put back into the prompts that carry them
        self.projector_used = 0.0
        self._ahead: dict[int, Encoded] = {}  # media encoded by a preparation, evaluated with its turn's audio
        self.held = 0.0  # when a preparation began keeping an on-demand projector for its turn's audio (0: none)
        self._load_s = self._encode_s = 0.0  # this turn's projector load and encode time
        # False when the memory plan loads the projector for each image and frees it before decoding
        self.projector_resident = plan is None or plan.chosen is None or plan.chosen.setting.projector_resident
        log.info("model loaded: %s in %.2fs (n_ctx %d, threads %d); prompted as %s: %s", self.path,
                 self.load_seconds, cfg.n_ctx, threads, self.prompt_format, why)

    def projector(self) -> Projector:
        """The model.mmproj projector, loaded on first use."""
        if self._projector is None:
            if not self.cfg.mmproj:
                raise AgentError(ErrorCode.NO_PROJECTOR, "this model has no projector (model.mmproj is not set): it "
                                  "cannot take images or audio")
            began = time.monotonic()
            try:
                self._projector = Projector(self.cfg.mmproj, llama_shim.model_handle(self.llm), self.threads,
                                            self.cfg.n_gpu_layers != 0)
            except ProjectorError as exc:
                raise AgentError(ErrorCode.PROJECTOR_ERROR, str(exc)) from None
            self._load_s += time.monotonic() - began
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
        self.held = 0.0
        apply.return_freed_heap()
        log.info("projector released (%s)", why or f"{time.monotonic() - self.projector_used:.0f}s unused")
        return True

    def _apply_lora(self, path: str, scale: float) -> None:
        """Load a GGUF LoRA adapter onto the model (freed with it) and enable it at `scale`. Done here rather
        than through Llama(lora_path=...), which would turn mmap off and load the whole model into RAM."""
        import llama_cpp

        adapter = llama_cpp.llama_adapter_lora_init(llama_shim.model_handle(self.llm), path.encode())
        if not adapter:
            raise ModelLoadError(f"{path}: llama.cpp could not load the LoRA adapter (it must be a GGUF LoRA made "
                                 f"for {self.path}'s architecture and shapes)")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(llama_shim.context_handle(self.llm), adapters, 1, scales):
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
        """Whether these turns (their media counted by media_positions) plus an answer of `budget` tokens fit the
        context window."""
        media = sum(media_positions(m) for t in turns for m in t.media)
        return len(self.tokenize(self.render(turns, system))) + media + budget <= self.n_ctx

    def render(self, turns: list[Turn], system: str | None = None) -> str:
        system = self.cfg.system_prompt if system is None else system
        bos = self._token_text(self.llm.token_bos())
        if self.prompt_format == "completion":
            return completion_prompt(system, turns, bos)
        if self.template is not None:
            try:
                return self.template.render(system, turns)
            except TemplateProblem as exc:
                log.warning("%s; using the built-in Gemma turn format", exc)
                self.template = None
        return gemma_prompt(system, turns, bos)

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` are already in the KV cache."""
        cached = llama_shim.cached_tokens(self.llm)
        n = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    def _arm_abort(self, deadline: float, cancel: Flag | None) -> None:
        """llama.cpp stops a decode once `cancel` is set or `deadline` passes (until _disarm_abort)."""
        self._abort_deadline, self._abort_event = deadline, cancel
        self._set_abort(llama_shim.context_handle(self.llm), self._abort_cb, None)

    def _disarm_abort(self) -> None:
        self._set_abort(llama_shim.context_handle(self.llm), self._no_abort_cb, None)

    def _should_abort(self, _data: Any) -> bool:
        event = self._abort_event
        return (event is not None and event.is_set()) or time.monotonic() > self._abort_deadline

    def generate(self, request: Request, turns: list[Turn] | None = None,
                 on_delta: Callable[[str, int], None] | None = None, cancel: Flag | None = None) -> Result:
        """Run one turn; `turns` (the conversation, the question last, media on the turns that show them)
        defaults to the request's text and media as the only user turn."""
        cfg = self.cfg
        started = time.monotonic()
        deadline = started + cfg.deadline
        self._load_s = self._encode_s = 0.0
        self.held = 0.0  # the turn a preparation kept the projector for (or any other: it frees it)
        turns = list(turns or [Turn("user", request.text, tuple(request.media))])
        shown = any(t.media for t in turns)
        if not shown and self._projector is not None and not self.projector_resident:
            self.release_projector("a text turn: the memory plan has no room for it beside decoding")
        prompt = self._media_prompt(turns, request.system) if shown else None
        if prompt is not None:
            tokens = prompt.tokens  # answers put back by _media_prompt
        else:
            tokens = self._put_back(self.tokenize(self.render(turns, request.system)))
        try:
            return self._run(request, tokens, prompt, started, deadline, on_delta, cancel)
        finally:
            self._ahead.clear()
            if prompt is not None:
                prompt.close()

    def prepare(self, request: Request, turns: list[Turn]) -> None:
        """Evaluate the prompt up to the request's question, its media included (the question is not known yet:
        a speech turn prepared at speech onset, the system prompt at start), so the turn finds the rest in the KV
        cache and evaluates only its question.

        A turn that will bring its speech as audio (`audio_follows`) under an on-demand plan finds the projector
        loaded instead, and its frame encoded but not evaluated: one load serves the frame and the clip, and the
        projector is freed before either is evaluated (`release_held` when the turn does not come)."""
        hold = request.audio_follows and bool(self.cfg.mmproj) and not self.projector_resident
        pictured = any(t.media for t in turns[:-1]) and not request.media  # cut only by libmtmd: the turn's work
        if pictured and not hold:
            return
        self._arm_abort(time.monotonic() + self.cfg.deadline, request.cancel)
        began = time.monotonic()
        try:
            if request.media:
                self._prepare_media(turns, request.system, hold)
            elif not pictured:
                self._prefill(self._head(turns, request.system))
            if hold:
                self.projector()
                self.held = time.monotonic()
            log.info("prompt prepared ahead of its turn (%s, %d media item(s)%s) in %.0f ms", request.source,
                     len(request.media), ", projector kept loaded for its audio" if hold else "",
                     (time.monotonic() - began) * 1000)
        except RuntimeError as exc:
            if not self._should_abort(None):
                raise AgentError(ErrorCode.MODEL_ERROR, f"llama.cpp failed preparing the turn: {exc}") from None
        finally:
            self._disarm_abort()

    def _prepare_media(self, turns: list[Turn], system: str | None, hold: bool) -> None:
        turns = [*turns[:-1], Turn("user", "", turns[-1].media)]  # no media of its own: the picture talked about
        prompt = self._media_prompt(turns, system)
        try:
            if hold:
                self._encode_ahead(prompt)
            else:
                self._feed_media(prompt)
        finally:
            prompt.close()
            if not self.projector_resident and not hold:
                self.release_projector("an on-demand plan")

    def _encode_ahead(self, prompt: Prompt) -> None:
        """Encode the media of `prompt` the KV cache lacks and keep their embeddings for the turn, which evaluates
        them once its own audio is encoded by the projector they share."""
        self._ahead = {}
        for piece, _skip in self._uncached(prompt)[1]:
            if piece.kind != "text" and (encoded := self._encode(piece)) is not None:
                self._ahead[piece.tokens[0]] = encoded

    def release_held(self) -> None:
        """Free what a preparation kept for a turn that did not come: the projector and the embeddings."""
        self._ahead.clear()
        self.release_projector("kept for a spoken turn that did not come")

    def _head(self, turns: list[Turn], system: str | None) -> list[int]:
        """The tokens of the prompt ahead of the last turn's text, but the last one (it may merge with the text's
        first), answers put back as produced: what any question in that place will start with."""
        one, other = (self.render([*turns[:-1], Turn("user", text)], system) for text in ("a", "b"))
        same = next(i for i, (x, y) in enumerate(zip(one, other, strict=True)) if x != y)
        return self._put_back(self.tokenize(one[:same]))[:-1]

    def _prefill(self, tokens: list[int]) -> None:
        """Evaluate what `tokens` add to the KV cache's longest prefix of them."""
        keep = self.cached_prefix(tokens)
        if keep < len(tokens):
            llama_shim.keep_prefix(self.llm, keep)
            self.llm.eval(tokens[keep:])

    def _media_prompt(self, turns: list[Turn], system: str | None) -> Prompt:
        """The prompt cut into text and media pieces: each turn's media (a marker each, before its text). A
        follow-up that only adds text after media the KV cache already holds is cut from the previous prompt's
        pieces, without loading the projector (under an on-demand plan that load was half a follow-up's time)."""
        marker = media_marker()
        text = self.render([Turn(t.role, marker * len(t.media) + t.text) for t in turns], system)
        media = [m for t in turns for m in t.media]
        keys = tuple(m.key for m in media)
        reused = self._tokenized.extended(text, keys, marker, self.tokenize) if self._tokenized else None
        if reused is not None and self.cached_prefix(reused.tokens) >= reused.media_end:
            self._tokenized = reused
            return self._own_answer(Prompt(None, list(reused.pieces)))
        try:
            prompt = self.projector().prompt(text, media)
        except ProjectorError as exc:
            raise AgentError(ErrorCode.PROJECTOR_ERROR, str(exc)) from None
        self._tokenized = Tokenized.of(text, keys, prompt.pieces)
        return self._own_answer(prompt)

    def _own_answer(self, prompt: Prompt) -> Prompt:
        """The prompt with recent answers put back as produced (OwnAnswer), where they lie in the final text
        piece: the one piece evaluated by generation, after the media."""
        tail = prompt.pieces[-1]
        start = len(prompt.tokens) - len(tail.tokens)
        tokens = self._put_back(prompt.tokens, start)
        if tokens[start:] != tail.tokens:
            prompt.pieces[-1] = dataclasses.replace(tail, tokens=tokens[start:])
        return prompt

    def _put_back(self, tokens: list[int], start: int = 0) -> list[int]:
        """`tokens` with each recent answer they carry put back as produced, oldest first (each answer's prompt
        holds the ones before it as produced)."""
        for answer in self.answers:
            tokens = answer.put_back(tokens, self.llm.detokenize, start) or tokens
        return tokens

    def _run(self, request: Request, tokens: list[int], prompt: Prompt | None, started: float, deadline: float,
             on_delta: Callable[[str, int], None] | None, cancel: Flag | None) -> Result:
        cfg = self.cfg
        room = self.n_ctx - len(tokens)
        if room < 2:
            raise AgentError(ErrorCode.PROMPT_TOO_LONG, f"the prompt is {len(tokens)} tokens; the context is "
                             f"{self.n_ctx}")
        budget = min(request.max_tokens or cfg.max_tokens, room - 1)
        cached = min(self.cached_prefix(tokens), len(tokens) - 1)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        produced: list[int] = []
        n_out, first_at, stop, media_s = 0, 0.0, StopReason.MAX_TOKENS, 0.0
        # The abort callback runs per graph node: armed for the prompt only, where one decode can take seconds.
        self._arm_abort(deadline, cancel)
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
                    self._disarm_abort()
                if self._is_eog(self._vocab, token) or token == self._end_of_turn:
                    stop = StopReason.END
                    break
                n_out += 1
                produced.append(token)
                text = decoder.decode(self.llm.detokenize([token]))
                line_ended = False
                if self.prompt_format == "completion":  # the answer is the rest of the "A:" line
                    text, line_ended = one_line(pieces, text)
                if text:
                    pieces.append(text)
                    if on_delta is not None:
                        on_delta(text, len(pieces) - 1)
                if line_ended:
                    stop = StopReason.END
                    break
                if halted := must_stop(cancel, deadline):
                    stop = halted
                    break
                if n_out >= budget:
                    asked = request.max_tokens or cfg.max_tokens
                    stop = StopReason.MAX_TOKENS if budget == asked else StopReason.CONTEXT
                    break
        except RuntimeError as exc:  # llama_decode aborted (cancel/deadline during the prompt) or failed
            if not self._should_abort(None):
                raise AgentError(ErrorCode.MODEL_ERROR, f"llama.cpp failed during the turn: {exc}") from None
            stop = StopReason.DEADLINE if time.monotonic() > deadline else StopReason.CANCELLED
        finally:
            self._disarm_abort()
            llama_shim.free_sampler(self.llm)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_delta is not None:
                on_delta(tail, len(pieces) - 1)
        self._remember_answer(tokens, produced, "".join(pieces))
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
            projector_load_ms=self._load_s * 1000, encode_ms=self._encode_s * 1000,
            image_tokens=prompt.media_tokens("image") if prompt else 0,
            audio_tokens=prompt.media_tokens("audio") if prompt else 0,
            transcript=request.transcript,
        )

    def _remember_answer(self, prompt: list[int], produced: list[int], text: str) -> None:
        """Keep the answer's tokens for later prompts (OwnAnswer; the last 16) when they are its text as the
        conversation records it (blanks around it stripped; nothing else cut off)."""
        said = text.strip()
        while produced and not self.llm.detokenize(produced[-1:]).strip():  # a line's end: the prompt spells its own
            produced = produced[:-1]
        if said and self.llm.detokenize(produced).decode("utf-8", errors="replace").strip() == said:
            self.answers = [*self.answers[-15:], OwnAnswer(list(prompt), produced, said)]

    def _feed_media(self, prompt: Prompt) -> None:
        """Evaluate every piece before the last text piece that the KV cache does not already hold.

        Media pieces stand in the token bookkeeping as a run of one negative pseudo-token derived from their
        content, so an identical image is reused and a different one never is; `llm.generate` then finds the
        whole prefix cached and evaluates only the final text. Images and audio clips are encoded before anything
        is evaluated, and under an on-demand plan the projector is freed as soon as the last one is: the model's
        weights need that memory back to evaluate them and the text ahead of them (with both resident, evaluating
        256 image tokens of E2B under 2 GiB took 12 s instead of 4).
        """
        llm = self.llm
        keep, todo = self._uncached(prompt)
        llama_shim.keep_prefix(llm, keep)
        media = [i for i, (piece, _) in enumerate(todo) if piece.kind != "text"]
        encoded: dict[int, Encoded | None] = {}
        for i in media:  # every image and clip encoded before anything is evaluated ...
            encoded[i] = self._encode(todo[i][0])
            if encoded[i] is None:  # M-RoPE: libmtmd encodes and evaluates it in one call, in its place
                break
        if media and all(encoded.get(i) for i in media) and not self.projector_resident:
            # ... so an on-demand projector is freed before the text ahead of the images is evaluated: that text
            # needs the memory back as much as the images do (evaluated beside the projector, 38-63 tokens of
            # history took 2.9 s under 2 GiB)
            self.release_projector("an on-demand plan: freed before the prompt is evaluated")
        for i, (piece, skip) in enumerate(todo):
            if piece.kind == "text":
                llm.eval(piece.tokens[skip:])
                continue
            lctx = llama_shim.context_handle(llm)
            ready = encoded[i] if i in encoded else self._encode(piece)
            if ready is None:
                began = time.monotonic()
                new_n_past = self.projector().evaluate(piece, lctx, llm.n_tokens, llm.n_batch)
                self._encode_s += time.monotonic() - began
            else:
                if i == media[-1] and not self.projector_resident:
                    self.release_projector("an on-demand plan: freed before the image is evaluated")
                new_n_past = decode_embeddings(lctx, ready, llm.n_tokens, llm.n_batch)
            llama_shim.record_media(llm, piece.tokens[0], new_n_past)

    def _uncached(self, prompt: Prompt) -> tuple[int, list[tuple[Piece, int]]]:
        """How much of the KV cache `prompt` keeps (never half of a media chunk), and the pieces before its last
        that are left to evaluate, each with the tokens of it already cached."""
        keep = self.cached_prefix(prompt.tokens)
        pos = 0
        for piece in prompt.pieces:
            if piece.kind != "text" and pos < keep < pos + len(piece.tokens):
                keep = pos
            pos += len(piece.tokens)
        todo, pos = [], 0
        for piece in prompt.pieces[:-1]:
            if pos + len(piece.tokens) > keep:
                todo.append((piece, max(0, keep - pos)))
            pos += len(piece.tokens)
        return keep, todo

    def _encode(self, piece: Piece) -> Encoded | None:
        """The media piece's embeddings, apart from libmtmd (None for what must be evaluated in one call): those a
        preparation encoded when it kept them, else the projector's."""
        if (ahead := self._ahead.pop(piece.tokens[0], None)) is not None:
            return ahead
        encoded = self.projector().encode(piece)
        if encoded is not None:
            self._encode_s += encoded.seconds
        return encoded

    def close(self) -> None:
        self.llm.close()
