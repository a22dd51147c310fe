"""A log sink that stops reading (a stuck journald or shipper, a full pipe).

The broker writes its log lines from a thread; its queue was unbounded, so
anonymous connect/close storms grew the broker by about 1,190 bytes per
connection while stderr was not read, and SIGTERM did not end it. Here a real
broker's stderr is a pipe the test does not read.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpfeeds3.broker.logs import MAX_QUEUED_RECORDS
from tests.support.broker import BROKER_BIN, free_port, wait_for_port, write_users_json

from .conftest import wait_healthy
from .support import RELIABILITY_USERS, MiB, PeakSampler, Probe, metric, record, scrape

DROPPED = "hpfeeds_broker_log_lines_dropped_total"
ARGS = ("--auth", "users.json", "--shutdown-drain", "1")


def storm(port: int, connections: int, workers: int = 4) -> float:
    """``connections`` anonymous connect-and-close, from ``workers`` threads; the seconds it took."""

    def run(n: int) -> None:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset: no TIME_WAIT

    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, [connections // workers] * workers))
    return time.monotonic() - start


class PipeReader:
    """Reads a pipe in a thread while ``reading`` is set; keeps what it read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = b""
        self.reading = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if not self.reading.wait(0.05):
                continue
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                data = os.read(self.fd, 1 << 16)
                if not data:
                    return
                self.text += data

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text and time.monotonic() < deadline:
            time.sleep(0.05)
        return needle in self.text

    def close(self) -> None:
        self.done.set()
        self._thread.join(5)


def test_a_stalled_log_sink_costs_dropped_lines_not_memory_nor_shutdown(tmp_path: Path) -> None:
    connections = 40_000
    write_users_json(tmp_path / "users.json", RELIABILITY_USERS)
    port, exporter = free_port(), free_port()
    proc = subprocess.Popen(
        [BROKER_BIN, "--bind", f"127.0.0.1:{port}", "--exporter", f"127.0.0.1:{exporter}", *ARGS],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    reader = PipeReader(proc.stderr.fileno())
    try:
        wait_for_port(port, timeout=15, proc=proc)
        wait_healthy(exporter)
        probe = Probe(proc.pid)
        storm(port, 500)  # fills the pipe (64 KiB): the writer thread is now stuck in a write
        before = probe.rss()
        with PeakSampler(probe) as peak:
            seconds = storm(port, connections)
            deadline = time.monotonic() + 10
            while metric(scrape(exporter), DROPPED) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        dropped = metric(scrape(exporter), DROPPED)
        growth = peak.peak - before

        reader.reading.set()  # the sink recovers
        told = reader.wait_for(b"log lines dropped", timeout=10)
        reader.reading.clear()
        time.sleep(0.2)  # the reader's last read returns
        storm(port, 2_000)  # and stalls again; now stop the broker
        stop_start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - stop_start
        record(
            "stalled_log_sink",
            connections=connections,
            storm_s=round(seconds, 1),
            queue_bound=MAX_QUEUED_RECORDS,
            rss_growth_mib=round(growth / MiB, 1),
            bytes_per_connection=round(growth / connections),
            dropped_lines=dropped,
            dropped_line_written=told,
            sigterm_exit_code=rc,
            sigterm_exit_s=round(stop_s, 1),
        )
        assert dropped > 0
        assert told, reader.text[-2000:]
        # Unbounded: ~1,190 B per connection (45 MiB); bounded, the queue's records (a few MiB).
        assert growth < 20 * MiB, growth
        assert rc == 0
        assert stop_s < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        reader.close()
        proc.stderr.close()
