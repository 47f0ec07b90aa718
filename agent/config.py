"""Typed configuration: a YAML file becomes dataclasses, and every error names the key and the line.

Sources, later ones winning: the dataclass defaults (documented in config/agent.yaml), the YAML file, `--set
dotted.key=value` overrides, then secrets from the environment (GEMMA_AGENT_MQTT_USERNAME, ..._PASSWORD).
A problem raises ConfigError; the CLI prints its one-line message and exits with EX_CONFIG (78).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.yamlfile import YamlError, read_yaml, show

EX_CONFIG = 78  # sysexits.h: configuration error
ENV_PREFIX = "GEMMA_AGENT_"
TOPIC_SAFE = r"^[A-Za-z0-9_-]{1,64}$"


RENAMED = {  # keys of earlier versions -> where that setting lives now (named in the unknown-key error)
    "vision.keep_loaded": "memory.projector",
    "vision.idle_release": "memory.projector",
    "homeassistant.camera_entity": "camera.snapshot (the camera entity is there whenever snapshots are)",
}


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the config."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever a value or a library message held


def opt(default: Any, lo: float | None = None, hi: float | None = None, pattern: str | None = None) -> Any:
    """A dataclass field with an inclusive range or a regular expression the value must match."""
    return field(default=default, metadata={"min": lo, "max": hi, "pattern": pattern})


@dataclass
class DeviceConfig:
    id: str = opt("", pattern=r"^$|" + TOPIC_SAFE)
    name: str = "Gemma Agent"


@dataclass
class ModelConfig:
    backend: Literal["local", "remote"] = "local"
    path: str = "models/gemma-3-270m-q4_k_m.gguf"
    sha256: str = opt("", pattern=r"^$|^[0-9a-fA-F]{64}$")
    mmproj: str = ""
    lora: str = ""
    lora_scale: float = opt(1.0, -10.0, 10.0)
    n_ctx: int = opt(2048, 256, 131072)
    n_threads: int = opt(0, 0, 256)
    n_batch: int = opt(512, 32, 8192)
    n_ubatch: int = opt(512, 32, 8192)
    n_gpu_layers: int = opt(0, -1, 1000)
    seed: int = opt(0, 0, 2**31 - 1)
    temperature: float = opt(1.0, 0.0, 5.0)
    top_p: float = opt(0.95, 0.0, 1.0)
    top_k: int = opt(64, 0, 1000)
    min_p: float = opt(0.0, 0.0, 1.0)
    repeat_penalty: float = opt(1.0, 0.5, 2.0)
    max_tokens: int = opt(256, 1, 8192)
    deadline: float = opt(120.0, 1.0, 3600.0)
    queue_size: int = opt(4, 1, 1000)
    prompt_format: Literal["auto", "chat", "completion"] = "auto"
    system_prompt: str = (
        "You are a helpful assistant running on a small home device. Answer briefly and plainly."
    )


@dataclass
class RemoteConfig:
    url: str = "http://127.0.0.1:8080"
    model: str = ""
    api_key: str = ""
    timeout: float = opt(60.0, 1.0, 3600.0)
    vision: bool = False
    audio: bool = False


@dataclass
class TlsConfig:
    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


@dataclass
class MqttConfig:
    host: str = "localhost"
    port: int = opt(1883, 1, 65535)
    prefix: str = opt("gemma_agent", pattern=TOPIC_SAFE)
    username: str = ""
    password: str = ""
    password_file: str = ""
    keepalive: int = opt(30, 5, 3600)
    max_payload: int = opt(4096, 64, 1048576)
    reconnect_min: float = opt(1.0, 0.1, 600.0)
    reconnect_max: float = opt(60.0, 0.1, 3600.0)
    allow_remote_system_prompt: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass
class CameraConfig:
    enabled: bool = False
    source: int | str = ""
    width: int = opt(640, 16, 7680)
    height: int = opt(480, 16, 4320)
    fps: float = opt(15.0, 0.1, 240.0)
    loop: bool = True
    reconnect_min: float = opt(0.5, 0.05, 60.0)
    reconnect_max: float = opt(30.0, 0.1, 3600.0)
    input_size: Literal[256, 512, 768] = 256
    fit: Literal["letterbox", "crop"] = "letterbox"
    snapshot: bool = False
    snapshot_quality: int = opt(80, 10, 100)


@dataclass
class MotionConfig:
    enabled: bool = False
    threshold: int = opt(25, 1, 255)
    min_area: float = opt(0.01, 0.0, 1.0)
    cooldown: float = opt(10.0, 0.0, 86400.0)
    scale_width: int = opt(160, 16, 1920)


@dataclass
class MicrophoneConfig:
    enabled: bool = False
    source: int | str = ""
    realtime: bool = True
    queue_frames: int = opt(500, 10, 100000)


@dataclass
class VadConfig:
    aggressiveness: int = opt(2, 0, 3)
    frame_ms: Literal[10, 20, 30] = 30
    pre_roll_ms: int = opt(300, 0, 5000)
    hangover_ms: int = opt(700, 0, 10000)
    early_end_ms: int = opt(250, 0, 10000)
    min_speech_ms: int = opt(250, 0, 10000)
    max_utterance_s: float = opt(15.0, 1.0, 300.0)


@dataclass
class VisionConfig:
    attach: Literal["always", "never", "on_request"] = "on_request"
    max_frame_age: float = opt(2.0, 0.05, 3600.0)
    describe_prompt: str = "Describe what the camera sees in one or two short sentences."
    motion_describe: bool = False
    motion_cooldown: float = opt(60.0, 0.0, 86400.0)
    prepare: bool = True
    ready_after: float = opt(0.0, 0.0, 3600.0)


@dataclass
class ListenConfig:
    trigger: Literal["always", "wake_word", "wake_phrase", "mqtt", "motion"] = "always"
    wake_phrases: list[str] = field(default_factory=lambda: ["hey gemma", "ok gemma"])
    window: float = opt(10.0, 1.0, 3600.0)
    follow_up: float = opt(8.0, 0.0, 3600.0)
    speech: Literal["auto", "native", "whisper"] = "auto"
    audio_prompt: str = ""


@dataclass
class WakeWordConfig:
    model: str = "okay_nabu"
    probability_cutoff: float = opt(0.0, 0.0, 1.0)
    sliding_window: int = opt(0, 0, 100)
    refractory: float = opt(2.0, 0.0, 60.0)


@dataclass
class WhisperConfig:
    model: str = "models/ggml-base.en.bin"
    language: str = opt("en", pattern=r"^(auto|[a-z]{2,3})$")
    threads: int = opt(0, 0, 256)
    max_tokens: int = opt(0, 0, 448)
    temperature_fallback: bool = True
    window: float = opt(10.0, 1.0, 30.0)


@dataclass
class LimitsConfig:
    asks_per_minute: int = opt(60, 0, 100_000)
    sender_asks_per_minute: int = opt(20, 0, 100_000)


@dataclass
class ConversationConfig:
    max_exchanges: int = opt(6, 0, 100)
    idle_reset: float = opt(300.0, 0.0, 86400.0)


@dataclass
class OutboxConfig:
    path: str = ""
    max_messages: int = opt(1000, 1, 1_000_000)
    max_bytes: int = opt(8 << 20, 4096, 1 << 30)
    max_age: float = opt(7 * 86400.0, 60.0, 365 * 86400.0)


@dataclass
class HealthConfig:
    interval: float = opt(30.0, 1.0, 3600.0)
    prometheus_port: int = opt(0, 0, 65535)
    prometheus_bind: str = "127.0.0.1"


@dataclass
class HomeAssistantConfig:
    enabled: bool = True
    discovery_prefix: str = opt("homeassistant", pattern=r"^[A-Za-z0-9_/-]{1,64}$")
    configuration_url: str = opt("", pattern=r"^$|^https?://\S+$")


@dataclass
class MemoryConfig:
    limit_mib: int = opt(2048, 0, 1 << 24)
    margin_mib: int = opt(256, 0, 1 << 20)
    mode: Literal["auto", "manual"] = "auto"
    repack: Literal["auto"] | bool = "auto"
    kv_type: Literal["auto", "f16", "q8_0"] = "auto"
    flash_attn: Literal["auto"] | bool = "auto"
    # auto | resident | on_demand | seconds: loaded on use, released after that long without a media turn
    projector: Literal["auto", "resident", "on_demand"] | float = opt("auto", 1.0, 86400.0)

    @property
    def projector_idle_release(self) -> float | None:
        """Seconds after which an unused projector is released (None: never, or the plan decides)."""
        return None if isinstance(self.projector, str) else float(self.projector)
    release_cold: Literal["auto"] | bool = "auto"


@dataclass
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    microphone: MicrophoneConfig = field(default_factory=MicrophoneConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    wake_word: WakeWordConfig = field(default_factory=WakeWordConfig)
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def device_id(self) -> str:
        """The configured device id, or one derived from the host name (stable across restarts)."""
        if self.device.id:
            return self.device.id
        derived = re.sub(r"[^a-z0-9_-]+", "_", socket.gethostname().lower()).strip("_")
        return (derived or "gemma")[:64]

    def outbox_path(self, environ: typing.Mapping[str, str] | None = None) -> Path:
        """outbox.path, or outbox-<device id>.sqlite3 in $STATE_DIRECTORY (systemd) / ~/.local/state/gemma-agent."""
        if self.outbox.path:
            return Path(self.outbox.path)
        env = os.environ if environ is None else environ
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        base = Path(state) if state else Path.home() / ".local" / "state" / "gemma-agent"
        return base / f"outbox-{self.device_id}.sqlite3"


class _Override(str):
    """A `--set` value: YAML-parsed unless the target field is a string, where it is taken as typed."""


# --- loading -------------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = (),
         environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (None: defaults only), apply overrides and environment secrets."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data, lines = _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        _put(data, key.strip().split("."), _Override(value), f"--set {item}")
        lines[key.strip()] = -1
    env = os.environ if environ is None else environ
    for name, dotted in (("MQTT_USERNAME", "mqtt.username"), ("MQTT_PASSWORD", "mqtt.password"),
                         ("REMOTE_API_KEY", "remote.api_key")):
        if env.get(ENV_PREFIX + name):
            _put(data, dotted.split("."), _Override(env[ENV_PREFIX + name]), ENV_PREFIX + name)
            lines[dotted] = -2
    cfg = _build(Config, data, "", _Where(source, lines))
    cfg.source = source
    _check(cfg)
    return cfg


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        data, lines = read_yaml(path, "config file")
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data, lines


def _put(data: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    for key in keys[:-1]:
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys)}: {key} is not a section")
        data = child
    data[keys[-1]] = value


@dataclass
class _Where:
    source: str
    lines: dict[str, int]

    def at(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        if line == -1:
            return f"--set {dotted}"
        if line == -2:
            return "environment"
        if line:
            return f"{self.source}, line {line}"
        return self.source


def _build(cls: type, data: Any, prefix: str, where: _Where) -> Any:
    """Turn a mapping into dataclass `cls`, checking keys, types and ranges."""
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "<top level>"
        raise ConfigError(f"{where.at(name)}: {name}: expected a mapping, got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            known = ", ".join(sorted(fields))
            moved = f"; it is now {RENAMED[dotted]}" if dotted in RENAMED else ""
            raise ConfigError(f"{where.at(dotted)}: unknown key {dotted!r}{moved} (known here: {known})")
    values = {}
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type, hint), value, dotted + ".", where)
        else:
            values[name] = _convert(value, hint, fields[name].metadata, dotted, where)
    return cls(**values)


def _convert(value: Any, hint: Any, meta: typing.Mapping[str, Any], dotted: str, where: _Where) -> Any:
    if isinstance(value, _Override):
        value = str(value) if hint is str else _parse_override(value, dotted)
    got = _coerce(value, hint)
    if got is _BAD:
        raise ConfigError(f"{where.at(dotted)}: {dotted}: expected {_describe(hint)}, got {show(value)}")
    lo, hi, pattern = meta.get("min"), meta.get("max"), meta.get("pattern")
    if isinstance(got, (int, float)) and not isinstance(got, bool) and (
        (lo is not None and got < lo) or (hi is not None and got > hi)
    ):
        raise ConfigError(f"{where.at(dotted)}: {dotted}: expected a value from {lo} to {hi}, got {got!r}")
    if pattern and isinstance(got, str) and not re.match(pattern, got):
        raise ConfigError(f"{where.at(dotted)}: {dotted}: {got!r} does not match {pattern}")
    return got


def _parse_override(value: str, dotted: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {dotted}: cannot parse value {value!r}") from None


_BAD = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` as type `hint`, or _BAD. Only lossless, unsurprising conversions."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value if value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)} \
            else _BAD
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            got = _coerce(value, option)
            if got is not _BAD:
                return got
        return _BAD
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return _BAD
        items = [_coerce(v, item) for v in value]
        return _BAD if any(i is _BAD for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok and abs(value) != float("inf") and value == value else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    return _BAD


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _describe(item))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# --- cross-field checks ------------------------------------------------------------------------------


def _check(cfg: Config) -> None:
    mqtt = cfg.mqtt
    if mqtt.reconnect_min > mqtt.reconnect_max:
        raise ConfigError(
            f"mqtt.reconnect_min ({mqtt.reconnect_min}) must not exceed mqtt.reconnect_max ({mqtt.reconnect_max})"
        )
    if cfg.model.n_ubatch > cfg.model.n_batch:
        raise ConfigError(f"model.n_ubatch ({cfg.model.n_ubatch}) must not exceed model.n_batch ({cfg.model.n_batch})")
    if cfg.model.max_tokens >= cfg.model.n_ctx:
        raise ConfigError(f"model.max_tokens ({cfg.model.max_tokens}) must be below model.n_ctx ({cfg.model.n_ctx})")
    if bool(mqtt.tls.cert_file) != bool(mqtt.tls.key_file):
        raise ConfigError("mqtt.tls.cert_file and mqtt.tls.key_file must be given together")
    if mqtt.password_file and not mqtt.password:
        mqtt.password = read_secret_file(mqtt.password_file, "mqtt.password_file")


def read_secret_file(path: str, key: str) -> str:
    """Read a secret from a file that only its owner may read (like ssh does for private keys)."""
    try:
        info = os.stat(path)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{key}: {path} is readable by others (mode {stat.filemode(info.st_mode)}); "
                              "chmod 600 it")
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from None


def default_path(environ: typing.Mapping[str, str] | None = None) -> Path | None:
    """The config file used when --config is not given: $GEMMA_AGENT_CONFIG, /etc, then ./config."""
    env = os.environ if environ is None else environ
    if env.get(ENV_PREFIX + "CONFIG"):
        return Path(env[ENV_PREFIX + "CONFIG"])
    for candidate in (Path("/etc/gemma-agent/agent.yaml"), Path("config/agent.yaml")):
        if candidate.is_file():
            return candidate
    return None


def available_cpus() -> int:
    """The CPUs this process may run on (what `n_threads: 0` means)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
