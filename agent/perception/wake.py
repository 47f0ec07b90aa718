"""Wake word: microWakeWord (the `pymicro-wakeword` wheel, as Home Assistant's voice satellites run it) on every
10 ms of microphone audio, before anything reaches speech-to-text.

- `resolve`: `wake_word.model` names a bundled model (`BUNDLED`) or a community model's `.json` (its `.tflite`
  beside it, as microWakeWord publishes them); the probability cutoff and sliding window come from that JSON unless
  the config overrides them. Every problem is a `WakeWordError` naming the key and the file.
- `WakeWordDetector`: int16 frames in, a `Detection` (stream time, probability) out, at most one per
  `wake_word.refractory` seconds. A file TensorFlow Lite rejects is refused before an interpreter is made of it
  (the C library dereferences a null model otherwise).
- `after_wake`: the part of an utterance that follows the wake word ("okay nabu, what is at the door" said in one
  breath: the question is what comes after the wake word), cut at the quietest moment just before the detection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import WakeWordConfig
from agent.perception.vad import RATE, Utterance

log = logging.getLogger("agent.perception.wake")
BUNDLED = ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")  # the models inside the pymicro-wakeword wheel
TFLITE_ID = b"TFL3"  # the flatbuffer file identifier of a TensorFlow Lite model, at bytes 4-8
CUT_SEARCH_S = 0.3  # the word boundary is looked for this far before the detection
CUT_STEP_S = 0.01  # ... in steps of this many seconds (the wake model's feature step)


class WakeWordError(Exception):
    """The wake word model cannot be found, read or loaded: the message names the key and the file."""


@dataclass(frozen=True)
class WakeModel:
    """A wake word model, resolved: what it detects, its files and its detection settings."""

    name: str
    phrase: str
    tflite: Path
    cutoff: float
    window: int
    refractory: float


@dataclass(frozen=True)
class Detection:
    ts: float  # stream time (seconds) at the end of the audio that set it off
    probability: float


def _package_dir() -> Path:
    import pymicro_wakeword

    return Path(pymicro_wakeword.__file__).parent


def resolve(cfg: WakeWordConfig) -> WakeModel:
    """The model `cfg.model` names, with cfg's overrides applied. WakeWordError when it cannot be used."""
    if cfg.model in BUNDLED:
        manifest = _package_dir() / "models" / f"{cfg.model}.json"
    elif cfg.model.endswith(".json") or "/" in cfg.model:
        manifest = Path(cfg.model).absolute()
    else:
        raise WakeWordError(f"wake_word.model: {cfg.model!r} is not a bundled model ({', '.join(BUNDLED)}) "
                            "nor the path of a model's .json")
    if not manifest.is_file():
        raise WakeWordError(f"wake_word.model: {manifest} not found")
    try:
        spec = json.loads(manifest.read_text(encoding="utf-8"))
        micro: dict[str, Any] = spec["micro"]
        tflite = manifest.parent / str(spec["model"])
        cutoff = cfg.probability_cutoff or float(micro["probability_cutoff"])
        window = cfg.sliding_window or int(micro["sliding_window_size"])
        phrase = str(spec.get("wake_word", manifest.stem))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise WakeWordError(f"wake_word.model: {manifest} is not a microWakeWord manifest (a JSON object with "
                            f"'model' and 'micro': probability_cutoff, sliding_window_size): {exc!r}") from None
    if not 0 < cutoff <= 1 or window < 1:
        raise WakeWordError(f"wake_word.model: {manifest}: probability_cutoff {cutoff} or sliding_window_size "
                            f"{window} out of range")
    check_tflite(tflite)
    return WakeModel(manifest.stem, phrase, tflite, cutoff, window, cfg.refractory)


