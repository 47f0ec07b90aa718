"""The health snapshot: every stage's state, memory (process and cgroup), the last turn's speed, queue depths and
the MQTT connection, published retained on `health` every health.interval seconds and served to Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import package_version
from agent.llm.engine import Engine
from agent.memory.probe import cgroup_memory, process_memory
from agent.mqtt.client import MqttClient
from agent.mqtt.outbox import Outbox
from agent.ops.sdnotify import Watchdog
from agent.perception.stage import Perception
from agent.turns.router import Router


@dataclass
class HealthReport:
    """Reads every stage; `snapshot()` is called from the health thread and the metrics server."""

    engine: Engine
    client: MqttClient
    outbox: Outbox
    perception: Perception
    router: Router
    watchdog: Watchdog
    projector: Callable[[], str]  # "none" | "loaded" | "released"
    speech: Callable[[], str]  # how speech is understood, or why it is not
    speech_stats: Callable[[], dict[str, int]]  # speculative turns: started, confirmed, wasted
    memory_limit: int  # bytes: the budget the memory plan was made for at start
    started: float

    def snapshot(self) -> dict[str, Any]:
        engine, client = self.engine, self.client
        last = engine.last_result
        devices_health = self.perception.health()
        stages = {
            "model": "busy" if engine.current else ("ok" if engine.alive else "dead"),
            "mqtt": "ok" if client.connected.is_set() else "disconnected",
            **{name: info["state"] for name, info in devices_health.items()},
        }
        problems = self.problems(stages)
        return {
            "state": "degraded" if problems else "ok",
            "problems": problems,
            "stuck": list(self.watchdog.stuck),
            "uptime": round(time.monotonic() - self.started, 1),
            "version": package_version(),
            "stages": stages,
            "memory": {**process_memory(), **{f"cgroup_{k}": v for k, v in cgroup_memory().items()},
                       "limit": self.memory_limit},  # what the memory plan budgets for
            "last_turn": None if last is None else {
                "prefill_tps": round(last.prefill_tps, 1), "decode_tps": round(last.decode_tps, 1),
                "ttft_ms": round(last.ttft_ms, 1), "tokens": last.prompt_tokens + last.completion_tokens},
            "turns": engine.turns_served,
            "projector": self.projector(),
            "speech": self.speech(),
            "speech_turns": self.speech_stats(),
            "prepared": engine.prepared,  # images encoded ahead of their turn
            "queues": {"model": engine.depth,
                       "audio": devices_health.get("microphone", {}).get("queued", 0)},
            "audio_dropped": devices_health.get("microphone", {}).get("overflows", 0),
            "camera_fps": devices_health.get("camera", {}).get("fps", 0.0),
            **devices_health,
            "mqtt": {"connected": client.connected.is_set(), "reconnects": max(0, client.connects - 1),
                     "disconnects": client.disconnects},
            "outbox": {"pending": len(self.outbox), "dropped": self.outbox.dropped},
            **self.router.stats(),
            "ts": round(time.time(), 3),
        }

    def problems(self, stages: dict[str, str]) -> list[str]:
        """Why the agent is not doing all it was configured to do, one line each (empty: state ok)."""
        out = [f"{name} is {state}" for name, state in stages.items() if state in ("dead", "error", "lost")]
        out += [f"{name} is stuck" for name in self.watchdog.stuck]
        speech = self.speech()
        if speech.startswith("unavailable"):
            out.append(f"speech is not understood ({speech}): every utterance is dropped")
        return out
