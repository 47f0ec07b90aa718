"""The answer about the scene, on the real model shape under the memory cap, through the daemon over MQTT.

Same-shape synthetic Gemma 3n E2B Q4_K_M (the published recipe) + MobileNetV5-300M-shaped projector (F16), from
`python -m bench.synth_gemma3n E2B --types Q4_K_M --recipes published --vision`; a whisper base.en-shaped model
(random weights, its decode capped by whisper.max_tokens); the daemon in a memory cgroup of --limit-mib (root:
made here, page cache dropped first so the model's pages are charged to it); camera = a looping video of a moving
square; microphone = a WAV of spoken questions replayed in real time. Random weights: speed and memory carry over
to the real model, answer quality does not.

Scenarios, each --rounds times, one JSON line per stage with the median (min-max):
  describe_<size>   `describe` of a new frame at each camera.input_size: projector load, encode, image eval,
                    prefill of the rest, first token; request published -> first streamed token received
  speech            a spoken question, no frame: VAD hangover, speech-to-text, queue, prefill, publish; end of
                    speech -> first streamed token
  speech_frame      the same carrying the frame (vision.attach always): the frame is encoded at speech onset
  speech_frame_still  the same with a camera whose view keeps still and vision.ready_after 1: the view is encoded
                    before the first question, and every question (a later frame of the same view) reuses it
  follow_up         an ask (no image of its own) right after a describe's answer: the conversation keeps the
                    frame, and its KV
  speech_native     a spoken question as audio to a projector that takes audio (Gemma 4), no whisper: VAD
                    hangover, queue, projector load, audio encode, audio eval, prefill; end of speech -> first token
  speech_native_frame  the same carrying the frame: image and audio in one turn, one projector load
plus the cgroup's peak and its OOM kills, and the engine against llama-cpp-python's MTMDChatHandler (no cap).

    sudo .venv/bin/python -m bench.scene_latency [--rounds 3] [--sizes 256,512,768] [--scenarios ...]
    sudo .venv/bin/python -m bench.scene_latency --text ~/.cache/gemma-agent/synth/gemma4-e2b-synthetic-q4_k_m.gguf \
        --projector ~/.cache/gemma-agent/synth/gemma4-e2b-projector-synthetic-q8_0.gguf \
        --scenarios describe,speech_native --sizes 256   # Gemma 4 E2B (bench/synth_gemma4.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support import synth
from tests.support.cgroup import Cgroup
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, speech_extent, still, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json

SYNTH = Path.home() / ".cache" / "gemma-agent" / "synth"
TEXT = SYNTH / "gemma3n-e2b-synthetic-q4_k_m-published.gguf"
PROJECTOR = SYNTH / "gemma3n-mobilenetv5-300m-synthetic-f16.gguf"
WHISPER = SYNTH / "whisper-base.en-shaped-f16.bin"
BASE_EN = synth.WhisperShape(n_state=512, n_head=8, n_audio_layer=6, n_text_layer=6)
QUESTIONS = ["What is at the front door?", "Is anyone in the garden?", "What colour is the car outside?",
             "Who is standing on the porch?", "Is the gate open?"]


def emit(scenario: str, stage: str, values: list[float], unit: str = "ms", **extra: Any) -> None:
    if not values:
        return
    print(json.dumps({"bench": "scene_latency", "scenario": scenario, "stage": stage, "unit": unit,
                      "median": round(statistics.median(values), 1), "min": round(min(values), 1),
                      "max": round(max(values), 1), "n": len(values), **extra}), flush=True)


class Stamped(Client):
    """A client that notes when each request's first streamed token arrived (wall clock)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.first: dict[str, float] = {}
        self.client.on_message = self._stamp

    def _stamp(self, c: Any, u: Any, msg: Any) -> None:
        if msg.topic.endswith("/response/stream"):
            self.first.setdefault(json.loads(msg.payload)["id"], time.time())
        self._on_message(c, u, msg)


