"""The router's decisions, in this process: what each MQTT command, motion event and speech turn becomes, and
every refusal with its code, id and source. The model's queue is a recording one (the router only needs its
`submit` / `prepare` protocol; the engine behind it is tested in test_engine and through the daemon)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.config import load
from agent.contract.codes import AgentError, ErrorCode, EventType, Source, StopReason
from agent.perception.motion import MotionEvent
from agent.perception.stage import Perception
from agent.turns.conversation import Conversation
from agent.turns.policy import TurnPolicy
from agent.turns.router import Router
from agent.turns.types import MediaSupport, Request, Result, Sink
from devices.camera import Frame
from tests.support.media import moving_square, still, write_video

pytestmark = pytest.mark.fast


class Output:
    """A recording Output: what the agent would publish."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.refusals: list[tuple[str | None, str, str]] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.results: list[str] = []
        self.snapshots: list[bytes] = []
        self.details: dict[str | None, str] = {}
        self.deltas: list[tuple[str, str, int]] = []

    def accepted(self, request: Request) -> None:
        self.journal.append(request.id)

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.deltas.append((request.id, delta, index))

    def on_result(self, request: Request, result: Result) -> None:
        self.results.append(request.id)

    def on_error(self, request: Request, error: AgentError) -> None:
        self.refused(request.id, request.source, error)

    def refused(self, request_id: str | None, source: str, error: AgentError) -> None:
        self.refusals.append((request_id, str(source), str(error.code)))
        self.details[request_id] = error.detail

    def event(self, kind: EventType, data: dict[str, object]) -> None:
        self.events.append((str(kind), data))

    def transcript(self, transcript: Any) -> None: ...

    def snapshot(self, jpeg: bytes) -> None:
        self.snapshots.append(jpeg)


