"""The model's request queue: one worker thread serves requests one at a time from a bounded queue. A full queue
refuses a request at once, and every accepted request ends in exactly one result or one error for its sink."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.config import ModelConfig
from agent.contract.codes import AgentError, ErrorCode, StopReason
from agent.turns.conversation import Conversation
from agent.turns.types import Flag, Request, Result, Sink, Turn, same_images

log = logging.getLogger("agent.llm.engine")


class Backend(Protocol):
    """What the Engine needs of a model: `agent.llm.local.LocalModel` or `agent.llm.remote.RemoteModel`."""

    cfg: ModelConfig
    projector_used: float
    held: float  # when a preparation began keeping the projector for its turn (0: it keeps nothing)

    @property
    def name(self) -> str: ...

    @property
    def projector_loaded(self) -> bool: ...

    def generate(self, request: Request, turns: list[Turn] | None = None,
                 on_delta: Callable[[str, int], None] | None = None, cancel: Flag | None = None) -> Result: ...

    def prepare(self, request: Request, turns: list[Turn]) -> None:
        """Evaluate the prompt up to and including the request's media, so the turn itself finds it cached."""

    def fits(self, turns: list[Turn], system: str | None, budget: int) -> bool: ...

    def release_projector(self, why: str = "") -> bool: ...

    def release_held(self) -> None:
        """Free what a preparation kept for a turn that did not come."""

    def close(self) -> None: ...


class Either:
    """Set when any of its flags is: the daemon stopping, or this one request let go."""

    def __init__(self, *flags: Flag) -> None:
        self.flags = flags

    def is_set(self) -> bool:
        return any(flag.is_set() for flag in self.flags)


def must_stop(cancel: Flag | None, deadline: float) -> StopReason | None:
    """`cancelled` or `deadline` when a running turn has to stop now, else None."""
    if cancel is not None and cancel.is_set():
        return StopReason.CANCELLED
    return StopReason.DEADLINE if time.monotonic() > deadline else None


_STOP = object()
_PREPARE = object()  # wakes the worker for the pending preparation