class Run:
    """One daemon in the cgroup, with a client subscribed to it."""

    def __init__(self, args: argparse.Namespace, broker: Broker, *overrides: str) -> None:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the model's pages are then charged to the cgroup
        self.cgroup = Cgroup(f"gemma-agent-scene-{os.getpid()}", args.limit_mib << 20)
        self.daemon = DaemonProcess(broker.port, args.text, f"model.mmproj={args.projector}", "model.max_tokens=16",
                                    "health.interval=5", f"memory.limit_mib={args.limit_mib}", *overrides, *args.sets,
                                    cgroup=Path(self.cgroup.join_file()))
        self.client = Stamped(broker.port)
        self.client.subscribe(f"{self.daemon.base}/#")
        self.daemon.start(self.client, timeout=300)

    def close(self, scenario: str) -> None:
        self.daemon.stop()
        self.client.close()
        emit(scenario, "cgroup_peak", [(self.cgroup.peak() or 0) / 2**20], "MiB")
        emit(scenario, "oom_kills", [float(self.cgroup.oom_kills() - self.cgroup.oom_before)], "count")
        self.cgroup.remove()


def response(run: Run, request_id: str, timeout: float = 240) -> dict[str, Any]:
    """The request's final response; its error, if one comes instead, ends the bench with it."""
    def settled(m: Any) -> bool:
        return bool(payload_json(m).get("id") == request_id)

    msg = run.client.wait_for(f"{run.daemon.base}/+", lambda m: m.topic.rsplit("/", 1)[1] in ("response", "error")
                              and settled(m), timeout=timeout)[0]
    if msg.topic.endswith("/error"):
        raise SystemExit(f"{request_id}: {msg.payload.decode()}\n" + "".join(run.daemon.lines()[-30:]))
    return dict(payload_json(msg))


def unit_of(stage: str) -> str:
    return {"decode_tps": "tok/s", "prompt_tokens_evaluated": "tokens"}.get(stage, "ms")


def model_stages(body: dict[str, Any], into: dict[str, list[float]]) -> None:
    load, media, encode = body["projector_load_ms"], body["media_ms"], body["encode_ms"]
    for name, value in (("queue", body["queue_ms"]), ("projector_load", load), ("encode", encode),
                        ("image_eval", media - encode), ("prefill_rest", body["ttft_ms"] - media - load),
                        ("decode_tps", body["decode_tps"]),
                        ("prompt_tokens_evaluated", body["tokens"]["prompt"] - body["tokens"]["cached"])):
        into.setdefault(name, []).append(value)


def describe(args: argparse.Namespace, broker: Broker, video: Path, size: int) -> None:
    run = Run(args, broker, "camera.enabled=true", f"camera.source={video}", f"camera.input_size={size}")
    stages: dict[str, list[float]] = {}
    try:  # online comes before the camera's first frame: a describe then would be answered no_frame
        run.client.wait_for(f"{run.daemon.base}/health", lambda m: payload_json(m)["stages"].get("camera") == "ok")
        for r in range(args.rounds):
            sent = time.time()
            run.client.publish(f"{run.daemon.base}/describe", {"id": f"d{size}-{r}"})
            body = response(run, f"d{size}-{r}")
            model_stages(body, stages)
            stages.setdefault("first_token_received", []).append((run.client.first[body["id"]] - sent) * 1000)
            if r == 0 and args.follow_up:  # a follow-up question on the frame just described
                sent = time.time()
                run.client.publish(f"{run.daemon.base}/ask", {"id": f"f{size}", "text": "Is it a person?"})
                follow = response(run, f"f{size}")
                emit("follow_up", "first_token_received", [(run.client.first[f"f{size}"] - sent) * 1000],
                     size=size, image_tokens=follow["tokens"]["image"], cached=follow["tokens"]["cached"],
                     encode_ms=follow["encode_ms"])
    finally:
        run.close(f"describe_{size}")
    for stage, values in stages.items():
        emit(f"describe_{size}", stage, values, unit_of(stage))


