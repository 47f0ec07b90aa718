"""`gemma-agent check`: every stage `run` would start, checked without starting it: the config, the model file
and its memory plan, the projector, speech (native audio or whisper, and what the trigger needs), the camera and
microphone sources, and the broker. Paths are shown resolved. The exit code is the one `run` would fail with (65
and 66 for model files, 78 for a configuration `run` refuses), else 1 when anything else is wrong."""

from __future__ import annotations

import argparse
import os
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config, ConfigError
from agent.contract.exitcodes import ExitCode

if TYPE_CHECKING:
    from agent.gguf import GgufInfo


def add(sub: Any) -> None:
    sub.add_parser("check", help="check every stage run would start (config, model, memory plan, projector, speech, "
                                 "camera, microphone, broker) and print what would be loaded")


class Report:
    """Lines as `name  text`, and the exit code: the most serious problem wins (run's own codes first)."""

    ORDER = (ExitCode.OK, ExitCode.FAILURE, ExitCode.EX_CONFIG, ExitCode.EX_DATAERR, ExitCode.EX_NOINPUT)

    def __init__(self) -> None:
        self.code = ExitCode.OK

    def line(self, name: str, text: str, problem: ExitCode = ExitCode.OK) -> None:
        print(f"{name:<11} " + (f"PROBLEM: {text}" if problem != ExitCode.OK else text))
        if self.ORDER.index(problem) > self.ORDER.index(self.code):
            self.code = problem


def main(cfg: Config, _args: argparse.Namespace) -> int:
    from agent.contract.topics import Topics

    report = Report()
    report.line("config", f"{Path(cfg.source).absolute() if cfg.source != '<defaults>' else cfg.source}: ok")
    report.line("device", f"{cfg.device_id}; topics {Topics(cfg.mqtt.prefix, cfg.device_id).base}/#")
    audio = check_model(cfg, report)
    check_speech(cfg, audio, report)
    check_camera(cfg, report)
    check_microphone(cfg, report)
    check_broker(cfg, report)
    return report.code


def check_model(cfg: Config, report: Report) -> bool | None:
    """The model (local file and plan, or remote server) and projector; whether the projector takes audio (None:
    unknown)."""
    if cfg.model.backend == "remote":
        from agent.llm.remote import RemoteModel

        unreachable = RemoteModel(cfg.model, cfg.remote).check()
        report.line("model", f"remote {cfg.remote.url}: " + (unreachable or "reachable"),
                    ExitCode.FAILURE if unreachable else ExitCode.OK)
        return cfg.remote.audio
    from agent.gguf import ModelFileError, describe, verify
    from agent.llm.input_size import resized
    from agent.llm.loader import gpu_offload_unused, media_use, speech_bytes
    from agent.llm.prompt import prompt_format
    from agent.memory.plan import plan

    try:
        info = verify(Path(cfg.model.path).absolute(), cfg.model.sha256)
        for text in describe(info):
            print(text)
        how, why = prompt_format(cfg.model.prompt_format, info.metadata)
        print(f"prompt      {how}: {why}")
        print(f"would load  n_ctx {cfg.model.n_ctx}, n_batch {cfg.model.n_batch}, n_ubatch {cfg.model.n_ubatch}, "
              f"threads {cfg.model.n_threads or 'all'}, mmap on" + (", sha256 pinned" if cfg.model.sha256 else ""))
        projector = verify(Path(cfg.model.mmproj).absolute()) if cfg.model.mmproj else None
        sized = resized(projector, cfg.camera.input_size) if projector is not None else None
    except ModelFileError as exc:
        report.line("model", str(exc), ExitCode.EX_NOINPUT if exc.missing else ExitCode.EX_DATAERR)
        return None
    if unused := gpu_offload_unused(cfg.model.n_gpu_layers):
        report.line("gpu", unused, ExitCode.FAILURE)
    elif cfg.model.n_gpu_layers:
        report.line("gpu", f"model.n_gpu_layers {cfg.model.n_gpu_layers}: offloaded to the GPU llama.cpp finds")
    chosen = plan(info, cfg.model, cfg.memory, projector=sized or projector, speech=speech_bytes(cfg, projector),
                  media=media_use(cfg))
    print("\n".join(chosen.lines()))
    if chosen.chosen is None:
        report.line("memory", "nothing fits the budget: run refuses to load it (see the plan above)",
                    ExitCode.EX_DATAERR)
    if projector is None:
        report.line("projector", "none (model.mmproj is empty): text only")
        return False
    vision, audio = projector.projector_inputs()
    kinds = " + ".join(kind for kind in projector.projector_types() if kind) or "?"
    report.line("projector", f"{projector.path} ({kinds}): vision "
                f"{'yes' if vision else 'no'}, audio {'yes' if audio else 'no'} (per its header; libmtmd confirms "
                "at start)" + (f"; encodes at {cfg.camera.input_size} px through a copy made at the first start"
                               if sized else ""))
    print(f"media       {media_cost(sized or projector, cfg)}")
    return audio