class Queue:
    """A recording TurnQueue; `full` makes it refuse as the engine's full queue does."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Request, Sink]] = []
        self.prepared: list[Request] = []
        self.full = False

    def submit(self, request: Request, sink: Sink) -> None:
        if self.full:
            raise AgentError(ErrorCode.QUEUE_FULL, "the queue is full")
        self.submitted.append((request, sink))

    def prepare(self, request: Request) -> None:
        self.prepared.append(request)


def router(*overrides: str) -> tuple[Router, Queue, Output, Conversation, TurnPolicy]:
    cfg = load(None, list(overrides), environ={})
    queue, output = Queue(), Output()
    conversation = Conversation(cfg.conversation.max_exchanges, cfg.conversation.idle_reset)
    policy = TurnPolicy(cfg.listen)
    return (Router(cfg, queue, conversation, output, Perception(cfg), policy, MediaSupport()), queue, output,
            conversation, policy)


def test_an_ask_is_queued_with_its_id_and_journalled() -> None:
    r, queue, output, _, _ = router()
    r.on_command("ask", b'{"id": "a1", "text": "Hi?", "image": "none"}')
    r.on_command("ask", b"Plain text?")
    (first, _), (second, _) = queue.submitted
    assert (first.id, first.text, first.source, first.media, first.system) == ("a1", "Hi?", Source.ASK, [], None)
    assert second.text == "Plain text?" and second.id and second.id != "a1"
    assert output.journal == ["a1", second.id] and output.refusals == []


def test_refusals_carry_the_code_the_id_and_the_source() -> None:
    r, queue, output, _, _ = router("limits.asks_per_minute=0")
    r.on_command("ask", b'{"id": "s", "text": "Hi", "system": "Be rude."}')
    r.on_command("ask", b'{"id": "img", "text": "Hi", "image": "latest"}')
    r.on_command("ask", b'{"id": "bad", "text": 5}')
    r.on_command("describe", b'{"id": "d"}')
    r.on_command("listen", b"")
    r.on_command("listen", b"nonsense")
    queue.full = True
    r.on_command("ask", b'{"id": "late", "text": "Hi"}')
    assert output.refusals == [("s", "ask", "forbidden_field"), ("img", "ask", "no_camera"),
                               ("bad", "ask", "invalid_field"), ("d", "describe", "no_camera"),
                               (None, "listen", "no_microphone"), (None, "listen", "invalid_field"),
                               ("late", "ask", "queue_full")]
    assert output.journal == ["late"]  # journalled before the queue refused: the refusal settles it
    assert output.details["s"] == ("field 'system' is refused: replacing the system prompt over MQTT needs "
                                   "mqtt.allow_remote_system_prompt")
    assert output.details["img"] == "no camera is configured (camera.enabled is false)"
    assert output.details["late"] == "the queue is full"
    assert output.details[None] == 'a listen payload is empty, a number of seconds, or {"seconds": N}'


def test_a_remote_system_prompt_is_taken_only_when_allowed() -> None:
    r, queue, _, _, _ = router("mqtt.allow_remote_system_prompt=true")
    r.on_command("ask", b'{"id": "s", "text": "Hi", "system": "Answer in French."}')
    assert queue.submitted[0][0].system == "Answer in French."


def test_rate_limits_count_asks_and_describes_per_sender() -> None:
    r, queue, output, _, _ = router("limits.asks_per_minute=3", "limits.sender_asks_per_minute=2")
    for n in range(3):
        r.on_command("ask", f'{{"id": "k{n}", "text": "Hi", "sender": "kitchen"}}'.encode())
    r.on_command("describe", b'{"id": "h0", "sender": "hall"}')  # global budget: 2 used + this one
    r.on_command("ask", b'{"id": "h1", "text": "Hi", "sender": "hall"}')  # global budget spent
    assert [i for i, _, code in output.refusals if code == "rate_limited"] == ["k2", "h1"]
    assert ("h0", "describe", "no_camera") in output.refusals  # admitted, then found no camera
    assert [q.id for q, _ in queue.submitted] == ["k0", "k1"] and r.stats()["rate_limited"] == 2


def test_without_a_microphone_listen_is_refused_by_name() -> None:
    r, _, output, _, policy = router("listen.trigger=mqtt")
    r.on_command("listen", b"")
    assert output.refusals == [(None, "listen", "no_microphone")] and not policy.window_open()
    assert output.details[None] == "there is no microphone to listen with (microphone.enabled is false)"


def test_listen_opens_the_window_and_reset_forgets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="agent.turns.router")
    r, _, output, conversation, policy = router("microphone.enabled=true", "listen.trigger=mqtt", "listen.window=25")
    assert not policy.window_open()
    r.on_command("listen", b'{"seconds": 30}')
    assert policy.window_open() and output.events[-1] == ("listening", {"reason": "mqtt", "seconds": 30.0})
    r.on_command("listen", b"")
    assert output.events[-1] == ("listening", {"reason": "mqtt", "seconds": 25.0})  # listen.window
    conversation.record("What is it?", "A cat.", [])
    r.on_command("reset", b"")
    assert conversation.history() == [] and output.events[-1] == ("reset", {})
    assert [r.getMessage() for r in caplog.records] == ["listening for 30s (listen command)",
                                                        "listening for 25s (listen command)",
                                                        "conversation reset by MQTT"]
    assert policy.decide("hello").reason == "mqtt"


def motion(mono: float) -> MotionEvent:
    return MotionEvent(ts=1000.0 + mono, mono=mono, seq=1, area_fraction=0.2, bbox=(0.1, 0.1, 0.3, 0.3))


def test_motion_opens_the_window_and_describes_once_per_cooldown() -> None:
    r, _, output, _, policy = router("listen.trigger=motion", "vision.motion_describe=true",
                                     "vision.motion_cooldown=60")
    for at in (100.0, 130.0, 160.0):
        r.on_motion(motion(at))
    kinds = [kind for kind, _ in output.events]
    assert kinds == ["motion", "listening"] * 3 and policy.window_open()
    assert output.events[0][1] == {"ts": 1100.0, "area": 0.2, "bbox": [0.1, 0.1, 0.3, 0.3]}
    # each description attempt (here refused: no camera) comes from motion, one per cooldown: at 100 and 160
    assert [(source, code) for _, source, code in output.refusals] == [("motion", "no_camera")] * 2


def test_an_answer_opens_the_follow_up_window() -> None:
    r, queue, output, _, policy = router("listen.trigger=wake_phrase", "listen.follow_up=5")
    r.on_command("ask", b'{"id": "q", "text": "Hi"}')
    request, sink = queue.submitted[0]
    assert not policy.window_open()
    sink.on_delta(request, "Hel", 0)
    sink.on_error(request, AgentError(ErrorCode.MODEL_ERROR, "boom"))
    assert output.deltas == [("q", "Hel", 0)] and output.refusals == [("q", "ask", "model_error")]
    assert not policy.window_open()  # an error is no answer: no follow-up window
    sink.on_result(request, Result("q", "Hello.", Source.ASK, StopReason.END, prompt_tokens=3, cached_tokens=0,
                                   completion_tokens=2, ttft_ms=1.0, latency_ms=2.0, prefill_tps=10.0,
                                   decode_tps=10.0))
    assert output.results == ["q"] and policy.window_open()
    assert policy.decide("and then?").reason == "follow_up"


def test_speech_takes_no_frame_without_a_camera_and_is_queued() -> None:
    r, queue, output, _, _ = router("vision.attach=always")
    spoken = Request(text="what is that", source=Source.SPEECH, spoken=(1.0, 2.0))
    r.on_speech(spoken)
    assert queue.submitted[0][0] is spoken and spoken.media == [] and output.journal == [spoken.id]
    r.on_speech_onset(5.0)  # no camera: the prompt up to the question only, no frame
    assert [(p.source, p.text, p.media) for p in queue.prepared] == [(Source.SPEECH, "", [])]


def test_speech_that_will_not_be_a_turn_prepares_nothing() -> None:
    r, queue, _, _, policy = router("listen.trigger=wake_phrase")
    r.on_speech_onset(5.0)  # whether it is a turn is known only from its transcript
    assert queue.prepared == []
    policy.open_window(why="test")
    r.on_speech_onset(6.0)
    assert [p.source for p in queue.prepared] == [Source.SPEECH]


# --- with a camera: a video file replayed by the real Camera -------------------------------------------------


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_video(tmp_path_factory.mktemp("router") / "door.avi", 30, fps=15.0, frame=moving_square))


@pytest.fixture(scope="module")
def calm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A camera whose view keeps still (sensor noise only)."""
    return str(write_video(tmp_path_factory.mktemp("router") / "calm.avi", 30, fps=15.0, frame=still))


