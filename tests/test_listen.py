"""Turn policy and wake phrases (pure logic, a fake clock), and the speech-to-text wrapper's failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import ListenConfig, WhisperConfig
from agent.turns.policy import Decision, TurnPolicy, split_wake_phrase
from agent.turns.speech import SpeechToText, SpeechToTextError, encoder_positions
from tests.support import models as testmodels

pytestmark = pytest.mark.fast

PHRASES = ["hey gemma", "ok gemma"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("heard", "rest"),
    [
        ("Hey Gemma, what's the time?", "what's the time?"),
        ("hey gemma what is at the door", "what is at the door"),
        ("Hey, Jemma! Turn on the lights.", "Turn on the lights."),
        ("OK Gemma.", ""),
        ("okay gemma, lights off", "lights off"),
        ("Hey gem ma open the garage", "open the garage"),
        ("What's the weather today?", None),
        ("Hello there, how are you?", None),
        ("", None),
    ],
)
def test_wake_phrase_matching_is_tolerant(heard: str, rest: str | None) -> None:
    assert split_wake_phrase(heard, PHRASES) == rest


def policy(trigger: str, clock: Clock, follow_up: float = 8.0) -> TurnPolicy:
    cfg = ListenConfig(trigger=trigger, wake_phrases=PHRASES, window=10.0, follow_up=follow_up)  # type: ignore[arg-type]
    return TurnPolicy(cfg, clock=clock)


def test_always_takes_everything() -> None:
    decision = policy("always", Clock()).decide("what time is it")
    assert decision.accept and decision.question == "what time is it"


def test_wake_phrase_mode() -> None:
    clock = Clock()
    p = policy("wake_phrase", clock)
    assert p.decide("what time is it").reason == "no_wake_phrase"
    taken = p.decide("Hey Gemma, what time is it?")
    assert taken.accept and taken.question == "what time is it?"
    # a phrase alone opens a listening window for the next utterance
    alone = p.decide("Hey Gemma.")
    assert not alone.accept and alone.reason == "phrase_only"
    clock.now += 5
    assert p.decide("is the door locked").accept
    clock.now += 11
    assert not p.decide("is the door locked").accept


def test_follow_up_window_after_an_answer() -> None:
    clock = Clock()
    p = policy("wake_phrase", clock)
    p.answered()
    clock.now += 7.9
    follow = p.decide("and tomorrow?")
    assert follow.accept and follow.reason == "follow_up"
    clock.now += 0.2
    assert p.decide("and tomorrow?").reason == "no_wake_phrase"


def test_mqtt_and_motion_windows() -> None:
    clock = Clock()
    for trigger in ("mqtt", "motion"):
        p = policy(trigger, clock)
        assert p.decide("hello").reason == "not_listening"
        p.open_window(why=trigger)
        taken = p.decide("hello")
        assert taken.accept and taken.reason == trigger
        clock.now += 10.1
        assert not p.decide("hello").accept


def test_native_audio_without_transcript() -> None:
    clock = Clock()
    assert policy("always", clock).decide(None).accept
    p = policy("mqtt", clock)
    assert not p.decide(None).accept
    p.open_window(5, "mqtt")
    assert p.decide(None).accept


def test_follow_up_zero_means_off() -> None:
    clock = Clock()
    p = policy("wake_phrase", clock, follow_up=0.0)
    p.answered()
    assert not p.window_open()


def test_speech_to_text_refuses_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(SpeechToTextError, match="whisper model not found"):
        SpeechToText(WhisperConfig(model=str(tmp_path / "ggml-base.en.bin")), 1)


def test_speech_to_text_refuses_a_file_that_is_not_whisper(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"\x00" * 4096)
    with pytest.raises(SpeechToTextError, match=r"not a whisper\.cpp ggml model"):
        SpeechToText(WhisperConfig(model=str(bogus)), 1)


def test_whisper_settings_reach_whisper_cpp_and_change_what_it_hears() -> None:
    """whisper.language, whisper.max_tokens and whisper.temperature_fallback are whisper.cpp's own parameters: each
    is set on the model and changes the transcript of the same audio (random weights: the words are nonsense, the
    effect of each setting is not)."""
    tone = (np.sin(np.arange(32000) / 5.0) * 6000).astype(np.int16)

    def hear(**settings: object) -> tuple[str, dict[str, object]]:
        stt = SpeechToText(WhisperConfig(model=str(testmodels.tiny_whisper()), **settings), 1)  # type: ignore[arg-type]
        return stt.transcribe(tone), stt.model.get_params()

    default, params = hear()
    assert default and default == hear()[0]  # deterministic: the comparisons below mean something
    assert (params["language"], params["max_tokens"], params["n_threads"]) == ("en", 0, 1)
    assert params["temperature_inc"] == pytest.approx(0.2)
    german, params = hear(language="de")
    assert params["language"] == "de" and german != default
    capped, params = hear(max_tokens=1)
    assert params["max_tokens"] == 1 and len(capped) < len(default)
    greedy, params = hear(temperature_fallback=False)
    assert params["temperature_inc"] == 0.0 and greedy != default
    assert params["audio_ctx"] == 500  # the 2 s tone, encoded over the default 10 s window
    full, params = hear(window=30.0)
    assert params["audio_ctx"] == 0 and full != default  # whisper's own 30 s: what it hears changes with the window
    fitted, params = hear(window=1.0)
    assert params["audio_ctx"] == 200 and fitted not in (default, full)  # the tone + 2 s


def test_the_encoder_window_is_the_utterance_plus_two_seconds_at_least_whisper_window() -> None:
    """whisper.window is a floor: a longer utterance widens the window (never cut off), 30 s is whisper's own."""
    assert encoder_positions(2.0, 10.0) == 500
    assert encoder_positions(2.0, 1.0) == 200
    assert encoder_positions(12.5, 10.0) == 725
    assert encoder_positions(2.0, 30.0) == encoder_positions(28.0, 1.0) == encoder_positions(40.0, 10.0) == 0
    assert encoder_positions(27.9, 1.0) == 1495


