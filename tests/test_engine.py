"""The engine on the real Gemma 3 270M: streaming, determinism, prefix reuse, stop conditions, the queue."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from agent.config import ModelConfig
from agent.contract.codes import AgentError
from agent.llm import llama_shim
from agent.llm.engine import Engine
from agent.llm.local import LocalModel
from agent.turns.conversation import Conversation
from agent.turns.types import Media, Request, Result, Turn
from tests.support import models as testmodels

SYSTEM = "You are a helpful assistant. " * 12


@pytest.fixture(scope="module")
def model(gemma270m: Path) -> Iterator[LocalModel]:
    m = LocalModel(ModelConfig(path=str(gemma270m), temperature=0.0, max_tokens=24, n_ctx=1024, system_prompt=SYSTEM))
    yield m
    m.close()


def configure(model: LocalModel, **changes: object) -> None:
    model.cfg = dataclasses.replace(model.cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def reset_config(model: LocalModel) -> Iterator[None]:
    saved = model.cfg
    yield
    model.cfg = saved


def test_stream_concatenates_to_the_final_text(model: LocalModel) -> None:
    deltas: list[tuple[str, int]] = []
    result = model.generate(Request(text="The capital of France is"), on_delta=lambda d, i: deltas.append((d, i)))
    assert result.text and result.completion_tokens > 0
    assert "".join(d for d, _ in deltas) == result.text
    assert [i for _, i in deltas] == list(range(len(deltas)))


def test_greedy_decoding_is_deterministic(model: LocalModel) -> None:
    first = model.generate(Request(text="Count from one to five."))
    model.generate(Request(text="Something else entirely, to disturb the cache."))
    second = model.generate(Request(text="Count from one to five."))
    assert first.text == second.text and first.text


def test_system_prompt_prefix_is_reused(model: LocalModel) -> None:
    model.generate(Request(text="First question?"))
    result = model.generate(Request(text="A second, different question?"))
    system_tokens = len(model.tokenize(f"<bos><start_of_turn>user\n{SYSTEM}\n\n"))
    assert result.cached_tokens >= system_tokens - 8 > 50
    assert result.prompt_tokens - result.cached_tokens < 30


def test_the_prompt_up_to_the_question_is_evaluated_ahead(model: LocalModel) -> None:
    """What the engine does at start (the system prompt) and at speech onset (the conversation so far): the turn
    then evaluates only its question; a turn not prepared evaluates what came between as well."""
    system = "You answer questions about the house in one short sentence."  # not in the KV cache yet

    def rest(question: str) -> int:  # + the prompt's last token ahead of the question, left to the turn
        return len(model.tokenize(f" {question}\nA:")) + 1

    model.prepare(Request("", system=system), [Turn("user", "")])
    first = model.generate(Request("Is the gate open?", system=system))
    assert first.cached_tokens > 40 and first.prompt_tokens - first.cached_tokens <= rest("Is the gate open?")
    turns = [Turn("user", "Is the gate open?"), Turn("model", first.text)]
    model.prepare(Request("", system=system), [*turns, Turn("user", "")])
    second = model.generate(Request("And the door?", system=system), [*turns, Turn("user", "And the door?")])
    assert second.prompt_tokens - second.cached_tokens <= rest("And the door?")
    turns += [Turn("user", "And the door?"), Turn("model", second.text)]
    third = model.generate(Request("And the car?", system=system), [*turns, Turn("user", "And the car?")])
    assert third.prompt_tokens - third.cached_tokens > rest("And the car?")


def test_max_tokens_stops_the_turn(model: LocalModel) -> None:
    result = model.generate(Request(text="Tell me a long story about a dragon.", max_tokens=5))
    assert result.stop == "max_tokens" and result.completion_tokens == 5


def test_cancel_before_start_aborts_during_the_prompt(model: LocalModel) -> None:
    cancel = threading.Event()
    cancel.set()
    result = model.generate(Request(text="Anything at all " * 40), cancel=cancel)
    assert result.stop == "cancelled" and result.completion_tokens == 0 and result.text == ""
    # the model state stays usable and exact after an aborted prompt
    again = model.generate(Request(text="Count from one to five."))
    assert again.text == model.generate(Request(text="Count from one to five.")).text


def test_cancel_mid_generation(model: LocalModel) -> None:
    cancel = threading.Event()

    def on_delta(_d: str, index: int) -> None:
        if index == 2:
            cancel.set()

    result = model.generate(Request(text="Write a poem about rain.", max_tokens=200), on_delta=on_delta, cancel=cancel)
    assert result.stop == "cancelled" and 3 <= result.completion_tokens < 10


def test_deadline_stops_the_turn(model: LocalModel) -> None:
    configure(model, deadline=1.0, max_tokens=900)
    result = model.generate(Request(text="Write a very long essay about the history of bread."))
    assert result.stop in ("deadline", "end")
    if result.stop == "deadline":
        assert result.latency_ms >= 1000


def test_prompt_longer_than_the_context_is_refused(model: LocalModel) -> None:
    with pytest.raises(AgentError) as err:
        model.generate(Request(text="word " * 2000))
    assert err.value.code == "prompt_too_long"


class Collect:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.errors: list[tuple[str, str]] = []
        self.done = threading.Semaphore(0)

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        pass

    def on_result(self, request: Request, result: Result) -> None:
        self.results.append(result)
        self.done.release()

    def on_error(self, request: Request, error: AgentError) -> None:
        self.errors.append((request.id, error.code))
        self.done.release()


def test_full_queue_refuses_at_once_and_nothing_is_dropped(model: LocalModel) -> None:
    engine = Engine(model, queue_size=2)
    sink = Collect()
    engine.submit(Request(text="one", id="1"), sink)
    engine.submit(Request(text="two", id="2"), sink)
    with pytest.raises(AgentError) as err:
        engine.submit(Request(text="three", id="3"), sink)
    assert err.value.code == "queue_full"
    engine.start()
    for _ in range(2):
        assert sink.done.acquire(timeout=60)
    assert sorted(r.id for r in sink.results) == ["1", "2"]
    assert engine.stop()


def test_stop_fails_queued_requests_with_an_error(model: LocalModel) -> None:
    engine = Engine(model, queue_size=3)
    sink = Collect()
    for n in range(3):
        engine.submit(Request(text="hello", id=str(n)), sink)
    assert engine.stop()
    assert sorted(sink.errors) == [("0", "shutting_down"), ("1", "shutting_down"), ("2", "shutting_down")]
    with pytest.raises(AgentError, match="stopping"):
        engine.submit(Request(text="late"), sink)


def ask_engine(engine: Engine, text: str) -> Result:
    sink = Collect()
    engine.submit(Request(text=text), sink)
    assert sink.done.acquire(timeout=120)
    assert not sink.errors, sink.errors
    return sink.results[0]


def test_conversation_history_reaches_the_model_and_reset_clears_it(model: LocalModel) -> None:
    configure(model, max_tokens=30, system_prompt="You are a helpful assistant. Answer briefly and plainly.")
    engine = Engine(model, queue_size=2, conversation=Conversation(max_exchanges=6, idle_reset=300))
    engine.start()
    try:
        ask_engine(engine, "My name is Alice and my cat is called Pickles.")
        assert "Alice" in ask_engine(engine, "What is my name?").text  # the real 270M reads the earlier turn
        assert engine.conversation is not None and len(engine.conversation) == 2
        engine.conversation.reset()
        assert "Alice" not in ask_engine(engine, "What is my name?").text
    finally:
        engine.stop()


def test_history_is_trimmed_to_fit_the_context(gemma270m: Path) -> None:
    small = LocalModel(ModelConfig(path=str(gemma270m), temperature=0.0, max_tokens=48, n_ctx=512, n_batch=256,
                              n_ubatch=256))
    conversation = Conversation(max_exchanges=50, idle_reset=300)
    engine = Engine(small, queue_size=2, conversation=conversation)
    engine.start()
    try:
        lengths = []
        for n in range(8):
            result = ask_engine(engine, f"Question number {n}: " + "tell me about the weather and the sea. " * 4)
            assert result.prompt_tokens + 48 <= 512
            lengths.append(len(conversation))
        assert max(lengths) < 8 and lengths[-1] >= 1  # oldest exchanges dropped, recent ones kept
    finally:
        engine.stop()
        small.close()


def test_the_model_runs_on_model_n_threads() -> None:
    """model.n_threads reaches llama.cpp's context, for decoding and for prompt batches alike."""
    one = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), n_threads=1, n_ctx=512))
    try:
        ctx = llama_shim.context_handle(one.llm)
        assert (one.threads, llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (1, 1, 1)
    finally:
        one.close()


def test_conversation_forgets_after_idle_reset() -> None:
    now = [0.0]
    conversation = Conversation(max_exchanges=3, idle_reset=60, clock=lambda: now[0])
    for n in range(5):
        conversation.record(f"q{n}", f"a{n}")
    assert [t.text for t in conversation.history()] == ["q2", "a2", "q3", "a3", "q4", "a4"]
    now[0] += 61
    assert conversation.history() == []


def test_the_picture_talked_about_stays_with_the_exchange_that_showed_it() -> None:
    conversation = Conversation(max_exchanges=4, idle_reset=60)
    door, yard = np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    conversation.record("what is at the door?", "a parcel", [Media("image", door)])
    conversation.record("is it big?", "no", [Media("image", door.copy())])  # the unchanged view, shown again
    assert [len(t.media) for t in conversation.history()] == [1, 0, 0, 0]  # the prompt (and KV) stay as they were
    conversation.record("and the yard?", "empty", [Media("image", yard)])  # a new picture replaces it
    assert [len(t.media) for t in conversation.history()] == [0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}], ids=["top_k", "top_p", "min_p"])
def test_a_sampler_narrowed_to_one_token_is_greedy(model: LocalModel, narrowing: dict[str, float]) -> None:
    prompt = Request(text="Write a line about the sea.")
    greedy = model.generate(prompt).text
    configure(model, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    free = {model.generate(prompt).text for _ in range(3)}
    assert free != {greedy}  # hot sampling wanders off the greedy line ...
    configure(model, **narrowing)
    assert model.generate(prompt).text == greedy  # ... unless the setting leaves it one token to pick


def test_repeat_penalty_changes_a_repetitive_answer(model: LocalModel) -> None:
    prompt = Request(text="Say the word yes ten times: yes yes yes")
    plain = model.generate(prompt).text
    configure(model, repeat_penalty=1.5)
    assert model.generate(prompt).text != plain
