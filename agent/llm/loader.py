"""Opening the model a config names: check the files with our own header reader, plan the memory, load with the
plan (or connect to a remote server), and learn what the projector takes. Failures raise ModelFileError /
ModelLoadError / AgentError; `exit_code_for` maps them to the documented exit codes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from agent.config import Config, ConfigError
from agent.contract.exitcodes import ExitCode
from agent.gguf import GgufInfo, ModelFileError, verify
from agent.llm.engine import Backend
from agent.llm.input_size import projector_for
from agent.llm.local import LocalModel, ModelLoadError
from agent.memory.estimate import MediaUse, whisper_bytes
from agent.memory.plan import plan
from agent.memory.shape import MemoryPlanError
from agent.turns.speech import speech_route
from agent.turns.types import MediaSupport

log = logging.getLogger("agent.llm")


def load_model(cfg: Config) -> LocalModel:
    """Check the model file with our own header parser, then load it; raises ModelFileError/ModelLoadError. A
    vision projector is loaded in the copy that encodes at camera.input_size (agent/llm/input_size.py)."""
    info = verify(cfg.model.path, cfg.model.sha256)
    if cfg.model.lora:
        adapter = verify(cfg.model.lora)
        if adapter.metadata.get("general.type") != "adapter" or adapter.arch != info.arch:
            raise ModelFileError(f"{cfg.model.lora}: not a LoRA adapter for {info.arch} (general.type "
                                 f"{adapter.metadata.get('general.type')!r}, arch {adapter.arch})")
    log.info("model file ok: %s (%s, %.1f MiB, %d tensors)", cfg.model.path, info.arch, info.size / 2**20,
             len(info.tensors))
    model_cfg = cfg.model
    if cfg.model.mmproj:  # projector_for checks its header
        model_cfg = replace(cfg.model, mmproj=projector_for(cfg.model.mmproj, cfg.camera.input_size))
        if model_cfg.mmproj != cfg.model.mmproj:
            log.info("projector: %s encodes at %d px", model_cfg.mmproj, cfg.camera.input_size)
    projector = verify(model_cfg.mmproj) if model_cfg.mmproj else None
    try:  # the load setting that fits the memory budget (bench/RESULTS.md), or a refusal with the table
        chosen = plan(info, model_cfg, cfg.memory, projector=projector, speech=speech_bytes(cfg, projector),
                      media=media_use(cfg))
    except MemoryPlanError as exc:
        raise ModelLoadError(str(exc)) from None
    if chosen.chosen is None:
        raise ModelLoadError(chosen.refusal())  # the table and what would fit, once
    for line in chosen.lines(rows=4):
        log.info("%s", line)
    if unused := gpu_offload_unused(cfg.model.n_gpu_layers):
        log.warning("%s", unused)
    return LocalModel(model_cfg, plan=chosen)


def gpu_offload_unused(n_gpu_layers: int) -> str | None:
    """Why model.n_gpu_layers offloads nothing with the installed llama-cpp-python (None: 0, or a GPU build)."""
    import llama_cpp

    if n_gpu_layers == 0 or llama_cpp.llama_supports_gpu_offload():
        return None
    return (f"model.n_gpu_layers is {n_gpu_layers}, but the installed llama-cpp-python has no GPU backend: every "
            "layer runs on the CPU (a CUDA build on Jetson: EXTRA_CMAKE_ARGS=\"-DGGML_CUDA=on\" bash .ci/setup)")


def media_use(cfg: Config) -> MediaUse:
    """The largest image and clip a turn hands the projector: a camera frame, an utterance."""
    return MediaUse(cfg.camera.input_size, cfg.vad.max_utterance_s)


def speech_bytes(cfg: Config, projector: GgufInfo | None) -> int:
    """What a whisper.cpp model will hold beside the model, when speech will go through one (0 otherwise)."""
    audio = projector is not None and projector.projector_inputs()[1]
    try:
        _native, whisper = speech_route(cfg.listen, cfg.microphone.enabled, MediaSupport(audio=audio))
    except ConfigError:  # the start refuses it later, with that message
        return 0
    path = Path(cfg.whisper.model)
    return whisper_bytes(path.stat().st_size) if whisper and path.is_file() else 0


def open_backend(cfg: Config) -> tuple[Backend, MediaSupport]:
    """The model the engine talks to: loaded here (model.backend local), or a remote llama-server."""
    if cfg.model.backend == "remote":
        from agent.llm.remote import RemoteModel

        remote = RemoteModel(cfg.model, cfg.remote)
        problem = remote.check()
        if problem:  # not fatal: the server may come up later; each turn reports its own failure
            log.warning("remote model server: %s", problem)
        return remote, MediaSupport(vision=cfg.remote.vision, audio=cfg.remote.audio)
    model = load_model(cfg)
    return model, probe_projector(model, cfg)


def probe_projector(model: LocalModel, cfg: Config) -> MediaSupport:
    """Load model.mmproj once at start to learn what it takes (libmtmd's own answer, not the file's claims); keep
    it loaded only when memory.projector makes it resident. A projector that will not load stops the start (exit
    65). load_model has already checked its header."""
    if not cfg.model.mmproj:
        return MediaSupport()
    projector = model.projector()
    support = MediaSupport(vision=projector.vision, audio=projector.audio)
    if cfg.memory.projector_idle_release is not None or not model.projector_resident:
        model.release_projector("probed at start; loaded again for the first image")
    return support


def exit_code_for(exc: Exception) -> ExitCode:
    """EX_NOINPUT for a missing or unreadable file, EX_DATAERR for one that is there but unusable."""
    if isinstance(exc, ModelFileError) and exc.missing:
        return ExitCode.EX_NOINPUT
    return ExitCode.EX_DATAERR
