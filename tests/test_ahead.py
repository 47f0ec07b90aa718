"""Work done before the question is complete, through the daemon on the tiny models: the system prompt is
evaluated at start and a spoken turn's prompt up to its question at speech onset, so the turn evaluates only its
question; the frame a spoken turn will carry is encoded at speech onset and reused by that turn; a frame prepared
at motion serves a describe while it is fresh, and not once it is stale; a still view is encoded ahead of any
question (vision.ready_after) and serves every turn about it while it stays unchanged; a turn started at a short
pause is answered once when the pause was the end, and nothing of it is published when speech resumes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import models as testmodels
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, speech_extent, still, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json


def start(broker: Broker, *overrides: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, testmodels.tiny_text(), "health.interval=1", *overrides)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    return daemon, client


def health(client: Client, base: str, check: Any) -> dict[str, Any]:
    return dict(payload_json(client.wait_for(f"{base}/health", lambda m: check(payload_json(m)), timeout=60)[-1]))


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("ahead") / "door.avi", 90, fps=15.0, frame=moving_square)


def question_tokens(text: str) -> int:
    """How many tokens a question adds to the tiny model's completion prompt (" <question>\nA:")."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(testmodels.tiny_text()), vocab_only=True, verbose=False)
    return len(vocab.tokenize(f" {' '.join(text.split())}\nA:".encode(), add_bos=False, special=True))


def uncached(body: dict[str, Any]) -> int:
    return int(body["tokens"]["prompt"] - body["tokens"]["cached"])


def test_the_system_prompt_is_evaluated_before_the_first_turn(broker: Broker) -> None:
    daemon, client = start(broker)
    client.publish(f"{daemon.base}/ask", {"id": "first", "text": "Is the gate open?"})
    body = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "first")[0])
    assert body["tokens"]["cached"] > 40  # the system prompt and the completion frame's examples
    assert uncached(body) <= question_tokens("Is the gate open?") + 1  # + the prompt's last token before it
    daemon.stop()
    client.close()


def test_a_spoken_turn_evaluates_only_its_question(broker: Broker, tmp_path: Path) -> None:
    """The second question's prompt carries the first exchange: evaluated at the second's speech onset (without,
    the turn would evaluate the blank line and "Q:" after the first answer too)."""
    pcm, _ = compose([(0.5, espeak("Is the gate open?")), (5.0, espeak("And the garage door?"))], total_s=8.0)
    daemon, client = speech_daemon(broker, write_wav(tmp_path / "two.wav", pcm))
    heard = [payload_json(m)["id"] for m in client.wait_for(f"{daemon.base}/transcript", count=2, timeout=60)]
    answers = {payload_json(m)["id"]: payload_json(m) for m in client.wait_for(
        f"{daemon.base}/response", lambda m: payload_json(m)["id"] in heard, count=2)}
    for body in answers.values():
        assert uncached(body) <= question_tokens(body["transcript"]) + 1, body
    daemon.stop()
    client.close()


def test_the_frame_of_a_spoken_turn_is_encoded_while_the_person_speaks(broker: Broker, door: Path,
                                                                        tmp_path: Path) -> None:
    pcm, _ = compose([(0.5, espeak("What is waiting at the front door right now?"))], total_s=4.0)
    wav = write_wav(tmp_path / "q.wav", pcm)
    daemon, client = start(broker, f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true",
                           f"camera.source={door}", "vision.attach=always", "microphone.enabled=true",
                           f"microphone.source={wav}", f"whisper.model={testmodels.tiny_whisper()}",
                           "vision.max_frame_age=30")
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=60)[0])
    body = payload_json(client.wait_for(f"{daemon.base}/response",
                                        lambda m: payload_json(m)["id"] == transcript["id"], timeout=60)[0])
    assert body["tokens"]["image"] == 256
    assert body["encode_ms"] == 0  # the image was already in the KV cache: encoded at speech onset
    assert body["tokens"]["cached"] >= 256  # ... with everything before it
    assert health(client, daemon.base, lambda h: h["prepared"] >= 1)["prepared"] >= 1
    daemon.stop()
    client.close()


