"""Home Assistant MQTT discovery, device-based: one retained message on <discovery prefix>/device/<id>/config
declares the device and its components (`cmps`), sharing the daemon's availability topic.

Written to what Home Assistant's MQTT integration accepts (homeassistant/components/mqtt, 2026.2): `qos` is not
one of the options a device passes down to its components, so every component carries its own; a component for a
stage that is switched off is sent as `{"p": platform}`, which removes an entity announced earlier; every entity
gets a `default_entity_id` from the device id, so two boards never collide into `..._2` entities; sensors fed by
the health snapshot expire (`expire_after`) when a hung daemon stops publishing it.
"""

from __future__ import annotations

import re
from typing import Any

from agent.config import Config
from agent.contract.codes import EventType
from agent.contract.topics import Topics

EVENT_TYPES = [str(t) for t in EventType]  # every event_type we publish
QOS = 1


def discovery_topic(cfg: Config) -> str:
    return f"{cfg.homeassistant.discovery_prefix}/device/{cfg.device_id}/config"


def _health(topics: Topics, cfg: Config, template: str, **extra: Any) -> dict[str, Any]:
    """A sensor on the health snapshot: diagnostic, unavailable when three snapshots in a row do not come."""
    return {"stat_t": topics.health, "val_tpl": template, "ent_cat": "diagnostic",
            "exp_aft": int(3 * cfg.health.interval + 10), **extra}


def _only_if(on: bool, component: dict[str, Any]) -> dict[str, Any]:
    """The component when its stage is on, else only its platform (which removes it from Home Assistant)."""
    return component if on else {"p": component["p"]}


