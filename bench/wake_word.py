"""Wake word (listen.trigger wake_word) against wake_phrase: what microWakeWord hears, what it costs, and the
speech-to-text it saves.

- detection: "okay nabu, <question>" in one breath, 5 questions x 8 espeak-ng voices, quiet and under white noise
  at 15 dB SNR, through the bundled okay_nabu model as the daemon runs it (30 ms frames, refractory 2 s);
- false accepts: 10 minutes of chatter (tests/support/media.CHATTER, 8 voices) through each bundled model, and
  the near misses ("okay, okay ...", "okay, now ...") through okay_nabu at its own cutoff and at 0.9;
- CPU: the wake word model's process time over those 10 minutes, against what wake_phrase costs on the same
  recording: every utterance the VAD cuts goes through whisper.cpp (a base.en-shaped model, random weights, decode
  capped at --max-tokens, --threads threads; --whisper for a real model).

    python -m bench.wake_word [--whisper PATH] [--threads 2] [--max-tokens 12] [--sample 12]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import VadConfig, WakeWordConfig, WhisperConfig
from agent.perception.vad import Segmenter
from agent.perception.wake import BUNDLED, WakeWordDetector, resolve
from agent.turns.speech import SpeechToText
from tests.support import synth
from tests.support.media import CHATTER_VOICES, NEAR_MISSES, RATE, chatter, compose, espeak, frames_of

SYNTH = Path.home() / ".cache" / "gemma-agent" / "synth"
WHISPER = SYNTH / "whisper-base.en-shaped-f16.bin"
BASE_EN = synth.WhisperShape(n_state=512, n_head=8, n_audio_layer=6, n_text_layer=6)
QUESTIONS = ("what is at the door?", "is anyone in the garden?", "turn on the porch light.",
             "who is standing outside?", "is the gate open?")


def emit(**row: Any) -> None:
    print(json.dumps({"bench": "wake_word", **row}), flush=True)


def hits(model: str, pcm: np.ndarray, cutoff: float = 0.0) -> tuple[int, float]:
    """Detections in `pcm` fed as 30 ms frames, and the process time that took (s)."""
    detector = WakeWordDetector(resolve(WakeWordConfig(model=model, probability_cutoff=cutoff)))
    began = time.process_time()
    found = sum(detector.push(f, i * 0.03) is not None for i, f in enumerate(frames_of(pcm, 480)))
    return found, time.process_time() - began


def detection() -> None:
    for snr in (None, 15.0):
        heard, per_voice = 0, {}
        for voice in CHATTER_VOICES:
            got = 0
            for i, question in enumerate(QUESTIONS):
                clip = espeak(f"okay nabu, {question}", voice=voice)
                pcm, _ = compose([(1.0, clip)], 2.5 + len(clip) / RATE, snr_db=snr, seed=i)
                got += hits("okay_nabu", pcm)[0] == 1
            per_voice[voice] = got
            heard += got
        emit(test="detection", model="okay_nabu", snr_db=snr, detected=heard,
             of=len(QUESTIONS) * len(CHATTER_VOICES), per_voice=per_voice)


def false_accepts(pcm: np.ndarray, sentences: int) -> None:
    for name in BUNDLED:
        found, cpu = hits(name, pcm)
        emit(test="false_accepts", model=name, audio_s=len(pcm) / RATE, sentences=sentences, wakes=found,
             cpu_s=round(cpu, 2), cpu_share=round(cpu / (len(pcm) / RATE), 5))
    near, count = chatter(60.0 * len(NEAR_MISSES), sentences=NEAR_MISSES)
    for cutoff in (0.0, 0.9):
        emit(test="near_misses", model="okay_nabu", cutoff=cutoff or "model's own (0.85)", sentences=count,
             wakes=hits("okay_nabu", near, cutoff)[0])


def whisper_per_utterance(pcm: np.ndarray, args: argparse.Namespace) -> None:
    segmenter = Segmenter(VadConfig())
    utterances = [u for f in frames_of(pcm, segmenter.frame_len) for u in segmenter.push(f)] + segmenter.flush()
    if args.whisper is None and not WHISPER.exists():
        synth.write_whisper_ggml(WHISPER, BASE_EN)
    stt = SpeechToText(WhisperConfig(model=str(args.whisper or WHISPER), max_tokens=args.max_tokens,
                                     temperature_fallback=False), args.threads)
    step = max(1, len(utterances) // args.sample)
    cpu, wall = [], []
    for utterance in utterances[::step][:args.sample]:
        began, began_cpu = time.monotonic(), time.process_time()
        stt.transcribe(utterance.pcm)
        wall.append(time.monotonic() - began)
        cpu.append(time.process_time() - began_cpu)
    audio_s = len(pcm) / RATE
    emit(test="wake_phrase_cost", whisper=str(args.whisper or WHISPER), threads=args.threads,
         max_tokens=args.max_tokens, audio_s=audio_s, utterances=len(utterances), sampled=len(cpu),
         cpu_s_per_utterance=round(float(np.mean(cpu)), 2), wall_s_per_utterance=round(float(np.mean(wall)), 2),
         cpu_s_total=round(float(np.mean(cpu)) * len(utterances), 1),
         cpu_share=round(float(np.mean(cpu)) * len(utterances) / audio_s, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper", type=Path, help="a real whisper.cpp model (default: a base.en-shaped one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--sample", type=int, default=12, help="utterances transcribed to price one")
    args = ap.parse_args()
    detection()
    pcm, sentences = chatter(600.0)
    false_accepts(pcm, sentences)
    whisper_per_utterance(pcm, args)


if __name__ == "__main__":
    main()
