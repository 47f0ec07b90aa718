"""Config loading: the documented default file, every error kind naming key and line, overrides, secrets."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.config import Config, ConfigError, load
from tests.support.paths import ROOT, run_agent

pytestmark = pytest.mark.fast

DEFAULT_YAML = ROOT / "config" / "agent.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_documented_default_file_equals_the_built_in_defaults() -> None:
    loaded = load(DEFAULT_YAML, environ={})
    loaded.source = Config().source
    assert loaded == Config()


def test_every_key_in_the_default_file_is_commented() -> None:
    for number, line in enumerate(DEFAULT_YAML.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") and "system_prompt" not in line:
            assert "#" in line, f"config/agent.yaml line {number} has no comment: {line!r}"


def test_every_dataclass_field_appears_in_the_default_file() -> None:
    text = DEFAULT_YAML.read_text()

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            assert f"{f.name}:" in text, f"{prefix}{f.name} is not documented in config/agent.yaml"
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):  # nested section
                walk(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]

    walk(Config, "")


def test_unknown_key_names_dotted_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_ctx: 1024\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    message = str(err.value)
    assert "model.temprature" in message and "line 3" in message and "temperature" in message


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2: unknown key 'modle'"):
        load(write(tmp_path, "# hi\nmodle:\n  n_ctx: 1\n"), environ={})


def test_wrong_type_names_key_expected_and_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "mqtt:\n  port: eighteen\n"), environ={})
    assert str(err.value) == f"{tmp_path / 'agent.yaml'}, line 2: mqtt.port: expected an integer, got 'eighteen' (str)"


def test_out_of_range_names_key_range_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2: model.top_p: expected a value from 0.0 to 1.0, got 1.5"):
        load(write(tmp_path, "model:\n  top_p: 1.5\n"), environ={})


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("model.n_ctx: expected an integer, got True")):
        load(write(tmp_path, "model:\n  n_ctx: yes\n"), environ={})


def test_choice_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"camera.input_size: expected one of 256, 512, 768, got 300"):
        load(write(tmp_path, "camera:\n  input_size: 300\n"), environ={})


def test_section_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 1: mqtt: expected a mapping"):
        load(write(tmp_path, "mqtt: 5\n"), environ={})


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3, column 10: mapping values"):
        load(write(tmp_path, "model:\n  n_ctx: 1024\n  path: a: b\n"), environ={})
    with pytest.raises(ConfigError, match=r"at line 4, column 1: .* \(while parsing a flow sequence at line 3, "):
        load(write(tmp_path, "model:\n  n_ctx: 1024\n  path: [unclosed\n"), environ={})


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(write(tmp_path, "- a\n- b\n"), environ={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load("/nonexistent/agent.yaml", environ={})


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "# nothing\n"), environ={}).model == Config().model


def test_overrides_are_typed_by_their_field(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "model:\n  n_ctx: 1024\n"),
               ["model.n_ctx=4096", "model.temperature=0", "mqtt.password=12345", "device.id=kitchen",
                "camera.source=0", "mqtt.tls.enabled=true"], environ={})
    assert cfg.model.n_ctx == 4096 and cfg.model.temperature == 0.0
    assert cfg.mqtt.password == "12345" and cfg.device_id == "kitchen"
    assert cfg.camera.source == 0 and cfg.mqtt.tls.enabled is True


def test_override_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--set model.n_ctx: model.n_ctx: expected an integer"):
        load(None, ["model.n_ctx=big"], environ={})
    with pytest.raises(ConfigError, match=r"--set model.nctx: unknown key 'model.nctx'"):
        load(None, ["model.nctx=1"], environ={})
    with pytest.raises(ConfigError, match=re.escape("expected dotted.key=value")):
        load(None, ["model.n_ctx"], environ={})


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.max_tokens")):
        load(None, ["model.n_ctx=512", "model.max_tokens=600"], environ={})
    with pytest.raises(ConfigError, match=re.escape("cert_file and mqtt.tls.key_file")):
        load(None, ["mqtt.tls.cert_file=/x.pem"], environ={})


def test_secrets_from_environment() -> None:
    cfg = load(None, environ={"GEMMA_AGENT_MQTT_USERNAME": "agent", "GEMMA_AGENT_MQTT_PASSWORD": "s3cret"})
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("agent", "s3cret")


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load(None, [f"mqtt.password_file={secret}"], environ={})
    secret.chmod(0o600)
    assert load(None, [f"mqtt.password_file={secret}"], environ={}).mqtt.password == "hunter2"


def test_device_id_pattern_and_derivation() -> None:
    with pytest.raises(ConfigError, match=re.escape("device.id")):
        load(None, ["device.id=living room/+"], environ={})
    derived = load(None, environ={}).device_id
    assert derived and all(c.isalnum() or c in "_-" for c in derived)


def test_default_path_prefers_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert config_mod.default_path({"GEMMA_AGENT_CONFIG": str(path)}) == path


def test_config_search_order_after_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$GEMMA_AGENT_CONFIG, then /etc/gemma-agent/agent.yaml (absent on this machine), then ./config/agent.yaml,
    then none (the built-in defaults)."""
    assert not Path("/etc/gemma-agent/agent.yaml").exists()
    monkeypatch.chdir(tmp_path)
    assert config_mod.default_path({}) is None
    assert config_mod.default_path({"GEMMA_AGENT_CONFIG": ""}) is None  # set but empty: not a path
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "agent.yaml").mkdir()  # a directory of that name is not a config file
    assert config_mod.default_path({}) is None
    (tmp_path / "config" / "agent.yaml").rmdir()
    (tmp_path / "config" / "agent.yaml").write_text("")
    assert config_mod.default_path({}) == Path("config/agent.yaml")
    assert config_mod.default_path({"GEMMA_AGENT_CONFIG": "/x.yaml"}) == Path("/x.yaml")


