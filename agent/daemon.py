"""The daemon: builds the stages from the config, routes MQTT requests to the engine, owns start and stop,
health, Home Assistant discovery and the systemd notifications."""

from __future__ import annotations

import faulthandler
import logging
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import exitcodes, memory, package_version
from agent.brain import Backend, Engine, EngineError, Model, ModelLoadError, Request, Result, available_cpus
from agent.config import Config, ConfigError
from agent.conversation import Conversation
from agent.discovery import discovery_payload, discovery_topic
from agent.health import MetricsServer, cgroup_memory, process_memory
from agent.listen import Listener, SpeechToText, SpeechToTextError, TurnPolicy
from agent.modelfile import ModelFileError, verify
from agent.motion import MotionEvent
from agent.outbox import Outbox
from agent.publisher import Publisher
from agent.remote import RemoteModel
from agent.router import Caps, Router
from agent.sdnotify import Heartbeat, Notifier, Watchdog
from agent.senses import Heard, Senses

log = logging.getLogger("agent.daemon")
HA_STATUS = "homeassistant/status"
MODEL_LOAD_LIMIT = 15 * 60  # seconds: EXTEND_TIMEOUT_USEC stops after this, so a hung load still fails the start


class MqttSink:
    """Turn output to the topic contract: stream partials (QoS 0), one final response or one error (QoS 1,
    through the outbox), and the matching Home Assistant event."""

    def __init__(self, publisher: Publisher, after_answer: Callable[[], None] = lambda: None) -> None:
        self.publisher = publisher
        self.after_answer = after_answer

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.publisher.publish_json(self.publisher.topics.stream, {"id": request.id, "delta": delta, "index": index},
                                    qos=0)

    def on_result(self, request: Request, result: Result) -> None:
        log.info("answered id=%s source=%s stop=%s tokens=%d+%d ttft=%.0fms decode=%.1ftok/s", result.id,
                 result.source, result.stop, result.prompt_tokens, result.completion_tokens, result.ttft_ms,
                 result.decode_tps)
        payload = {**result.payload(), "ts": round(time.time(), 3)}
        self.publisher.publish_json(self.publisher.topics.response, payload, durable=True, settles=request.id)
        self.publisher.publish_event("response", {"id": result.id, "text": result.text, "source": result.source})
        self.after_answer()

    def on_error(self, request: Request, code: str, detail: str) -> None:
        self.publisher.publish_error(request.id, code, detail, settles=True, source=request.source)


def load_model(cfg: Config) -> Model:
    """Check the model file with our own header parser, then load it; raises ModelFileError/ModelLoadError."""
    info = verify(cfg.model.path, cfg.model.sha256)
    if cfg.model.lora:
        adapter = verify(cfg.model.lora)
        if adapter.metadata.get("general.type") != "adapter" or adapter.arch != info.arch:
            raise ModelFileError(f"{cfg.model.lora}: not a LoRA adapter for {info.arch} (general.type "
                                 f"{adapter.metadata.get('general.type')!r}, arch {adapter.arch})")
    log.info("model file ok: %s (%s, %.1f MiB, %d tensors)", cfg.model.path, info.arch, info.size / 2**20,
             len(info.tensors))
    projector = verify(cfg.model.mmproj) if cfg.model.mmproj else None
    try:  # the load setting that fits the memory budget (bench/RESULTS.md), or a refusal with the table
        plan = memory.plan(info, cfg.model, cfg.memory, projector=projector)
    except memory.MemoryPlanError as exc:
        raise ModelLoadError(str(exc)) from None
    for line in plan.lines(rows=4):
        log.info("%s", line)
    return Model(cfg.model, plan=plan)


def open_backend(cfg: Config) -> tuple[Backend, Caps]:
    """The model the engine talks to: loaded here (model.backend local), or a remote llama-server."""
    if cfg.model.backend == "remote":
        remote = RemoteModel(cfg.model, cfg.remote)
        problem = remote.check()
        if problem:  # not fatal: the server may come up later; each turn reports its own failure
            log.warning("remote model server: %s", problem)
        return remote, Caps(vision=cfg.remote.vision, audio=cfg.remote.audio)
    model = load_model(cfg)
    return model, probe_projector(model, cfg)


