"""Speech: what an utterance becomes for the model.

- `SpeechToText`: whisper.cpp through pywhispercpp, for models whose projector takes no audio.
- Native audio: when the projector takes audio (`mtmd_support_audio`, Gemma 4 E2B/E4B today, Gemma 3n the day
  llama.cpp supports it), the PCM goes to the model as an audio chunk; no code here changes for that.
- `SpeechWorker`: utterances in (bounded queue, its own thread, so speech-to-text never stalls the microphone),
  the turn policy asked, transcripts and turn requests out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.config import ConfigError, ListenConfig, WhisperConfig
from agent.contract.codes import AgentError, ErrorCode, EventType, Source
from agent.contract.outbound import Transcript
from agent.perception.stage import TimedUtterance
from agent.turns.policy import Decision, TurnPolicy
from agent.turns.types import Media, MediaSupport, Output, Request, Result, Sink, new_id

log = logging.getLogger("agent.turns.speech")
WHISPER_MAGIC = b"lmgg"  # 0x67676d6c, little-endian: whisper.cpp's legacy ggml format
WHISPER_WINDOW = 30.0  # seconds whisper was trained on: its encoder's 1500 positions, 50 per second
WINDOW_MARGIN = 2.0  # seconds of silence kept after the speech when the window is cut to the utterance


def encoder_positions(seconds: float, window: float) -> int:
    """whisper.cpp's `audio_ctx` for an utterance of `seconds`: the encoder runs over max(window, utterance + 2 s),
    50 positions a second; 0 (whisper.cpp's full 30 s) when that reaches 30 s."""
    span = max(window, seconds + WINDOW_MARGIN)
    return 0 if span >= WHISPER_WINDOW else math.ceil(span * 50)


class SpeechToTextError(Exception):
    """The whisper model cannot be loaded or run."""


def speech_route(cfg: ListenConfig, microphone: bool, support: MediaSupport) -> tuple[bool, bool]:
    """(native audio, whisper needed): native audio when the projector takes audio (listen.speech auto/native),
    else whisper.cpp; whisper also runs beside native audio when the wake phrase needs a transcript. ConfigError
    for listen.speech native without an audio projector."""
    if not microphone:
        return False, False
    native = support.native_audio(cfg.speech)
    if cfg.speech == "native" and not support.audio:
        raise ConfigError("listen.speech is native, but the projector (model.mmproj) takes no audio")
    return native, not native or cfg.trigger == "wake_phrase"


def check_whisper_file(model: str) -> Path:
    """The whisper model's absolute path, after checking it is there and is a whisper.cpp file."""
    path = Path(model).absolute()
    if not path.is_file():  # pywhispercpp would try to download a name it does not find: never let it
        raise SpeechToTextError(f"{path}: whisper model not found (whisper.model); "
                                "`gemma-agent models pull whisper-base.en` fetches one")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != WHISPER_MAGIC:  # whisper.cpp does not fail cleanly on a bad file: check before it reads one
        raise SpeechToTextError(f"{path}: not a whisper.cpp ggml model (magic {magic!r}, expected "
                                f"{WHISPER_MAGIC!r})")
    return path


class SpeechToText:
    """whisper.cpp (pywhispercpp): 16 kHz mono int16 in, text out."""

    def __init__(self, cfg: WhisperConfig, threads: int) -> None:
        path = check_whisper_file(cfg.model)
        from pywhispercpp.model import Model

        try:
            limits: dict[str, Any] = {"max_tokens": cfg.max_tokens} if cfg.max_tokens else {}
            self.model = Model(str(path), redirect_whispercpp_logs_to=None, n_threads=threads,
                               language=cfg.language, print_progress=False, print_realtime=False,
                               print_timestamps=False, no_context=True, single_segment=False,
                               temperature_inc=0.2 if cfg.temperature_fallback else 0.0, **limits)
        except Exception as exc:  # pywhispercpp raises bare RuntimeErrors and the like on a bad file
            raise SpeechToTextError(f"{cfg.model}: whisper.cpp could not load it: {exc}") from None
        self._lock = threading.Lock()
        self.window = cfg.window
        log.info("speech-to-text: whisper.cpp with %s (%s, %d threads, encoder window >= %g s)", path,
                 cfg.language, threads, cfg.window)

    def transcribe(self, pcm: np.ndarray) -> str:
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        positions = encoder_positions(len(audio) / 16000, self.window)
        with self._lock:
            segments = self.model.transcribe(audio, audio_ctx=positions)
        return " ".join(s.text.strip() for s in segments).strip()


class SpeechTurns(Protocol):
    """Where speech turns go (agent.turns.router.Router)."""

    def on_speech_onset(self, start: float) -> None: ...

    def on_speech(self, request: Request, sink: HeldSink | None = None) -> None: ...

    @property
    def sink(self) -> Sink: ...


class HeldSink:
    """A speculative turn's output, held until the utterance is confirmed (then passed on, in order) or let go
    (then dropped, and the turn cancelled). Written by the engine's thread, confirmed by the speech worker's."""

    def __init__(self, sink: Sink, output: Output) -> None:
        self.sink, self.output = sink, output
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # held while the held calls go out: later ones wait behind them
        self._held: list[Callable[[], None]] = []
        self._state = "held"  # held | passed | dropped

    def _route(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._state == "held":
                self._held.append(call)
                return
            if self._state == "dropped":
                return
        with self._flushing:
            call()

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self._route(lambda: self.sink.on_delta(request, delta, index))

    def on_result(self, request: Request, result: Result) -> None:
        self._route(lambda: self.sink.on_result(request, result))

    def on_error(self, request: Request, error: AgentError) -> None:
        self._route(lambda: self.sink.on_error(request, error))

    def confirm(self, request: Request) -> None:
        """The utterance ended as guessed: journal the request, then pass on what was held and what follows."""
        self.output.accepted(request)
        with self._flushing:
            with self._lock:
                held, self._held, self._state = self._held, [], "passed"
            for call in held:  # in order; the engine's next call waits for _flushing and comes after these
                call()

    def drop(self, request: Request) -> None:
        with self._lock:
            self._held, self._state = [], "dropped"
        request.cancel.set()


@dataclass
class Speculation:
    """A turn started at a short pause (vad.early_end_ms), before the hangover confirms the end of speech."""

    start: float
    end: float
    transcript: str | None
    stt_ms: float
    decision: Decision
    request: Request | None = None
    sink: HeldSink | None = None


class SpeechWorker:
    """The microphone's listener: utterances in (bounded queue, its own thread, so speech-to-text never stalls the
    microphone); transcripts and refusals out through `output`, accepted turns to the router.

    Speculation: at a short pause the utterance is transcribed and its turn started with its output held; when the
    hangover ends the same utterance, the turn is confirmed and its output goes out, so the answer starts as if
    the hangover were vad.early_end_ms; when speech resumes first, the turn is cancelled and nothing of it is
    published. Speech onset lets the router prepare the frame the turn will carry."""

    def __init__(self, policy: TurnPolicy, stt: SpeechToText | None, native_audio: bool, audio_prompt: str,
                 output: Output, turns: SpeechTurns, queue_size: int = 4) -> None:
        self.policy = policy
        self.stt = stt
        self.native_audio = native_audio
        self.audio_prompt = audio_prompt
        self.output = output
        self.turns = turns
        # utterances may fill it; guesses (pauses) only its first half, so they never crowd out an utterance
        self._queue: queue.Queue[tuple[str, TimedUtterance] | None] = queue.Queue(maxsize=2 * queue_size)
        self._thread = threading.Thread(target=self._work, name="speech", daemon=True)
        self._speculation: Speculation | None = None
        self._lock = threading.Lock()
        self.backlog_drops = 0
        self.speculated = self.confirmed = self.wasted = 0
        self.transcribed = 0  # utterances given to speech-to-text
        self.ignored = 0  # not transcribed: outside a window, for a trigger that needs no transcript
        self.progress_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # the worker drains the queue; give it a few seconds
            self._queue.put(None, timeout=5.0)
        self._thread.join(5.0)

    # --- the microphone's thread: queue and return at once -------------------------------------------------

    def on_onset(self, start: float) -> None:
        self.turns.on_speech_onset(start)

    def on_wake(self, at: float, details: dict[str, Any]) -> None:
        """The wake word: listen for listen.window seconds, say so, and prepare the frame the question may carry
        (the earliest moment a turn is certain)."""
        self.policy.open_window(why="wake_word")
        self.output.event(EventType.WAKE, {**details, "seconds": self.policy.cfg.window})
        self.turns.on_speech_onset(at)

    def on_pause(self, utterance: TimedUtterance) -> None:
        if self._queue.qsize() < self._queue.maxsize // 2:  # a guess is worth nothing when the worker is behind
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(("pause", utterance))

    def on_resume(self) -> None:
        with self._lock:
            guess, self._speculation = self._speculation, None
        if guess is not None:
            self._let_go(guess, "speech resumed")

    def on_utterance(self, utterance: TimedUtterance) -> None:
        try:
            self._queue.put_nowait(("final", utterance))
        except queue.Full:
            self.backlog_drops += 1
            log.warning("speech backlog full: an utterance of %.1fs was not processed",
                        utterance.end - utterance.start)
            self.output.refused(None, Source.SPEECH, AgentError(
                ErrorCode.SPEECH_BACKLOG, f"speech-to-text could not keep up; the utterance at "
                f"{utterance.start:.3f} was skipped"))

    # --- the speech thread ----------------------------------------------------------------------------------

    def busy(self) -> bool:
        return not self._queue.empty()

    def progressing(self, limit: float = 120.0) -> bool:
        """Watchdog probe: idle, or the utterance being processed started less than `limit` seconds ago."""
        return not self.busy() or time.monotonic() - self.progress_at < limit

    def stats(self) -> dict[str, int]:
        return {"transcribed": self.transcribed, "ignored": self.ignored, "speculated": self.speculated,
                "confirmed": self.confirmed, "wasted": self.wasted, "backlog_drops": self.backlog_drops}

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self.progress_at = time.monotonic()
            kind, utterance = item
            try:
                if kind == "pause":
                    self._speculate(utterance)
                else:
                    self._process(utterance)
            except Exception as exc:  # one bad utterance must not end speech handling
                log.exception("processing an utterance failed")
                self.output.refused(None, Source.SPEECH, AgentError(ErrorCode.SPEECH_FAILED,
                                                                    f"{type(exc).__name__}: {exc}"))
            self.progress_at = time.monotonic()

    def _transcribe(self, utterance: TimedUtterance) -> tuple[str | None, float]:
        if self.stt is None:
            return None, 0.0
        began = time.monotonic()
        text = self.stt.transcribe(utterance.utterance.pcm)
        self.transcribed += 1
        return text, (time.monotonic() - began) * 1000

    def _speculate(self, utterance: TimedUtterance) -> None:
        if self.policy.ignores_speech_now():
            return
        transcript, stt_ms = self._transcribe(utterance)
        guess = Speculation(utterance.start, utterance.end, transcript, stt_ms, self.policy.decide(transcript,
                                                                                                    peek=True))
        request = self._request(utterance, guess.decision, transcript)
        if request is not None:
            guess.request, guess.sink = request, HeldSink(self.turns.sink, self.output)
        with self._lock:
            self._speculation = guess
        self.speculated += 1
        if request is not None and guess.sink is not None:
            self.turns.on_speech(request, guess.sink)

    def _process(self, utterance: TimedUtterance) -> None:
        with self._lock:
            guess, self._speculation = self._speculation, None
        if guess is not None and (guess.start, guess.end) == (utterance.start, utterance.end):
            self._confirm(guess, utterance)
            return
        if guess is not None:
            self._let_go(guess, "another utterance ended")
        if self.policy.ignores_speech_now():
            self.ignored += 1
            log.info("utterance at %.3f not taken (not listening): not transcribed", utterance.start)
            return
        transcript, stt_ms = self._transcribe(utterance)
        turn_id = new_id()
        decision = self.policy.decide(transcript)  # before the transcript goes out: what is heard next is later
        self._announce(turn_id, utterance, transcript, stt_ms, decision)
        request = self._request(utterance, decision, transcript, turn_id)
        if request is not None:
            self.turns.on_speech(request)

    def _confirm(self, guess: Speculation, utterance: TimedUtterance) -> None:
        """The hangover ended the utterance the guess was made on: its turn is the answer (unless the policy
        changed its mind in between, say a window closed or opened)."""
        decision = self.policy.decide(guess.transcript)  # for real this time: windows open and close here
        turn_id = guess.request.id if guess.request is not None else new_id()
        self._announce(turn_id, utterance, guess.transcript, guess.stt_ms, decision)
        if guess.request is not None and guess.sink is not None and decision.accept:
            self.confirmed += 1
            guess.sink.confirm(guess.request)
            return
        self._let_go(guess, "not taken after all")
        request = self._request(utterance, decision, guess.transcript, turn_id)
        if request is not None:
            self.turns.on_speech(request)

    def _let_go(self, guess: Speculation, why: str) -> None:
        if guess.request is not None and guess.sink is not None:
            self.wasted += 1
            guess.sink.drop(guess.request)
            log.info("speculative turn %s let go: %s", guess.request.id, why)

    def _announce(self, turn_id: str, utterance: TimedUtterance, transcript: str | None, stt_ms: float,
                  decision: Decision) -> None:
        self.output.transcript(Transcript(turn_id, transcript, utterance.start, utterance.end, utterance.emitted,
                                          stt_ms))
        if decision.reason == "phrase_only":
            self.output.event(EventType.LISTENING, {"reason": "wake_phrase", "seconds": self.policy.cfg.window})
        if not decision.accept:
            log.info("utterance %s not taken (%s): %r", turn_id, decision.reason, transcript)

    def _request(self, utterance: TimedUtterance, decision: Decision, transcript: str | None,
                 turn_id: str | None = None) -> Request | None:
        """The turn an accepted utterance becomes, or None."""
        if not decision.accept:
            return None
        if not self.native_audio and not decision.question:
            log.info("utterance at %.3f: nothing was understood", utterance.start)
            return None
        pcm = utterance.utterance.pcm
        media = [Media("audio", pcm)] if self.native_audio else []
        return Request(text=decision.question or self.audio_prompt, id=turn_id or new_id(), source=Source.SPEECH,
                       media=media, transcript=transcript, remember=bool(decision.question),
                       spoken=(utterance.start, utterance.end))