def test_the_outbox_lives_in_the_state_directory(tmp_path: Path) -> None:
    cfg = load(None, ["device.id=porch"], environ={})
    assert cfg.outbox_path({"STATE_DIRECTORY": "/var/lib/gemma-agent:/var/lib/other"}) == \
        Path("/var/lib/gemma-agent/outbox-porch.sqlite3")  # systemd's first StateDirectory=
    assert cfg.outbox_path({}) == Path.home() / ".local/state/gemma-agent/outbox-porch.sqlite3"
    assert cfg.outbox_path({"STATE_DIRECTORY": ""}) == Path.home() / ".local/state/gemma-agent/outbox-porch.sqlite3"
    chosen = load(None, [f"outbox.path={tmp_path / 'box.db'}"], environ={})
    assert chosen.outbox_path({"STATE_DIRECTORY": "/var/lib/gemma-agent"}) == tmp_path / "box.db"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("model:\n  bogus: 1\n", "unknown key 'model.bogus'"),
        ("model:\n  n_ctx: many\n", "model.n_ctx: expected an integer"),
        ("model:\n  n_ctx: 64\n", "model.n_ctx: expected a value from 256"),
        ("model: [\n", "malformed YAML at line"),
    ],
)
def test_cli_exits_78_with_one_clear_line(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = write(tmp_path, yaml_text)
    proc = run_agent("--config", str(path), "check", timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 78
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_a_key_that_moved_says_where_it_went(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("vision:\n  keep_loaded: false\n")
    with pytest.raises(ConfigError, match=r"line 2: unknown key 'vision.keep_loaded'; it is now memory.projector"):
        load(path)


def test_projector_lifetime_is_one_key() -> None:
    assert load(None, ["memory.projector=on_demand"]).memory.projector_idle_release is None
    idle = load(None, ["memory.projector=300"]).memory
    assert idle.projector == 300.0 and idle.projector_idle_release == 300.0
    with pytest.raises(ConfigError, match=r"memory\.projector"):
        load(None, ["memory.projector=sometimes"])
    with pytest.raises(ConfigError, match=r"from 1\.0 to 86400\.0"):
        load(None, ["memory.projector=0"])


@pytest.mark.parametrize(("setting", "expected"), [
    ("camera.enabled=3", "camera.enabled: expected true or false, got 3 (int)"),
    ("model.n_ctx=big", "model.n_ctx: expected an integer, got 'big' (str)"),
    ("model.top_p=true", "model.top_p: expected a number, got True (bool)"),
    ("model.temperature=.nan", "model.temperature: expected a number, got nan (float)"),
    ("camera.source=[1]", "camera.source: expected an integer or a string, got [1] (list)"),
    ("listen.wake_phrases=[1, 2]", "listen.wake_phrases: expected a list of strings, got [1, 2] (list)"),
    ("memory.projector=fast", "memory.projector: expected one of 'auto', 'resident', 'on_demand' or a number, got "
                              "'fast' (str)"),
    ("camera.input_size=300", "camera.input_size: expected one of 256, 512, 768, got 300 (int)"),
    ("memory.repack=1", "memory.repack: expected one of 'auto' or true or false, got 1 (int)"),
])
def test_a_wrong_type_is_named_with_what_was_expected(setting: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [setting], environ={})
    assert str(caught.value) == f"--set {setting.split('=')[0]}: {expected}"


def test_a_list_setting_is_taken_whole() -> None:
    assert load(None, ["listen.wake_phrases=[hey board, hello board]"], environ={}).listen.wake_phrases == \
        ["hey board", "hello board"]


@pytest.mark.parametrize(("yaml_text", "overrides", "expected"), [
    ("- a\n- b\n", [], "{path}: the top level must be a mapping of sections, got list"),
    ("model: 5\n", ["model.n_ctx=1"], "--set model.n_ctx=1: model.n_ctx: model is not a section"),
    ("mqtt: 5\n", [], "{path}, line 1: mqtt: expected a mapping, got 5 (int)"),
    ("vision:\n  keep_loaded: true\n", [], "{path}, line 2: unknown key 'vision.keep_loaded'; it is now "
     "memory.projector (known here: attach, describe_prompt, max_frame_age, motion_cooldown, motion_describe, "
     "prepare, ready_after)"),
    ("", ["model.top_p=1.01"], "--set model.top_p: model.top_p: expected a value from 0.0 to 1.0, got 1.01"),
    ("", ["device.id=living room/+"], "--set device.id: device.id: 'living room/+' does not match "
     "^$|^[A-Za-z0-9_-]{{1,64}}$"),
    ("", ["model.n_ctx=[unclosed"], "--set model.n_ctx: cannot parse value '[unclosed'"),
    ("", ["model.seed="], "--set model.seed: model.seed: expected an integer, got '' (str)"),
    ("", ["model.temperature=.inf"], "--set model.temperature: model.temperature: expected a number, got inf (float)"),
    ("", ["mqtt.reconnect_min=6", "mqtt.reconnect_max=5"],
     "mqtt.reconnect_min (6.0) must not exceed mqtt.reconnect_max (5.0)"),
    ("", ["model.n_ubatch=1024", "model.n_batch=512"], "model.n_ubatch (1024) must not exceed model.n_batch (512)"),
    ("", ["model.max_tokens=2048"], "model.max_tokens (2048) must be below model.n_ctx (2048)"),
    ("", ["mqtt.tls.key_file=/k.pem"], "mqtt.tls.cert_file and mqtt.tls.key_file must be given together"),
])
def test_each_config_error_reads_exactly(tmp_path: Path, yaml_text: str, overrides: list[str],
                                         expected: str) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as caught:
        load(path, overrides, environ={})
    assert str(caught.value) == expected.format(path=path)


def test_the_edges_of_ranges_and_cross_checks_are_allowed(tmp_path: Path) -> None:
    cfg = load(None, ["model.top_p=1.0", "model.top_p=0.0", "mqtt.reconnect_min=5", "mqtt.reconnect_max=5",
                      "model.n_ubatch=512", "model.n_batch=512", "model.max_tokens=2047"], environ={})
    assert (cfg.model.top_p, cfg.mqtt.reconnect_min, cfg.model.max_tokens) == (0.0, 5.0, 2047)
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        load(None, [f"mqtt.password_file={secret}"], environ={})
    assert str(caught.value) == f"mqtt.password_file: {secret} is readable by others (mode -rw-r--r--); chmod 600 it"
