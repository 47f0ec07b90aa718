"""Turns from every source: MQTT commands (`ask`, `describe`, `listen`, `reset`), speech and motion. The router
decides what each becomes (text, the latest frame, audio), applies the vision and listen policies and the rate
limits, and queues requests for the model; refusals go out at once as `error` messages. It never blocks its
caller (paho's network thread, the camera's grabber, the speech worker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import Config
from agent.contract.codes import AgentError, ErrorCode, EventType, Source
from agent.contract.inbound import parse_ask, parse_describe, parse_listen
from agent.perception.frames import FramePreparer, ModelImage
from agent.perception.motion import MotionEvent
from agent.perception.scene import StillWatch, same_scene, small_grey
from agent.perception.stage import Perception
from agent.turns.conversation import Conversation
from agent.turns.policy import TurnPolicy
from agent.turns.ratelimit import RateLimiter
from agent.turns.types import Media, MediaSupport, Output, Request, Result, Sink, TurnQueue, new_id
from devices.camera import Frame

log = logging.getLogger("agent.turns.router")


class _AfterAnswer:
    """A turn's sink that also runs `answered` once the answer is out (it opens the follow-up window)."""

    def __init__(self, sink: Sink, answered: Callable[[], None]) -> None:
        self.sink, self.answered = sink, answered

    def on_delta(self, request: Request, delta: str, index: int) -> None:
        self.sink.on_delta(request, delta, index)

    def on_result(self, request: Request, result: Result) -> None:
        self.sink.on_result(request, result)
        self.answered()

    def on_error(self, request: Request, error: AgentError) -> None:
        self.sink.on_error(request, error)


@dataclass(frozen=True)
class Prepared:
    """A frame encoded ahead of its turn: for which kind of turn, when (wall clock) it was pinned, and the reduced
    view (scene.small_grey) a later frame is compared with to reuse it."""

    why: str  # "speech" (at its onset) | "motion" (for a describe that follows) | "ready" (a still view)
    image: ModelImage
    at: float
    view: np.ndarray


