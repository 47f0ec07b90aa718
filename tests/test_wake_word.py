"""The wake word trigger (listen.trigger wake_word): microWakeWord on real espeak-ng speech, with the models the
pymicro-wakeword wheel ships, through the detector and through the daemon (microphone = a WAV file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import WakeWordConfig
from agent.perception.vad import Utterance
from agent.perception.wake import BUNDLED, WakeWordDetector, WakeWordError, after_wake, resolve
from tests.support import models as testmodels
from tests.support.daemon import DaemonProcess
from tests.support.media import RATE, chatter, compose, espeak, moving_square, speech_extent, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json
from tests.support.paths import ROOT, run_agent

WAKE = "okay nabu"
QUESTION = "what is at the door?"
VOICES = ("en+m3", "en-us+m1")  # two voices okay_nabu hears in quiet and at 15 dB (others: see bench/RESULTS.md)


def detections(detector: WakeWordDetector, pcm: np.ndarray, frame: int = 480) -> list[float]:
    """Stream times of the detections in `pcm`, fed as the microphone feeds it (30 ms frames)."""
    found = [detector.push(pcm[i:i + frame], i / RATE) for i in range(0, len(pcm), frame)]
    return [d.ts for d in found if d is not None]


def wake_then_question(voice: str, snr_db: float | None, at: float = 1.0) -> tuple[np.ndarray, float, float]:
    """'okay nabu, what is at the door?' in one breath at `at` s; the stream, where the wake word's sound ends
    and where the whole phrase ends (seconds)."""
    clip = espeak(f"{WAKE}, {QUESTION}", voice=voice)
    wake_end = speech_extent(espeak(f"{WAKE},", voice=voice))[1]
    pcm, truths = compose([(at, clip)], at + len(clip) / RATE + 1.5, snr_db=snr_db)
    return pcm, at + wake_end, truths[0].end


@pytest.mark.parametrize("snr_db", [None, 15.0])
@pytest.mark.parametrize("voice", VOICES)
def test_okay_nabu_is_heard_once_right_after_it_is_said(voice: str, snr_db: float | None) -> None:
    pcm, wake_end, phrase_end = wake_then_question(voice, snr_db)
    hits = detections(WakeWordDetector(resolve(WakeWordConfig())), pcm)
    assert len(hits) == 1  # the refractory period swallows the frames after the first that still score high
    assert wake_end - 0.1 < hits[0] < phrase_end


def test_ten_minutes_of_chatter_wake_no_bundled_model() -> None:
    pcm, sentences = chatter(600.0)
    assert sentences > 100
    for name in BUNDLED:
        assert detections(WakeWordDetector(resolve(WakeWordConfig(model=name))), pcm) == [], name


def test_the_question_is_the_speech_after_the_wake_word() -> None:
    pcm, wake_end, phrase_end = wake_then_question(VOICES[0], None, at=0.5)
    (hit,) = detections(WakeWordDetector(resolve(WakeWordConfig())), pcm)
    utterance = Utterance(pcm=pcm[int(0.2 * RATE):], start_ts=0.5, end_ts=phrase_end, pcm_ts=0.2)
    question = after_wake(utterance, hit, min_speech_s=0.25)
    assert question is not None
    assert wake_end - 0.1 <= question.start_ts <= hit and question.end_ts == phrase_end
    assert question.pcm_ts == question.start_ts
    assert len(question.pcm) == len(utterance.pcm) - round((question.start_ts - 0.2) * RATE)
    # the wake word alone leaves nothing to answer; an utterance begun after the detection is left whole
    assert after_wake(Utterance(pcm[:int(hit * RATE)], 0.5, wake_end, 0.0), hit, 0.25) is None
    later = Utterance(pcm[int(3.0 * RATE):], hit + 0.5, hit + 1.5, hit + 0.5)
    assert after_wake(later, hit, 0.25) is later


def test_a_community_model_is_loaded_from_its_json_path(tmp_path: Path) -> None:
    bundled = resolve(WakeWordConfig())
    shutil.copy(bundled.tflite, tmp_path / "door_word.tflite")
    manifest = {"type": "micro", "wake_word": "Door Word", "model": "door_word.tflite",
                "micro": {"probability_cutoff": 0.8, "sliding_window_size": 4}}
    (tmp_path / "door_word.json").write_text(json.dumps(manifest))
    model = resolve(WakeWordConfig(model=str(tmp_path / "door_word.json"), refractory=3.0))
    assert (model.name, model.phrase, model.cutoff, model.window, model.refractory) == \
        ("door_word", "Door Word", 0.8, 4, 3.0)
    overridden = resolve(WakeWordConfig(model=str(tmp_path / "door_word.json"), probability_cutoff=0.99))
    assert overridden.cutoff == 0.99
    pcm, _, _ = wake_then_question(VOICES[0], None)
    assert len(detections(WakeWordDetector(model), pcm)) == 1


def test_a_longer_sliding_window_needs_the_word_held_longer() -> None:
    """wake_word.sliding_window averages that many 10 ms probabilities: the bundled 5 hears "okay nabu", a window
    of 60 (0.6 s of sustained certainty) no longer does."""
    pcm, _, _ = wake_then_question(VOICES[0], None)
    short, long = (resolve(WakeWordConfig(sliding_window=n)) for n in (0, 60))
    assert (short.window, long.window) == (5, 60)
    assert len(detections(WakeWordDetector(short), pcm)) == 1
    assert detections(WakeWordDetector(long), pcm) == []


@pytest.mark.parametrize(("setting", "message"), [
    ("okay_nabo", "'okay_nabo' is not a bundled model (alexa, hey_jarvis, hey_mycroft, okay_nabu)"),
    ("{tmp}/absent.json", "wake_word.model: {tmp}/absent.json not found"),
    ("{tmp}/orphan.json", "the model's .tflite file {tmp}/orphan.tflite: No such file or directory"),
    ("{tmp}/broken.json", "{tmp}/broken.json is not a microWakeWord manifest"),
    ("{tmp}/text.json", "{tmp}/text.tflite is not a TensorFlow Lite model"),
    ("{tmp}/garbage.json", "{tmp}/garbage.tflite: TensorFlow Lite cannot read it"),
])
def test_a_model_that_cannot_be_used_is_named(tmp_path: Path, setting: str, message: str) -> None:
    for stem in ("orphan", "text", "garbage"):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"model": f"{stem}.tflite", "micro": {
            "probability_cutoff": 0.9, "sliding_window_size": 5}}))
    (tmp_path / "broken.json").write_text('{"model": "x.tflite"}')
    (tmp_path / "text.tflite").write_text("not a model at all")
    rng = np.random.default_rng(3)  # the identifier TensorFlow Lite looks for, then noise its verifier refuses
    (tmp_path / "garbage.tflite").write_bytes(b"\0\0\0\0TFL3" + rng.integers(0, 256, 4000, np.uint8).tobytes())
    with pytest.raises(WakeWordError) as caught:
        WakeWordDetector(resolve(WakeWordConfig(model=setting.format(tmp=tmp_path))))
    assert message.format(tmp=tmp_path) in str(caught.value)


# --- through the daemon ------------------------------------------------------------------------------------


def start(broker: Broker, wav: Path, *overrides: str) -> tuple[DaemonProcess, Client]:
    daemon = DaemonProcess(broker.port, testmodels.tiny_text(), "health.interval=1", "microphone.enabled=true",
                           f"microphone.source={wav}", "microphone.realtime=false", "listen.trigger=wake_word",
                           f"whisper.model={testmodels.tiny_whisper()}", "listen.follow_up=0", *overrides)
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    return daemon, client


def replayed(client: Client, base: str) -> dict[str, Any]:
    """The first health message after the microphone's replay ended and every utterance was handled."""
    def done(health: dict[str, Any]) -> bool:
        mic, speech = health["microphone"], health["speech_turns"]
        handled = speech["transcribed"] + speech["ignored"] + mic["wake"]["wake_only"]
        return mic["state"] == "ended" and mic["queued"] == 0 and handled >= mic["utterances"] and \
            not health["queues"]["model"] and health["stages"]["model"] == "ok"

    msg = client.wait_for(f"{base}/health", lambda m: done(payload_json(m)), timeout=120)[0]
    return dict(payload_json(msg))


