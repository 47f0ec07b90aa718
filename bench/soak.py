"""Soak: N turns (text asks, camera descriptions, spoken questions) through the real daemon inside a memory
cgroup; does anything grow? One JSON line per figure.

The daemon runs as a subprocess in a cgroup this script creates (root; v2 if available, else v1; see
bench/memory_cap.py), on the small models: the tiny Gemma 3n with its gemma3nv projector (images) and the tiny
whisper model (speech, a WAV replayed in real time with one question every few seconds), camera from a looping
video. After every answer it samples the daemon's RSS, open file descriptors and threads from /proc.
Reports: RSS growth between the first and the last 10 % of turns (target < 5 %), fd and thread counts (target: no
growth), turn latency p50/p95 per kind, errors, OOM kills.

    sudo .venv/bin/python -m bench.soak [--turns 300] [--limit-mib 1024]

On the full-size Gemma 4 E2B shape (bench/synth_gemma4.py; speech as audio to the model, no whisper):

    sudo .venv/bin/python -m bench.soak --turns 200 --limit-mib 2048 --speech native --speech-every 40 \
        --text ~/.cache/gemma-agent/synth/gemma4-e2b-synthetic-q4_k_m-published.gguf \
        --projector ~/.cache/gemma-agent/synth/gemma4-e2b-mmproj-synthetic-q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.support import models as testmodels
from tests.support.cgroup import Cgroup
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json

ROOT = Path(__file__).resolve().parent.parent


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"bench": "soak", "figure": figure, "value": round(value, 3), "unit": unit, **extra}),
          flush=True)


def sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "rss_anon": int(fields["RssAnon"].split()[0]) * 1024,
            "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def answers(request_id: str) -> Callable[[mqtt.MQTTMessage], bool]:
    """Matches the one response or error that ends request `request_id`."""
    return lambda m: m.topic.rsplit("/", 1)[1] in ("response", "error") and payload_json(m).get("id") == request_id


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--limit-mib", type=int, default=1024)
    ap.add_argument("--speech-every", type=float, default=6.0, help="seconds between spoken questions")
    ap.add_argument("--text", type=Path, default=None, help="text model (default: the tiny Gemma 3n)")
    ap.add_argument("--projector", type=Path, default=None, help="projector (default: the tiny gemma3nv)")
    ap.add_argument("--speech", choices=["whisper", "native"], default="whisper",
                    help="speech through the tiny whisper model, or as audio to a projector that takes it")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gemma-agent-soak-"))
    speech_count = max(1, int(args.turns / 3))
    clips = [(0.5 + args.speech_every * i, espeak(f"Question number {i % 10}, what do you see?"))
             for i in range(speech_count)]
    pcm, _ = compose(clips, total_s=args.speech_every * speech_count + 2)
    wav = write_wav(tmp / "speech.wav", pcm)
    video = write_video(tmp / "door.avi", 150, fps=15.0, frame=moving_square)
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the model's pages are then charged to the cgroup
    cgroup = Cgroup(f"gemma-agent-soak-{os.getpid()}", args.limit_mib << 20)
    broker = Broker(tmp)
    broker.start()
    hearing = ["listen.speech=native"] if args.speech == "native" else [f"whisper.model={testmodels.tiny_whisper()}"]
    daemon = DaemonProcess(broker.port, args.text or testmodels.tiny_text(),
                           f"model.mmproj={args.projector or testmodels.tiny_vision_projector()}",
                           "camera.enabled=true", f"camera.source={video}", "microphone.enabled=true",
                           f"microphone.source={wav}", *hearing, "health.interval=5",
                           "model.max_tokens=16", "limits.asks_per_minute=0", "limits.sender_asks_per_minute=0",
                           "vision.max_frame_age=5", cgroup=Path(cgroup.join_file()))
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client, timeout=300)
    assert daemon.proc is not None
    samples: list[dict[str, int]] = []
    latency: dict[str, list[float]] = {"ask": [], "describe": [], "speech": []}
    started = time.monotonic()
    try:
        for n in range(args.turns):
            kind = "describe" if n % 2 else "ask"
            rid = f"soak-{n}"
            payload: dict[str, Any] = {"id": rid, "text": f"Turn {n}: say something short."} if kind == "ask" \
                else {"id": rid}
            client.publish(f"{daemon.base}/{kind}", payload)
            try:
                msg = client.wait_for(f"{daemon.base}/+", answers(rid), timeout=args.timeout)[0]
            except AssertionError:  # no answer: have faulthandler print every thread's stack, then show them
                daemon.signal(signal.SIGABRT)
                daemon.wait()
                print(daemon.log[-20000:], file=sys.stderr)
                raise
            if msg.topic.endswith("/response"):
                latency[kind].append(payload_json(msg)["latency_ms"])
            samples.append(sample(daemon.proc.pid))
        latency["speech"] = [payload_json(m)["latency_ms"] for m in client.on(f"{daemon.base}/response")
                             if payload_json(m)["source"] == "speech"]
    finally:
        oom = cgroup.oom_kills() - cgroup.oom_before
        peak = cgroup.peak()
        errors = [payload_json(m)["error"] for m in client.on(f"{daemon.base}/error")]
        daemon.stop()
        client.close()
        broker.stop()
        cgroup.remove()
    tenth = max(1, len(samples) // 10)
    first = statistics.median(s["rss"] for s in samples[:tenth])
    last = statistics.median(s["rss"] for s in samples[-tenth:])
    meta = {"turns": sum(len(v) for v in latency.values()), "limit_mib": args.limit_mib,
            "seconds": round(time.monotonic() - started)}
    emit("rss_growth", 100 * (last - first) / first, "%", target="< 5", first_mib=round(first / 2**20, 1),
         last_mib=round(last / 2**20, 1), **meta)
    deciles = [samples[min(len(samples) - 1, i * len(samples) // 10)] for i in range(10)] + [samples[-1]]
    emit("rss_by_decile", last / 2**20, "MiB", rss_mib=[round(s["rss"] / 2**20, 1) for s in deciles],
         rss_anon_mib=[round(s["rss_anon"] / 2**20, 1) for s in deciles])
    for key in ("fds", "threads"):
        emit(f"{key}_growth", samples[-1][key] - samples[tenth - 1][key], "count", first=samples[tenth - 1][key],
             last=samples[-1][key], target="0")
    for kind, values in latency.items():
        if values:
            emit(f"latency_{kind}_p50", percentile(values, 0.5), "ms", n=len(values))
            emit(f"latency_{kind}_p95", percentile(values, 0.95), "ms", n=len(values))
    emit("errors", len(errors), "count", codes=sorted(set(errors)))
    emit("oom_kills", oom, "count", cgroup_peak_mib=round((peak or 0) / 2**20, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
