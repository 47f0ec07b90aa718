"""The daemon with real media as its camera and microphone: one transcript per spoken sentence, motion events,
device states in health, and text asks still served when the microphone fails."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, write_video, write_wav
from tests.support.mqtt import Broker, Client, payload_json

SENTENCES = ["Turn on the kitchen lights.", "What is the weather tomorrow?", "Good night."]


def spoken_wav(path: Path) -> tuple[Path, int]:
    clips = [(0.5 + 3.0 * i, espeak(text)) for i, text in enumerate(SENTENCES)]
    pcm, truths = compose(clips, total_s=10.0, snr_db=30)
    return write_wav(path, pcm), len(truths)


def test_video_and_wav_sources_publish_one_transcript_per_sentence(broker: Broker, gemma270m: Path,
                                                                   tmp_path: Path) -> None:
    wav, sentences = spoken_wav(tmp_path / "speech.wav")
    video = write_video(tmp_path / "door.avi", 60, fps=15.0, frame=moving_square)
    daemon = DaemonProcess(broker.port, gemma270m, "camera.enabled=true", f"camera.source={video}",
                           "motion.enabled=true", "motion.cooldown=1", "microphone.enabled=true",
                           f"microphone.source={wav}", "microphone.realtime=false", "health.interval=1")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    transcripts = client.wait_for(f"{daemon.base}/transcript", count=sentences, timeout=60)
    bodies = [payload_json(m) for m in transcripts]
    assert all(b["duration"] > 0.3 and b["end"] > b["start"] for b in bodies)
    assert len({b["id"] for b in bodies}) == sentences
    client.wait_for(f"{daemon.base}/event", lambda m: payload_json(m)["event_type"] == "motion", timeout=30)
    health = payload_json(client.wait_for(
        f"{daemon.base}/health", lambda m: payload_json(m)["stages"].get("camera") == "ok"
        and payload_json(m)["camera"]["fps"] > 0  # frames are arriving (0 until two have)
        and payload_json(m)["microphone"]["utterances"] == sentences, timeout=30)[-1])
    assert health["microphone"]["source"].startswith("wav:")
    daemon.stop()
    assert len(client.on(f"{daemon.base}/transcript")) == sentences  # exactly one per sentence
    client.close()


def test_failing_microphone_is_reported_and_text_asks_still_work(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m, "microphone.enabled=true",
                           "microphone.source=no-such-microphone", "health.interval=1")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    health = client.wait_for(f"{daemon.base}/health",
                             lambda m: payload_json(m)["stages"].get("microphone") == "error", timeout=30)[-1]
    assert "no-such-microphone" in payload_json(health)["microphone"]["error"]
    client.publish(f"{daemon.base}/ask", {"id": "still-here", "text": "Hello?"})
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "still-here")
    daemon.stop()
    client.close()


def test_speech_without_speech_to_text_is_a_degraded_health(broker: Broker, gemma270m: Path, tmp_path: Path) -> None:
    """A microphone whose utterances nothing can understand (no projector audio, no whisper model): every
    utterance is dropped, so health says degraded and why, rather than ok."""
    wav, _ = spoken_wav(tmp_path / "speech.wav")
    daemon = DaemonProcess(broker.port, gemma270m, "microphone.enabled=true", f"microphone.source={wav}",
                           f"whisper.model={tmp_path / 'absent.bin'}", "health.interval=1")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    health = payload_json(client.wait_for(f"{daemon.base}/health")[-1])
    assert health["state"] == "degraded" and health["speech"].startswith("unavailable")
    assert any("every utterance is dropped" in p and "absent.bin" in p for p in health["problems"])
    daemon.stop()
    client.close()


def test_audio_a_stalled_daemon_could_not_take_is_counted_as_dropped(broker: Broker, gemma270m: Path,
                                                                     tmp_path: Path) -> None:
    """A live microphone does not wait: stop the daemon for 3 s (SIGSTOP, as a board under a heavy load or a
    swap storm would), and the 100 frames that came due meanwhile reach a 10-frame queue at once; what did not fit
    is dropped, never blocked on, and health's audio_dropped says how much."""
    pcm, _ = compose([], total_s=20.0)  # a quiet room
    wav = write_wav(tmp_path / "room.wav", pcm)
    daemon = DaemonProcess(broker.port, gemma270m, "microphone.enabled=true", f"microphone.source={wav}",
                           "microphone.realtime=true", "microphone.queue_frames=10", "health.interval=1")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["stages"].get("microphone") == "ok")
    assert payload_json(client.wait_for(f"{daemon.base}/health")[-1])["audio_dropped"] == 0
    daemon.signal(signal.SIGSTOP)
    time.sleep(3.0)  # the stall itself: the test's input, not a wait for an outcome
    daemon.signal(signal.SIGCONT)
    first = payload_json(client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["audio_dropped"] > 0,
                                         timeout=30)[-1])
    # the snapshot after it: the first one can be taken while the frames that came due are still being dropped
    health = payload_json(client.wait_for(f"{daemon.base}/health", lambda m: payload_json(m)["ts"] > first["ts"],
                                          timeout=30)[-1])
    assert 50 <= health["audio_dropped"] <= 100 and health["audio_dropped"] == health["microphone"]["overflows"]
    daemon.stop()
    assert "frame(s) dropped because the consumer fell behind" in daemon.log
    client.close()