def speech(args: argparse.Namespace, broker: Broker, video: Path, wav: Path, scenario: str) -> None:
    """A spoken question per round: through whisper (speech, speech_frame[_still]) or as audio
    (speech_native[_frame])."""
    hearing = (["listen.speech=native"] if scenario.startswith("speech_native") else
               ["listen.speech=whisper", f"whisper.model={WHISPER}", "whisper.max_tokens=12",
                "whisper.temperature_fallback=false"])
    ahead = ["vision.ready_after=1.0"] if scenario.endswith("_still") else []
    run = Run(args, broker, "camera.enabled=true", f"camera.source={video}", "camera.input_size=256",
              "microphone.enabled=true", f"microphone.source={wav}", "vision.max_frame_age=30",
              f"vision.attach={'always' if '_frame' in scenario else 'on_request'}", *hearing, *ahead)
    stages: dict[str, list[float]] = {}
    try:
        finals = run.client.wait_for(f"{run.daemon.base}/response", count=args.rounds, timeout=600)
        transcripts = {payload_json(m)["id"]: payload_json(m) for m in run.client.on(f"{run.daemon.base}/transcript")}
        for msg in finals:
            body = payload_json(msg)
            heard = transcripts[body["id"]]
            model_stages(body, stages)
            stages.setdefault("vad_hangover", []).append((heard["emitted"] - heard["end"]) * 1000)
            if heard.get("stt_ms") is not None:
                stages.setdefault("stt", []).append(heard["stt_ms"])
            stages.setdefault("end_of_speech_to_first_token", []).append(
                (run.client.first[body["id"]] - heard["end"]) * 1000)
        health = payload_json(run.client.wait_for(f"{run.daemon.base}/health")[-1])
        print(json.dumps({"bench": "scene_latency", "scenario": scenario, "speech_turns": health["speech_turns"],
                          "prepared": health["prepared"]}), flush=True)
    finally:
        run.close(scenario)
    for stage, values in stages.items():
        emit(scenario, stage, values, unit_of(stage))


def questions_wav(path: Path, n: int, gap_s: float, lead_s: float = 1.0) -> Path:
    clips, at = [], lead_s
    for i in range(n):
        clip = espeak(QUESTIONS[i % len(QUESTIONS)])
        clips.append((at, clip))
        at += speech_extent(clip)[1] + gap_s
    pcm, _ = compose(clips, total_s=at + 2.0)
    return write_wav(path, pcm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit-mib", type=int, default=2048)
    ap.add_argument("--sizes", default="256,512,768",
                    help="camera.input_size values (only gemma3nv projectors change size)")
    ap.add_argument("--text", type=Path, default=TEXT, help="text model GGUF")
    ap.add_argument("--projector", type=Path, default=PROJECTOR, help="projector GGUF (vision, or vision + audio)")
    ap.add_argument("--scenarios", default="describe,speech,speech_frame")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every daemon (e.g. whisper.window=30)")
    ap.add_argument("--no-follow-up", dest="follow_up", action="store_false")
    args = ap.parse_args()
    for needed in (args.text, args.projector):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: python -m bench.synth_gemma3n E2B --types Q4_K_M "
                             "--recipes published --vision (Gemma 4: python -m bench.synth_gemma4)")
    if not WHISPER.exists():
        synth.write_whisper_ggml(WHISPER, BASE_EN)
    scenarios = args.scenarios.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "door.avi", 150, fps=15.0, width=640, height=480, frame=moving_square)
        calm = write_video(Path(tmp) / "calm.avi", 150, fps=15.0, width=640, height=480, frame=still)
        broker = Broker(Path(tmp))
        broker.start()
        try:
            if "describe" in scenarios:
                for size in (int(s) for s in args.sizes.split(",")):
                    describe(args, broker, video, size)
            for scenario in ("speech", "speech_frame", "speech_frame_still", "speech_native", "speech_native_frame"):
                if scenario in scenarios:
                    gap = 25.0 if scenario.endswith("_frame") else 12.0
                    if scenario.endswith("_still"):  # the view is prepared before the first question comes
                        wav = questions_wav(Path(tmp) / "q.wav", args.rounds, gap_s=12.0, lead_s=25.0)
                        speech(args, broker, calm, wav, scenario)
                        continue
                    wav = questions_wav(Path(tmp) / "q.wav", args.rounds, gap_s=gap)
                    speech(args, broker, video, wav, scenario)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
