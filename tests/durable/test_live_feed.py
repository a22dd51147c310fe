"""A durable connection that has caught up, fed as the writer writes: inside the broker.

Under load one loop turn handles many reads (libuv reads a socket up to 32 times
per poll, 256 KiB each): a durable connection fed only when the writer's
``on_written`` reaches the loop would get a turn's publishes a turn late, and the
publishers' in-flight window filled with what waited for the turn to end. These
tests run the broker's loop in a thread and hold one turn themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hpfeeds3.broker.config import BrokerConfig
from hpfeeds3.broker.state import Broker
from hpfeeds3.protocol import encode_publish

from ..support.broker import RawClient
from ..support.inprocess import serving_in_thread

T = TypeVar("T")
CHANNEL = b"c"


def durable_config(tmp_path: Path) -> BrokerConfig:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "alice": {"owner": "o", "secret": "a", "pubchans": ["c"], "subchans": ["c"]},
                "col": {"owner": "o", "secret": "c", "pubchans": [], "subchans": ["c"], "durable": True},
            }
        )
    )
    return BrokerConfig(auth=(str(keys),), data_dir=str(tmp_path / "data"), durable=True)


def frames(first: int, count: int) -> bytes:
    return b"".join(encode_publish(b"alice", CHANNEL, b"%08d" % i) for i in range(first, first + count))


def on_loop(broker: Broker, call: Callable[[], T], timeout: float = 10.0) -> T:
    """``call()`` run on the broker's loop, inside one callback: one loop turn, held."""

    async def run() -> T:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), broker.loop).result(timeout)


def wait_until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def caught_up_feed(broker: Broker) -> object:
    """The durable connection of "col", once its feed follows CHANNEL and has caught up."""

    def ready() -> bool:
        conn = broker.feeds.get("col")
        return conn is not None and conn.feed is not None and conn.feed.channels == (CHANNEL,) and conn.feed.live

    wait_until(ready)
    return broker.feeds["col"]


def test_a_caught_up_durable_connection_gets_what_was_written_at_the_next_publish_of_the_same_turn(
    tmp_path: Path,
) -> None:
    with serving_in_thread(durable_config(tmp_path)) as (broker, port), RawClient(port) as col:
        col.auth("col", "c")
        col.subscribe("c")
        conn = caught_up_feed(broker)
        durable = broker.durable
        assert durable is not None
        first = frames(0, 10)

        def one_turn() -> int:
            broker.publish(CHANNEL, first, 10)
            # The writer thread writes it (its on_written waits for a later turn: this
            # one is held); then more comes in, in the same turn.
            wait_until(lambda: durable.written(CHANNEL) >= 10)
            before = conn.sent_bytes  # type: ignore[attr-defined]
            broker.publish(CHANNEL, frames(10, 10), 10)
            return int(conn.sent_bytes - before)  # type: ignore[attr-defined]

        # (the second run too when the writer was quick: never less than the first)
        assert on_loop(broker, one_turn) >= len(first)
        assert [m.payload for m in col.messages(20)] == [b"%08d" % i for i in range(20)]
