"""What the kernel knows of a connection's socket (sockinfo.py), on a real socket
accepted by an asyncio server that reads nothing, as a held-back connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from hpfeeds3.broker.sockinfo import bytes_waiting, peer_gone


async def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_bytes_waiting_then_the_peer_gone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

        class Unread(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.pause_reading()  # type: ignore[attr-defined]
                accepted.set_result(transport)  # type: ignore[arg-type]

        server = await loop.create_server(Unread, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        transport = await asyncio.wait_for(accepted, 5)
        try:
            assert not bytes_waiting(transport)
            assert not peer_gone(transport)
            client.sendall(b"\x00\x00\x00\x05\x02")
            assert await _eventually(lambda: bytes_waiting(transport))
            assert not peer_gone(transport)
            client.close()
            assert await _eventually(lambda: peer_gone(transport))
        finally:
            client.close()
            transport.abort()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_lost_connection_has_nothing_waiting_and_is_not_gone() -> None:
    """Once lost the connection's transport is None: nothing is known, nothing is acted on."""
    assert not bytes_waiting(None)
    assert not peer_gone(None)