@pytest.fixture
def seeing(door: str) -> Iterator[Callable[..., tuple[Router, Queue, Output, TurnPolicy]]]:
    """A router whose camera replays `door` and whose model sees (MediaSupport vision), per overrides."""
    started: list[Perception] = []

    def make(*overrides: str, vision: bool = True) -> tuple[Router, Queue, Output, TurnPolicy]:
        cfg = load(None, ["camera.enabled=true", f"camera.source={door}", "camera.input_size=256", *overrides],
                   environ={})
        perception = Perception(cfg)
        assert perception.camera is not None
        perception.camera.start()
        started.append(perception)
        deadline = time.monotonic() + 10
        while perception.latest_frame() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        queue, output, policy = Queue(), Output(), TurnPolicy(cfg.listen)
        return (Router(cfg, queue, None, output, perception, policy, MediaSupport(vision=vision)), queue, output,
                policy)

    yield make
    for perception in started:
        perception.stop()


def images(request: Request) -> list[Any]:
    return [m.data for m in request.media if m.kind == "image"]


def test_describe_and_asks_take_the_frame_as_vision_attach_says(seeing: Any) -> None:
    r, queue, output, _ = seeing("camera.snapshot=true", "vision.describe_prompt=Who is at the door?")
    r.on_command("describe", b'{"id": "d"}')
    r.on_command("ask", b'{"id": "latest", "text": "What?", "image": "latest"}')
    r.on_command("ask", b'{"id": "plain", "text": "What?"}')  # on_request: no frame unless asked
    (d, _), (latest, _), (plain, _) = queue.submitted
    assert d.source == Source.DESCRIBE and d.text == "Who is at the door?" and d.remember
    assert [img.shape for img in images(d)] == [(256, 256, 3)] and len(images(latest)) == 1 and images(plain) == []
    assert output.snapshots and output.snapshots[0][:2] == b"\xff\xd8"  # the frame it used, as a JPEG
    always, queue, _, _ = seeing("vision.attach=always")
    always.on_command("ask", b'{"id": "a", "text": "What?"}')
    always.on_command("ask", b'{"id": "n", "text": "What?", "image": "none"}')
    (a, _), (n, _) = queue.submitted
    assert len(images(a)) == 1 and images(n) == []
    never, queue, output, _ = seeing("vision.attach=never")
    never.on_command("ask", b'{"id": "x", "text": "What?", "image": "latest"}')
    never.on_command("describe", b'{"id": "dd"}')  # describe is always about the picture
    assert output.refusals == [("x", "ask", "image_disabled")] and len(images(queue.submitted[0][0])) == 1


