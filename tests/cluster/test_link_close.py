"""Stopping the cluster link while NATS is unreachable ends every task of it,
whenever the stop lands in the connection attempts (a task left running keeps
the broker process from exiting: asyncio.run waits for it for ever)."""

from __future__ import annotations

import asyncio

import uvloop

from hpfeeds3.broker.backplane.nats import NatsBackplane
from hpfeeds3.protocol.frames import FrameLimits
from tests.support.broker import free_port


def test_close_ends_the_link_tasks_at_any_point_of_an_unreachable_connect() -> None:
    async def cycles() -> list[int]:
        left_running = []
        refused = f"nats://127.0.0.1:{free_port()}"
        for i in range(300):
            backplane = NatsBackplane([refused], lambda *_: None, limits=FrameLimits())
            await backplane.start()
            # 0 to 3 ms in 50 µs steps: some stops land as a refused attempt
            # completes, where asyncio.wait_for (3.11) swallows a cancellation.
            await asyncio.sleep((i % 60) * 0.00005)
            await backplane.close()
            if not all(t.done() for t in backplane._tasks):
                left_running.append(i)
            for t in backplane._tasks:  # let the next cycle start clean
                t.cancel()
        return left_running

    assert uvloop.run(asyncio.wait_for(cycles(), 600)) == []  # the broker's loop