def events(client: Client, base: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(payload_json, client.on(f"{base}/event")) if e["event_type"] == kind]


@pytest.mark.parametrize("snr_db", [None, 15.0])
def test_okay_nabu_then_the_question_in_one_breath_is_answered_once(broker: Broker, tmp_path: Path,
                                                                    snr_db: float | None) -> None:
    pcm, wake_end, phrase_end = wake_then_question(VOICES[0], snr_db)
    daemon, client = start(broker, write_wav(tmp_path / "wake.wav", pcm))
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=60)[0])
    answer = payload_json(client.wait_for(f"{daemon.base}/response",
                                          lambda m: payload_json(m)["id"] == transcript["id"])[0])
    health = replayed(client, daemon.base)
    (wake,) = events(client, daemon.base, "wake")
    assert wake["model"] == "okay_nabu" and wake["phrase"] == "Okay Nabu" and wake["probability"] > 0.85
    assert answer["source"] == "speech" and answer["transcript"] == transcript["text"]
    # only the question went to whisper: the utterance it heard is the phrase after the wake word (its times are
    # wall-clock, counted from the microphone's start: compare lengths)
    assert 0.5 < transcript["duration"] <= phrase_end - wake_end + 0.15
    assert health["microphone"]["wake"]["detections"] == 1 and health["microphone"]["wake"]["last"] is not None
    assert health["speech_turns"]["transcribed"] == 1 and health["speech_turns"]["ignored"] == 0
    assert len(client.on(f"{daemon.base}/transcript")) == 1 and len(client.on(f"{daemon.base}/response")) == 1
    daemon.stop()
    client.close()


