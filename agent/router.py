"""Turns from every source: MQTT asks, `describe`, `listen` and `reset` commands, speech and motion. The router
decides what each becomes (text, the latest frame, audio), applies the vision and listen policies, and hands
requests to the engine; refusals go out at once as `error` messages. It never blocks its caller."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.brain import Engine, EngineError, Request, Sink, new_id
from agent.config import Config
from agent.frames import FramePreparer
from agent.listen import TurnPolicy
from agent.messages import PayloadError, parse_ask, parse_describe, parse_listen
from agent.motion import MotionEvent
from agent.projector import Media
from agent.publisher import Publisher
from agent.ratelimit import RateLimiter
from agent.senses import Senses

log = logging.getLogger("agent.router")


@dataclass(frozen=True)
class Caps:
    """What the loaded projector takes (both False without model.mmproj)."""

    vision: bool = False
    audio: bool = False


class Refused(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class Router:
    def __init__(self, cfg: Config, engine: Engine, publisher: Publisher, sink: Sink, senses: Senses,
                 policy: TurnPolicy, caps: Caps) -> None:
        self.cfg = cfg
        self.engine, self.publisher, self.sink, self.senses = engine, publisher, sink, senses
        self.policy = policy
        self.caps = caps
        self.frames = FramePreparer(cfg.camera)
        self.limiter = RateLimiter(cfg.limits.asks_per_minute, cfg.limits.sender_asks_per_minute)
        self._last_motion_describe = float("-inf")
        self._motion_lock = threading.Lock()

    # --- MQTT commands ---------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Handle a command topic; False if the topic is not one of ours."""
        topics = self.publisher.topics
        handlers = {topics.ask: self.ask, topics.describe: self.describe, topics.listen: self.listen,
                    topics.reset: self.reset}
        handler = handlers.get(topic)
        if handler is None:
            return False
        source = topic.rsplit("/", 1)[1]
        try:
            handler(payload)
        except PayloadError as exc:
            self.publisher.publish_error(exc.request_id, exc.code, exc.detail, source=source)
        return True

    def ask(self, payload: bytes) -> None:
        ask = parse_ask(payload, self.cfg.mqtt.max_payload)
        request = Request(text=ask.text, id=ask.id or new_id(), source="ask", system=ask.system)
        try:
            self._admit(request, ask.sender)
            if ask.system is not None and not self.cfg.mqtt.allow_remote_system_prompt:
                raise Refused("forbidden_field", "field 'system' is refused: replacing the system prompt over MQTT "
                              "needs mqtt.allow_remote_system_prompt")
            self._attach_frame(request, requested=ask.image == "latest", allowed=ask.image != "none")
        except Refused as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, source="ask")
            return
        self.submit(request)

    def describe(self, payload: bytes, source: str = "describe", remember: bool = True) -> None:
        command = parse_describe(payload, self.cfg.mqtt.max_payload)
        request = Request(text=command.prompt or self.cfg.vision.describe_prompt, id=command.id or new_id(),
                          source=source, remember=remember)
        try:
            if source == "describe":  # MQTT-originated; motion has its own cooldown
                self._admit(request, command.sender)
            self._attach_frame(request, requested=True)
        except Refused as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, source=source)
            return
        self.submit(request)

    def listen(self, payload: bytes) -> None:
        seconds = parse_listen(payload, self.cfg.mqtt.max_payload, self.cfg.listen.window)
        self.policy.open_window(seconds, "mqtt")
        log.info("listening for %.0fs (listen command)", seconds)
        self.publisher.publish_event("listening", {"reason": "mqtt", "seconds": seconds})

    def reset(self, _payload: bytes) -> None:
        if self.engine.conversation is not None:
            self.engine.conversation.reset()
        log.info("conversation reset by MQTT")
        self.publisher.publish_event("reset", {})

    # --- perception ------------------------------------------------------------------------------------

    def on_motion(self, event: MotionEvent) -> None:
        """Called on the camera's grabber thread: publish, open a window, maybe describe; never block."""
        payload = event.payload()
        self.publisher.publish_event(str(payload.pop("event_type")), payload)
        if self.cfg.listen.trigger == "motion":
            self.policy.open_window(why="motion")
            self.publisher.publish_event("listening", {"reason": "motion", "seconds": self.cfg.listen.window})
        if self.cfg.vision.motion_describe:
            with self._motion_lock:
                if event.mono - self._last_motion_describe < self.cfg.vision.motion_cooldown:
                    return
                self._last_motion_describe = event.mono
            self.describe(b"", source="motion", remember=False)

    def on_speech(self, request: Request) -> None:
        """A speech turn from the Listener: attach the frame per vision.attach, then queue it."""
        try:
            self._attach_frame(request, requested=False)
        except Refused as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, source="speech")
            return
        self.submit(request)

    def on_transcript(self, transcript: dict[str, Any]) -> None:
        self.publisher.publish_json(self.publisher.topics.transcript, transcript, durable=True)
        self.publisher.publish_event("transcript", transcript)

    # --- shared ----------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request, remembered in the outbox until answered (a crash then reports it `interrupted`)."""
        outbox = self.publisher.outbox
        if outbox is not None:
            outbox.accept(request.id, request.source)
        try:
            self.engine.submit(request, self.sink)
        except EngineError as exc:
            self.publisher.publish_error(request.id, exc.code, exc.detail, settles=True, source=request.source)

    def _admit(self, request: Request, sender: str) -> None:
        if not self.limiter.allow(sender):
            raise Refused("rate_limited", f"too many requests (limits.asks_per_minute "
                          f"{self.cfg.limits.asks_per_minute}, per sender {self.cfg.limits.sender_asks_per_minute}); "
                          "try again later")

    def _attach_frame(self, request: Request, requested: bool, allowed: bool = True) -> None:
        """Put the latest frame first in the request's media when asked for (`requested`: a refusal if none is
        fresh) or when vision.attach is `always` (skipped quietly if none is fresh)."""
        attach = self.cfg.vision.attach
        if requested and attach == "never" and request.source in ("ask", "speech"):
            raise Refused("image_disabled", "vision.attach is never: asks do not take camera frames")
        if not requested and not (attach == "always" and allowed):
            return
        if not requested and not self.caps.vision:
            return
        try:
            image = self.fresh_frame()
        except Refused:
            if requested:
                raise
            log.info("no fresh frame for %s %s: answering without one", request.source, request.id)
            return
        if not self.caps.vision:
            raise Refused("no_projector", "the model has no vision projector (model.mmproj): it cannot see "
                          "camera frames")
        request.media.insert(0, Media("image", image))

    def fresh_frame(self) -> Any:
        """The latest frame prepared for the model, or Refused naming the camera's state."""
        camera = self.senses.camera
        if camera is None:
            detail = self.senses.camera_error or "no camera is configured (camera.enabled is false)"
            raise Refused("no_camera", detail)
        frame = camera.latest()
        if frame is None:
            raise Refused("no_frame", f"the camera has no frame yet (state {camera.state})")
        age = time.monotonic() - frame.mono
        if age > self.cfg.vision.max_frame_age:
            raise Refused("stale_frame", f"the latest frame is {age:.1f}s old (vision.max_frame_age "
                          f"{self.cfg.vision.max_frame_age}s); camera state {camera.state}")
        return self.frames(frame).rgb
