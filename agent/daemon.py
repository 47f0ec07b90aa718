"""The daemon: builds the stages from the config, routes MQTT requests to the engine, owns start and stop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from agent import exitcodes
from agent.brain import Engine, EngineError, Model, ModelLoadError, Request, Result, new_id
from agent.config import Config
from agent.messages import PayloadError, parse_ask
from agent.modelfile import ModelFileError, verify
from agent.publisher import Publisher

log = logging.getLogger("agent.daemon")


class MqttSink:
    """Turn output to the topic contract: stream partials (QoS 0), one final response or one error (QoS 1)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.publisher.publish_json(self.publisher.topics.stream, {"id": request.id, "delta": delta, "index": index},
                                    qos=0)

    def on_result(self, request: Request, result: Result) -> None:
        log.info("answered id=%s source=%s stop=%s tokens=%d+%d ttft=%.0fms decode=%.1ftok/s", result.id,
                 result.source, result.stop, result.prompt_tokens, result.completion_tokens, result.ttft_ms,
                 result.decode_tps)
        self.publisher.publish_json(self.publisher.topics.response, {**result.payload(), "ts": round(time.time(), 3)})

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

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stopping = threading.Event()
        self.engine: Engine | None = None
        self.publisher: Publisher | None = None
        self.started = time.monotonic()

    def request_stop(self, *_args: Any) -> None:
        self.stopping.set()

    def run(self) -> int:
        try:
            model = load_model(self.cfg)
        except (ModelFileError, ModelLoadError) as exc:
            log.error("%s", exc)
            return model_exit_code(exc)
        self.engine = Engine(model, self.cfg.model.queue_size)
        self.engine.start()
        self.publisher = Publisher(self.cfg.mqtt, self.cfg.device_id, self.on_message)
        self.sink = MqttSink(self.publisher)
        self.publisher.start()
        log.info("ready: device %s, model %s", self.cfg.device_id, self.cfg.model.path)
        while not self.stopping.wait(1.0):
            pass
        return self.shutdown()

    def shutdown(self) -> int:
        log.info("stopping")
        assert self.engine is not None and self.publisher is not None
        clean = self.engine.stop(timeout=3.0)
        if not clean:
            log.warning("the running turn did not stop in time")
        self.publisher.stop(timeout=1.5)
        if clean:
            self.engine.model.close()
        log.info("stopped")
        return exitcodes.OK

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

    def submit(self, request: Request) -> None:
        assert self.engine is not None and self.publisher is not None
        try:
            self.engine.submit(request, self.sink)
        except EngineError as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, source=request.source)


def install_signal_handlers(daemon: Daemon) -> None:
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
