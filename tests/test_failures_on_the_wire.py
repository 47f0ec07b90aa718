"""Failures that no well-behaved input produces, on the wire as README documents them: the engine, llama.cpp and
speech-to-text failing mid-turn. The real engine, model, speech worker, MQTT client, outbox and broker; only the
failure itself is injected (at the lowest layer that can fail: llama.cpp's eval, whisper's transcribe, a backend
bug), since nothing here fails on demand."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import Config, ModelConfig
from agent.llm.engine import Engine
from agent.llm.local import LocalModel
from agent.mqtt.client import MqttClient
from agent.mqtt.outbox import Outbox
from agent.mqtt.sink import MqttOutput
from agent.perception.stage import TimedUtterance
from agent.perception.vad import Utterance
from agent.turns.policy import TurnPolicy
from agent.turns.speech import SpeechWorker
from agent.turns.types import Request
from tests.support import models as testmodels
from tests.support.mqtt import Broker, Client, payload_json


@pytest.fixture
def wire(broker: Broker, tmp_path: Path) -> Iterator[tuple[MqttOutput, Client, str]]:
    """The agent's real MQTT output on the test broker, and a client subscribed to its topics."""
    cfg = Config()
    cfg.mqtt = dataclasses.replace(cfg.mqtt, host="127.0.0.1", port=broker.port)
    device = f"wire{tmp_path.name[-6:]}".replace("_", "")
    mqtt_client = MqttClient(cfg.mqtt, device, Outbox(tmp_path / "outbox.sqlite3"))
    watcher = Client(broker.port)
    watcher.subscribe(f"{mqtt_client.topics.base}/#")
    mqtt_client.start(lambda *_: None)
    assert mqtt_client.connected.wait(10)
    yield MqttOutput(mqtt_client), watcher, mqtt_client.topics.base
    mqtt_client.stop()
    watcher.close()


def error_for(watcher: Client, base: str, request_id: str | None, code: str) -> dict[str, Any]:
    def match(m: Any) -> bool:
        body = payload_json(m)
        return bool(body["error"] == code and body["id"] == request_id)

    return dict(payload_json(watcher.wait_for(f"{base}/error", match, timeout=30)[0]))


class FailingDecode(LocalModel):
    """The real model, with llama.cpp's eval failing the way llama-cpp-python reports a failed llama_decode."""

    def fail_next_eval(self) -> None:
        def failed(*_: Any, **__: Any) -> None:
            raise RuntimeError("llama_decode returned -3")

        self.llm.eval = failed  # type: ignore[method-assign]


class Buggy:
    """A backend with a bug: what the engine must report as internal_error and survive."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.cfg = model.cfg
        self.projector_used = 0.0
        self.name = model.name
        self.projector_loaded = False
        self.broken = True

    def generate(self, request: Request, **kwargs: Any) -> Any:
        if self.broken:
            self.broken = False
            raise KeyError("a bug")
        return self.model.generate(request, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_a_failed_llama_decode_is_a_model_error_and_the_engine_serves_on(wire: tuple[MqttOutput, Client, str],
                                                                      tmp_path: Path) -> None:
    output, watcher, base = wire
    model = FailingDecode(ModelConfig(path=str(testmodels.tiny_text()), max_tokens=4, n_ctx=512))
    engine = Engine(model, 4)
    engine.start()
    try:
        model.fail_next_eval()
        engine.submit(Request(text="Hello?", id="broken"), output)
        body = error_for(watcher, base, "broken", "model_error")
        assert "llama.cpp failed during the turn: llama_decode returned -3" in body["detail"]
        del model.llm.eval  # llama.cpp works again: so does the engine
        engine.submit(Request(text="Hello again?", id="after"), output)
        watcher.wait_for(f"{base}/response", lambda m: payload_json(m)["id"] == "after", timeout=30)
    finally:
        engine.stop()
        model.close()


def test_a_bug_in_a_turn_is_an_internal_error_and_the_engine_serves_on(wire: tuple[MqttOutput, Client, str]) -> None:
    output, watcher, base = wire
    model = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), max_tokens=4, n_ctx=512))
    engine = Engine(Buggy(model), 4)  # type: ignore[arg-type]
    engine.start()
    try:
        engine.submit(Request(text="Hello?", id="bug"), output)
        assert error_for(watcher, base, "bug", "internal_error")["detail"] == "KeyError: 'a bug'"
        engine.submit(Request(text="Hello again?", id="after-bug"), output)
        watcher.wait_for(f"{base}/response", lambda m: payload_json(m)["id"] == "after-bug", timeout=30)
    finally:
        engine.stop()
        model.close()


class BrokenWhisper:
    def transcribe(self, pcm: np.ndarray) -> str:
        raise RuntimeError("whisper_full failed")


class Turns:
    """Where accepted speech turns go: nowhere (none is accepted in these tests)."""

    sink: Any = None

    def on_speech_onset(self, start: float) -> None: ...

    def on_speech(self, request: Request, sink: Any = None) -> None:
        raise AssertionError("no turn expected")


def utterance(start: float) -> TimedUtterance:
    pcm = np.zeros(16000, np.int16)
    return TimedUtterance(Utterance(pcm, 0.0, 1.0, 0.0), start, start + 1.0, start + 1.7)


def test_speech_to_text_failing_is_a_speech_failed_error(wire: tuple[MqttOutput, Client, str]) -> None:
    output, watcher, base = wire
    cfg = Config().listen
    worker = SpeechWorker(TurnPolicy(cfg), BrokenWhisper(), False, "", output, Turns())  # type: ignore[arg-type]
    worker.start()
    worker.on_utterance(utterance(1000.0))
    body = error_for(watcher, base, None, "speech_failed")
    assert body["source"] == "speech" and body["detail"] == "RuntimeError: whisper_full failed"
    worker.stop()


def test_a_full_speech_queue_refuses_with_speech_backlog(wire: tuple[MqttOutput, Client, str]) -> None:
    output, watcher, base = wire
    worker = SpeechWorker(TurnPolicy(Config().listen), BrokenWhisper(), False, "", output, Turns(),  # type: ignore[arg-type]
                          queue_size=1)
    for n in range(3):  # not started: the queue (2 slots) holds two, the third is refused
        worker.on_utterance(utterance(2000.0 + n))
    body = error_for(watcher, base, None, "speech_backlog")
    assert body["source"] == "speech" and "2002.000 was skipped" in body["detail"] and worker.backlog_drops == 1