def test_no_projector_and_a_stale_frame_are_refused(seeing: Any) -> None:
    blind, queue, output, _ = seeing(vision=False)
    blind.on_command("describe", b'{"id": "d"}')
    blind.on_command("ask", b'{"id": "a", "text": "What?"}')  # a plain ask still goes through
    assert output.refusals == [("d", "describe", "no_projector")] and [q.id for q, _ in queue.submitted] == ["a"]
    old, queue, output, _ = seeing("vision.max_frame_age=0.05")
    assert old.perception.camera is not None
    old.perception.camera.stop()
    time.sleep(0.1)
    old.on_command("describe", b'{"id": "late"}')
    ((rid, source, code),) = output.refusals
    assert (rid, source, code) == ("late", "describe", "stale_frame")


def test_the_frame_prepared_at_speech_onset_is_the_one_the_turn_carries(seeing: Any) -> None:
    r, queue, _, _ = seeing("vision.attach=always")
    began = time.time()
    r.on_speech_onset(began)
    ((prepared,),) = [images(p) for p in queue.prepared]
    time.sleep(0.2)  # the camera moves on
    r.on_speech(Request(text="what is it", source=Source.SPEECH, spoken=(began, began + 1.0)))
    assert images(queue.submitted[0][0])[0] is prepared
    r.on_speech(Request(text="and now", source=Source.SPEECH, spoken=(began + 5.0, began + 6.0)))
    assert images(queue.submitted[1][0])[0] is not prepared  # a later utterance, the view has moved: a fresh frame
    assert r.stats()["frames_reused"] == 0
    quiet, queue, _, _ = seeing("vision.attach=on_request")
    quiet.on_speech_onset(time.time())
    assert [p.media for p in queue.prepared] == [[]]  # the turn will not carry a frame: its prompt up to the question


def test_a_later_frame_of_an_unchanged_view_stands_for_the_prepared_one(seeing: Any, calm: str) -> None:
    r, queue, _, _ = seeing(f"camera.source={calm}", "vision.attach=always")
    began = time.time()
    r.on_speech_onset(began)
    ((prepared,),) = [images(p) for p in queue.prepared]
    time.sleep(0.2)  # newer frames, the same still view
    r.on_speech(Request(text="and now", source=Source.SPEECH, spoken=(began + 5.0, began + 6.0)))
    r.on_command("ask", b'{"id": "a", "text": "What?", "image": "latest"}')
    assert [images(q)[0] is prepared for q, _ in queue.submitted] == [True, True]
    assert r.stats()["frames_reused"] == 2


def test_a_view_that_keeps_still_is_prepared_once_ahead_of_any_question(seeing: Any, calm: str) -> None:
    r, queue, _, _ = seeing(f"camera.source={calm}", "vision.ready_after=1.0")
    clock = iter(100.0 + 0.3 * n for n in range(100))

    def show(frames: list[Any]) -> None:  # the grabber thread's calls, 0.3 s apart
        for seq, image in enumerate(frames):
            r.on_frame(Frame(image, time.time(), next(clock), seq))

    show([still(n) for n in range(4)])  # still for 0.9 s
    assert queue.prepared == []
    show([still(n) for n in range(4, 12)])  # still past 1.0 s: prepared, once
    ((first,),) = [images(p) for p in queue.prepared]
    show([moving_square(n) for n in range(0, 60, 6)])  # the view keeps changing: nothing to prepare
    assert len(queue.prepared) == 1
    show([moving_square(30)] * 5)  # it settles in a new view
    assert len(queue.prepared) == 2 and images(queue.prepared[1])[0] is not first
    off, queue, _, _ = seeing(f"camera.source={calm}")
    assert off.still is None  # vision.ready_after 0: nothing looks at the frames


def test_motion_prepares_the_frame_a_describe_then_uses(seeing: Any) -> None:
    r, queue, output, _ = seeing("motion.enabled=true")
    r.on_motion(motion(time.monotonic()))
    ((prepared,),) = [images(p) for p in queue.prepared]
    time.sleep(0.2)  # the camera moves on: the describe still gets the frame motion prepared
    r.on_command("describe", b'{"id": "after-motion"}')
    assert images(queue.submitted[0][0])[0] is prepared
    assert [kind for kind, _ in output.events] == ["motion"]
    off, queue, _, _ = seeing("vision.prepare=false")
    off.on_motion(motion(time.monotonic()))
    assert queue.prepared == []