def media_cost(projector: GgufInfo, cfg: Config) -> str:
    """What one image and one utterance cost in tokens, and the projector's memory while encoding."""
    from agent.llm.loader import media_use
    from agent.memory.estimate import projector_bytes
    from agent.memory.tokens import audio_tokens_for, image_tokens

    media = media_use(cfg)
    weights, compute = projector_bytes(projector, media)
    parts = []
    frame = image_tokens(projector, media.image_side)
    if frame:
        parts.append(f"{frame} tokens per {media.image_side} px frame")
    per_second = audio_tokens_for(projector, 1.0)
    if per_second:
        parts.append(f"{per_second} audio tokens per second "
                     f"({audio_tokens_for(projector, media.audio_s)} for a {media.audio_s:g} s utterance)")
    return (", ".join(parts) or "no media the planner knows") + (
        f"; projector weights {round(weights / 2**20)} MiB + {round(compute / 2**20)} MiB while encoding")


def check_speech(cfg: Config, audio: bool | None, report: Report) -> None:
    from agent.turns.speech import SpeechToTextError, check_whisper_file, speech_route
    from agent.turns.types import MediaSupport

    if not cfg.microphone.enabled:
        report.line("speech", "off (microphone.enabled is false)")
        return
    try:
        native, whisper = speech_route(cfg.listen, True, MediaSupport(audio=bool(audio)))
    except ConfigError as exc:
        report.line("speech", str(exc), ExitCode.EX_CONFIG)
        return
    how = ["native audio"] if native else []
    if whisper:
        try:
            how.append(f"whisper {check_whisper_file(cfg.whisper.model)}")
        except SpeechToTextError as exc:
            fatal = cfg.listen.trigger == "wake_phrase"  # run refuses to start: the trigger needs a transcript
            report.line("speech", f"{exc}" + ("; listen.trigger wake_phrase needs it" if fatal else
                                               ": utterances would be dropped"),
                        ExitCode.EX_CONFIG if fatal else ExitCode.FAILURE)
            return
    report.line("speech", f"{' + '.join(how)}; trigger {cfg.listen.trigger}")
    if cfg.listen.trigger == "wake_word":
        check_wake_word(cfg, report)


def check_wake_word(cfg: Config, report: Report) -> None:
    """Load the wake word model as run does (a file TensorFlow Lite cannot read is refused, not crashed on)."""
    from agent.perception.wake import WakeWordDetector, WakeWordError, resolve

    try:
        model = resolve(cfg.wake_word)
        WakeWordDetector(model)
    except WakeWordError as exc:
        report.line("wake word", str(exc), ExitCode.EX_CONFIG)
        return
    report.line("wake word", f"{model.phrase!r}: microWakeWord {model.tflite} (probability cutoff {model.cutoff}, "
                f"window {model.window}, refractory {model.refractory:g} s)")


def check_camera(cfg: Config, report: Report) -> None:
    from devices.camera import CameraError, parse_source

    if not cfg.camera.enabled:
        report.line("camera", "off (camera.enabled is false)")
        return
    try:
        source = parse_source(cfg.camera)
    except CameraError as exc:
        report.line("camera", str(exc), ExitCode.FAILURE)
        return
    where = f"{source.kind} {source.display}"
    if source.kind in ("path", "device"):
        path = Path(str(source.target)).absolute()
        if not path.exists():
            report.line("camera", f"{path} does not exist (camera.source)", ExitCode.FAILURE)
            return
        where = f"{source.kind} {path}"
    elif source.kind == "url":
        where += " (not probed)"
    report.line("camera", f"{where}; frames at {cfg.camera.input_size} px for the model"
                + ("; motion on" if cfg.motion.enabled else ""))


def check_microphone(cfg: Config, report: Report) -> None:
    from devices.microphone import MicrophoneError, find_input_device, is_wav_source

    if not cfg.microphone.enabled:
        report.line("microphone", "off (microphone.enabled is false)")
        return
    source = cfg.microphone.source
    if is_wav_source(source):
        path = Path(str(source)).absolute()
        try:
            with wave.open(os.fspath(path), "rb") as wav:
                seconds = wav.getnframes() / wav.getframerate()
        except (OSError, wave.Error, EOFError) as exc:
            report.line("microphone", f"{path}: cannot read the WAV file: {exc}", ExitCode.FAILURE)
            return
        report.line("microphone", f"WAV replay {path} ({seconds:.1f} s)")
        return
    try:
        device = find_input_device(source)
    except MicrophoneError as exc:
        report.line("microphone", str(exc), ExitCode.FAILURE)
        return
    report.line("microphone", f"{device.index}: {device.name}")


def check_broker(cfg: Config, report: Report) -> None:
    from agent.mqtt.client import probe_broker

    try:
        problem = probe_broker(cfg.mqtt, f"gemma-agent-{cfg.device_id}")
    except ConfigError as exc:
        report.line("broker", str(exc), ExitCode.EX_CONFIG)
        return
    report.line("broker", f"mqtt{'s' if cfg.mqtt.tls.enabled else ''}://{cfg.mqtt.host}:{cfg.mqtt.port}: "
                + (problem or "reachable"), ExitCode.FAILURE if problem else ExitCode.OK)
