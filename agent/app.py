"""The daemon, composed as a list of steps: model → outbox → MQTT → turns → perception → operations. Each object is
whole when it is built (`Agent.build`); `start()` sets them running, `shutdown()` stops them in reverse order.
A step that cannot be taken is a `StartupError` with a documented exit code, before anything is published."""

from __future__ import annotations

import faulthandler
import logging
import random
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent import package_version
from agent.config import Config, ConfigError, available_cpus
from agent.contract.codes import AgentError, ErrorCode
from agent.contract.exitcodes import ExitCode
from agent.contract.outbound import Health
from agent.contract.topics import HA_STATUS
from agent.gguf import ModelFileError
from agent.llm.engine import Backend, Engine
from agent.llm.loader import exit_code_for, open_backend
from agent.llm.local import ModelLoadError
from agent.memory.plan import budget
from agent.mqtt.client import MqttClient, tls_context
from agent.mqtt.discovery import discovery_payload, discovery_topic
from agent.mqtt.outbox import Outbox
from agent.mqtt.sink import MqttOutput
from agent.ops.health import HealthReport
from agent.ops.metrics import MetricsServer
from agent.ops.sdnotify import Heartbeat, Notifier, Watchdog
from agent.perception.stage import Perception
from agent.perception.wake import WakeWordDetector, WakeWordError, resolve
from agent.turns.conversation import Conversation
from agent.turns.policy import TurnPolicy
from agent.turns.router import Router
from agent.turns.speech import SpeechToText, SpeechToTextError, SpeechWorker, speech_route
from agent.turns.types import MediaSupport, Output

log = logging.getLogger("agent.app")
MODEL_LOAD_LIMIT = 15 * 60  # seconds: EXTEND_TIMEOUT_USEC stops after this, so a hung load still fails the start
# seconds past the longest utterance (vad.max_utterance_s) that what a speech onset prepared waits for its turn
# (the hangover, speech-to-text and the queue come after the speech)
PREPARED_HOLD_MARGIN_S = 10.0


