"""Gemma 4 through the daemon: one projector file carries vision (gemma4v) and audio (gemma4a), so a camera frame
and a spoken question reach the model without whisper. Tiny random-weight files with the real layouts (a 4-layer
gemma4 text model with KV sharing and both head sizes, a combined projector) run the real llama.cpp / libmtmd
code; the words are nonsense, the token counts and the contract are not."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.contract.codes import Source
from agent.llm.engine import Engine
from agent.llm.local import LocalModel
from agent.memory import tokens
from agent.turns.types import Media, Request
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, write_wav
from tests.support.models_gemma4 import tiny_gemma4_projector, tiny_gemma4_text
from tests.support.mqtt import Broker, Client, payload_json
from tests.support.paths import run_agent


def start(broker: Broker, *overrides: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, tiny_gemma4_text(template=True), f"model.mmproj={tiny_gemma4_projector()}",
                           "model.n_ctx=2048", "health.interval=1", *overrides)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    if "camera.enabled=true" in overrides:
        daemon.wait_for_camera()
    return daemon, client


def answer(client: Client, base: str, request_id: str | None = None, source: str | None = None) -> dict[str, Any]:
    """The answer to request `request_id`, or the first from `source`, or the first."""
    def match(m: Any) -> bool:
        body = payload_json(m)
        return request_id in (None, body["id"]) and source in (None, body["source"])

    return payload_json(client.wait_for(f"{base}/response", match, timeout=90)[0])


@pytest.mark.parametrize("size", [256, 768])
def test_a_frame_costs_what_its_size_gives_on_gemma4v(broker: Broker, door_video: Path, size: int) -> None:
    """gemma4v keeps the frame's size (no fixed grid): camera.input_size sets the image tokens, 81 at 256 px and
    256 at 768 px, as the planner counts them."""
    daemon, client = start(broker, "camera.enabled=true", f"camera.source={door_video}", f"camera.input_size={size}")
    client.publish(f"{daemon.base}/describe", {"id": "d"})
    body = answer(client, daemon.base, "d")
    assert body["source"] == "describe" and body["tokens"]["image"] == tokens.dyn_image_tokens(size, size)
    assert body["tokens"]["image"] == {256: 81, 768: 256}[size]
    daemon.stop()
    client.close()


def test_spoken_question_goes_to_gemma4_as_audio_with_the_audio_prompt(broker: Broker, question_wav: Path) -> None:
    """listen.speech native: the utterance is the model's input (25 tokens per second), no whisper runs, and
    listen.audio_prompt is the text that goes with it."""
    audio_prompt = "Answer the question you hear in one short sentence." + " Be brief." * 100  # ~300 tokens
    daemon, client = start(broker, "microphone.enabled=true", f"microphone.source={question_wav}",
                           "microphone.realtime=false", "listen.speech=native", f"listen.audio_prompt={audio_prompt}")
    body = answer(client, daemon.base)
    assert body["tokens"]["prompt"] - body["tokens"]["audio"] > 300  # the audio prompt went in with the audio
    heard = payload_json(client.wait_for(f"{daemon.base}/transcript")[0])
    assert body["source"] == "speech" and heard["id"] == body["id"] and heard["text"] is None
    # the utterance's audio is the speech plus up to vad.pre_roll_ms + vad.hangover_ms (1 s) around it
    assert 25 * heard["duration"] <= body["tokens"]["audio"] <= 25 * (heard["duration"] + 1.0) + 1
    health = payload_json(client.wait_for(f"{daemon.base}/health")[-1])
    assert health["speech"] == "native audio"
    daemon.stop()
    assert "speech: native audio, trigger always" in daemon.log and "speech-to-text: whisper.cpp" not in daemon.log
    client.close()


def test_on_demand_projector_serves_an_image_then_speech(broker: Broker, door_video: Path,
                                                           question_wav: Path) -> None:
    """The plan Gemma 4 E2B gets under 2 GiB (projector loaded for each image or clip, then freed): a describe and
    a spoken question each load it and release it."""
    daemon, client = start(broker, "memory.mode=manual", "memory.projector=on_demand", "camera.enabled=true",
                           f"camera.source={door_video}", "microphone.enabled=true",
                           f"microphone.source={question_wav}", "microphone.realtime=false")
    client.publish(f"{daemon.base}/describe", {"id": "img"})
    assert answer(client, daemon.base, "img")["tokens"]["image"] == 81
    assert answer(client, daemon.base, source="speech")["tokens"]["audio"] > 0
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["projector"] == "released"
                    and payload_json(m)["turns"] == 2, timeout=30)
    daemon.stop()
    assert daemon.log.count("projector released (an on-demand plan") == 2, daemon.log
    client.close()


def test_a_spoken_question_finds_the_projector_loaded_and_its_frame_encoded(broker: Broker, door_video: Path,
                                                                            tmp_path: Path) -> None:
    """Under an on-demand plan, speech that goes to the projector as audio has it loaded at the speech's onset and
    the frame encoded then, not evaluated: the turn loads nothing, encodes only its clip, frees the projector and
    evaluates frame and clip (one load and one release for the whole turn)."""
    pcm, _ = compose([(3.0, espeak("What is at the front door?"))], total_s=6.5)  # the camera is up by then
    daemon, client = start(broker, "memory.mode=manual", "memory.projector=on_demand", "camera.enabled=true",
                           f"camera.source={door_video}", "vision.attach=always", "vision.max_frame_age=30",
                           "microphone.enabled=true", f"microphone.source={write_wav(tmp_path / 'q.wav', pcm)}")
    body = answer(client, daemon.base, source="speech")
    assert body["tokens"]["image"] == 81 and body["tokens"]["audio"] > 0
    assert body["projector_load_ms"] == 0  # loaded while the question was spoken
    assert body["encode_ms"] > 0  # the clip's own encode, after the speech
    tokens_ = body["tokens"]  # the frame was evaluated with the turn, after the clip was encoded
    assert tokens_["prompt"] - tokens_["cached"] >= tokens_["image"] + tokens_["audio"], tokens_
    daemon.stop()
    assert "(speech, 1 media item(s), projector kept loaded for its audio)" in daemon.log, daemon.log
    assert daemon.log.count("projector loaded:") == 2, daemon.log  # the probe at start, then the speech onset
    assert "projector released (an on-demand plan: freed before the prompt is evaluated)" in daemon.log
    client.close()


def test_what_a_speech_onset_kept_for_a_turn_that_never_came_is_freed() -> None:
    """The projector and the frame's embeddings kept for a spoken turn wait for it prepared_hold seconds only."""
    model = LocalModel(ModelConfig(path=str(tiny_gemma4_text(template=True)), mmproj=str(tiny_gemma4_projector()),
                                   n_ctx=1024))
    model.projector_resident = False  # what an on-demand memory plan sets
    engine = Engine(model, 2, prepared_hold=1.0)
    engine.start()

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, "the engine never got there"
            time.sleep(0.05)

    try:
        frame = np.random.default_rng(3).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
        engine.prepare(Request(text="", source=Source.SPEECH, audio_follows=True, media=[Media("image", frame)]))
        until(lambda: model.held > 0)
        assert model.projector_loaded and engine.prepared == 1
        until(lambda: not model.projector_loaded)
        assert model.held == 0
    finally:
        assert engine.stop()
        model.close()


def test_check_prints_the_gemma4_plan_and_media_cost(tmp_path: Path) -> None:
    """`gemma-agent check` on the Gemma 4 pair: both encoders named, the tokens an image and a second of speech
    cost, and the projector's memory while encoding."""
    out = run_agent("--set", f"model.path={tiny_gemma4_text(template=True)}",
                    "--set", f"model.mmproj={tiny_gemma4_projector()}", "--set", "camera.input_size=512",
                    "--set", "microphone.enabled=true", "--set", "vad.max_utterance_s=10", "check",
                    cwd=tmp_path)
    text = out.stdout
    assert "(gemma4v + gemma4a): vision yes, audio yes" in text, text
    assert "121 tokens per 512 px frame, 25 audio tokens per second (250 for a 10 s utterance)" in text, text
    assert "memory plan" in text and "fits" in text
