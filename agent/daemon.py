"""The daemon: builds the stages from the config, routes MQTT requests to the engine, owns start and stop,
health, Home Assistant discovery and the systemd notifications."""

from __future__ import annotations

import faulthandler
import logging
import random
import signal
import threading
import time
from typing import Any

from agent import exitcodes, package_version
from agent.brain import Engine, EngineError, Model, ModelLoadError, Request, Result, new_id
from agent.config import Config
from agent.conversation import Conversation
from agent.discovery import discovery_payload, discovery_topic
from agent.health import MetricsServer, cgroup_memory, process_memory
from agent.messages import PayloadError, parse_ask
from agent.modelfile import ModelFileError, verify
from agent.motion import MotionEvent
from agent.outbox import Outbox
from agent.publisher import Publisher
from agent.sdnotify import Heartbeat, Notifier, Watchdog
from agent.senses import Heard, Senses

log = logging.getLogger("agent.daemon")
HA_STATUS = "homeassistant/status"
MODEL_LOAD_LIMIT = 15 * 60  # seconds: EXTEND_TIMEOUT_USEC stops after this, so a hung load still fails the start


class MqttSink:
    """Turn output to the topic contract: stream partials (QoS 0), one final response or one error (QoS 1,
    through the outbox), and the matching Home Assistant event."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.publisher.publish_json(self.publisher.topics.stream, {"id": request.id, "delta": delta, "index": index},
                                    qos=0)

    def on_result(self, request: Request, result: Result) -> None:
        log.info("answered id=%s source=%s stop=%s tokens=%d+%d ttft=%.0fms decode=%.1ftok/s", result.id,
                 result.source, result.stop, result.prompt_tokens, result.completion_tokens, result.ttft_ms,
                 result.decode_tps)
        payload = {**result.payload(), "ts": round(time.time(), 3)}
        self.publisher.publish_json(self.publisher.topics.response, payload, durable=True)
        self.publisher.publish_event("response", {"id": result.id, "text": result.text, "source": result.source})

    def on_error(self, request: Request, code: str, detail: str) -> None:
        self.publisher.publish_error(request.id, code, detail, source=request.source)


def load_model(cfg: Config) -> Model:
    """Check the model file with our own header parser, then load it; raises ModelFileError/ModelLoadError."""
    info = verify(cfg.model.path, cfg.model.sha256)
    log.info("model file ok: %s (%s, %.1f MiB, %d tensors)", cfg.model.path, info.arch, info.size / 2**20,
             len(info.tensors))
    return Model(cfg.model)


def model_exit_code(exc: Exception) -> int:
    if isinstance(exc, ModelFileError) and exc.missing:
        return exitcodes.EX_NOINPUT
    return exitcodes.EX_DATAERR


class Daemon:
    """One running agent. `run()` blocks until a signal or `request_stop()`, and returns the exit code."""

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier.from_env()
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.engine: Engine | None = None
        self.publisher: Publisher | None = None
        self.outbox: Outbox | None = None
        self.health_beat = Heartbeat()
        self.watchdog = Watchdog(self.notifier)
        self.metrics: MetricsServer | None = None
        self.senses: Senses | None = None

    def request_stop(self, *_args: Any) -> None:
        self.stopping.set()

    # --- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.notifier.status(f"loading model {cfg.model.path}")
        try:
            with self.notifier.extending(60, limit=MODEL_LOAD_LIMIT):
                model = load_model(cfg)
        except (ModelFileError, ModelLoadError) as exc:
            log.error("%s", exc)
            self.notifier.status(f"failed: {exc}")
            return model_exit_code(exc)
        conversation = Conversation(cfg.conversation.max_exchanges, cfg.conversation.idle_reset)
        self.engine = Engine(model, cfg.model.queue_size, conversation)
        self.engine.start()
        self.outbox = Outbox(cfg.outbox_path(), cfg.outbox.max_messages, cfg.outbox.max_bytes, cfg.outbox.max_age)
        extra = (HA_STATUS,) if cfg.homeassistant.enabled else ()
        self.publisher = Publisher(cfg.mqtt, cfg.device_id, self.on_message, self.outbox, extra)
        self.sink = MqttSink(self.publisher)
        self.publisher.on_connected.append(self._on_connected)
        self.publisher.start()
        self.senses = Senses(cfg, self.on_motion, self.on_heard)
        self.senses.start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        if cfg.health.prometheus_port:
            self.metrics = MetricsServer(cfg.health.prometheus_bind, cfg.health.prometheus_port, self.health)
            self.metrics.start()
        self.watchdog.add("model", self._engine_progressing)
        self.watchdog.add("health", self.health_beat.probe(2 * cfg.health.interval + 10))
        self.watchdog.add("microphone", self.senses.listening)
        self.watchdog.start()
        status = f"ready: {cfg.model.path} on mqtt://{cfg.mqtt.host}:{cfg.mqtt.port} as {self.publisher.topics.base}"
        self.notifier.ready(status=status)
        log.info("%s", status)
        while not self.stopping.wait(1.0):
            pass
        return self.shutdown()

    def shutdown(self) -> int:
        log.info("stopping")
        self.notifier.stopping()
        self.watchdog.stop()
        assert self.engine is not None and self.publisher is not None and self.outbox is not None
        if self.senses is not None:
            self.senses.stop()
        clean = self.engine.stop(timeout=3.0)
        if not clean:
            log.warning("the running turn did not stop in time")
        if self.metrics is not None:
            self.metrics.stop()
        self.publisher.stop(timeout=1.5)
        self.outbox.close()
        if clean:
            self.engine.model.close()
        log.info("stopped")
        return exitcodes.OK

    def _engine_progressing(self) -> bool:
        """Stuck only when the worker died or one turn has run well past model.deadline."""
        engine = self.engine
        assert engine is not None
        if not engine.alive:
            return False
        return engine.current is None or time.monotonic() - engine.progress_at < self.cfg.model.deadline + 30

    # --- MQTT ----------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called on paho's thread: parse, queue, reply with an error at once if refused. Never blocks."""
        assert self.publisher is not None and self.engine is not None
        topics = self.publisher.topics
        if topic == topics.ask:
            try:
                ask = parse_ask(payload, self.cfg.mqtt.max_payload)
            except PayloadError as exc:
                self.publisher.publish_error(exc.request_id, exc.code, exc.detail, source="ask")
                return
            self.submit(Request(text=ask.text, id=ask.id or new_id(), source="ask"))
        elif topic == topics.describe:
            self.publisher.publish_error(None, "no_camera", "no camera is configured (camera.enabled is false)",
                                         source="describe")
        elif topic == topics.reset:
            if self.engine.conversation is not None:
                self.engine.conversation.reset()
            log.info("conversation reset by MQTT")
            self.publisher.publish_event("reset", {})
        elif topic == HA_STATUS and payload.strip() == b"online":
            # Home Assistant restarted: send discovery again, after a small random delay so a fleet of
            # devices does not answer at the same instant.
            timer = threading.Timer(random.uniform(0.5, 5.0), self.publish_discovery)
            timer.daemon = True
            timer.start()

    def submit(self, request: Request) -> None:
        assert self.engine is not None and self.publisher is not None
        try:
            self.engine.submit(request, self.sink)
        except EngineError as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, source=request.source)

    # --- perception ------------------------------------------------------------------------------------

    def on_motion(self, event: MotionEvent) -> None:
        """Called on the camera's grabber thread: publish and return."""
        assert self.publisher is not None
        payload = event.payload()
        self.publisher.publish_event(str(payload.pop("event_type")), payload)

    def on_heard(self, heard: Heard) -> None:
        """Called on the listen thread for each utterance the VAD cut out."""
        assert self.publisher is not None
        transcript = {"id": new_id(), "text": None, "start": round(heard.start, 3), "end": round(heard.end, 3),
                      "duration": round(heard.end - heard.start, 3)}
        log.info("heard an utterance of %.2fs", heard.end - heard.start)
        self.publisher.publish_json(self.publisher.topics.transcript, transcript, durable=True)
        self.publisher.publish_event("transcript", transcript)

    def _on_connected(self) -> None:
        self.publish_discovery()
        self.publish_health()

    def publish_discovery(self) -> None:
        if not self.cfg.homeassistant.enabled or self.publisher is None or self.engine is None:
            return
        name = str(self.engine.model.llm.metadata.get("general.name", "Gemma"))
        payload = discovery_payload(self.cfg, self.publisher.topics, package_version(), name)
        self.publisher.publish_json(discovery_topic(self.cfg), payload, retain=True)
        log.info("published Home Assistant discovery on %s", discovery_topic(self.cfg))

    # --- health --------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """A snapshot of every stage (published retained on <base>/health; Prometheus gauges)."""
        engine, publisher, outbox = self.engine, self.publisher, self.outbox
        assert engine is not None and publisher is not None and outbox is not None
        last = engine.last_result
        senses = self.senses.health() if self.senses is not None else {}
        stages = {
            "model": "busy" if engine.current else ("ok" if engine.alive else "dead"),
            "mqtt": "ok" if publisher.connected.is_set() else "disconnected",
            **{name: info["state"] for name, info in senses.items()},
        }
        stuck = self.watchdog.stuck
        return {
            "state": "ok" if not stuck and engine.alive else "degraded",
            "stuck": list(stuck),
            "uptime": round(time.monotonic() - self.started, 1),
            "version": package_version(),
            "stages": stages,
            "memory": {**process_memory(), **{f"cgroup_{k}": v for k, v in cgroup_memory().items()}},
            "last_turn": None if last is None else {
                "prefill_tps": round(last.prefill_tps, 1), "decode_tps": round(last.decode_tps, 1),
                "ttft_ms": round(last.ttft_ms, 1), "tokens": last.prompt_tokens + last.completion_tokens},
            "turns": engine.turns_served,
            "queues": {"model": engine.depth,
                       "audio": senses.get("microphone", {}).get("queued", 0)},
            "audio_dropped": senses.get("microphone", {}).get("overflows", 0),
            "camera_fps": senses.get("camera", {}).get("fps", 0.0),
            **senses,
            "mqtt": {"connected": publisher.connected.is_set(), "reconnects": max(0, publisher.connects - 1),
                     "disconnects": publisher.disconnects},
            "outbox": {"pending": len(outbox), "dropped": outbox.dropped},
            "ts": round(time.time(), 3),
        }

    def publish_health(self) -> None:
        if self.publisher is not None:
            self.publisher.publish_json(self.publisher.topics.health, self.health(), retain=True)
        self.health_beat.beat()

    def _health_loop(self) -> None:
        while not self.stopping.wait(self.cfg.health.interval):
            try:
                self.publish_health()
            except Exception:  # health must never take the daemon down
                log.exception("health snapshot failed")


def install_signal_handlers(daemon: Daemon) -> None:
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    faulthandler.enable()  # systemd's watchdog sends SIGABRT first: every thread's stack goes to the journal