class StartupError(Exception):
    """A step of the start that cannot be taken: the message names what and why; `code` is the exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Speech:
    """The speech worker (None with the microphone off) and how speech is understood, for health."""

    worker: SpeechWorker | None
    mode: str


def build_speech(cfg: Config, policy: TurnPolicy, support: MediaSupport, output: Output, router: Router) -> Speech:
    """The speech worker, understanding speech as `speech_route` decides (ConfigError when it cannot)."""
    if not cfg.microphone.enabled:
        return Speech(None, "off")
    native, needs_whisper = speech_route(cfg.listen, cfg.microphone.enabled, support)
    stt, mode = None, "off"
    if needs_whisper:
        try:
            stt = SpeechToText(cfg.whisper, cfg.whisper.threads or cfg.model.n_threads or available_cpus())
        except SpeechToTextError as exc:
            if cfg.listen.trigger == "wake_phrase":
                raise ConfigError(f"listen.trigger is wake_phrase, which needs a transcript: {exc}") from None
            log.error("speech-to-text unavailable, utterances are reported without text: %s", exc)
            mode = f"unavailable: {exc}"
    if native or stt is not None:
        mode = "native audio" + (" + whisper" if stt else "") if native else "whisper"
    log.info("speech: %s, trigger %s", mode, cfg.listen.trigger)
    worker = SpeechWorker(policy, stt, native, cfg.listen.audio_prompt, output, router)
    return Speech(worker, mode)


def open_wake_word(cfg: Config) -> WakeWordDetector | None:
    """The wake word detector listen.trigger wake_word needs (StartupError EX_CONFIG when it cannot load)."""
    if cfg.listen.trigger != "wake_word" or not cfg.microphone.enabled:
        return None
    try:
        return WakeWordDetector(resolve(cfg.wake_word))
    except WakeWordError as exc:
        raise StartupError(ExitCode.EX_CONFIG, f"config error: {exc}") from None


@dataclass
class Agent:
    """One running agent: every stage, built and wired."""

    cfg: Config
    notifier: Notifier
    backend: Backend
    engine: Engine
    outbox: Outbox
    client: MqttClient
    output: MqttOutput
    perception: Perception
    router: Router
    speech: Speech
    watchdog: Watchdog
    health: HealthReport
    health_beat: Heartbeat
    metrics: MetricsServer | None
    stopping: threading.Event
    activity: threading.Event

    @classmethod
    def build(cls, cfg: Config, notifier: Notifier, stopping: threading.Event) -> Agent:
        check_tls(cfg)  # the certificate files and the port first: found in a second, not after the model loads
        metrics = open_metrics(cfg)
        notifier.status(f"loading model {cfg.model.path}")
        try:
            with notifier.extending(60, limit=MODEL_LOAD_LIMIT):
                backend, support = open_backend(cfg)
        except (ModelFileError, ModelLoadError, AgentError) as exc:
            raise StartupError(exit_code_for(exc), str(exc)) from None
        conversation = Conversation(cfg.conversation.max_exchanges, cfg.conversation.idle_reset)
        activity = threading.Event()  # set by the engine at each turn's start and end: health goes out then
        engine = Engine(backend, cfg.model.queue_size, conversation,
                        projector_idle=cfg.memory.projector_idle_release, on_activity=activity.set,
                        prepared_hold=cfg.vad.max_utterance_s + PREPARED_HOLD_MARGIN_S)
        outbox = open_outbox(cfg)
        extra = (HA_STATUS,) if cfg.homeassistant.enabled else ()
        client = MqttClient(cfg.mqtt, cfg.device_id, outbox, extra)
        output = MqttOutput(client)
        for request_id, source in outbox.interrupted():
            output.refused(request_id, source, AgentError(
                ErrorCode.INTERRUPTED, "the daemon stopped (a crash or a power cut) while this request was waiting "
                "or being answered; ask again"))
        policy = TurnPolicy(cfg.listen)
        perception = Perception(cfg, open_wake_word(cfg))
        router = Router(cfg, engine, conversation, output, perception, policy, support)
        try:
            speech = build_speech(cfg, policy, support, output, router)
        except ConfigError as exc:
            raise StartupError(ExitCode.EX_CONFIG, f"config error: {exc}") from None
        watchdog = Watchdog(notifier)
        projector = (lambda: "none") if not cfg.model.mmproj else \
            (lambda: "loaded" if backend.projector_loaded else "released")
        health = HealthReport(engine, client, outbox, perception, router, watchdog, projector,
                              lambda: speech.mode, lambda: speech.worker.stats() if speech.worker else {},
                              budget(cfg.memory).limit, time.monotonic())
        return cls(cfg, notifier, backend, engine, outbox, client, output, perception, router, speech, watchdog,
                   health, Heartbeat(), metrics, stopping, activity)

    # --- running -----------------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self.engine.start()
        self.client.on_connected.append(self._on_connected)
        self.client.start(self.on_message)
        worker = self.speech.worker
        if worker is not None:
            worker.start()
        if self.router.still is not None and self.perception.camera is not None:
            self.perception.camera.subscribe(self.router.on_frame)  # vision.ready_after: a still view prepared
        self.perception.start(self.router.on_motion, worker)
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        if self.metrics is not None:
            self.metrics.start(self.health.snapshot)
        self.watchdog.add("model", lambda: self.engine.progressing(cfg.model.deadline + 30))
        self.watchdog.add("health", self.health_beat.probe(2 * cfg.health.interval + 10))
        self.watchdog.add("microphone", self.perception.microphone_progressing)
        if worker is not None:
            self.watchdog.add("speech", worker.progressing)
        self.watchdog.start()

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called on paho's thread: route and return at once."""
        command = self.client.topics.command(topic)
        if command is not None:
            self.router.on_command(command, payload)
        elif topic == HA_STATUS and payload.strip() == b"online":
            # Home Assistant restarted: send discovery again, after a small random delay so a fleet of devices
            # does not answer at the same instant.
            timer = threading.Timer(random.uniform(0.5, 5.0), self.publish_discovery)
            timer.daemon = True
            timer.start()

    def _on_connected(self) -> None:
        self.publish_discovery()
        self.publish_health()

    def publish_discovery(self) -> None:
        if not self.cfg.homeassistant.enabled:
            return
        payload = discovery_payload(self.cfg, self.client.topics, package_version(), self.backend.name)
        self.client.publish_json(discovery_topic(self.cfg), payload, retain=True)
        log.info("published Home Assistant discovery on %s", discovery_topic(self.cfg))

    def publish_health(self) -> None:
        """The health snapshot, retained. Only while connected: a retained state queued during an outage would be
        delivered after the fresh one sent on reconnecting, and stay retained, stale."""
        if self.client.connected.is_set():
            self.client.publish(Health(self.health.snapshot()))
        self.health_beat.beat()

    def _health_loop(self) -> None:
        """Health every health.interval seconds, and whenever a turn starts or ends (busy / idle)."""
        while not self.stopping.is_set():
            self.activity.wait(self.cfg.health.interval)
            self.activity.clear()
            if self.stopping.is_set():
                return
            try:
                self.publish_health()
            except Exception:  # health must never take the daemon down
                log.exception("health snapshot failed")

    def shutdown(self) -> ExitCode:
        log.info("stopping")
        self.activity.set()  # wakes the health thread, which sees `stopping` and ends
        self.notifier.stopping()
        self.watchdog.stop()
        self.perception.stop()
        if self.speech.worker is not None:
            self.speech.worker.stop()
        clean = self.engine.stop(timeout=3.0)
        if not clean:
            log.warning("the running turn did not stop in time")
        if self.metrics is not None:
            self.metrics.stop()
        self.client.stop(timeout=1.5)
        self.outbox.close()
        if clean:
            self.backend.release_projector()
            self.backend.close()
        log.info("stopped")
        return ExitCode.OK


