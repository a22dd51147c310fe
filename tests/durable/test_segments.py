"""The local durable log on real files: order, bounded reads, bounds and exact
drop counts, segment deletion, restart recovery, torn tails, write errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpfeeds3.broker.config import ConfigError
from hpfeeds3.broker.durable import DurableConfig, DurableLog, SegmentLog
from hpfeeds3.broker.durable.format import (
    HEADER_BYTES,
    RECORD_MAX_BYTES,
    decode_header,
    frame_ends,
    scan_segment,
    segment_seq,
)
from hpfeeds3.broker.durable.segments import SPARE_SEGMENTS
from hpfeeds3.broker.durable.tcpack import CloseKind
from hpfeeds3.protocol.codec import encode_publish

CHANNEL = b"cowrie.sessions"

OpenLog = Callable[..., SegmentLog]


class Clock:
    """Wall-clock seconds the test moves by hand (record times, max age)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def message(i: int, size: int = 100, channel: bytes = CHANNEL) -> bytes:
    """PUBLISH frame ``i``: its number first, padded to ``size`` bytes of payload."""
    return encode_publish(b"sensor", channel, f"{i:08d}".encode().ljust(size, b"."))


def numbers(data: bytes | memoryview) -> list[int]:
    data = bytes(data)
    out, start = [], 0
    for end in frame_ends(data):
        frame = data[start:end]
        payload = frame[5 + 1 + len(b"sensor") + 1 + len(CHANNEL) :]
        out.append(int(payload[:8]))
        start = end
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_log(tmp_path: Path, clock: Clock) -> Iterator[OpenLog]:
    opened: list[SegmentLog] = []

    def go(**options: object) -> SegmentLog:
        config = DurableConfig(data_dir=str(tmp_path / "data"), **options)  # type: ignore[arg-type]
        log = SegmentLog.open(config, clock=clock)
        opened.append(log)
        return log

    yield go
    for log in opened:
        log.close()


def append_run(log: SegmentLog, first: int, count: int, size: int = 100, channel: bytes = CHANNEL) -> int:
    data = b"".join(message(i, size, channel) for i in range(first, first + count))
    return log.append(channel, data, count)


def read_all(log: SegmentLog, start: int = 0, max_bytes: int = 4096, channel: bytes = CHANNEL) -> tuple[list[int], int]:
    """Every message from ``start``, checking each chunk's bound and numbering; and the messages skipped."""
    reader = log.open_reader(channel, start)
    got: list[int] = []
    skipped = 0
    try:
        while (chunk := reader.read(max_bytes)) is not None:
            assert chunk.frames >= 1
            assert len(chunk.data) <= max_bytes or chunk.frames == 1
            assert chunk.end_seq - chunk.first_seq == chunk.frames == len(numbers(chunk.data))
            skipped += chunk.skipped
            got.extend(numbers(chunk.data))
    finally:
        reader.close()
    return got, skipped


def segment_files(tmp_path: Path) -> list[Path]:
    return sorted(
        p for p in (tmp_path / "data" / "durable" / "channels").glob("*/*") if segment_seq(p.name) is not None
    )


def spare_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "data" / "durable" / "channels").glob("*/*.free"))


def keep_up(log: SegmentLog, sent: int, runs: int, size: int = 100) -> int:
    """``runs`` runs of 10 messages from ``sent``, each written on its own (same size), with
    "a" committing every message written, as a collector that keeps up; the next number."""
    for _ in range(runs):
        append_run(log, sent, 10, size)
        sent += 10
        assert log.sync()
        log.commit("a", CHANNEL, log.written(CHANNEL))
    return sent


def test_the_segment_log_is_a_durable_log(open_log: OpenLog) -> None:
    assert isinstance(open_log(), DurableLog)


