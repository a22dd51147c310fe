"""A process SIGKILLed while it appends loses nothing the log reported written.

The writer reports each new written position (``on_written``, from its
thread) on stdout; the test kills it with SIGKILL in the middle of appending,
reopens the log (recovery cuts a torn tail) and reads it back. Three rounds
on the same directory: each new process goes on numbering from the position
it recovered, so the whole log must read back as 0, 1, 2, ... with no gap.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hpfeeds3.broker.durable import DurableConfig, SegmentLog
from hpfeeds3.broker.durable.format import frame_ends

CHANNEL = b"c"
# Each round is killed once the writer has reported this many more messages written.
PER_ROUND = 20_000
ROUNDS = 3
DEADLINE_S = 60.0

APPENDER = textwrap.dedent(
    """
    import os, random, sys
    from hpfeeds3.broker.durable import DurableConfig, SegmentLog
    from hpfeeds3.protocol.codec import encode_publish

    log = SegmentLog.open(DurableConfig(data_dir=sys.argv[1], segment_bytes=256 * 1024))
    log.follow("collector", b"c")
    log.set_on_written(lambda: os.write(1, b"written %d\\n" % log.written(b"c")))
    n = log.written(b"c")
    os.write(1, b"start %d\\n" % n)
    rng = random.Random(n)
    while True:  # until killed
        run = rng.choice((1, 1, 3, 20, 200))
        data = b"".join(encode_publish(b"sensor", b"c", b"%010d" % i + b"x" * rng.randrange(0, 300))
                        for i in range(n, n + run))
        n = log.append(b"c", data, run)
        if n % 1000 < run:
            log.sync()  # keep the queue short: the point is a kill at any moment of a write
    """
)


def payload_number(frame: bytes | memoryview) -> int:
    body = bytes(frame[5:])
    ident_len = body[0]
    channel_len = body[1 + ident_len]
    payload = body[2 + ident_len + channel_len :]
    return int(payload[:10])


def run_round(data_dir: Path) -> tuple[int, int]:
    """Start the appender, SIGKILL it after PER_ROUND more messages reported written; (start, last reported)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    start = reported = -1
    buffer = b""
    deadline = time.monotonic() + DEADLINE_S
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.stderr.read().decode() if proc.stderr else ""
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, value = line.split()
                if word == b"start":
                    start = int(value)
                else:
                    reported = max(reported, int(value))
            if start >= 0 and reported >= start + PER_ROUND:
                os.kill(proc.pid, signal.SIGKILL)
                # lines already in the pipe were reported before the kill too
                proc.wait(10)
                rest = proc.stdout.read()
                for line in (buffer + rest).split(b"\n"):
                    if line.startswith(b"written "):
                        reported = max(reported, int(line.split()[1]))
                return start, reported
        raise AssertionError(f"no progress within {DEADLINE_S} s: start {start}, reported {reported}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_sigkill_while_appending_loses_nothing_reported_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    reported_total = 0
    for _ in range(ROUNDS):
        start, reported = run_round(data_dir)
        assert start >= reported_total  # the restart found everything reported before
        reported_total = reported
    log = SegmentLog.open(DurableConfig(data_dir=str(data_dir), segment_bytes=256 * 1024))
    try:
        end = log.written(CHANNEL)
        assert end >= reported_total >= ROUNDS * PER_ROUND
        reader = log.open_reader(CHANNEL, 0)
        expected = 0
        while (chunk := reader.read(1 << 16)) is not None:
            assert chunk.skipped == 0
            at = 0
            for frame_end in frame_ends(chunk.data):
                assert payload_number(chunk.data[at:frame_end]) == expected
                expected += 1
                at = frame_end
        reader.close()
        assert expected == end
    finally:
        log.close()