def probe_projector(model: Model, cfg: Config) -> Caps:
    """Load model.mmproj once at start to learn what it takes (libmtmd's own answer, not the file's claims);
    keep it loaded only when vision.keep_loaded and the memory plan has room for it. A projector that will not
    load stops the start (exit 65). load_model has already checked its header."""
    if not cfg.model.mmproj:
        return Caps()
    projector = model.projector()
    caps = Caps(vision=projector.vision, audio=projector.audio)
    if not cfg.vision.keep_loaded or not model.projector_resident:
        model.release_projector("probed at start; loaded again for the first image")
    return caps


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
        self.senses: Senses | None = None
        self.listener: Listener | None = None
        self.router: Router | None = None
        self.speech_mode = "off"
        self.health_beat = Heartbeat()
        self.watchdog = Watchdog(self.notifier)
        self.metrics: MetricsServer | None = None

    def request_stop(self, *_args: Any) -> None:
        self.stopping.set()

    # --- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.notifier.status(f"loading model {cfg.model.path}")
        try:
            with self.notifier.extending(60, limit=MODEL_LOAD_LIMIT):
                model, caps = open_backend(cfg)
        except (ModelFileError, ModelLoadError, EngineError) as exc:
            log.error("%s", exc)
            self.notifier.status(f"failed: {exc}")
            return model_exit_code(exc)
        conversation = Conversation(cfg.conversation.max_exchanges, cfg.conversation.idle_reset)
        self.engine = Engine(model, cfg.model.queue_size, conversation,
                             projector_idle=None if cfg.vision.keep_loaded else cfg.vision.idle_release)
        try:
            self.outbox = Outbox(cfg.outbox_path(), cfg.outbox.max_messages, cfg.outbox.max_bytes,
                                 cfg.outbox.max_age)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot open the outbox %s (outbox.path): %s", cfg.outbox_path(), exc)
            self.notifier.status(f"failed: cannot open the outbox: {exc}")
            return exitcodes.EX_CANTCREAT
        extra = (HA_STATUS,) if cfg.homeassistant.enabled else ()
        self.publisher = Publisher(cfg.mqtt, cfg.device_id, self.on_message, self.outbox, extra)
        for request_id, source in self.outbox.interrupted():
            self.publisher.publish_error(request_id, "interrupted", "the daemon stopped (a crash or a power cut) "
                                         "while this request was waiting or being answered; ask again",
                                         source=source)
        policy = TurnPolicy(cfg.listen)
        self.sink = MqttSink(self.publisher, after_answer=policy.answered)
        self.senses = Senses(cfg, self.on_motion, self.on_heard)
        self.router = Router(cfg, self.engine, self.publisher, self.sink, self.senses, policy, caps)
        if cfg.microphone.enabled:
            try:
                self.listener = self.make_listener(policy, caps)
            except ConfigError as exc:
                log.error("config error: %s", exc)
                return exitcodes.EX_CONFIG
        self.engine.start()
        self.publisher.on_connected.append(self._on_connected)
        self.publisher.start()
        if self.listener is not None:
            self.listener.start()
        self.senses.start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        if cfg.health.prometheus_port:
            self.metrics = MetricsServer(cfg.health.prometheus_bind, cfg.health.prometheus_port, self.health)
            self.metrics.start()
        self.watchdog.add("model", self._engine_progressing)
        self.watchdog.add("health", self.health_beat.probe(2 * cfg.health.interval + 10))
        self.watchdog.add("microphone", self.senses.listening)
        if self.listener is not None:
            self.watchdog.add("speech", self._speech_progressing)
        self.watchdog.start()
        status = f"ready: {cfg.model.path} on mqtt://{cfg.mqtt.host}:{cfg.mqtt.port} as {self.publisher.topics.base}"
        self.notifier.ready(status=status)
        log.info("%s", status)
        while not self.stopping.wait(1.0):
            pass
        return self.shutdown()

    def make_listener(self, policy: TurnPolicy, caps: Caps) -> Listener:
        """Native audio when the projector takes audio (listen.speech auto/native), else whisper.cpp; whisper
        also runs alongside native audio when the wake phrase needs a transcript."""
        cfg = self.cfg
        native = caps.audio and cfg.listen.speech in ("auto", "native")
        if cfg.listen.speech == "native" and not caps.audio:
            raise ConfigError(f"listen.speech is native, but model.mmproj ({cfg.model.mmproj or 'not set'}) "
                              "takes no audio")
        stt = None
        if not native or cfg.listen.trigger == "wake_phrase":
            try:
                stt = SpeechToText(cfg.whisper, cfg.whisper.threads or cfg.model.n_threads or available_cpus())
            except SpeechToTextError as exc:
                if cfg.listen.trigger == "wake_phrase":
                    raise ConfigError(f"listen.trigger is wake_phrase, which needs a transcript: {exc}") from None
                log.error("speech-to-text unavailable, utterances are reported without text: %s", exc)
                self.speech_mode = f"unavailable: {exc}"
        if native or stt is not None:
            self.speech_mode = "native audio" + (" + whisper" if stt else "") if native else "whisper"
        assert self.router is not None
        log.info("speech: %s, trigger %s", self.speech_mode, cfg.listen.trigger)
        return Listener(policy, stt, native, cfg.listen.audio_prompt, self.router.on_transcript,
                        self.router.on_speech, self.router.publisher.publish_event)

    def shutdown(self) -> int:
        log.info("stopping")
        self.notifier.stopping()
        self.watchdog.stop()
        assert self.engine is not None and self.publisher is not None and self.outbox is not None
        if self.senses is not None:
            self.senses.stop()
        if self.listener is not None:
            self.listener.stop()
        clean = self.engine.stop(timeout=3.0)
        if not clean:
            log.warning("the running turn did not stop in time")
        if self.metrics is not None:
            self.metrics.stop()
        self.publisher.stop(timeout=1.5)
        self.outbox.close()
        if clean:
            self.engine.model.release_projector()
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

    def _speech_progressing(self) -> bool:
        listener = self.listener
        return listener is None or not listener.busy() or time.monotonic() - listener.progress_at < 120

    # --- inputs ----------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called on paho's thread: route and return at once."""
        if self.router is not None and self.router.on_message(topic, payload):
            return
        if topic == HA_STATUS and payload.strip() == b"online":
            # Home Assistant restarted: send discovery again, after a small random delay so a fleet of
            # devices does not answer at the same instant.
            timer = threading.Timer(random.uniform(0.5, 5.0), self.publish_discovery)
            timer.daemon = True
            timer.start()

    def on_motion(self, event: MotionEvent) -> None:
        if self.router is not None:
            self.router.on_motion(event)

    def on_heard(self, heard: Heard) -> None:
        if self.listener is not None:
            self.listener.heard(heard)

    def _on_connected(self) -> None:
        self.publish_discovery()
        self.publish_health()

    def publish_discovery(self) -> None:
        if not self.cfg.homeassistant.enabled or self.publisher is None or self.engine is None:
            return
        name = self.engine.model.name
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
            "projector": "none" if not self.cfg.model.mmproj else
                         ("loaded" if engine.model.projector_loaded else "released"),
            "speech": self.speech_mode,
            "queues": {"model": engine.depth,
                       "audio": senses.get("microphone", {}).get("queued", 0)},
            "audio_dropped": senses.get("microphone", {}).get("overflows", 0),
            "camera_fps": senses.get("camera", {}).get("fps", 0.0),
            **senses,
            "mqtt": {"connected": publisher.connected.is_set(), "reconnects": max(0, publisher.connects - 1),
                     "disconnects": publisher.disconnects},
            "outbox": {"pending": len(outbox), "dropped": outbox.dropped},
            "rate_limited": self.router.limiter.refused if self.router is not None else 0,
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