def components(cfg: Config, topics: Topics) -> dict[str, dict[str, Any]]:
    """Every component the agent can have: its config, or only its platform when its stage is switched off."""
    camera, microphone = cfg.camera.enabled, cfg.microphone.enabled
    mib = "{{ (%s / 1048576) | round(1) if %s is number else None }}"
    return {
        "last_response": {
            "p": "sensor", "name": "Last response", "icon": "mdi:robot", "stat_t": topics.response,
            "val_tpl": "{{ value_json.text[:255] }}", "json_attr_t": topics.response,
            "json_attr_tpl": "{{ {'text': value_json.text, 'id': value_json.id, 'source': value_json.source, "
                             "'stop': value_json.stop, 'latency_ms': value_json.latency_ms} | tojson }}",
        },
        "answer_latency": {
            "p": "sensor", "name": "Answer latency", "stat_t": topics.response,
            "val_tpl": "{{ value_json.latency_ms }}", "dev_cla": "duration", "unit_of_meas": "ms",
            "stat_cla": "measurement", "ent_cat": "diagnostic",
        },
        "first_token": {
            "p": "sensor", "name": "Time to first token", "stat_t": topics.response,
            "val_tpl": "{{ value_json.ttft_ms }}", "dev_cla": "duration", "unit_of_meas": "ms",
            "stat_cla": "measurement", "ent_cat": "diagnostic", "en": False,
        },
        "decode_speed": {
            "p": "sensor", "name": "Decode speed", "stat_t": topics.response, "val_tpl": "{{ value_json.decode_tps }}",
            "unit_of_meas": "tok/s", "stat_cla": "measurement", "ent_cat": "diagnostic", "en": False,
            "icon": "mdi:speedometer",
        },
        "events": {"p": "event", "name": "Events", "stat_t": topics.event, "evt_typ": EVENT_TYPES},
        "activity": {
            "p": "sensor", "name": "Activity", "stat_t": topics.health, "dev_cla": "enum",
            "val_tpl": "{{ 'busy' if value_json.stages.model == 'busy' else 'idle' }}", "options": ["idle", "busy"],
            "exp_aft": int(3 * cfg.health.interval + 10), "icon": "mdi:head-cog",
        },
        "prompt": {"p": "text", "name": "Prompt", "cmd_t": topics.ask, "max": 255, "icon": "mdi:chat-question"},
        "notify": {"p": "notify", "name": "Ask", "cmd_t": topics.ask},
        "describe": _only_if(camera, {"p": "button", "name": "Describe scene", "cmd_t": topics.describe,
                                      "pl_prs": "", "icon": "mdi:cctv"}),
        "listen": _only_if(microphone, {"p": "button", "name": "Listen", "cmd_t": topics.listen, "pl_prs": "",
                                        "icon": "mdi:microphone"}),
        "reset": {"p": "button", "name": "Reset conversation", "cmd_t": topics.reset, "pl_prs": "",
                  "icon": "mdi:restart"},
        "transcript": _only_if(microphone, {"p": "sensor", "name": "Last transcript", "stat_t": topics.transcript,
                                            "val_tpl": "{{ (value_json.text or '')[:255] }}",
                                            "icon": "mdi:account-voice"}),
        "motion": _only_if(camera and cfg.motion.enabled, {
            "p": "binary_sensor", "name": "Motion", "dev_cla": "motion", "stat_t": topics.event,
            "val_tpl": "{{ 'ON' if value_json.event_type == 'motion' else '' }}",
            "off_dly": max(1, round(cfg.motion.cooldown))}),
        "snapshot": _only_if(camera and cfg.camera.snapshot,
                             {"p": "camera", "name": "Snapshot", "t": topics.snapshot}),
        "problem": {"p": "binary_sensor", "name": "Problem", "dev_cla": "problem", "ent_cat": "diagnostic",
                    "stat_t": topics.health, "val_tpl": "{{ 'ON' if value_json.state != 'ok' else 'OFF' }}",
                    "json_attr_t": topics.health, "json_attr_tpl": "{{ {'problems': value_json.problems} | tojson }}",
                    "exp_aft": int(3 * cfg.health.interval + 10)},
        "health": _health(topics, cfg, "{{ value_json.state }}", p="sensor", name="Health",
                          json_attr_t=topics.health),
        "memory_used": _health(topics, cfg, mib % ("value_json.memory.rss", "value_json.memory.rss"), p="sensor",
                               name="Memory used", dev_cla="data_size", unit_of_meas="MiB", stat_cla="measurement"),
        "memory_limit": _health(topics, cfg, mib % ("value_json.memory.limit", "value_json.memory.limit"),
                                p="sensor", name="Memory limit", dev_cla="data_size", unit_of_meas="MiB", en=False),
        "queue_depth": _health(topics, cfg, "{{ value_json.queues.model }}", p="sensor", name="Queue depth",
                               stat_cla="measurement", en=False, icon="mdi:tray-full"),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")


def discovery_payload(cfg: Config, topics: Topics, version: str, model_name: str) -> dict[str, Any]:
    """The device and its components; every topic named here is one the daemon serves."""
    uid = f"gemma_agent_{cfg.device_id}"
    cmps: dict[str, dict[str, Any]] = {}
    for key, component in components(cfg, topics).items():
        if set(component) == {"p"}:  # switched off: removes the entity if an earlier discovery announced it
            cmps[key] = component
            continue
        platform = component["p"]
        cmps[key] = {**component, "uniq_id": f"{uid}_{key}", "qos": QOS,
                     "def_ent_id": f"{platform}.{_slug(cfg.device_id)}_{key}"}
    device: dict[str, Any] = {"ids": [uid], "name": cfg.device.name, "mf": "gemma-agent", "mdl": model_name,
                              "sw": version}
    if cfg.homeassistant.configuration_url:
        device["cu"] = cfg.homeassistant.configuration_url
    return {
        "dev": device,
        "o": {"name": "gemma-agent", "sw": version},
        "avty_t": topics.availability, "pl_avail": "online", "pl_not_avail": "offline",
        "cmps": cmps,
    }


def served_topics(payload: dict[str, Any]) -> set[str]:
    """Every topic a discovery payload names (for checking them against the daemon's contract)."""
    keys = ("stat_t", "json_attr_t", "cmd_t", "t", "avty_t")
    found = {payload[k] for k in keys if k in payload}
    for component in payload["cmps"].values():
        found |= {component[k] for k in keys if k in component}
    return found