def test_messages_come_back_in_order_in_bounded_chunks(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("collector", CHANNEL)
    sent = 0
    for run in (1, 7, 50, 1, 300, 2):
        assert append_run(log, sent, run) == sent + run
        sent += run
    assert log.sync()
    assert log.written(CHANNEL) == sent
    got, skipped = read_all(log, 0, max_bytes=1000)
    assert got == list(range(sent)) and skipped == 0
    # from any position, mid-run too
    got, _ = read_all(log, 33, max_bytes=1000)
    assert got == list(range(33, sent))


def test_a_chunk_gathers_many_small_records_up_to_its_bound(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("collector", CHANNEL)
    for i in range(300):
        log.append(CHANNEL, message(i), 1)  # one record each
    assert log.sync()
    reader = log.open_reader(CHANNEL, 0)
    frame = len(message(0))
    chunk = reader.read(100 * frame)
    assert chunk is not None and chunk.frames == 100 and len(chunk.data) == 100 * frame
    assert numbers(chunk.data) == list(range(100))
    chunk = reader.read(1 << 20)
    assert chunk is not None and numbers(chunk.data) == list(range(100, 300))
    assert reader.read(1 << 20) is None
    reader.close()


def test_a_reader_that_caught_up_gets_what_is_written_later(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("collector", CHANNEL)
    append_run(log, 0, 10)
    assert log.sync()
    reader = log.open_reader(CHANNEL, 0)
    chunk = reader.read(1 << 20)
    assert chunk is not None and numbers(chunk.data) == list(range(10))
    assert reader.read(1 << 20) is None
    append_run(log, 10, 5)
    assert log.sync()
    chunk = reader.read(1 << 20)
    assert chunk is not None and numbers(chunk.data) == list(range(10, 15)) and reader.position == 15
    reader.close()


def test_large_runs_are_split_and_a_frame_larger_than_a_record_is_read_whole(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("collector", CHANNEL)
    append_run(log, 0, 400, size=2000)  # ~800 KB in one run: several records
    big = message(400, size=RECORD_MAX_BYTES + 1000)
    log.append(CHANNEL, big, 1)
    append_run(log, 401, 3)
    assert log.sync()
    reader = log.open_reader(CHANNEL, 0)
    got: list[int] = []
    largest = 0
    while (chunk := reader.read(64 * 1024)) is not None:
        largest = max(largest, len(chunk.data))
        got.extend(numbers(chunk.data))
    reader.close()
    assert got == list(range(404))
    assert largest == len(big)  # the one frame above the chunk size, alone


def test_each_message_is_stored_once_whatever_the_number_of_followers(tmp_path: Path, clock: Clock) -> None:
    sizes = []
    for followers in (1, 5):
        config = DurableConfig(data_dir=str(tmp_path / f"d{followers}"))
        log = SegmentLog.open(config, clock=clock)
        try:
            for k in range(followers):
                log.follow(f"collector{k}", CHANNEL)
            append_run(log, 0, 200)
            assert log.sync()
            sizes.append(log.stats().disk_bytes)
        finally:
            log.close()
    assert sizes[0] == sizes[1] > 200 * 100


def test_a_channel_no_key_follows_is_not_wanted(open_log: OpenLog) -> None:
    log = open_log()
    assert not log.wants(CHANNEL)
    log.follow("collector", CHANNEL)
    assert log.wants(CHANNEL) and not log.wants(b"other")
    log.unfollow("collector")
    assert not log.wants(CHANNEL)


def test_segments_are_deleted_once_every_position_passed_them(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log(segment_bytes=8192, max_bytes=1 << 30)
    log.follow("a", CHANNEL)
    log.follow("b", CHANNEL)
    for i in range(0, 600, 10):
        append_run(log, i, 10)
    assert log.sync() and log.maintain()
    many = len(segment_files(tmp_path))
    assert many > 5
    log.commit("a", CHANNEL, 600)
    assert log.maintain()
    assert len(segment_files(tmp_path)) == many  # b still needs them all
    log.commit("b", CHANNEL, 300)
    assert log.maintain()
    left = segment_files(tmp_path)
    assert 1 < len(left) < many
    assert segment_seq(left[0].name) <= 300  # type: ignore[operator]
    got, skipped = read_all(log, 300)
    assert got == list(range(300, 600)) and skipped == 0
    log.commit("b", CHANNEL, 600)
    assert log.maintain()
    assert len(segment_files(tmp_path)) == 1  # the one being written
    assert log.backlog("a").dropped == log.backlog("b").dropped == 0


def test_max_bytes_drops_the_oldest_for_that_key_only_counted_exactly(open_log: OpenLog) -> None:
    limit = 64 * 1024
    log = open_log(segment_bytes=8192, max_bytes=limit)
    log.follow("away", CHANNEL)
    log.follow("reading", CHANNEL)
    total = 2000
    for i in range(0, total, 20):
        append_run(log, i, 20)
        if i % 200 == 0:
            assert log.sync()
            log.commit("reading", CHANNEL, log.written(CHANNEL))
    assert log.sync()
    log.commit("reading", CHANNEL, total)
    assert log.maintain()
    away = log.backlog("away")
    assert away.bytes <= limit
    position = log.position("away", CHANNEL)
    assert position is not None and position > 0
    # exact: every message is either dropped (counted) or still readable, none both
    assert away.dropped == position
    got, skipped = read_all(log, position)
    assert got == list(range(position, total)) and skipped == 0
    assert away.dropped + len(got) == total
    assert away.messages == total - position
    assert log.backlog("reading").dropped == 0


def test_max_bytes_over_a_key_s_channels_drops_nothing_for_another_key_within_it(
    open_log: OpenLog, clock: Clock
) -> None:
    # "wide" follows two channels and holds more than the bound over both; "narrow"
    # follows one of them and holds less: only "wide" loses its oldest messages.
    limit = 64 * 1024
    other = b"dionaea.connections"
    log = open_log(segment_bytes=8192, max_bytes=limit)
    log.follow("wide", CHANNEL)
    log.follow("wide", other)
    log.follow("narrow", CHANNEL)
    total = 300  # about 38 KiB a channel
    for i in range(0, total, 10):
        append_run(log, i, 10)
    clock.now += 1  # the other channel's segments are newer: CHANNEL's oldest goes first
    for i in range(0, total, 10):
        append_run(log, i, 10, channel=other)
    assert log.sync() and log.maintain()
    assert log.backlog("wide").dropped > 0
    assert log.backlog("narrow").dropped == 0 and log.position("narrow", CHANNEL) == 0
    got, skipped = read_all(log, 0)
    assert got == list(range(total)) and skipped == 0


def test_a_segment_is_kept_while_a_position_is_on_its_last_message(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log(segment_bytes=8192, max_bytes=1 << 30)
    log.follow("a", CHANNEL)
    for i in range(0, 300, 10):
        append_run(log, i, 10)
    assert log.sync() and log.maintain()
    second = segment_seq(segment_files(tmp_path)[1].name)
    assert second is not None and second > 1
    log.commit("a", CHANNEL, second - 1)  # the first segment's last message is still unread
    assert log.maintain()
    assert segment_seq(segment_files(tmp_path)[0].name) == 0
    got, skipped = read_all(log, second - 1)
    assert got == list(range(second - 1, 300)) and skipped == 0
    log.commit("a", CHANNEL, second)
    assert log.maintain()
    assert segment_seq(segment_files(tmp_path)[0].name) == second


def test_a_position_is_never_committed_past_what_the_log_holds(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 10)
    assert log.sync()
    log.commit("a", CHANNEL, 10 + 50)  # a position from a stale mark, past the end
    assert log.position("a", CHANNEL) == 10
    append_run(log, 10, 5)
    assert log.sync()
    got, skipped = read_all(log, log.position("a", CHANNEL))  # type: ignore[arg-type]
    assert got == list(range(10, 15)) and skipped == 0


def test_a_reader_whose_segments_are_dropped_under_it_goes_on_and_counts_them(open_log: OpenLog) -> None:
    log = open_log(segment_bytes=8192, max_bytes=32 * 1024)
    log.follow("away", CHANNEL)
    total = 1000
    for i in range(0, total, 10):
        append_run(log, i, 10)
    assert log.sync()
    reader = log.open_reader(CHANNEL, 0)
    first = reader.read(2000)
    assert first is not None
    got = numbers(first.data)
    assert log.maintain() and log.backlog("away").dropped > len(got)  # segments ahead of the reader deleted
    while (chunk := reader.read(2000)) is not None:
        got.extend(numbers(chunk.data))
    reader.close()
    assert got == sorted(set(got)) and got[-1] == total - 1
    assert len(got) + reader.skipped == total  # every message read or counted as passed over, never both


def test_max_age_drops_old_segments_for_every_key_counted_exactly(open_log: OpenLog, clock: Clock) -> None:
    log = open_log(segment_bytes=8192, max_age_s=60.0)
    log.follow("a", CHANNEL)
    log.follow("b", CHANNEL)
    append_run(log, 0, 300)  # at t0: several segments
    assert log.sync()
    log.commit("b", CHANNEL, 100)
    clock.now += 30
    assert log.maintain()
    assert log.backlog("a").dropped == 0
    assert log.backlog("a").oldest_age_s == pytest.approx(30.0)
    clock.now += 31  # everything written at t0 is now older than 60 s
    assert log.maintain()
    # the last segment expired whole too: nothing is left, and every message is counted
    assert log.backlog("a").dropped == 300
    assert log.backlog("b").dropped == 200
    assert log.position("a", CHANNEL) == log.position("b", CHANNEL) == 300
    assert log.backlog("a").messages == 0
    append_run(log, 300, 5)
    assert log.sync()
    assert read_all(log, 300)[0] == list(range(300, 305))


def test_restart_recovers_segments_positions_drop_counts_and_numbering(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log(segment_bytes=8192, max_bytes=32 * 1024)
    log.follow("a", CHANNEL)
    log.follow("b", b"other")
    for i in range(0, 500, 25):
        append_run(log, i, 25)
    append_run(log, 0, 7, channel=b"other")
    assert log.sync() and log.maintain()
    dropped = log.backlog("a").dropped
    assert dropped > 0
    log.commit("b", b"other", 3)
    position = log.position("a", CHANNEL)
    log.close()

    log = open_log(segment_bytes=8192, max_bytes=32 * 1024)
    assert log.written(CHANNEL) == 500 and log.written(b"other") == 7
    assert log.position("a", CHANNEL) == position and log.position("b", b"other") == 3
    assert log.backlog("a").dropped == dropped
    assert log.wants(CHANNEL) and log.wants(b"other")  # captured again before the keys come back
    assert read_all(log, position)[0] == list(range(position, 500))  # type: ignore[arg-type]
    assert append_run(log, 500, 10) == 510
    assert log.sync()
    assert read_all(log, 495)[0] == list(range(495, 510))


def test_a_torn_tail_is_detected_and_cut_on_reopen(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 40)
    append_run(log, 40, 10)
    assert log.sync()
    log.close()
    (segment,) = segment_files(tmp_path)
    good = segment.stat().st_size
    # a crash in the middle of writing the next record: its header and part of its body
    with open(segment, "ab") as f:
        f.write(segment.read_bytes()[: HEADER_BYTES + 50])

    log = open_log()
    assert segment.stat().st_size == good
    assert log.written(CHANNEL) == 50
    assert read_all(log, 0)[0] == list(range(50))
    append_run(log, 50, 5)
    assert log.sync()
    assert read_all(log, 0)[0] == list(range(55))


def test_a_corrupt_record_in_the_last_segment_ends_it_there(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 10)
    assert log.sync()
    first_record = segment_files(tmp_path)[0].stat().st_size
    append_run(log, 10, 10)
    append_run(log, 20, 10)
    assert log.sync()
    log.close()
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    data[first_record + HEADER_BYTES + 7] ^= 0xFF  # a bit flip in the second record's payload
    segment.write_bytes(bytes(data))

    log = open_log()
    assert log.written(CHANNEL) == 10
    assert segment.stat().st_size == first_record
    assert read_all(log, 0)[0] == list(range(10))


def test_a_corrupt_record_in_a_sealed_segment_is_not_served_after_a_restart(open_log: OpenLog, tmp_path: Path) -> None:
    """Records this process wrote are read without a second CRC check; a sealed segment
    found at start is not rescanned, so its records are checked as they are read."""
    log = open_log(segment_bytes=8192)
    log.follow("a", CHANNEL)
    for first in range(0, 200, 10):
        append_run(log, first, 10)
        assert log.sync()
    log.close()
    first_segment, *rest = segment_files(tmp_path)
    assert rest, "the log rolled to a second segment"
    data = bytearray(first_segment.read_bytes())
    data[HEADER_BYTES + 7] ^= 0xFF  # a bit flip in the first record's payload
    first_segment.write_bytes(bytes(data))

    log = open_log(segment_bytes=8192)
    got, skipped = read_all(log, 0)
    second = segment_seq(rest[0].name)
    assert second is not None
    # the bad record ends that segment's data: the rest of it is passed over and counted
    assert got == list(range(second, 200)) and skipped == second


def test_runs_queued_while_the_writer_is_busy_are_written_whole_in_order(open_log: OpenLog) -> None:
    """Runs are written as queued, a header before each record's runs, many runs per
    writev: more buffers than one writev takes are written in several, in order."""
    from hpfeeds3.broker.durable.segments import IOV_MAX

    log = open_log()
    log.follow("a", CHANNEL)
    runs = 3 * IOV_MAX
    with log._save_mutex:  # the writer first saves the new follower below: it waits here
        log.follow("b", CHANNEL + b".other")
        for i in range(runs):
            log.append(CHANNEL, message(i), 1)
        assert log.written(CHANNEL) == 0  # all queued: one batch for the writer
    assert log.sync()
    assert log.written(CHANNEL) == runs
    got, skipped = read_all(log, 0, max_bytes=1 << 20)
    assert got == list(range(runs)) and skipped == 0
    # one record holds many runs: far fewer records (headers) than runs
    reader = log.open_reader(CHANNEL, 0)
    chunks = 0
    while reader.read(1 << 20) is not None:
        chunks += 1
    reader.close()
    assert chunks < runs // 100


def test_a_chunk_ends_at_a_record_boundary_rather_than_split_the_next_record(open_log: OpenLog) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 30)  # one record each (each synced before the next is appended)
    assert log.sync()
    append_run(log, 30, 30)
    assert log.sync()
    frame = len(message(0))
    reader = log.open_reader(CHANNEL, 0)
    chunk = reader.read(45 * frame)  # room for the first record and half of the second
    assert chunk is not None and numbers(chunk.data) == list(range(30))
    chunk = reader.read(45 * frame)
    assert chunk is not None and numbers(chunk.data) == list(range(30, 60))
    # a record larger than the bound alone is cut at a frame boundary
    reader.close()
    reader = log.open_reader(CHANNEL, 0)
    chunk = reader.read(20 * frame)
    assert chunk is not None and numbers(chunk.data) == list(range(20))
    reader.close()


def test_sealed_segments_are_synced_and_closed_at_the_next_sync(open_log: OpenLog) -> None:
    """A roll does not wait for the disk: the sealed segment stays open until the syncer
    fsyncs it; after that no descriptor is held for it."""
    log = open_log(segment_bytes=8192, sync_interval_s=0.05)
    log.follow("a", CHANNEL)
    fds = len(os.listdir("/proc/self/fd"))
    for first in range(0, 400, 10):
        append_run(log, first, 10)
        assert log.sync()
    deadline = time.monotonic() + 10
    while len(os.listdir("/proc/self/fd")) > fds + 2:  # the segment being written (and a dup in a sync)
        assert time.monotonic() < deadline, "sealed segments are still open"
        time.sleep(0.01)
    assert read_all(log, 0)[0] == list(range(400))


def test_a_position_saved_ahead_of_the_log_is_brought_back_to_its_end(open_log: OpenLog, tmp_path: Path) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 10)
    assert log.sync()
    log.close()
    positions = tmp_path / "data" / "durable" / "positions.json"
    doc = json.loads(positions.read_text())
    doc["positions"][0][2] = 99  # saved after messages the crash did not let reach the file
    positions.write_text(json.dumps(doc))
    log = open_log()
    assert log.position("a", CHANNEL) == 10
    assert append_run(log, 10, 1) == 11


@pytest.mark.parametrize("text", ["", "[]", '{"positions": [["a"]]}', '{"positions": [], "dropped": 3}', "{"])
def test_a_broken_positions_file_is_logged_and_every_key_starts_from_the_end(
    open_log: OpenLog, tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log()
    log.follow("a", CHANNEL)
    append_run(log, 0, 10)
    assert log.sync()
    log.close()
    (tmp_path / "data" / "durable" / "positions.json").write_text(text)
    log = open_log()
    assert log.position("a", CHANNEL) is None and log.written(CHANNEL) == 10
    assert "positions" in caplog.text


def test_a_second_process_cannot_use_the_same_directory(open_log: OpenLog) -> None:
    open_log()
    with pytest.raises(ConfigError, match="in use"):
        open_log()


WRITER_UNDER_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from hpfeeds3.broker.durable import DurableConfig, SegmentLog
    from hpfeeds3.protocol.codec import encode_publish

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    log = SegmentLog.open(DurableConfig(data_dir=sys.argv[1], segment_bytes=1 << 20))
    log.follow("a", b"c")
    for i in range(200):
        frame = encode_publish(b"sensor", b"c", b"%08d" % i + b"." * 992)
        log.append(b"c", frame, 1)  # never raises
        if i % 10 == 9:
            log.sync()
    log.sync()
    stats = log.stats()
    reader = log.open_reader(b"c", 0)
    got, skipped = [], 0
    while (chunk := reader.read(1 << 16)) is not None:
        skipped += chunk.skipped
        start = 0
        for end in __import__("hpfeeds3.broker.durable.format", fromlist=["x"]).frame_ends(chunk.data):
            got.append(int(bytes(chunk.data[start:end][-1000:-992])))
            start = end
    reader.close()
    print(json.dumps({"degraded": stats.degraded, "error": stats.last_error, "appended": stats.appended,
                      "unstored": stats.unstored, "got": got, "skipped": skipped}))
    log.close()
    """
)


def test_a_write_error_degrades_the_store_counts_and_never_raises(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", WRITER_UNDER_FILE_SIZE_LIMIT, str(tmp_path / "data")],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["degraded"] and "File too large" in out["error"]
    assert out["appended"] == 200
    stored = out["got"]
    # what was stored is intact and in order; everything else is counted, nothing both
    assert stored == list(range(len(stored))) and 0 < len(stored) < 200
    assert out["unstored"] == 200 - len(stored)
    assert b"cannot write" in r.stderr
    assert os.path.getsize(next(iter((tmp_path / "data" / "durable" / "channels").glob("*/*.seg")))) <= 64 * 1024


def test_appends_beyond_the_pending_bound_are_counted_not_queued(
    open_log: OpenLog, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(max_pending_bytes=50)  # smaller than one message: none is queued
    log.follow("a", CHANNEL)
    with caplog.at_level(logging.WARNING, logger="hpfeeds3.broker.durable"):
        assert append_run(log, 0, 3) == 3
        assert append_run(log, 3, 2) == 5
        assert log.sync()
        deadline = time.monotonic() + 5
        while "messages not stored" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer logs it after the write that gave them up
    assert "not stored: the writer was more than 50 bytes behind" in caplog.text
    stats = log.stats()
    assert stats.appended == stats.unstored == 5 and stats.disk_bytes == 0
    assert log.written(CHANNEL) == 5
    reader = log.open_reader(CHANNEL, 0)
    assert reader.read(1 << 20) is None and reader.skipped == 5
    reader.close()


def test_sync_after_every_write_when_the_interval_is_zero(open_log: OpenLog) -> None:
    log = open_log(sync_interval_s=0)
    log.follow("a", CHANNEL)
    for i in range(0, 50, 5):
        append_run(log, i, 5)
    assert log.sync()
    assert read_all(log, 0)[0] == list(range(50))
    assert not log.stats().degraded


def test_config_refuses_bounds_that_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DurableConfig(max_bytes=0)
    with pytest.raises(ConfigError):
        DurableConfig(max_bytes=1 << 20, segment_bytes=2 << 20)
    with pytest.raises(ConfigError):
        DurableConfig(sync_interval_s=-1)


def test_append_write_and_replay_rates_are_recorded(open_log: OpenLog) -> None:
    """Every message of runs of 1 and of 10 reads back; the rates are printed (-s), not asserted."""
    import time

    log = open_log()
    figures = []
    total = 0
    for run in (1, 10):
        channel = b"rate-%d" % run
        log.follow("collector", channel)
        frame = message(0, 100, channel)
        data = frame * run
        count = 200_000
        t0 = time.perf_counter()
        in_append = 0.0
        for i in range(count // run):
            a = time.perf_counter()
            log.append(channel, data, run)
            in_append += time.perf_counter() - a
            if i % 1000 == 999:
                assert log.sync(60)  # paced: the writer's rate, not the pending bound
        assert log.sync(60)
        wrote = time.perf_counter() - t0
        reader = log.open_reader(channel, 0)
        t0 = time.perf_counter()
        read = 0
        while (chunk := reader.read(256 * 1024)) is not None:
            read += chunk.frames
        replay = time.perf_counter() - t0
        reader.close()
        assert read == count
        total += count
        figures.append(
            f"runs of {run:>2}: append {in_append / count * 1e9:5.0f} ns/msg on the caller, "
            f"written {count / wrote / 1e6:.2f} M msg/s, replay read {count / replay / 1e6:.2f} M msg/s "
            f"({len(frame)} B frames)"
        )
    stats = log.stats()
    assert stats.unstored == 0 and stats.appended == total
    print(f"\ndurable log: {stats.disk_bytes / total:.1f} B on disk per message")
    print("\n".join(figures))


def test_a_passed_segments_file_is_reused_and_its_old_data_is_never_read(
    open_log: OpenLog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(segment_bytes=8192, max_bytes=1 << 30)
    log.follow("a", CHANNEL)
    sent = keep_up(log, 0, 60)
    assert log.maintain()
    assert log.reused_segments > 5  # the segments after the first few are written into old files
    assert 0 < len(spare_files(tmp_path)) <= SPARE_SEGMENTS
    sent = keep_up(log, sent, 20, size=300)  # segments sealed at other sizes than their files' old data
    # every sealed segment ends at its last record: a reused file is cut when sealed
    sealed = segment_files(tmp_path)[:-1]
    for path in sealed:
        assert scan_segment(str(path), segment_seq(path.name)).torn_bytes == 0  # type: ignore[arg-type]
    # a collector that falls behind now reads exactly what was written, nothing older
    position = log.position("a", CHANNEL)
    assert position == sent
    for i in range(sent, sent + 120, 10):
        append_run(log, i, 10)
    assert log.sync()
    assert read_all(log, position) == (list(range(position, sent + 120)), 0)
    spares = spare_files(tmp_path)
    log.close()

    caplog.set_level(logging.WARNING, "hpfeeds3.broker.durable")
    log = open_log(segment_bytes=8192, max_bytes=1 << 30)
    assert "after the last whole record" not in caplog.text  # a clean close cut the file being written
    assert read_all(log, position) == (list(range(position, sent + 120)), 0)
    assert spare_files(tmp_path) == spares
    log.commit("a", CHANNEL, sent + 120)
    keep_up(log, sent + 120, 30)
    assert log.reused_segments > 0  # spares found at the restart, or made since, are reused


def test_a_crash_while_writing_a_reused_file_loses_nothing_and_reads_no_old_record(
    open_log: OpenLog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The state a kill leaves: the segment being written is a reused file whose old
    records (same size, so whole and intact, with older numbers) follow the new ones."""
    log = open_log(segment_bytes=8192, max_bytes=1 << 30)
    log.follow("a", CHANNEL)
    sent = keep_up(log, 0, 60)
    assert log.maintain()
    # roll into a reused file and write a little into it
    while True:
        reused = log.reused_segments
        sent = keep_up(log, sent, 1)
        if log.reused_segments > reused:
            break
    last = segment_files(tmp_path)[-1]
    scan = scan_segment(str(last), segment_seq(last.name))  # type: ignore[arg-type]
    old = decode_header(last.read_bytes()[scan.valid_bytes :][:HEADER_BYTES])
    assert old is not None and old.end_seq <= scan.end_seq  # a whole old record right after the new ones
    snapshot = tmp_path / "crashed"
    shutil.copytree(tmp_path / "data", snapshot / "data")  # what a kill -9 leaves on disk (the writer is idle)
    log.close()

    caplog.set_level(logging.WARNING, "hpfeeds3.broker.durable")
    config = DurableConfig(data_dir=str(snapshot / "data"), segment_bytes=8192, max_bytes=1 << 30)
    crashed = SegmentLog.open(config)
    try:
        assert crashed.written(CHANNEL) == sent  # the old records after the new ones are not messages
        assert "after the last whole record" in caplog.text
        position = crashed.position("a", CHANNEL)
        assert position is not None
        assert read_all(crashed, position) == (list(range(position, sent)), 0)
        append_run(crashed, sent, 10)
        assert crashed.sync()
        assert read_all(crashed, position) == (list(range(position, sent + 10)), 0)
    finally:
        crashed.close()


def test_a_segment_a_reader_holds_open_is_not_reused_under_it(open_log: OpenLog, tmp_path: Path) -> None:
    # Segments larger than a reader's block, so that it reads its file again after the roll.
    log = open_log(segment_bytes=1 << 20, max_bytes=1 << 30)
    log.follow("a", CHANNEL)
    sent = 0
    while len(segment_files(tmp_path)) < 2:  # two segments: the first is the one deleted at the next roll
        append_run(log, sent, 500)
        sent += 500
        assert log.sync()
    first_end = segment_seq(segment_files(tmp_path)[1].name)
    assert first_end is not None
    reader = log.open_reader(CHANNEL, 0)
    chunk = reader.read(2000)  # the reader has the first segment open
    assert chunk is not None
    got = numbers(chunk.data)
    log.commit("a", CHANNEL, sent)  # every position passed it: it is deleted at the next roll
    while log.reused_segments < 2:  # ... and later segments are written into reused files
        append_run(log, sent, 500)
        sent += 500
        assert log.sync()
        log.commit("a", CHANNEL, sent)
    assert not any(segment_seq(p.name.replace(".free", ".seg")) == 0 for p in spare_files(tmp_path))
    while (chunk := reader.read(2000)) is not None:
        got.extend(numbers(chunk.data))
    reader.close()
    # it read its file to the end, then what is left after it: in order, nothing passed over in it
    assert got[:first_end] == list(range(first_end))
    assert got == sorted(set(got)) and len(got) + reader.skipped == sent


class RecordingOutput:
    """A feed's connection side that takes everything: what a turn wrote."""

    def __init__(self) -> None:
        self.written = 0
        self.writable = True

    def feed_write(self, data: bytes | memoryview) -> int:
        self.written += len(data)
        return len(data)

    def feed_writelines(self, pieces: tuple[bytes | memoryview, ...], size: int) -> int:
        assert size == sum(map(len, pieces))
        return self.feed_write(b"".join(pieces))

    def feed_writable(self) -> bool:
        return self.writable

    def feed_socket(self) -> None:
        return None

    def feed_buffered(self) -> int:
        return 0


def test_a_feed_turn_keeps_pace_with_what_the_log_took_in_since_the_last_one(open_log: OpenLog) -> None:
    """Under load one loop turn brings many publishes: a turn writes what came in since
    the last one, and PUMP_BYTES of backlog more, so a durable collector never falls behind
    the publishers because the loop's turns are long."""
    from hpfeeds3.broker.durable.feed import PUMP_BYTES, DurableFeed, FeedStats

    log = open_log()
    output = RecordingOutput()
    feed = DurableFeed("a", log, output, 0, FeedStats(), {}, lambda _call: None)
    feed.add(CHANNEL)
    sent = 0
    frame = len(message(0))
    for _turn in range(3):
        run = 3 * PUMP_BYTES // frame  # three turns' budget of backlog came in during this turn
        append_run(log, sent, run)
        sent += run
        assert log.sync()
        before = output.written
        assert feed.pump() is False  # everything written went out in this one turn
        assert output.written - before == run * frame
    # a backlog built while nothing pumped is caught up PUMP_BYTES a turn more than the inflow
    append_run(log, sent, 10 * PUMP_BYTES // frame)
    assert log.sync()
    feed._inflow_seen = log.appended_bytes  # (as if a turn had run without writing: no inflow since)
    before = output.written
    assert feed.pump() is True
    assert PUMP_BYTES <= output.written - before <= PUMP_BYTES + RECORD_MAX_BYTES
    feed.finish(CloseKind.CLEAN)


def test_a_caught_up_feed_is_sent_all_the_writer_wrote_and_one_behind_waits_for_its_turn(open_log: OpenLog) -> None:
    """The writer wrote more (``DurableFeed.written``): a feed that had caught up is sent
    all of it at once, whatever its size (it is what came in since); a feed that had not
    goes on in the loop's next turn, within its budget."""
    from hpfeeds3.broker.durable.feed import PUMP_BYTES, DurableFeed, FeedStats

    log = open_log()
    output = RecordingOutput()
    turns: list[Callable[[], object]] = []
    feed = DurableFeed("a", log, output, 0, FeedStats(), {}, turns.append)
    feed.add(CHANNEL)
    turns.pop()()  # the first turn: nothing to send, caught up
    assert feed.live and not turns
    frame = len(message(0))
    run = 3 * PUMP_BYTES // frame
    append_run(log, 0, run)
    assert log.sync()
    feed._inflow_seen = log.appended_bytes  # (a turn's budget would not cover it)
    feed.written()
    assert output.written == run * frame and not turns
    assert feed.live
    output.writable = False  # the transport pauses: the feed falls behind
    append_run(log, run, run)
    assert log.sync()
    feed.written()
    assert output.written == run * frame and not feed.live
    output.writable = True
    feed.written()  # behind: its next turn, not now
    assert output.written == run * frame and len(turns) == 1
    feed._inflow_seen = log.appended_bytes
    turns.pop()()
    assert PUMP_BYTES <= output.written - run * frame <= PUMP_BYTES + RECORD_MAX_BYTES
    feed.finish(CloseKind.CLEAN)


def test_a_reader_that_keeps_up_is_handed_the_bytes_just_written_not_a_copy_read_back(open_log: OpenLog) -> None:
    from hpfeeds3.broker.durable.feed import CHUNK_BYTES

    log = open_log()
    log.follow("a", CHANNEL)
    reader = log.open_reader(CHANNEL, 0)
    for first in range(0, 300, 100):
        data = b"".join(message(i) for i in range(first, first + 100))
        log.append(CHANNEL, data, 100)
        assert log.sync()
        chunk = reader.read(CHUNK_BYTES)
        assert chunk is not None and chunk.data is data  # the record the writer wrote
        assert (chunk.first_seq, chunk.end_seq, chunk.frames) == (first, first + 100, 100)
        assert reader.read(CHUNK_BYTES) is None
    reader.close()


def test_records_read_in_one_chunk_are_its_pieces_as_written_not_joined(open_log: OpenLog) -> None:
    """A reader that keeps up and reads several records in one chunk is handed the
    records themselves, one piece each (a connection writes them with one writelines),
    not a copy joining them; so is one reading a file block, views of it."""
    from hpfeeds3.broker.durable.feed import CHUNK_BYTES

    log = open_log()
    log.follow("a", CHANNEL)
    reader = log.open_reader(CHANNEL, 0)
    runs = []
    for first in range(0, 300, 100):
        runs.append(b"".join(message(i) for i in range(first, first + 100)))
        log.append(CHANNEL, runs[-1], 100)
        assert log.sync()  # each its own batch: its own record
    chunk = reader.read(CHUNK_BYTES)
    assert chunk is not None and (chunk.first_seq, chunk.end_seq, chunk.frames) == (0, 300, 300)
    assert len(chunk.pieces) == 3 and all(piece is run for piece, run in zip(chunk.pieces, runs, strict=True))
    assert chunk.size == sum(map(len, runs)) and numbers(chunk.data) == list(range(300))
    reader.close()
    log.close()
    reopened = open_log()  # (a new process: nothing in memory, the records read from the file)
    reader = reopened.open_reader(CHANNEL, 0)
    chunk = reader.read(CHUNK_BYTES)
    assert chunk is not None and len(chunk.pieces) == 3 and all(isinstance(p, memoryview) for p in chunk.pieces)
    assert chunk.size == sum(map(len, runs)) and numbers(chunk.data) == list(range(300))
    reader.close()


def test_while_appends_keep_coming_the_writer_leaves_the_loop_to_see_its_batches(open_log: OpenLog) -> None:
    """Whoever appends looks at ``written_batches`` after each append (the router, between
    publishes): while appends keep coming, a batch is not also reported by ``on_written``
    (a wake-up of the loop from the writer's thread per batch); the batch that writes the
    last append is, so nothing written waits for an append that may never come."""
    log = open_log()
    log.follow("a", CHANNEL)
    reported: list[int] = []
    log.set_on_written(lambda: reported.append(log.written(CHANNEL)))
    run = 1200  # about 150 KiB: the writer pauses after each batch, as under load
    runs = 60
    data = [b"".join(message(n) for n in range(i * run, (i + 1) * run)) for i in range(runs)]
    before = log.written_batches
    for i in range(runs):
        log.append(CHANNEL, data[i], run)
        time.sleep(0.0005)  # a busy publisher's pace, not synchronisation
    deadline = time.monotonic() + 30
    while (not reported or reported[-1] < runs * run) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported and reported[-1] == runs * run  # the last batch is reported
    batches = log.written_batches - before
    assert batches > 1 and len(reported) < batches


def test_a_reader_behind_what_is_kept_in_memory_reads_the_file_then_memory_in_order(open_log: OpenLog) -> None:
    """More than RECENT_BYTES written while a reader waits, over several segments: it
    reads the oldest from the files, then what is still in memory, every message once, in
    order; so does one that starts inside a record, and one reading small chunks."""
    from hpfeeds3.broker.durable.feed import CHUNK_BYTES
    from hpfeeds3.broker.durable.segments import RECENT_BYTES

    log = open_log(segment_bytes=1 << 20)
    log.follow("a", CHANNEL)
    early = log.open_reader(CHANNEL, 0)
    run = 700  # about 80 KiB a run
    total = 0
    while total * len(message(0)) < 3 * RECENT_BYTES:
        append_run(log, total, run)
        total += run
        if total % (4 * run) == 0:
            assert log.sync()
    assert log.sync()
    got: list[int] = []
    while (chunk := early.read(CHUNK_BYTES)) is not None:
        assert chunk.skipped == 0 and chunk.end_seq - chunk.first_seq == chunk.frames
        got.extend(numbers(chunk.data))
    assert got == list(range(total))
    early.close()
    assert read_all(log, 1234, max_bytes=CHUNK_BYTES)[0] == list(range(1234, total))
    assert read_all(log, total - 3 * run - 5, max_bytes=4096)[0] == list(range(total - 3 * run - 5, total))


def test_under_load_the_writer_writes_several_runs_a_batch_not_one(open_log: OpenLog) -> None:
    """Runs of 128 KiB and more keep coming (publishers are busy): the writer pauses after
    each batch, so that it wakes, takes the interpreter and wakes the loop once per several
    runs; every message is still written, in order."""
    log = open_log()
    log.follow("a", CHANNEL)
    run = 1200  # about 150 KiB
    runs = 60
    data = [b"".join(message(n) for n in range(i * run, (i + 1) * run)) for i in range(runs)]
    before = log.written_batches
    for i in range(runs):
        log.append(CHANNEL, data[i], run)
        time.sleep(0.0005)  # a busy publisher's pace, not synchronisation
    assert log.sync()
    assert log.written_batches - before <= runs // 3
    assert read_all(log, 0, max_bytes=1 << 20)[0] == list(range(runs * run))


def write_old_format_segment(tmp_path: Path, runs: list[tuple[int, int]]) -> Path:
    """A channel log as the previous format wrote it (``HPD1`` records: zlib's CRC-32),
    one record per (first, count) run."""
    from hpfeeds3.broker.durable.format import MAGIC_CRC32, channel_dirname, encode_record, segment_name

    directory = tmp_path / "data" / "durable" / "channels" / channel_dirname(CHANNEL)
    directory.mkdir(parents=True)
    (directory / "CHANNEL").write_bytes(CHANNEL)
    segment = directory / segment_name(runs[0][0])
    records = [
        encode_record(first, count, 1_700_000_000_000, b"".join(map(message, range(first, first + count))), MAGIC_CRC32)
        for first, count in runs
    ]
    segment.write_bytes(b"".join(records))
    return segment


def test_a_log_of_the_previous_format_is_read_and_appended_in_the_new_one(open_log: OpenLog, tmp_path: Path) -> None:
    from hpfeeds3.broker.durable.format import MAGIC, MAGIC_CRC32, MAGIC_CRC32C

    segment = write_old_format_segment(tmp_path, [(0, 10), (10, 15)])
    old = segment.stat().st_size
    log = open_log()
    assert log.written(CHANNEL) == 25
    log.follow("a", CHANNEL)
    assert read_all(log, 0)[0] == list(range(25))
    append_run(log, 25, 5)
    assert log.sync()
    log.close()
    data = segment.read_bytes()
    # the old records as they were, the new ones with the new checksum (google-crc32c's
    # wheels carry the compiled CRC-32C: a log written with CRC-32 would be slower)
    assert MAGIC == MAGIC_CRC32C
    assert data[:4] == MAGIC_CRC32 and data[old : old + 4] == MAGIC_CRC32C
    # reopened: the last segment is scanned, every record checked with its own checksum
    log = open_log()
    assert log.written(CHANNEL) == 30 and segment.stat().st_size == len(data)
    assert read_all(log, 0)[0] == list(range(30))


def test_a_corrupt_record_of_the_previous_format_ends_the_segment_there(open_log: OpenLog, tmp_path: Path) -> None:
    segment = write_old_format_segment(tmp_path, [(0, 10), (10, 10)])
    first_record = HEADER_BYTES + len(b"".join(message(i) for i in range(10)))
    data = bytearray(segment.read_bytes())
    data[first_record + HEADER_BYTES + 7] ^= 0xFF  # a bit flip in the second record's payload
    segment.write_bytes(bytes(data))
    log = open_log()
    assert log.written(CHANNEL) == 10 and segment.stat().st_size == first_record
    log.follow("a", CHANNEL)
    assert read_all(log, 0)[0] == list(range(10))


def test_records_are_checked_with_the_checksum_their_magic_names() -> None:
    """A record whose magic is changed to the other checksum's fails its check: the magic
    is part of what is checked, and each checksum is the one its magic names."""
    from hpfeeds3.broker.durable.format import MAGIC_CRC32, MAGIC_CRC32C, check_record, encode_record

    payload = b"".join(message(i) for i in range(3))
    for magic, other in ((MAGIC_CRC32, MAGIC_CRC32C), (MAGIC_CRC32C, MAGIC_CRC32)):
        raw = encode_record(7, 3, 1_700_000_000_000, payload, magic)
        header = decode_header(raw[:HEADER_BYTES])
        assert header is not None and header.magic == magic and header.first_seq == 7 and header.count == 3
        assert check_record(raw[:HEADER_BYTES], header, memoryview(raw)[HEADER_BYTES:])
        swapped = other + raw[4:]
        header = decode_header(swapped[:HEADER_BYTES])
        assert header is not None and not check_record(swapped[:HEADER_BYTES], header, swapped[HEADER_BYTES:])
    assert decode_header(b"HPD9" + raw[4:HEADER_BYTES]) is None