def open_outbox(cfg: Config) -> Outbox:
    try:
        return Outbox(cfg.outbox_path(), cfg.outbox.max_messages, cfg.outbox.max_bytes, cfg.outbox.max_age)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(ExitCode.EX_CANTCREAT, f"cannot open the outbox {cfg.outbox_path()} (outbox.path): "
                           f"{exc}") from None


def check_tls(cfg: Config) -> None:
    """The broker connection's certificate files can be used (StartupError naming the key if not)."""
    if cfg.mqtt.tls.enabled:
        try:
            tls_context(cfg.mqtt.tls)
        except ConfigError as exc:
            raise StartupError(ExitCode.EX_CONFIG, f"config error: {exc}") from None


def open_metrics(cfg: Config) -> MetricsServer | None:
    """The Prometheus endpoint's socket, bound now so a port in use stops the start before anything is sent."""
    if not cfg.health.prometheus_port:
        return None
    try:
        return MetricsServer(cfg.health.prometheus_bind, cfg.health.prometheus_port)
    except OSError as exc:
        raise StartupError(ExitCode.EX_CONFIG, f"health.prometheus_port: cannot listen on "
                           f"{cfg.health.prometheus_bind}:{cfg.health.prometheus_port}: {exc.strerror or exc}") \
            from None


def run(cfg: Config, stopping: threading.Event, notifier: Notifier | None = None) -> int:
    """Build, start, serve until `stopping` is set, stop; the exit code."""
    notifier = notifier or Notifier.from_env()
    try:
        agent = Agent.build(cfg, notifier, stopping)
    except StartupError as exc:
        log.error("%s", exc)
        notifier.status(f"failed: {exc}")
        return exc.code
    agent.start()
    status = f"ready: {cfg.model.path} on mqtt://{cfg.mqtt.host}:{cfg.mqtt.port} as {agent.client.topics.base}"
    notifier.ready(status=status)
    log.info("%s", status)
    while not stopping.wait(1.0):
        pass
    return agent.shutdown()


def install_signal_handlers(stopping: threading.Event) -> None:
    def stop(*_args: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faulthandler.enable()  # systemd's watchdog sends SIGABRT first: every thread's stack goes to the journal
