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
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.config import ConfigError, ListenConfig, WhisperConfig
from agent.contract.codes import AgentError, ErrorCode, EventType, Source
from agent.contract.outbound import Transcript
from agent.perception.stage import TimedUtterance
from agent.turns.policy import TurnPolicy
from agent.turns.types import Media, MediaSupport, Output, Request, new_id

log = logging.getLogger("agent.turns.speech")
WHISPER_MAGIC = b"lmgg"  # 0x67676d6c, little-endian: whisper.cpp's legacy ggml format


class SpeechToTextError(Exception):
    """The whisper model cannot be loaded or run."""


def speech_route(cfg: ListenConfig, microphone: bool, support: MediaSupport) -> tuple[bool, bool]:
    """(native audio, whisper needed): native audio when the projector takes audio (listen.speech auto/native),
    else whisper.cpp; whisper also runs beside native audio when the wake phrase needs a transcript. ConfigError
    for listen.speech native without an audio projector."""
    if not microphone:
        return False, False
    native = support.audio and cfg.speech in ("auto", "native")
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
            self.model = Model(str(path), redirect_whispercpp_logs_to=None, n_threads=threads,
                               language=cfg.language, print_progress=False, print_realtime=False,
                               print_timestamps=False, no_context=True, single_segment=False)
        except Exception as exc:  # pywhispercpp raises bare RuntimeErrors and the like on a bad file
            raise SpeechToTextError(f"{cfg.model}: whisper.cpp could not load it: {exc}") from None
        self._lock = threading.Lock()
        log.info("speech-to-text: whisper.cpp with %s (%s, %d threads)", path, cfg.language, threads)

    def transcribe(self, pcm: np.ndarray) -> str:
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        with self._lock:
            segments = self.model.transcribe(audio)
        return " ".join(s.text.strip() for s in segments).strip()


class SpeechWorker:
    """Utterances in (bounded queue, its own thread, so speech-to-text never stalls the microphone); transcripts and
    refusals out through `output`, accepted turns to `on_turn`."""

    def __init__(self, policy: TurnPolicy, stt: SpeechToText | None, native_audio: bool, audio_prompt: str,
                 output: Output, on_turn: Callable[[Request], None], queue_size: int = 4) -> None:
        self.policy = policy
        self.stt = stt
        self.native_audio = native_audio
        self.audio_prompt = audio_prompt
        self.output = output
        self._on_turn = on_turn
        self._queue: queue.Queue[TimedUtterance | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="speech", daemon=True)
        self.backlog_drops = 0
        self.progress_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # the worker drains the queue; give it a few seconds
            self._queue.put(None, timeout=5.0)
        self._thread.join(5.0)

    def on_utterance(self, utterance: TimedUtterance) -> None:
        """Called on the microphone's thread: queue and return at once."""
        try:
            self._queue.put_nowait(utterance)
        except queue.Full:
            self.backlog_drops += 1
            log.warning("speech backlog full: an utterance of %.1fs was not processed",
                        utterance.end - utterance.start)
            self.output.refused(None, Source.SPEECH, AgentError(
                ErrorCode.SPEECH_BACKLOG, f"speech-to-text could not keep up; the utterance at "
                f"{utterance.start:.3f} was skipped"))

    def busy(self) -> bool:
        return not self._queue.empty()

    def progressing(self, limit: float = 120.0) -> bool:
        """Watchdog probe: idle, or the utterance being processed started less than `limit` seconds ago."""
        return not self.busy() or time.monotonic() - self.progress_at < limit

    def _work(self) -> None:
        while (utterance := self._queue.get()) is not None:
            self.progress_at = time.monotonic()
            try:
                self._process(utterance)
            except Exception as exc:  # one bad utterance must not end speech handling
                log.exception("processing an utterance failed")
                self.output.refused(None, Source.SPEECH, AgentError(ErrorCode.SPEECH_FAILED,
                                                                    f"{type(exc).__name__}: {exc}"))
            self.progress_at = time.monotonic()

    def _process(self, utterance: TimedUtterance) -> None:
        pcm = utterance.utterance.pcm
        began = time.monotonic()
        transcript = self.stt.transcribe(pcm) if self.stt is not None else None
        stt_ms = (time.monotonic() - began) * 1000
        turn_id = new_id()
        decision = self.policy.decide(transcript)  # before the transcript goes out: what is heard next is later
        self.output.transcript(Transcript(turn_id, transcript, utterance.start, utterance.end, utterance.emitted,
                                          stt_ms))
        if decision.reason == "phrase_only":
            self.output.event(EventType.LISTENING, {"reason": "wake_phrase", "seconds": self.policy.cfg.window})
        if not decision.accept:
            log.info("utterance %s not taken (%s): %r", turn_id, decision.reason, transcript)
            return
        if not self.native_audio and not decision.question:
            log.info("utterance %s: nothing was understood", turn_id)
            return
        media = [Media("audio", pcm)] if self.native_audio else []
        self._on_turn(Request(text=decision.question or self.audio_prompt, id=turn_id, source=Source.SPEECH,
                              media=media, transcript=transcript, remember=bool(decision.question)))
