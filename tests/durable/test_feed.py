"""DurableFeed's pacing on a real log: what one loop turn writes."""

from __future__ import annotations

from pathlib import Path

from hpfeeds3.broker.durable import DurableConfig, SegmentLog
from hpfeeds3.broker.durable.feed import CHUNK_BYTES, PUMP_BYTES, DurableFeed, FeedStats
from hpfeeds3.broker.durable.tcpack import CloseKind, SocketLike

from .test_segments import CHANNEL, append_run, numbers

MiB = 1024 * 1024


class Sink:
    """A connection that takes everything (a collector faster than the broker)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def feed_writable(self) -> bool:
        return True

    def feed_socket(self) -> SocketLike | None:
        return None

    def feed_buffered(self) -> int:
        return 0


def append_bytes(log: SegmentLog, first: int, nbytes: int) -> int:
    """Messages from ``first`` until ``nbytes`` more were appended; the next number."""
    start = log.appended_bytes()
    while log.appended_bytes() - start < nbytes:
        first = append_run(log, first, 100)
    assert log.sync()
    return first


def test_a_feed_writes_per_turn_what_was_appended_since_its_last_turn_and_a_replay_allowance(tmp_path: Path) -> None:
    """A replay gets PUMP_BYTES per loop turn (the loop is shared); a turn also takes as
    much as the publishers appended since the feed's last turn, so a live feed keeps up
    however long a loop turn is."""
    log = SegmentLog.open(DurableConfig(data_dir=str(tmp_path)))
    try:
        log.follow("k", CHANNEL)
        total = append_bytes(log, 0, 4 * MiB)  # a backlog
        sink = Sink()
        scheduled: list[object] = []
        feed = DurableFeed("k", log, sink, 0, FeedStats(), {}, scheduled.append)
        feed.add(CHANNEL)
        assert feed.pump()  # more left for a later turn
        assert PUMP_BYTES <= len(sink.data) < PUMP_BYTES + CHUNK_BYTES
        before = len(sink.data)
        appended = log.appended_bytes()
        total = append_bytes(log, total, 2 * MiB)  # the publishers, during a loop turn
        assert feed.pump()
        turn = len(sink.data) - before
        allowance = PUMP_BYTES + log.appended_bytes() - appended
        assert allowance <= turn < allowance + CHUNK_BYTES
        while feed.pump():
            pass
        assert numbers(bytes(sink.data)) == list(range(total))  # each once, in order
        feed.finish(CloseKind.CLEAN)
    finally:
        log.close()