def test_a_frame_prepared_at_motion_serves_a_describe_while_fresh_only(broker: Broker, door: Path) -> None:
    daemon, client = start(broker, f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true",
                           f"camera.source={door}", "motion.enabled=true", "motion.cooldown=3600",
                           "vision.max_frame_age=2")
    health(client, daemon.base, lambda h: h["prepared"] == 1)  # the motion frame is in the KV cache
    client.publish(f"{daemon.base}/describe", {"id": "fresh"})
    fresh = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "fresh")[0])
    assert fresh["tokens"]["image"] == 256 and fresh["encode_ms"] == 0
    time.sleep(2.5)  # the motion frame is now older than vision.max_frame_age
    client.publish(f"{daemon.base}/describe", {"id": "later"})
    later = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "later")[0])
    assert later["tokens"]["image"] == 256 and later["encode_ms"] > 0  # a newer frame, encoded for this turn
    daemon.stop()
    client.close()


def test_a_still_view_is_encoded_before_the_question_and_serves_every_turn_about_it(broker: Broker,
                                                                                    tmp_path: Path) -> None:
    calm = write_video(tmp_path / "calm.avi", 90, fps=15.0, frame=still)
    daemon, client = start(broker, f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true",
                           f"camera.source={calm}", "vision.ready_after=0.5")
    health(client, daemon.base, lambda h: h["prepared"] == 1)  # the still view, in the KV cache before any turn
    client.publish(f"{daemon.base}/describe", {"id": "first"})
    first = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "first")[0])
    assert first["tokens"]["image"] == 256 and first["encode_ms"] == 0 and first["tokens"]["cached"] >= 256
    client.publish(f"{daemon.base}/ask", {"id": "again", "text": "Is it a person?", "image": "latest"})
    again = payload_json(client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "again")[0])
    # a newer frame of the same view: the picture the conversation holds, so only the question is evaluated
    assert again["encode_ms"] == 0 and again["tokens"]["image"] == 256
    assert again["tokens"]["prompt"] - again["tokens"]["cached"] < 40
    assert health(client, daemon.base, lambda h: h["frames_reused"] >= 2)["prepared"] == 1
    daemon.stop()
    client.close()


def speech_daemon(broker: Broker, wav: Path) -> tuple[DaemonProcess, Client]:
    return start(broker, "microphone.enabled=true", f"microphone.source={wav}",
                 f"whisper.model={testmodels.tiny_whisper()}", "model.max_tokens=8")


def test_a_turn_started_at_the_pause_that_ended_speech_is_answered_once(broker: Broker, tmp_path: Path) -> None:
    pcm, _ = compose([(0.5, espeak("Turn on the porch light."))], total_s=3.5)
    daemon, client = speech_daemon(broker, write_wav(tmp_path / "one.wav", pcm))
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=60)[0])
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == transcript["id"])
    stats = health(client, daemon.base, lambda h: h["speech_turns"].get("confirmed") == 1)["speech_turns"]
    assert stats == {"transcribed": 1, "ignored": 0, "speculated": 1, "confirmed": 1, "wasted": 0, "backlog_drops": 0}
    daemon.stop()  # a barrier: anything else the daemon had to say is out before it is gone
    ids = {payload_json(m)["id"] for t in ("response", "response/stream", "error")
           for m in client.on(f"{daemon.base}/{t}")}
    assert ids == {transcript["id"]} and len(client.on(f"{daemon.base}/response")) == 1
    client.close()


def test_a_turn_started_at_a_pause_speech_resumed_after_is_never_published(broker: Broker, tmp_path: Path) -> None:
    """A 450 ms pause: longer than vad.early_end_ms (250), shorter than the hangover (700): the turn started at
    the pause is let go, and only the whole utterance is answered."""
    first, second = espeak("Turn on the light"), espeak("in the kitchen please.")
    first_end, second_start = speech_extent(first)[1], speech_extent(second)[0]
    pcm, _ = compose([(0.5, first), (0.5 + first_end + 0.45 - second_start, second)], total_s=5.0)
    daemon, client = speech_daemon(broker, write_wav(tmp_path / "two.wav", pcm))
    transcripts = client.wait_for(f"{daemon.base}/transcript", timeout=60)
    answered = payload_json(transcripts[0])["id"]
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == answered)
    stats = health(client, daemon.base, lambda h: h["speech_turns"].get("wasted", 0) >= 1)["speech_turns"]
    assert stats["speculated"] >= 2 and stats["wasted"] >= 1
    daemon.stop()
    assert len(client.on(f"{daemon.base}/transcript")) == 1  # still one utterance: the hangover cut it
    ids = {payload_json(m)["id"] for t in ("response", "response/stream", "error")
           for m in client.on(f"{daemon.base}/{t}")}
    assert ids == {answered}  # the let-go turn's stream never went out
    client.close()