class Router:
    def __init__(self, cfg: Config, turns: TurnQueue, conversation: Conversation | None, output: Output,
                 perception: Perception, policy: TurnPolicy, support: MediaSupport) -> None:
        self.cfg = cfg
        self.turns, self.conversation, self.output, self.perception = turns, conversation, output, perception
        self.policy = policy
        self.support = support
        self.frames = FramePreparer(cfg.camera)
        self.limiter = RateLimiter(cfg.limits.asks_per_minute, cfg.limits.sender_asks_per_minute)
        self._sink = _AfterAnswer(output, policy.answered)
        self._last_motion_describe = float("-inf")
        self._motion_lock = threading.Lock()
        self._prepared: Prepared | None = None  # the frame last encoded ahead of its turn
        self._prepared_lock = threading.Lock()
        self.frames_reused = 0  # turns and preparations that took the prepared frame for an unchanged view
        self.still = StillWatch(cfg.motion) if self._can_prepare() and cfg.vision.ready_after > 0 else None

    @property
    def sink(self) -> Sink:
        """Where a turn's output goes (the follow-up window opens after each answer)."""
        return self._sink

    # --- MQTT commands ---------------------------------------------------------------------------------

    def on_command(self, command: str, payload: bytes) -> None:
        """One inbound command (a name from contract.topics.COMMANDS); refusals are published, never raised."""
        handlers = {"ask": self.ask, "describe": self.describe, "listen": self.listen, "reset": self.reset}
        try:
            handlers[command](payload)
        except AgentError as exc:
            self.output.refused(exc.request_id, command, exc)

    def ask(self, payload: bytes) -> None:
        ask = parse_ask(payload, self.cfg.mqtt.max_payload)
        request = Request(text=ask.text, id=ask.id or new_id(), source=Source.ASK, system=ask.system)
        try:
            self._admit(ask.sender)
            if ask.system is not None and not self.cfg.mqtt.allow_remote_system_prompt:
                raise AgentError(ErrorCode.FORBIDDEN_FIELD, "field 'system' is refused: replacing the system prompt "
                                 "over MQTT needs mqtt.allow_remote_system_prompt")
            self._attach_frame(request, requested=ask.image == "latest", allowed=ask.image != "none")
        except AgentError as exc:
            self.output.refused(request.id, Source.ASK, exc)
            return
        self.submit(request)

    def describe(self, payload: bytes, source: Source = Source.DESCRIBE, remember: bool = True) -> None:
        command = parse_describe(payload, self.cfg.mqtt.max_payload)
        request = Request(text=command.prompt or self.cfg.vision.describe_prompt, id=command.id or new_id(),
                          source=source, remember=remember)
        try:
            if source == Source.DESCRIBE:  # MQTT-originated; motion has its own cooldown
                self._admit(command.sender)
            self._attach_frame(request, requested=True, prepared=self._prepared_frame("motion"))
        except AgentError as exc:
            self.output.refused(request.id, source, exc)
            return
        self.submit(request)

    def listen(self, payload: bytes) -> None:
        seconds = parse_listen(payload, self.cfg.mqtt.max_payload, self.cfg.listen.window)
        if not self.cfg.microphone.enabled:
            raise AgentError(ErrorCode.NO_MICROPHONE, "there is no microphone to listen with (microphone.enabled is "
                             "false)")
        self.policy.open_window(seconds, "mqtt")
        log.info("listening for %.0fs (listen command)", seconds)
        self.output.event(EventType.LISTENING, {"reason": "mqtt", "seconds": seconds})

    def reset(self, _payload: bytes) -> None:
        if self.conversation is not None:
            self.conversation.reset()
        log.info("conversation reset by MQTT")
        self.output.event(EventType.RESET, {})

    # --- perception ------------------------------------------------------------------------------------

    def on_motion(self, event: MotionEvent) -> None:
        """Called on the camera's grabber thread: publish, open a window, prepare or describe; never block."""
        self.output.event(EventType.MOTION, event.payload())
        if not self.cfg.vision.motion_describe:  # a describe that follows (an automation) finds this frame ready
            self._prepare("motion", Request(text=self.cfg.vision.describe_prompt, source=Source.DESCRIBE))
        if self.cfg.listen.trigger == "motion":
            self.policy.open_window(why="motion")
            self.output.event(EventType.LISTENING, {"reason": "motion", "seconds": self.cfg.listen.window})
        if self.cfg.vision.motion_describe:
            with self._motion_lock:
                if event.mono - self._last_motion_describe < self.cfg.vision.motion_cooldown:
                    return
                self._last_motion_describe = event.mono
            self.describe(b"", source=Source.MOTION, remember=False)

    def on_frame(self, frame: Frame) -> None:
        """Every captured frame (the camera's grabber thread; vision.ready_after > 0): once the view has kept
        still for ready_after seconds and differs from the frame last prepared, prepare it for whatever turn
        comes. Cheap when nothing changes: one small grey view compared every 0.25 s."""
        if self.still is None or (view := self.still.feed(frame.image, frame.mono)) is None:
            return
        if self.still.still_for(frame.mono) < self.cfg.vision.ready_after:
            return
        with self._prepared_lock:
            prepared = self._prepared
        if prepared is None or not same_scene(view, prepared.view, self.cfg.motion):
            log.info("the view has kept still for %.1fs: preparing frame %d ahead of any question",
                     self.cfg.vision.ready_after, frame.seq)
            self._prepare("ready", Request(text="", source=Source.DESCRIBE), frame=frame)

    def on_speech_onset(self, start: float) -> None:
        """Speech began (the microphone's thread) and will be a turn: evaluate its prompt up to the question now
        (the frame it will carry, or the system prompt and conversation), so after the end of speech only the
        question is left to evaluate; speech that goes to the projector as audio has it loaded ahead too."""
        if not self.policy.expects_turn():
            return
        framed = self.cfg.vision.attach == "always"
        audio = self.support.native_audio(self.cfg.listen.speech)
        if not (framed and self._prepare("speech", Request(text="", source=Source.SPEECH, audio_follows=audio),
                                         since=start)):
            self.turns.prepare(Request(text="", source=Source.SPEECH, audio_follows=audio))

    def on_speech(self, request: Request, sink: Sink | None = None) -> None:
        """A speech turn from the speech worker: attach the frame per vision.attach (the one prepared at its onset
        when there is one), then queue it. `sink`: a speculative turn's held output, journalled when confirmed."""
        try:
            self._attach_frame(request, requested=False, prepared=self._prepared_frame("speech", request.spoken))
        except AgentError as exc:
            if sink is None:
                self.output.refused(request.id, Source.SPEECH, exc)
            else:  # held with the speculation: goes out (and settles the request) only if it is confirmed
                sink.on_error(request, exc)
            return
        self.submit(request, sink)

    # --- shared ----------------------------------------------------------------------------------------

    def submit(self, request: Request, sink: Sink | None = None) -> None:
        """Queue a request, journalled until answered (a crash then reports it `interrupted`); a held `sink` is
        journalled when it is confirmed."""
        if sink is None:
            self.output.accepted(request)
        try:
            self.turns.submit(request, sink or self._sink)
        except AgentError as exc:
            (sink or self.output).on_error(request, exc)

    def _can_prepare(self) -> bool:
        return self.cfg.vision.prepare and self.support.vision and self.perception.camera is not None

    def _prepare(self, why: str, request: Request, since: float | None = None, frame: Frame | None = None) -> bool:
        """Pin the latest frame (or `frame`; the prepared one while the view is unchanged) for the turn `why`
        announces and have the model encode it ahead of that turn: nothing left to do when its KV is cached.
        False when there is no frame to prepare."""
        if not self._can_prepare():
            return False
        try:
            image, view = self._scene_frame(frame)
        except AgentError:
            return False
        with self._prepared_lock:
            self._prepared = Prepared(why, image, time.time() if since is None else since, view)
        request.media.append(Media("image", image.rgb))
        self.turns.prepare(request)
        return True

    def _prepared_frame(self, why: str, spoken: tuple[float, float] | None = None) -> ModelImage | None:
        """The frame prepared for this turn: at its speech's onset, or (describe) at motion still fresh."""
        with self._prepared_lock:
            prepared = self._prepared
        if prepared is None or prepared.why != why:
            return None
        if spoken is not None:
            return prepared.image if spoken[0] - 0.5 <= prepared.at <= spoken[1] else None
        age = time.time() - prepared.image.ts
        return prepared.image if age <= self.cfg.vision.max_frame_age else None

    def _admit(self, sender: str) -> None:
        if not self.limiter.allow(sender):
            raise AgentError(ErrorCode.RATE_LIMITED, f"too many requests (limits.asks_per_minute "
                             f"{self.cfg.limits.asks_per_minute}, per sender "
                             f"{self.cfg.limits.sender_asks_per_minute}); try again later")

    def _attach_frame(self, request: Request, requested: bool, allowed: bool = True,
                      prepared: ModelImage | None = None) -> None:
        """Put the latest frame first in the request's media when asked for (`requested`: a refusal if none is
        fresh) or when vision.attach is `always` (skipped quietly if none is fresh); `prepared`, the frame encoded
        ahead for this turn, instead of the latest when there is one."""
        attach = self.cfg.vision.attach
        if requested and attach == "never" and request.source in (Source.ASK, Source.SPEECH):
            raise AgentError(ErrorCode.IMAGE_DISABLED, "vision.attach is never: asks do not take camera frames")
        if not requested and not (attach == "always" and allowed):
            return
        if not requested and not self.support.vision:
            return
        try:
            prepared = prepared or self._scene_frame()[0]
        except AgentError:
            if requested:
                raise
            log.info("no fresh frame for %s %s: answering without one", request.source, request.id)
            return
        if not self.support.vision:
            raise AgentError(ErrorCode.NO_PROJECTOR, "remote.vision is false: the model server is not sent camera "
                             "frames" if self.cfg.model.backend == "remote" else "the model has no vision projector "
                             "(model.mmproj): it cannot see camera frames")
        request.media.insert(0, Media("image", prepared.rgb))
        if prepared.jpeg is not None:
            self.output.snapshot(prepared.jpeg)

    def _scene_frame(self, frame: Frame | None = None) -> tuple[ModelImage, np.ndarray]:
        """The image for the camera's current view (or `frame`'s), and that view reduced: the prepared frame's
        image while the view shows the same scene (what the motion detector would not call motion: the model has
        it already, so it is neither encoded nor evaluated again), else the latest frame's. AgentError naming
        the camera's state when there is no fresh frame."""
        frame = frame or self._latest_frame()
        view = small_grey(frame.image, self.cfg.motion.scale_width)
        with self._prepared_lock:
            prepared = self._prepared
            if prepared is not None and same_scene(view, prepared.view, self.cfg.motion):
                self.frames_reused += 1
                log.debug("frame %d shows the scene of prepared frame %d: reusing it", frame.seq,
                          prepared.image.seq)
                return prepared.image, prepared.view
        return self.frames(frame), view

    def _latest_frame(self) -> Frame:
        """The camera's latest frame, or AgentError naming the camera's state."""
        camera = self.perception.camera
        if camera is None:
            detail = self.perception.camera_error or "no camera is configured (camera.enabled is false)"
            raise AgentError(ErrorCode.NO_CAMERA, detail)
        frame = camera.latest()
        if frame is None:
            raise AgentError(ErrorCode.NO_FRAME, f"the camera has no frame yet (state {camera.state})")
        age = time.monotonic() - frame.mono
        if age > self.cfg.vision.max_frame_age:
            raise AgentError(ErrorCode.STALE_FRAME, f"the latest frame is {age:.1f}s old (vision.max_frame_age "
                             f"{self.cfg.vision.max_frame_age}s); camera state {camera.state}")
        return frame

    def stats(self) -> dict[str, Any]:
        return {"rate_limited": self.limiter.refused, "frames_reused": self.frames_reused}
