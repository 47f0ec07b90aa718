"""Rate limits: token buckets (fake clock), and over MQTT against a real daemon: excess asks are answered with
`rate_limited`, other senders are still served, the queue stays bounded; remote system prompts are refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.turns.ratelimit import MAX_SENDERS, RateLimiter
from tests.support.daemon import DaemonProcess
from tests.support.mqtt import Broker, Client, payload_json


@pytest.mark.fast
def test_buckets_refill_over_time_and_bound_each_sender() -> None:
    now = [0.0]
    limiter = RateLimiter(global_per_minute=10, sender_per_minute=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another sender has its own budget ...
    for n in range(6):
        limiter.allow(f"s{n}")
    assert not limiter.allow("c")  # ... but the global budget (10) is spent
    now[0] += 20.0  # 20 s refill 1 per sender (3/min) and 3 globally (10/min)
    assert limiter.allow("a") and not limiter.allow("a")
    assert limiter.refused == 3  # a's 4th, c, a's second after the refill


@pytest.mark.fast
def test_zero_is_no_limit_refills_are_partial_and_capped_and_the_oldest_sender_is_forgotten() -> None:
    now = [0.0]
    free = RateLimiter(global_per_minute=0, sender_per_minute=0, clock=lambda: now[0])
    assert all(free.allow("x") for _ in range(500)) and free.refused == 0
    limiter = RateLimiter(global_per_minute=0, sender_per_minute=1, clock=lambda: now[0])
    assert limiter.allow("old") and not limiter.allow("old")
    for n in range(MAX_SENDERS):  # "old" becomes the least recently seen, and is pushed out ...
        assert limiter.allow(f"s{n}")
    assert limiter.allow("old")  # ... so it starts afresh
    now[0] += 30.0  # half a token (1 per minute)
    assert not limiter.allow("s7")
    now[0] += 30.0  # the other half
    assert limiter.allow("s7")
    now[0] += 3600.0  # an hour idle refills one token, not sixty
    assert limiter.allow("s8") and not limiter.allow("s8")
    assert limiter.refused == 3
    shared = RateLimiter(global_per_minute=2, sender_per_minute=0, clock=lambda: now[0])
    assert [shared.allow(f"any{n}") for n in range(3)] == [True, True, False]


@pytest.mark.fast
def test_sender_table_stays_bounded() -> None:
    limiter = RateLimiter(global_per_minute=0, sender_per_minute=1)
    for n in range(MAX_SENDERS * 3):
        limiter.allow(f"sender-{n}")
    assert len(limiter._senders) == MAX_SENDERS


def test_flooding_sender_is_limited_others_are_served(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m, "limits.asks_per_minute=100", "limits.sender_asks_per_minute=3",
                           "model.max_tokens=4", "model.queue_size=4")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    for n in range(12):
        client.publish(f"{daemon.base}/ask", {"id": f"flood-{n}", "sender": "spammer", "text": "Hi!"})
    client.publish(f"{daemon.base}/ask", {"id": "polite", "sender": "kitchen", "text": "Hello."})
    client.wait_for(f"{daemon.base}/response", lambda m: payload_json(m)["id"] == "polite")
    limited = client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["error"] == "rate_limited", count=9)
    assert {payload_json(m)["id"] for m in limited} == {f"flood-{n}" for n in range(3, 12)}
    deadline = time.monotonic() + 60
    while len([m for m in client.on(f"{daemon.base}/response") if payload_json(m)["id"].startswith("flood")]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    health = payload_json(client.wait_for(f"{daemon.base}/health")[-1])
    assert health["queues"]["model"] <= 4
    daemon.stop()
    client.close()


def test_remote_system_prompt_needs_permission(broker: Broker, gemma270m: Path) -> None:
    daemon = DaemonProcess(broker.port, gemma270m, "model.max_tokens=24")
    client = Client(broker.port)
    client.subscribe(f"{daemon.base}/#")
    daemon.start(client)
    client.publish(f"{daemon.base}/ask", {"id": "sys", "text": "Who are you?", "system": "You are a pirate."})
    body = payload_json(client.wait_for(f"{daemon.base}/error", lambda m: payload_json(m)["id"] == "sys")[0])
    assert body["error"] == "forbidden_field" and "allow_remote_system_prompt" in body["detail"]
    daemon.stop()
    allowed = DaemonProcess(broker.port, gemma270m, "model.max_tokens=24", "model.temperature=0",
                            "mqtt.allow_remote_system_prompt=true")
    client.subscribe(f"{allowed.base}/#")
    allowed.start(client)
    client.publish(f"{allowed.base}/ask", {"id": "sys2", "text": "Who are you?", "system": "Zebras are purple."})
    reply = payload_json(client.wait_for(f"{allowed.base}/response", lambda m: payload_json(m)["id"] == "sys2")[0])
    assert reply["text"]
    allowed.stop()
    client.close()
