"""Home Assistant MQTT discovery, device-based: one retained message on <discovery prefix>/device/<id>/config
declares the device and all its entities (`cmps`), sharing the daemon's availability topic."""

from __future__ import annotations

from typing import Any

from agent.config import Config
from agent.contract.codes import EventType
from agent.contract.topics import Topics

EVENT_TYPES = [str(t) for t in EventType]  # every event_type we publish


def discovery_topic(cfg: Config) -> str:
    return f"{cfg.homeassistant.discovery_prefix}/device/{cfg.device_id}/config"


def discovery_payload(cfg: Config, topics: Topics, version: str, model_name: str) -> dict[str, Any]:
    """The device and its components; every topic named here is one the daemon serves."""
    uid = f"gemma_agent_{cfg.device_id}"
    components: dict[str, dict[str, Any]] = {
        "last_response": {
            "p": "sensor", "name": "Last response", "uniq_id": f"{uid}_last_response", "icon": "mdi:robot",
            "stat_t": topics.response, "val_tpl": "{{ value_json.text[:255] }}",
            "json_attr_t": topics.response,
            "json_attr_tpl": "{{ {'text': value_json.text, 'id': value_json.id, 'source': value_json.source, "
                             "'stop': value_json.stop, 'latency_ms': value_json.latency_ms} | tojson }}",
        },
        "events": {
            "p": "event", "name": "Events", "uniq_id": f"{uid}_events", "stat_t": topics.event,
            "evt_typ": EVENT_TYPES,
        },
        "prompt": {
            "p": "text", "name": "Prompt", "uniq_id": f"{uid}_prompt", "cmd_t": topics.ask, "max": 255,
            "icon": "mdi:chat-question",
        },
        "notify": {"p": "notify", "name": "Ask", "uniq_id": f"{uid}_notify", "cmd_t": topics.ask},
        "describe": {
            "p": "button", "name": "Describe scene", "uniq_id": f"{uid}_describe", "cmd_t": topics.describe,
            "pl_prs": "", "icon": "mdi:cctv",
        },
        "reset": {
            "p": "button", "name": "Reset conversation", "uniq_id": f"{uid}_reset", "cmd_t": topics.reset,
            "pl_prs": "", "icon": "mdi:restart",
        },
        "health": {
            "p": "sensor", "name": "Health", "uniq_id": f"{uid}_health", "ent_cat": "diagnostic",
            "stat_t": topics.health, "val_tpl": "{{ value_json.state }}", "json_attr_t": topics.health,
        },
    }
    if cfg.homeassistant.camera_entity:
        components["snapshot"] = {"p": "camera", "name": "Snapshot", "uniq_id": f"{uid}_snapshot",
                                  "t": topics.snapshot}
    return {
        "dev": {"ids": [uid], "name": cfg.device.name, "mf": "gemma-agent", "mdl": model_name, "sw": version},
        "o": {"name": "gemma-agent", "sw": version},
        "avty_t": topics.availability, "pl_avail": "online", "pl_not_avail": "offline",
        "qos": 1,
        "cmps": components,
    }


def served_topics(payload: dict[str, Any]) -> set[str]:
    """Every topic a discovery payload names (for checking them against the daemon's contract)."""
    keys = ("stat_t", "json_attr_t", "cmd_t", "t", "avty_t")
    found = {payload[k] for k in keys if k in payload}
    for component in payload["cmps"].values():
        found |= {component[k] for k in keys if k in component}
    return found
