"""The subscriber's check: every loss, duplicate, reorder or stray frame is caught."""

from __future__ import annotations

import random

from hpfeeds3.bench.wire import Checker, Stream
from hpfeeds3.protocol import encode_error

IDENT, CHANNEL = b"bench", b"bench"


def frames_of(pid: int, n: int, batch_bytes: int = 4096) -> list[bytes]:
    """The first ``n`` frames publisher ``pid`` sends, one by one."""
    s = Stream(IDENT, CHANNEL, pid, 100, batch_bytes)
    out: list[bytes] = []
    while len(out) < n:
        batch = bytes(s.next_batch())
        out += [batch[i : i + s.frame_len] for i in range(0, len(batch), s.frame_len)]
    return out[:n]


def checker(publishers: int) -> Checker:
    return Checker([Stream(IDENT, CHANNEL, pid, 100, 4096) for pid in range(publishers)])


def feed_in_chunks(c: Checker, data: bytes, seed: int = 1) -> str | None:
    """Feed ``data`` as a subscriber would: arbitrary reads, whole frames checked, tail kept."""
    rng = random.Random(seed)
    buf = bytearray()
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 3000)
        buf += data[pos : pos + n]
        pos += n
        whole = len(buf) - len(buf) % c.frame_len
        if whole:
            fault = c.feed(buf, whole)
            if fault:
                return fault
            del buf[:whole]
    return None


def interleaved(publishers: int, per_publisher: int, seed: int = 2) -> list[bytes]:
    """Runs of consecutive frames from each publisher, in a random order, each in sequence."""
    rng = random.Random(seed)
    queues = {pid: frames_of(pid, per_publisher) for pid in range(publishers)}
    out: list[bytes] = []
    while queues:
        pid = rng.choice(list(queues))
        take = rng.randint(1, 40)
        out += queues[pid][:take]
        del queues[pid][:take]
        if not queues[pid]:
            del queues[pid]
    return out


def test_interleaved_runs_of_many_publishers_pass_and_are_counted() -> None:
    c = checker(5)
    assert feed_in_chunks(c, b"".join(interleaved(5, 300))) is None
    assert c.frames == 1500
    assert c.missing({pid: 300 for pid in range(5)}) == {}


def test_a_lost_message_fails() -> None:
    frames = frames_of(0, 200)
    del frames[77]
    fault = feed_in_chunks(checker(1), b"".join(frames))
    assert fault is not None and "got message #78, expected #77 (lost)" in fault


def test_a_duplicated_message_fails() -> None:
    frames = frames_of(0, 200)
    frames.insert(50, frames[49])
    fault = feed_in_chunks(checker(1), b"".join(frames))
    assert fault is not None and "duplicated or reordered" in fault


def test_swapped_messages_fail() -> None:
    frames = interleaved(3, 100)
    frames[10], frames[11] = frames[11], frames[10]
    assert feed_in_chunks(checker(3), b"".join(frames)) is not None


def test_a_corrupted_payload_fails() -> None:
    frames = frames_of(0, 50)
    bad = bytearray(frames[20])
    bad[-1] ^= 0xFF
    frames[20] = bytes(bad)
    fault = feed_in_chunks(checker(1), b"".join(frames))
    assert fault is not None and "corrupted" in fault


def test_an_error_frame_is_reported_with_its_text() -> None:
    frames = frames_of(0, 50)
    error = encode_error("accessfail: no")
    data = b"".join(frames[:10]) + error + b"\0" * (-len(error) % len(frames[0])) + b"".join(frames[10:])
    fault = feed_in_chunks(checker(1), data)
    assert fault is not None and "accessfail: no" in fault


def test_missing_messages_at_the_end_are_counted() -> None:
    c = checker(2)
    assert feed_in_chunks(c, b"".join(frames_of(0, 100) + frames_of(1, 90))) is None
    assert c.missing({0: 100, 1: 100}) == {1: 10}