def test_the_wake_word_starts_encoding_the_frame_the_question_carries(broker: Broker, tmp_path: Path) -> None:
    pcm, _, _ = wake_then_question(VOICES[1], None)
    video = write_video(tmp_path / "door.avi", 90, fps=15.0, frame=moving_square)
    daemon, client = start(broker, write_wav(tmp_path / "wake.wav", pcm), "microphone.realtime=true",
                           f"model.mmproj={testmodels.tiny_vision_projector()}", "camera.enabled=true",
                           f"camera.source={video}", "vision.attach=always", "vision.max_frame_age=30")
    transcript = payload_json(client.wait_for(f"{daemon.base}/transcript", timeout=60)[0])
    body = payload_json(client.wait_for(f"{daemon.base}/response",
                                        lambda m: payload_json(m)["id"] == transcript["id"])[0])
    assert body["tokens"]["image"] == 256 and body["encode_ms"] == 0  # encoded when the wake word was heard
    health = replayed(client, daemon.base)
    assert health["prepared"] == 1  # once: speech onset before the wake word prepared nothing (not listening)
    daemon.stop()
    client.close()


def test_chatter_without_the_wake_word_never_reaches_speech_to_text(broker: Broker, tmp_path: Path) -> None:
    pcm, sentences = chatter(600.0)
    daemon, client = start(broker, write_wav(tmp_path / "chatter.wav", pcm))
    health = replayed(client, daemon.base)
    assert health["microphone"]["utterances"] >= sentences * 0.9  # the VAD cut them ...
    assert health["speech_turns"]["ignored"] == health["microphone"]["utterances"]  # ... and none was transcribed
    assert health["speech_turns"]["transcribed"] == 0 and health["microphone"]["wake"]["detections"] == 0
    assert events(client, daemon.base, "wake") == [] and client.on(f"{daemon.base}/transcript") == []
    daemon.stop()
    client.close()


def test_a_bad_wake_word_model_stops_the_start_with_a_config_error(broker: Broker, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"model": "bad.tflite", "micro": {
        "probability_cutoff": 0.9, "sliding_window_size": 5}}))
    (tmp_path / "bad.tflite").write_bytes(b"\0\0\0\0TFL3" + bytes(range(256)) * 8)
    pcm, _, _ = wake_then_question(VOICES[0], None)
    daemon = DaemonProcess(broker.port, testmodels.tiny_text(), "microphone.enabled=true",
                           f"microphone.source={write_wav(tmp_path / 'w.wav', pcm)}", "listen.trigger=wake_word",
                           f"whisper.model={testmodels.tiny_whisper()}", f"wake_word.model={tmp_path / 'bad.json'}")
    daemon.start(None, wait_online=False)
    assert daemon.wait(60) == 78
    assert f"wake_word.model: {tmp_path / 'bad.tflite'}: TensorFlow Lite cannot read it" in daemon.log


def test_check_names_the_wake_word_model() -> None:
    out = run_agent("--set", "microphone.enabled=true", "--set", "listen.trigger=wake_word",
                                   "--set", f"whisper.model={testmodels.tiny_whisper()}",
                                   "--set", "wake_word.model=hey_jarvis", "check", timeout=120, cwd=ROOT)
    line = next(x for x in out.stdout.splitlines() if x.lstrip().startswith("wake word"))
    assert "'Hey Jarvis': microWakeWord" in line and "hey_jarvis.tflite (probability cutoff 0.97, window 5" in line
