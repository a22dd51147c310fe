"""Our broker inside the test process, for tests that reach into it: a fault put
into the router, a store that answers when the test says, the console's
tracker fed events by hand.

``serving_in_thread``: the real ``serve`` on a thread with its own loop,
listening on a free loopback port (raw-socket clients talk to it).
``idle_broker``: a ``Broker`` that serves nothing (no listener, no loop
running), for code that only needs one to hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from hpfeeds3.broker.auth import Authenticator, build_authenticator
from hpfeeds3.broker.config import BrokerConfig, Endpoint
from hpfeeds3.broker.server import serve
from hpfeeds3.broker.state import Broker

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


@contextlib.contextmanager
def serving_in_thread(
    config: BrokerConfig,
    *,
    authenticator: Authenticator | None = None,
    backlog: int = 16,
    tls_pem: str | None = None,
) -> Iterator[tuple[Broker, int]]:
    """(the broker, its port) while ``serve(config)`` runs on a thread; stopped (and
    its thread joined) when the block ends. ``authenticator`` replaces the
    stores of ``config.auth``; with ``tls_pem`` (certificate and key) the port
    is a TLS listener."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        stop = holder["stop"] = asyncio.Event()

        def started(broker: Broker) -> None:
            holder["broker"] = broker
            ready.set()

        await serve(
            config,
            sockets=[(Endpoint("tls" if tls_pem else "tcp", "127.0.0.1", port, cert=tls_pem, key=tls_pem), sock)],
            stop=stop,
            started=started,
            authenticator=authenticator,
        )

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="broker", daemon=True)
    thread.start()
    try:
        assert ready.wait(START_TIMEOUT_S), "broker did not start"
        yield holder["broker"], port  # type: ignore[misc]
    finally:
        stop = holder.get("stop")
        if isinstance(stop, asyncio.Event):
            loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT_S)
        assert not thread.is_alive(), "the broker did not stop"
        loop.close()


def idle_broker(loop: asyncio.AbstractEventLoop) -> Broker:
    """A ``Broker`` with an empty ``env`` key store, on ``loop``, serving nothing."""
    return Broker(BrokerConfig(auth=("env",)), build_authenticator(("env",)), loop)
