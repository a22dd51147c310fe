"""Our client with the reference Python clients (PyPI hpfeeds 3.1.0, in its own venv)."""

from __future__ import annotations

import ast
import asyncio
import threading

from hpfeeds3.client import BlockingClient, Message
from tests.client.brokers import TESTER, client_for
from tests.support.reference import Broker, run_reference_python

TIMEOUT_S = 20.0
BINARY = bytes(range(256))

REFERENCE_BLOCKING_PUBLISHER = """
import sys, hpfeeds
host, port, ident, secret, channel = sys.argv[1:6]
hpc = hpfeeds.new(host, int(port), ident, secret)
hpc.publish(channel, b"from the reference")
hpc.publish(channel, bytes(range(256)))
print(hpc.wait(0.3))  # None unless the broker sent an ERROR
hpc.close()
"""

REFERENCE_ASYNCIO_SUBSCRIBER = """
import asyncio, sys
from hpfeeds.asyncio import ClientSession
host, port, ident, secret, channel = sys.argv[1:6]

async def main():
    async with ClientSession(host, int(port), ident, secret) as session:
        session.subscribe(channel)
        print(repr(await session.read()), flush=True)

asyncio.run(asyncio.wait_for(main(), 15))
"""


def test_reference_blocking_client_publishes_to_our_client(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> list[Message]:
        async with client_for(plain_broker) as sub:
            await sub.subscribe(channel)
            await sub.wait_ready(0.2)
            args = [plain_broker.host, str(plain_broker.port), *TESTER, channel]
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, lambda: run_reference_python(REFERENCE_BLOCKING_PUBLISHER, args))
            assert result.returncode == 0 and result.stdout.strip() == b"None", result
            async with asyncio.timeout(TIMEOUT_S):
                return [await sub.__anext__(), await sub.__anext__()]

    assert asyncio.run(scenario()) == [
        Message("tester", channel, b"from the reference"),
        Message("tester", channel, BINARY),
    ]


def test_our_blocking_client_publishes_to_the_reference_asyncio_client(plain_broker: Broker, channel: str) -> None:
    stop = threading.Event()
    with BlockingClient(plain_broker.host, plain_broker.port, *TESTER) as pub:

        def keep_publishing() -> None:
            # The reference subscriber says nothing once subscribed: publish
            # until it has read one message and exited.
            while not stop.wait(0.1):
                pub.publish(channel, BINARY)

        publisher = threading.Thread(target=keep_publishing)
        publisher.start()
        try:
            args = [plain_broker.host, str(plain_broker.port), *TESTER, channel]
            result = run_reference_python(REFERENCE_ASYNCIO_SUBSCRIBER, args, timeout_s=TIMEOUT_S)
        finally:
            stop.set()
            publisher.join(TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode()
    assert ast.literal_eval(result.stdout.decode().strip()) == ("tester", channel, BINARY)
