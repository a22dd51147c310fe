"""How long the console's views take, and stall the event loop, with 10,000 connections.

Not a test (CI asserts no speed): ``python -m tests.console.scale``. The
connections are stand-ins holding what the views read (ident, peer, owner,
publish counters); the broker state, tracker and handlers are the real ones.
Prints, per view, the time to answer and the longest time the loop went
without a turn while answering.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import make_mocked_request

from hpfeeds3.broker.admin.api import Console
from hpfeeds3.broker.admin.tokens import TokenFile, generate_token, hash_token
from hpfeeds3.broker.metrics import PublishStats
from tests.support.inprocess import idle_broker

CONNECTIONS = 10_000


class StandIn:
    transport = None
    owner = "ops"
    received_bytes = sent_bytes = 0
    subscriptions: frozenset[bytes] = frozenset()

    def __init__(self, i: int) -> None:
        self.ident = f"sensor-{i}"
        self.peer = f"10.0.{i // 256}.{i % 256}:5000"
        self.publish_stats = {b"cowrie.sessions": PublishStats(), b"dionaea.capture": PublishStats()}

    def write_buffer_size(self) -> int:
        return 0


async def main() -> None:
    broker = idle_broker(asyncio.get_running_loop())
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"a admin sha256:{hash_token(generate_token())}\n")
        console = Console(broker, TokenFile(str(tokens)), secure_cookie=False)
    conns = [StandIn(i) for i in range(CONNECTIONS)]
    broker.connections.update(conns)  # type: ignore[arg-type]
    await console.tracker.poll()
    for c in conns:
        for st in c.publish_stats.values():
            st.count += 3
    await console.tracker.poll()
    gc.collect()
    gc.freeze()  # as the broker does once started

    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    views = {
        "/api/v1/sensors?sort=-last_5m": console.sensors,
        "/api/v1/connections": console.connections,
        "/api/v1/channels": console.channels,
    }
    for _ in range(2):
        for path, handler in views.items():
            await asyncio.sleep(0.05)
            gaps.clear()
            t0 = time.perf_counter()
            response = await handler(make_mocked_request("GET", path))
            total = time.perf_counter() - t0
            size = len(response.body)  # type: ignore[attr-defined]
            print(f"{path}: {total * 1e3:.0f} ms, longest stall {max(gaps) * 1e3:.1f} ms, {size / 1e3:.0f} kB")
    done.set()
    await task


if __name__ == "__main__":
    asyncio.run(main())