class Engine:
    """A worker thread serving requests one at a time from a bounded queue."""

    def __init__(self, model: Backend, queue_size: int, conversation: Conversation | None = None,
                 projector_idle: float | None = None, on_activity: Callable[[], None] | None = None,
                 prepared_hold: float = 30.0) -> None:
        """`projector_idle`: release the projector after this many seconds without a media turn (None: keep);
        `on_activity`: called on the worker thread when a turn starts and when it ends; `prepared_hold`: seconds
        what a preparation keeps for its turn (a spoken one: longer than any utterance) waits for it."""
        self.model = model
        self._on_activity = on_activity or (lambda: None)
        self.conversation = conversation
        self.projector_idle = projector_idle
        self.prepared_hold = prepared_hold
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size + 1)  # + one wake-up for a preparation
        self._size = queue_size
        self._preparing: Request | None = None
        self._lock = threading.Lock()
        self.prepared = 0  # preparations run
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self.current: Request | None = None
        self.last_result: Result | None = None
        self.turns_served = 0
        self.progress_at = time.monotonic()

    def start(self) -> None:
        """Start serving; the system prompt (and a restored conversation) is evaluated first, while nothing waits."""
        self._thread.start()
        self.prepare(Request(text=""))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        with self._lock:
            return self._queue.qsize() - (self._preparing is not None)

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue a request, or raise AgentError (queue_full, shutting_down) at once."""
        if self._cancel.is_set():
            raise AgentError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping", request.id)
        full = AgentError(ErrorCode.QUEUE_FULL, f"{self._size} requests are already waiting; try again later",
                          request.id)
        if self.depth >= self._size:
            raise full
        try:
            self._queue.put_nowait((request, sink))
        except queue.Full:  # another sender got the last place first
            raise full from None

    def prepare(self, request: Request) -> None:
        """Evaluate the start of `request`'s prompt (system prompt, conversation, its images) into the KV cache
        ahead of the turn. Runs only when nothing else is queued, so a waiting turn is delayed by at most the one
        preparation already running; a newer preparation replaces a pending one."""
        if self._cancel.is_set():
            return
        with self._lock:
            wake = self._preparing is None
            self._preparing = request
        if wake:
            try:
                self._queue.put_nowait(_PREPARE)
            except queue.Full:  # turns fill the queue: they go first anyway
                with self._lock:
                    self._preparing = None

    def progressing(self, deadline: float) -> bool:
        """Watchdog probe: stuck only when the worker died or one turn has run past `deadline` seconds."""
        if not self.alive:
            return False
        return self.current is None or time.monotonic() - self.progress_at < deadline

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=None if self.projector_idle is None and not self.model.held else 1.0)
            except queue.Empty:
                self._release_unused()
                continue
            if item is _STOP:
                return
            if item is _PREPARE:
                self._prepare()
                continue
            request, sink = item
            self.current = request
            self.progress_at = time.monotonic()
            self._activity()
            try:
                if self._cancel.is_set():
                    sink.on_error(request, _shutting_down(request))
                    continue
                result = self.model.generate(request, turns=self._turns(request),
                                             on_delta=functools.partial(sink.on_delta, request),
                                             cancel=Either(self._cancel, request.cancel))
                if self.conversation is not None and request.remember and result.stop != StopReason.CANCELLED:
                    self.conversation.record(request.text, result.text, request.media)
                self.last_result = result
                self.turns_served += 1
                sink.on_result(request, result)
            except AgentError as exc:
                sink.on_error(request, exc)
            except Exception as exc:  # a bug must not kill the worker: report it and keep serving
                log.exception("turn %s failed", request.id)
                sink.on_error(request, AgentError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
            finally:
                self.current = None
                self.progress_at = time.monotonic()
                self._activity()

    def _activity(self) -> None:
        try:
            self._on_activity()
        except Exception:  # reporting must never stop the worker
            log.exception("activity callback failed")

    def _prepare(self) -> None:
        with self._lock:
            request, self._preparing = self._preparing, None
            waiting = self._queue.qsize()
        if request is None or request.cancel.is_set() or waiting or self._cancel.is_set():
            return  # a turn is waiting: it goes first, and does its own work
        self.progress_at = time.monotonic()
        try:
            self.model.prepare(request, self._turns(request))
            self.prepared += bool(request.media)
        except AgentError as exc:
            log.info("preparing %s's turn failed: %s", request.source, exc.detail)
        except Exception:  # the turn itself will report what is wrong
            log.exception("preparing a turn failed")
        finally:
            self.progress_at = time.monotonic()

    def _release_unused(self) -> None:
        """Free what a preparation kept past prepared_hold, and a projector unused for projector_idle seconds."""
        if self.model.held and time.monotonic() - self.model.held > self.prepared_hold:
            self.model.release_held()
        idle = self.projector_idle
        if idle is not None and self.model.projector_used and time.monotonic() - self.model.projector_used > idle:
            self.model.release_projector()
            self.model.projector_used = 0.0

    def _turns(self, request: Request) -> list[Turn]:
        """The conversation so far plus this question, dropping the oldest exchanges until the answer fits."""
        if self.conversation is None:
            return [Turn("user", request.text, tuple(request.media))]
        budget = request.max_tokens or self.model.cfg.max_tokens
        while True:
            history = self.conversation.history()
            media = request.media
            if same_images(media, (m for t in history for m in t.media)):  # the very picture talked about
                media = [m for m in media if m.kind != "image"]
            elif any(m.kind == "image" for m in media):  # a new picture replaces the one talked about
                history = [Turn(t.role, t.text) for t in history]
            turns = [*history, Turn("user", request.text, tuple(media))]
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
            if item is not _PREPARE:
                request, sink = item
                sink.on_error(request, _shutting_down(request))
        if self._thread.ident is None:  # never started
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _shutting_down(request: Request) -> AgentError:
    return AgentError(ErrorCode.SHUTTING_DOWN, "the daemon stopped before this request was served", request.id)