def test_a_held_turn_passes_on_in_order_when_confirmed_and_nothing_when_dropped() -> None:
    """HeldSink: the engine's thread keeps writing while the speech worker confirms; what went out is every
    call, in the order made."""
    import threading

    from agent.contract.codes import AgentError, ErrorCode
    from agent.turns.speech import HeldSink
    from agent.turns.types import Request

    class Record:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def on_delta(self, _r: Request, delta: str, index: int) -> None:
            self.calls.append(("delta", index))

        def on_result(self, _r: Request, result: object) -> None:
            self.calls.append(("result", None))

        def on_error(self, _r: Request, error: AgentError) -> None:
            self.calls.append(("error", error.code))

        def accepted(self, _r: Request) -> None:
            self.calls.append(("accepted", None))

    out = Record()
    held, request = HeldSink(out, out), Request(text="q")  # type: ignore[arg-type]  # a recorder, not an Output
    def write() -> None:
        for i in range(2000):
            held.on_delta(request, "x", i)

    writer = threading.Thread(target=write)
    writer.start()
    held.confirm(request)
    writer.join()
    assert out.calls[0] == ("accepted", None)
    assert [c[1] for c in out.calls[1:]] == list(range(2000))  # every delta, in order, across the switch
    dropped_out = Record()
    dropped = HeldSink(dropped_out, dropped_out)  # type: ignore[arg-type]
    other = Request(text="q2")
    dropped.on_delta(other, "x", 0)
    dropped.drop(other)
    dropped.on_error(other, AgentError(ErrorCode.MODEL_ERROR, "late"))
    assert dropped_out.calls == [] and other.cancel.is_set()


def test_windows_at_their_edges_and_what_each_decision_says() -> None:
    clock = Clock()
    p = policy("wake_word", clock)
    assert not p.expects_turn() and p.decide("hello") == Decision(False, "hello", "not_listening")
    p.open_window(why="wake_word")  # listen.window: 10 s
    assert p.expects_turn() and p.decide(" Hey Gemma, and now? ") == Decision(True, "and now?", "wake_word")
    assert p.decide(None) == Decision(True, "", "wake_word")
    p.open_window(2.0, "mqtt")  # a shorter window leaves the longer one (and its reason) alone
    clock.now += 9.99
    assert p.decide("still?").reason == "wake_word"
    clock.now += 0.01  # exactly at the end: closed
    assert not p.window_open() and not p.expects_turn()
    always = policy("always", clock)
    assert always.expects_turn() and always.decide(None) == Decision(True, "", "always")


def test_a_guess_on_a_phrase_alone_opens_nothing_the_real_decision_does() -> None:
    clock = Clock()
    p = policy("wake_phrase", clock, follow_up=0.0)
    assert p.decide("Hey Gemma", peek=True) == Decision(False, "", "phrase_only")
    assert not p.window_open()
    assert p.decide("Hey Gemma") == Decision(False, "", "phrase_only")
    assert p.window_open() and p.decide("lights on") == Decision(True, "lights on", "wake_phrase")
    p.answered()  # follow_up 0: no follow-up window, and the phrase's window is not cut short
    clock.now += 9.0
    assert p.decide("and off").reason == "wake_phrase"


@pytest.mark.parametrize(("heard", "rest"), [
    ("hey gemma hey gemma", "hey gemma"),  # only the first phrase is the wake phrase
    ("ok, gemma: timer", "timer"),
    ("hey", None),  # one word of two is not enough
    ("hey gem ma what", "what"),
])
def test_wake_phrase_edges(heard: str, rest: str | None) -> None:
    assert split_wake_phrase(heard, PHRASES) == rest
