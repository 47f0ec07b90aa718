"""A loopback MQTT broker for `gemma-agent demo` where mosquitto is not installed: amqtt (pure Python).

Usage: python -m agent.cli.demo_broker PORT. Anonymous, 127.0.0.1 only, runs until terminated.
"""

from __future__ import annotations

import asyncio
import signal
import sys


async def serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
