"""What Home Assistant's MQTT integration accepts in a device discovery payload, and what its entities make of the
messages they receive: the rules of homeassistant/components/mqtt (2026.2.3: schemas.py, discovery.py,
abbreviations.py and each platform's module) that the agent's discovery relies on, written down so a test fails
where Home Assistant would refuse a component or quietly run it at QoS 0.

`render` applies a component's value template the way Home Assistant does (Jinja), so a test reads an entity's
state from a real message as Home Assistant would.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

# options each platform takes (abbreviated as the agent writes them); anything else is a typo Home Assistant drops
COMMON = {"p", "name", "uniq_id", "qos", "def_ent_id", "icon", "ent_cat", "en", "json_attr_t", "json_attr_tpl"}
PLATFORMS: dict[str, tuple[set[str], set[str]]] = {  # platform -> (required, also allowed)
    "sensor": ({"stat_t"}, {"val_tpl", "dev_cla", "unit_of_meas", "stat_cla", "exp_aft", "options"}),
    "binary_sensor": ({"stat_t"}, {"val_tpl", "dev_cla", "exp_aft", "off_dly", "pl_on", "pl_off"}),
    "event": ({"stat_t", "evt_typ"}, {"val_tpl", "dev_cla"}),
    "button": ({"cmd_t"}, {"pl_prs", "dev_cla"}),
    "text": ({"cmd_t"}, {"max", "min", "mode", "stat_t"}),
    "notify": ({"cmd_t"}, set()),
    "camera": ({"t"}, {"img_e"}),
}
SHARED = {"avty", "avty_mode", "avty_tpl", "avty_t", "cmd_t", "pl_avail", "pl_not_avail", "stat_t"}  # SHARED_OPTIONS
UNITS = {"duration": {"ms", "s", "min", "h", "d"}, "data_size": {"B", "kB", "MB", "GB", "KiB", "MiB", "GiB"}}


def problems(payload: dict[str, Any]) -> list[str]:
    """Everything about a device discovery payload Home Assistant would refuse or handle differently than meant."""
    out: list[str] = []
    for key in ("dev", "o", "cmps"):  # DEVICE_DISCOVERY_SCHEMA: all three required
        if key not in payload:
            out.append(f"missing {key}")
    if not payload.get("dev", {}).get("ids"):
        out.append("dev needs identifiers")
    if "name" not in payload.get("o", {}):
        out.append("o needs a name")
    for key, component in payload.get("cmps", {}).items():
        platform = component.get("p")
        if platform not in PLATFORMS:
            out.append(f"{key}: unknown platform {platform!r}")
            continue
        if set(component) == {"p"}:  # removes the entity (discovery.py: an empty payload after popping p)
            continue
        required, allowed = PLATFORMS[platform]
        # inherited from the device level (only SHARED_OPTIONS are)
        present = set(component) | {k for k in SHARED if k in payload}
        out += [f"{key}: {platform} needs {r}" for r in sorted(required - present)]
        out += [f"{key}: {platform} does not take {k}" for k in sorted(set(component) - allowed - COMMON - required)]
        if component.get("qos") != 1:  # qos is not a shared option: without it the entity runs at QoS 0
            out.append(f"{key}: qos {component.get('qos')!r}, not 1")
        if "uniq_id" not in component:
            out.append(f"{key}: no uniq_id")
        entity_id = component.get("def_ent_id", "")
        if not re.fullmatch(rf"{platform}\.[a-z0-9_]+", entity_id):
            out.append(f"{key}: default_entity_id {entity_id!r} is not {platform}.<slug>")
        for int_key in ("exp_aft", "off_dly"):
            if int_key in component and not (isinstance(component[int_key], int) and component[int_key] > 0):
                out.append(f"{key}: {int_key} must be a positive integer")
        unit, device_class = component.get("unit_of_meas"), component.get("dev_cla")
        if unit and device_class in UNITS and unit not in UNITS[device_class]:
            out.append(f"{key}: unit {unit} is not one of {device_class}'s")
        if "options" in component and device_class != "enum":
            out.append(f"{key}: options need device_class enum")
        if component.get("ent_cat") not in (None, "diagnostic", "config"):
            out.append(f"{key}: entity_category {component['ent_cat']!r}")
    return out


_ENV = ImmutableSandboxedEnvironment()


def render(template: str, payload: bytes | bytearray) -> str:
    """A value template applied to a received payload, as Home Assistant's MQTT entities apply it."""
    text = payload.decode()
    try:
        value_json: Any = json.loads(text)
    except ValueError:
        value_json = None
    return str(_ENV.from_string(template).render(value=text, value_json=value_json)).strip()


def sensor_state(component: dict[str, Any], payload: bytes | bytearray) -> str | None:
    """The state a sensor / binary_sensor shows after `payload` (None: unchanged; "unknown": HA's None)."""
    rendered = render(component.get("val_tpl", "{{ value }}"), payload)
    if component["p"] == "binary_sensor":
        if not rendered:
            return None  # "No output from template, ignore"
        if rendered == "None":
            return "unknown"
        assert rendered in (component.get("pl_on", "ON"), component.get("pl_off", "OFF")), rendered
        return rendered
    return "unknown" if rendered == "None" else rendered
