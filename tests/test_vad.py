"""The VAD segmenter on real speech: espeak-ng sentences placed at known offsets, in silence and in white noise.

Truth is each clip's own non-silent extent (media.speech_extent); boundaries must be within 150 ms of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from agent.config import VadConfig
from agent.perception.vad import RATE, Segmenter, Utterance
from tests.support.media import Truth, active_rms, compose, espeak, frames_of, noise_burst, speech_extent

TOLERANCE = 0.150
SENTENCES = ["Turn on the kitchen lights please.", "What is the weather like tomorrow morning?",
             "Remind me to call my sister at six."]
MONOLOGUE = [
    "Once upon a time there was a little robot who lived in a kitchen",
    "every morning it made coffee for the family and listened to the radio",
    "it liked the news and the weather and sometimes a song about the sea",
    "one day the radio stopped and the robot did not know what to do",
    "so it started to sing on its own, quietly at first and then louder",
    "the family woke up and laughed and asked the robot to sing again",
    "and from then on the kitchen was never quiet in the morning",
]


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [espeak(s) for s in SENTENCES]


def segment(pcm: np.ndarray, **overrides: Any) -> tuple[list[Utterance], Segmenter]:
    seg = Segmenter(dataclasses.replace(VadConfig(), **overrides))
    out: list[Utterance] = []
    for frame in frames_of(pcm, seg.frame_len):
        out += seg.push(frame)
    return out + seg.flush(), seg


def assert_matches(found: list[Utterance], truths: list[Truth]) -> None:
    got = [(round(u.start_ts, 3), round(u.end_ts, 3)) for u in found]
    assert len(found) == len(truths), f"found {got}, expected {truths}"
    for u, t in zip(found, truths, strict=True):
        assert abs(u.start_ts - t.start) <= TOLERANCE, f"start {u.start_ts:.3f} vs truth {t.start:.3f} ({got})"
        assert abs(u.end_ts - t.end) <= TOLERANCE, f"end {u.end_ts:.3f} vs truth {t.end:.3f} ({got})"


def assert_pcm_is_the_stream(u: Utterance, stream: np.ndarray) -> None:
    first = round(u.pcm_ts * RATE)
    assert np.array_equal(u.pcm, stream[first:first + len(u.pcm)])


@pytest.mark.parametrize("snr_db", [None, 20.0], ids=["silence", "noise-20dB"])
def test_three_sentences_found_at_their_true_boundaries(clips: list[np.ndarray], snr_db: float | None) -> None:
    stream, truths = compose([(1.0, clips[0]), (5.0, clips[1]), (10.0, clips[2])], 14.0, snr_db=snr_db)
    found, _ = segment(stream)
    assert_matches(found, truths)
    for u in found:
        assert u.pcm.dtype == np.int16 and not u.cut
        # pre-roll: the 300 ms before onset are kept, so the first syllable is whole
        assert u.pcm_ts == pytest.approx(u.start_ts - 0.3, abs=1e-6)
        assert u.pcm_ts + len(u.pcm) / RATE >= u.end_ts
        assert_pcm_is_the_stream(u, stream)


@pytest.mark.parametrize("frame_ms", [10, 20])
def test_other_frame_lengths(clips: list[np.ndarray], frame_ms: int) -> None:
    stream, truths = compose([(0.5, clips[1]), (4.5, clips[2])], 8.0)
    found, seg = segment(stream, frame_ms=frame_ms)
    assert seg.frame_len == RATE * frame_ms // 1000
    assert_matches(found, truths)


def two_sentences_400ms_apart() -> tuple[np.ndarray, list[Truth]]:
    a, b = espeak("What is the weather like tomorrow morning"), espeak("The quick brown fox jumps over the lazy dog")
    gap_at = 1.0 + speech_extent(a)[1] + 0.4 - speech_extent(b)[0]
    stream, truths = compose([(1.0, a), (gap_at, b)], 8.0)
    assert truths[1].start - truths[0].end == pytest.approx(0.4, abs=1e-3)
    return stream, truths


def test_pause_shorter_than_the_hangover_merges_two_sentences() -> None:
    stream, truths = two_sentences_400ms_apart()
    found, _ = segment(stream)  # default hangover 700 ms > 400 ms pause
    assert_matches(found, [Truth(truths[0].start, truths[1].end)])


def test_pause_longer_than_the_hangover_splits_them() -> None:
    stream, truths = two_sentences_400ms_apart()
    # webrtcvad itself calls ~100 ms after speech voiced, so a 400 ms pause leaves ~300 ms of unvoiced frames
    found, _ = segment(stream, hangover_ms=200)
    assert_matches(found, truths)


def test_cough_length_burst_is_dropped(clips: list[np.ndarray]) -> None:
    burst = noise_burst(0.12, rms=active_rms(clips[0]))
    stream, truths = compose([(1.0, burst), (3.0, clips[0])], 6.0)
    found, seg = segment(stream)
    assert seg.dropped == 1  # the burst was voiced enough to open an utterance, and was dropped
    assert_matches(found, truths[1:])


def test_lone_clicks_do_not_open_an_utterance() -> None:
    click = noise_burst(0.01, rms=8000.0)
    stream, _ = compose([(t, click) for t in (0.5, 1.3, 2.1, 2.9)], 4.0)
    found, seg = segment(stream)
    assert found == [] and seg.dropped == 0


def test_monologue_longer_than_the_maximum_is_cut_into_two() -> None:
    parts, t = [], 0.5
    for text in MONOLOGUE:  # sentences 200 ms apart: one stretch of speech of ~27 s
        clip = espeak(text)
        a, b = speech_extent(clip)
        parts.append((t - a, clip))
        t += b - a + 0.2
    stream, truths = compose(parts, t + 1.5)
    found, _ = segment(stream)
    assert len(found) == 2
    first, second = found
    assert first.cut and not second.cut
    assert len(first.pcm) == 15.0 * RATE  # exactly max_utterance_s, pre-roll included
    assert abs(first.start_ts - truths[0].start) <= TOLERANCE
    assert abs(second.end_ts - truths[-1].end) <= TOLERANCE
    # the continuation starts where the cut was: contiguous audio, nothing lost or repeated
    assert second.start_ts == pytest.approx(first.end_ts)
    assert second.pcm_ts == pytest.approx(first.pcm_ts + 15.0)
    assert_pcm_is_the_stream(first, stream)
    assert_pcm_is_the_stream(second, stream)


def test_timestamps_follow_the_frames_clock(clips: list[np.ndarray]) -> None:
    stream, truths = compose([(1.0, clips[0])], 4.0)
    seg = Segmenter(VadConfig())
    found: list[Utterance] = []
    for i, frame in enumerate(frames_of(stream, seg.frame_len)):
        found += seg.push(frame, ts=100.0 + i * 0.03)  # a stream that started at t=100 s
    found += seg.flush()
    assert_matches([dataclasses.replace(u, start_ts=u.start_ts - 100, end_ts=u.end_ts - 100) for u in found],
                   truths)


def test_speech_running_into_the_end_of_the_stream_is_flushed(clips: list[np.ndarray]) -> None:
    stream, truths = compose([(0.5, clips[0])], 4.0)
    stream = stream[:round((truths[0].start + 1.0) * RATE)]  # the stream stops mid-sentence
    seg = Segmenter(VadConfig())
    for frame in frames_of(stream, seg.frame_len):
        assert seg.push(frame) == []
    assert seg.in_speech
    (u,) = seg.flush()
    assert abs(u.start_ts - truths[0].start) <= TOLERANCE
    assert u.end_ts == pytest.approx(len(stream) / RATE, abs=0.06)
    assert not seg.in_speech and seg.flush() == []


def test_wrong_frames_are_refused_with_the_expected_size() -> None:
    seg = Segmenter(VadConfig())
    with pytest.raises(ValueError, match="480 int16 samples"):
        seg.push(np.zeros(320, np.int16))
    with pytest.raises(ValueError, match="480 int16 samples"):
        seg.push(np.zeros(480, np.float32))
    with pytest.raises(ValueError, match="frame_ms"):
        Segmenter(dataclasses.replace(VadConfig(), frame_ms=25))  # type: ignore[arg-type]


def test_aggressiveness_decides_how_much_noise_counts_as_speech() -> None:
    noise = noise_burst(4.0, rms=600.0, seed=7)
    voiced = {level: segment(noise, aggressiveness=level)[1].voiced for level in (0, 3)}
    assert voiced[0] > voiced[3]


def test_min_speech_ms_drops_what_is_shorter(clips: list[np.ndarray]) -> None:
    stream, truths = compose([(1.0, clips[0])], 5.0)
    length_ms = (truths[0].end - truths[0].start) * 1000
    kept, _ = segment(stream, min_speech_ms=int(length_ms / 2))
    dropped, seg = segment(stream, min_speech_ms=int(length_ms * 2))
    assert len(kept) == 1 and dropped == [] and seg.dropped == 1


@pytest.mark.parametrize("pre_roll_ms", [0, 600])
def test_pre_roll_ms_of_audio_precede_the_speech(clips: list[np.ndarray], pre_roll_ms: int) -> None:
    stream, _ = compose([(2.0, clips[0])], 6.0)
    (u,), _ = segment(stream, pre_roll_ms=pre_roll_ms)
    assert u.start_ts - u.pcm_ts == pytest.approx(pre_roll_ms / 1000, abs=0.03)
    assert_pcm_is_the_stream(u, stream)


def test_max_utterance_s_cuts_long_speech(clips: list[np.ndarray]) -> None:
    stream, _ = compose([(0.5, clips[1]), (0.5 + len(clips[1]) / RATE, clips[2])], 8.0)
    found, _ = segment(stream, max_utterance_s=2.0)
    assert len(found) >= 2 and found[0].cut
    assert all(len(u.pcm) <= 2.0 * RATE for u in found)


def test_early_end_ms_announces_the_pause_before_the_hangover_ends() -> None:
    stream, _ = two_sentences_400ms_apart()
    pauses: list[Utterance] = []
    seg = Segmenter(dataclasses.replace(VadConfig(), early_end_ms=150), on_pause=pauses.append)
    found = [u for f in frames_of(stream, seg.frame_len) for u in seg.push(f)] + seg.flush()
    assert len(found) == 1 and seg.pauses >= 2 and seg.resumes >= 1  # one guess voided, the last one right
    assert (pauses[-1].start_ts, pauses[-1].end_ts) == (found[0].start_ts, found[0].end_ts)
    off = Segmenter(dataclasses.replace(VadConfig(), early_end_ms=0), on_pause=pauses.append)
    for f in frames_of(stream, off.frame_len):
        off.push(f)
    assert off.pauses == 0