def check_tflite(path: Path) -> None:
    """WakeWordError unless `path` is a file that starts like a TensorFlow Lite model."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise WakeWordError(f"wake_word.model: the model's .tflite file {path}: {exc.strerror}") from None
    if head[4:8] != TFLITE_ID:
        raise WakeWordError(f"wake_word.model: {path} is not a TensorFlow Lite model (no {TFLITE_ID!r} "
                            "identifier)")


class WakeWordDetector:
    """microWakeWord over a stream of int16 16 kHz frames (any length). Used by one thread (the microphone's)."""

    def __init__(self, model: WakeModel) -> None:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

        library = next(iter(sorted((_package_dir() / "lib").glob("*tensorflowlite_c.*"))), None)
        if library is None:
            raise WakeWordError("wake_word: the pymicro-wakeword package has no TensorFlow Lite library for this "
                                "platform")
        self.model = model
        self._refuse_unloadable(library)
        try:
            self._net = MicroWakeWord(model.name, wake_word=model.phrase, tflite_model=model.tflite,
                                      probability_cutoff=model.cutoff, sliding_window_size=model.window,
                                      trained_languages=[], libtensorflowlite_c_path=library)
        except Exception as exc:  # an op or tensor type this runtime cannot run
            raise WakeWordError(f"wake_word.model: {model.tflite}: TensorFlow Lite cannot run it: {exc}") from None
        self._features = MicroWakeWordFeatures()
        self._quiet_until = float("-inf")
        self.detections = 0
        self.last: Detection | None = None
        log.info("wake word %r: microWakeWord %s (cutoff %.2f, window %d, refractory %.1fs)", model.phrase,
                 model.tflite, model.cutoff, model.window, model.refractory)

    def _refuse_unloadable(self, library: Path) -> None:
        """Load the model alone first: TensorFlow Lite returns null for a file it cannot verify, and making an
        interpreter of that null crashes the process."""
        from pymicro_wakeword.wakeword import TfLiteWakeWord

        lib = TfLiteWakeWord(library).lib  # the ctypes binding of libtensorflowlite_c, signatures set
        handle = lib.TfLiteModelCreateFromFile(str(self.model.tflite).encode())
        if not handle:
            raise WakeWordError(f"wake_word.model: {self.model.tflite}: TensorFlow Lite cannot read it (not a "
                                "valid model file)")
        lib.TfLiteModelDelete(handle)

    def push(self, pcm: np.ndarray, ts: float) -> Detection | None:
        """Feed a frame whose first sample is at stream time `ts`; a Detection when the wake word ends in it."""
        found: Detection | None = None
        step = 0
        for features in self._features.process_streaming(pcm.astype(np.int16, copy=False).tobytes()):
            step += 1
            probability = self._net.process_streaming_prob(features)
            if probability is None or probability <= self.model.cutoff or found is not None:
                continue
            at = ts + min(step * CUT_STEP_S, len(pcm) / RATE)
            if at >= self._quiet_until:
                found = Detection(at, float(probability))
        if found is not None:
            self._quiet_until = found.ts + self.model.refractory
            self.detections += 1
            self.last = found
        return found

    def stats(self) -> dict[str, Any]:
        return {"model": self.model.name, "phrase": self.model.phrase, "detections": self.detections,
                "last_probability": round(self.last.probability, 3) if self.last else None}


def after_wake(utterance: Utterance, wake_ts: float, min_speech_s: float) -> Utterance | None:
    """`utterance` without the wake word that set off a detection at stream time `wake_ts` inside it: cut at the
    quietest 10 ms of the CUT_SEARCH_S before the detection; None when too little speech follows (the utterance
    was the wake word alone). An utterance that began after the detection is returned as it is."""
    if wake_ts <= utterance.start_ts:
        return utterance
    step = int(CUT_STEP_S * RATE)
    pcm = utterance.pcm
    lo = max(0, int((max(utterance.start_ts, wake_ts - CUT_SEARCH_S) - utterance.pcm_ts) * RATE))
    hi = min(len(pcm), int((wake_ts - utterance.pcm_ts) * RATE))
    cut = hi
    if hi - lo >= step:
        energy = [float(np.mean(pcm[i:i + step].astype(np.float32) ** 2)) for i in range(lo, hi - step + 1, step)]
        cut = lo + step * int(np.argmin(energy)) + step // 2
    start = utterance.pcm_ts + cut / RATE
    if utterance.end_ts - start < min_speech_s:
        return None
    return replace(utterance, pcm=pcm[cut:], start_ts=start, pcm_ts=start)
