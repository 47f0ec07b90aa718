"""Understanding end to end: camera frames through the Gemma 3n vision projector, speech through native audio
and through whisper.cpp, the listen triggers, projector release. Tiny random-weight models with the real
layouts run the real llama.cpp / libmtmd / whisper.cpp code (their words are nonsense; the metadata is not)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tests.support import models as testmodels
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, still, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json


def start(broker: Broker, model: Path, *overrides: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, model, "model.n_ctx=2048", "health.interval=1", *overrides)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    if "camera.enabled=true" in overrides:
        daemon.wait_for_camera()
    return daemon, client


def response(client: Client, base: str, request_id: str | None = None, timeout: float = 60) -> dict[str, Any]:
    def match(m: mqtt.MQTTMessage) -> bool:
        return request_id is None or payload_json(m)["id"] == request_id

    return payload_json(client.wait_for(f"{base}/response", match, timeout=timeout)[0])


def error(client: Client, base: str, code: str) -> dict[str, Any]:
    return payload_json(client.wait_for(f"{base}/error", lambda m: payload_json(m)["error"] == code)[0])


def vision_args(video: Path, size: int = 512) -> tuple[str, ...]:
    return (f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true", f"camera.source={video}",
            f"camera.input_size={size}")


@pytest.mark.parametrize("size", [256, 512, 768])
def test_describe_sends_one_image_of_256_tokens_at_each_input_size(broker: Broker, door_video: Path,
                                                                  size: int) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(door_video, size))
    client.publish(f"{daemon.base}/describe", {"id": "d1", "prompt": "What is at the door?"})
    body = response(client, daemon.base, "d1")
    assert body["source"] == "describe" and body["tokens"]["image"] == 256
    assert body["tokens"]["prompt"] > 256
    daemon.stop()
    client.close()


def test_ask_with_the_frame_a_follow_up_about_it_and_a_reset(broker: Broker, door_video: Path) -> None:
    """The frame an ask carried stays in the conversation: a follow-up without one is about the same picture and
    finds it in the KV cache (nothing encoded); after a reset a question carries no picture."""
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(door_video))
    client.publish(f"{daemon.base}/ask", {"id": "with", "text": "Who is there?", "image": "latest"})
    first = response(client, daemon.base, "with")
    assert first["tokens"]["image"] == 256 and first["encode_ms"] > 0
    client.publish(f"{daemon.base}/ask", {"id": "follow", "text": "Is it a person?"})
    follow = response(client, daemon.base, "follow")
    assert follow["tokens"]["image"] == 256 and follow["encode_ms"] == 0
    assert follow["tokens"]["cached"] > first["tokens"]["prompt"]  # the whole first exchange, image included
    client.publish(f"{daemon.base}/reset", b"")
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "reset")
    client.publish(f"{daemon.base}/ask", {"id": "fresh", "text": "Who is there?"})
    assert response(client, daemon.base, "fresh")["tokens"]["image"] == 0
    daemon.stop()
    client.close()


def test_home_assistants_describe_button_is_answered_from_the_frame(broker: Broker, door_video: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(door_video))
    client.publish(f"{daemon.base}/describe", b"")  # the button's empty payload: the default prompt
    body = payload_json(client.wait_for(f"{daemon.base}/response", timeout=60)[0])
    assert body["source"] == "describe" and body["tokens"]["image"] == 256
    daemon.stop()
    client.close()


def test_image_request_without_a_projector_is_an_error(broker: Broker, gemma270m: Path, door_video: Path) -> None:
    daemon, client = start(broker, gemma270m, "camera.enabled=true", f"camera.source={door_video}")
    client.publish(f"{daemon.base}/describe", {"id": "np"})
    body = error(client, daemon.base, "no_projector")
    assert body["id"] == "np" and "model.mmproj" in str(body["detail"])
    client.publish(f"{daemon.base}/ask", {"id": "still-ok", "text": "Hello"})
    response(client, daemon.base, "still-ok")
    daemon.stop()
    client.close()


def test_a_stale_frame_is_not_described(broker: Broker, tmp_path: Path) -> None:
    video = write_video(tmp_path / "short.avi", 3, fps=15.0, frame=still)
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(video), "camera.loop=false",
                           "vision.max_frame_age=0.5")
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["camera"]["state"] == "ended", timeout=30)
    time.sleep(0.6)
    client.publish(f"{daemon.base}/describe", {"id": "old"})
    body = error(client, daemon.base, "stale_frame")
    assert body["id"] == "old" and "camera state ended" in str(body["detail"])
    daemon.stop()
    client.close()


def test_projector_is_released_when_idle_and_loaded_again(broker: Broker, door_video: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(door_video), "memory.projector=1")
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["projector"] == "released", timeout=30)
    client.publish(f"{daemon.base}/describe", {"id": "again"})
    assert response(client, daemon.base, "again")["tokens"]["image"] == 256
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["projector"] == "released"
                    and payload_json(m)["turns"] == 1, timeout=30)
    daemon.stop()
    client.close()


def test_an_on_demand_memory_plan_loads_the_projector_only_for_each_image(broker: Broker, door_video: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), *vision_args(door_video), "memory.mode=manual",
                           "memory.projector=on_demand", "health.interval=1")
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["projector"] == "released", timeout=30)
    for n in range(2):  # loaded for the image, freed before the answer is decoded, loaded again for the next
        client.publish(f"{daemon.base}/describe", {"id": f"od{n}"})
        assert response(client, daemon.base, f"od{n}")["tokens"]["image"] == 256
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["projector"] == "released"
                    and payload_json(m)["turns"] == 2, timeout=30)
    daemon.stop()
    assert daemon.log.count("projector released (an on-demand plan") == 2, daemon.log
    client.close()


def test_speech_goes_to_the_model_as_native_audio(broker: Broker, question_wav: Path) -> None:
    text, projector = testmodels.tiny_audio_pair()
    daemon, client = start(broker, text, f"model.mmproj={projector}", "microphone.enabled=true",
                           f"microphone.source={question_wav}", "microphone.realtime=false")
    body = response(client, daemon.base)
    assert body["source"] == "speech" and body["tokens"]["audio"] > 0 and "transcript" not in body
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript")[0])
    assert transcript["id"] == body["id"] and transcript["text"] is None and transcript["duration"] > 0.5
    health = payload_json(client.wait_for(f"{daemon.base}/health")[-1])
    assert health["speech"] == "native audio"
    daemon.stop()
    client.close()


def test_speech_through_whisper_publishes_the_transcript_and_answers_it(broker: Broker, question_wav: Path) -> None:
    daemon, client = start(broker, testmodels.tiny_text(), "microphone.enabled=true",
                           f"microphone.source={question_wav}", "microphone.realtime=false",
                           f"whisper.model={testmodels.tiny_whisper()}", "whisper.threads=1")
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript")[0])
    assert "(en, 1 threads, encoder window >= 10 s)" in daemon.wait_log("speech-to-text: whisper.cpp")
    assert isinstance(transcript["text"], str) and transcript["text"]
    body = response(client, daemon.base, transcript["id"])
    assert body["source"] == "speech" and body["transcript"] == transcript["text"]
    assert body["tokens"]["audio"] == 0
    event = client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "transcript")[0]
    assert payload_json(event)["text"] == transcript["text"]
    daemon.stop()
    client.close()


def speech_health(client: Client, base: str, ignored: int) -> dict[str, Any]:
    """The first health message counting `ignored` utterances heard outside a listening window."""
    return dict(payload_json(client.wait_for(
        f"{base}/health", lambda m: payload_json(m)["speech_turns"]["ignored"] == ignored, timeout=30)[0]))


def test_mqtt_trigger_takes_speech_only_inside_the_listen_window(broker: Broker, tmp_path: Path) -> None:
    pcm, _ = compose([(0.3, espeak("Is anybody home?")), (6.0, espeak("Open the garage door."))], total_s=8.5)
    wav = write_wav(tmp_path / "two.wav", pcm)
    text, projector = testmodels.tiny_audio_pair()
    daemon, client = start(broker, text, f"model.mmproj={projector}", "microphone.enabled=true",
                           f"microphone.source={wav}", "listen.trigger=mqtt", "listen.follow_up=0")
    speech_health(client, daemon.base, ignored=1)  # the first sentence: not listening, so neither heard nor kept
    assert client.on(f"{daemon.base}/transcript") == []
    client.publish(f"{daemon.base}/listen", {"seconds": 30})
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "listening")
    second = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=30)[0])
    body = response(client, daemon.base, str(second["id"]))
    assert body["source"] == "speech"
    assert len(client.on(f"{daemon.base}/transcript")) == 1 and len(client.on(f"{daemon.base}/response")) == 1
    daemon.stop()
    client.close()


@pytest.mark.parametrize(("frames", "answered"), [(moving_square, True), (still, False)])
def test_motion_trigger_opens_a_listening_window(broker: Broker, tmp_path: Path, question_wav: Path,
                                                 frames: Callable[[int, int, int], np.ndarray], answered: bool) -> None:
    pcm, _ = compose([(2.5, espeak("What is at the front door?"))], total_s=5.0)
    wav = write_wav(tmp_path / "late.wav", pcm)
    video = write_video(tmp_path / "cam.avi", 90, fps=15.0, frame=frames)
    text, projector = testmodels.tiny_audio_pair()
    daemon, client = start(broker, text, f"model.mmproj={projector}", "microphone.enabled=true",
                           f"microphone.source={wav}", "listen.trigger=motion", "camera.enabled=true",
                           f"camera.source={video}", "motion.enabled=true", "motion.cooldown=1")
    if answered:
        transcript = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=30)[0])
        client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "motion")
        assert response(client, daemon.base, str(transcript["id"]))["source"] == "speech"
    else:
        speech_health(client, daemon.base, ignored=1)  # the utterance came, outside any window
        assert client.on(f"{daemon.base}/response") == [] and client.on(f"{daemon.base}/transcript") == []
        assert not [m for m in client.on(f"{daemon.base}/event") if payload_json(m)["event_type"] == "motion"]
    daemon.stop()
    client.close()
