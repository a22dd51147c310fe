#!/usr/bin/env python3
"""What a durable subscriber costs: ``hpfeeds-bench`` pubsub-100 and fanout
against fresh brokers, interleaved (A B C D E A B C D E ...):

- one of the bench's own subscribers durable vs not (the headline): the
  bench's subscriber 0 (``--sub-ident``) authenticates as key ``dur``, durable
  or not; same subscribers, every message verified by the bench;
- one more subscriber: no durable key, one plain extra reader (a key that is
  not durable) and one durable extra reader beside the bench's subscribers
  (what one more durable subscriber costs: it is one more subscriber);

then the replay rate of a large backlog with the broker's peak RSS during it;
disk bytes per message; the log's own CPU per message, in-process.

    .venv/bin/python benchmarks/durable_cost.py [--rounds 2] [--duration 5] [--backlog-mib 1024]
        [--baseline NAME=BROKER]

``--baseline`` adds the durable rows (the bench's subscriber durable, the
durable extra reader) on another ``hpfeeds-broker`` executable (an earlier
build) to each round, so that a change of the log is measured against what
it changes in the same interleaved run.

Every broker is started fresh in its own temporary directory (data directory
included); figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from hpfeeds3.protocol import Decoder, Info, encode_auth, encode_publish, encode_subscribe, sign

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_noise

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the sockets are held until all are bound, or a port
    just released could be handed out twice (the broker's and its exporter's)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def cpu_s(pid: int) -> float:
    """CPU seconds the process used so far (every thread, user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def broker(
    durable: bool, reader_key: bool | None = None, extra: tuple[str, ...] = (), exe: str = ""
) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """A fresh broker; the reader's key ``dur`` is there when ``reader_key`` (default:
    ``durable``), durable when ``durable``; ``extra``: more flags; ``exe``: another
    ``hpfeeds-broker`` than this environment's."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keys = tmp / "keys.json"
        subprocess.run([str(BIN / "hpfeeds-bench"), "--write-json", str(keys)], check=True, capture_output=True)
        users = json.loads(keys.read_text())
        if durable if reader_key is None else reader_key:
            # Publish too: as the bench's subscriber 0 it publishes a setup marker.
            users["dur"] = {"owner": "dur", "secret": "dur", "pubchans": ["bench"], "subchans": ["bench"]}
            users["dur"]["durable"] = durable
        keys.write_text(json.dumps(users))
        port, exporter = free_ports(2)
        args = [exe or str(BIN / "hpfeeds-broker"), "--bind", f"127.0.0.1:{port}", "--auth", str(keys)]
        args += ["--exporter", f"127.0.0.1:{exporter}"]
        args += ["--data-dir", str(tmp / "data"), *extra]
        with open(tmp / "broker.log", "wb") as log:
            proc = subprocess.Popen(args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while "serving" not in (tmp / "broker.log").read_text():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp / "broker.log").read_text())
                time.sleep(0.05)
            yield port, proc, tmp
        finally:
            proc.terminate()
            proc.wait(20)


class Reader(threading.Thread):
    """A durable collector that reads and counts the bytes."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.received = 0
        self.stopping = False
        decoder = Decoder.for_client()
        data = self.sock.recv(4096)
        info = decoder.feed(data)[0]
        assert isinstance(info, Info)
        self.sock.sendall(encode_auth(b"dur", sign(info.nonce, b"dur")) + encode_subscribe(b"dur", b"bench"))

    def wait_quiet(self, quiet_s: float = 0.5, timeout_s: float = 120.0) -> None:
        """Until nothing more arrives for ``quiet_s``: a durable reader behind the
        publishers receives the rest after them, and the broker's CPU for it counts."""
        deadline = time.monotonic() + timeout_s
        seen, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            if self.received != seen:
                seen, since = self.received, time.monotonic()
            time.sleep(0.05)

    def run(self) -> None:
        # Bytes are counted, not frames: the reader costs little next to the broker.
        self.sock.settimeout(0.5)
        while not self.stopping:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                return
            self.received += len(data)


def unstored(proc: subprocess.Popen[bytes]) -> int:
    """``hpfeeds_durable_unstored`` from the broker's exporter: messages the log did not store."""
    args = [str(a) for a in proc.args]  # type: ignore[union-attr]
    where = args[args.index("--exporter") + 1]
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("hpfeeds_durable_unstored "):
                return int(float(line.split()[1]))
    return 0


def bench(port: int, scenario: str, duration: float, *extra: str) -> dict[str, Any]:
    """``hpfeeds-bench``'s record of ``scenario``; ``extra``: more of its flags."""
    args = [str(BIN / "hpfeeds-bench"), "--port", str(port), "--duration", str(duration), "--json-only", *extra]
    out = subprocess.run([*args, scenario], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("scenario") == scenario:
            return dict(record)
    raise RuntimeError(out)


class Variant(NamedTuple):
    durable: bool  # key ``dur`` is durable
    reader: bool  # an extra reader as ``dur`` beside the bench's own subscribers
    bench_sub: bool  # the bench's subscriber 0 authenticates as ``dur`` (``--sub-ident``)
    exe: str = ""  # another ``hpfeeds-broker`` than this environment's


# The headline: one of the bench's own subscribers durable or not, the same subscribers.
SUB_PLAIN, SUB_DURABLE = "bench's subscriber not durable", "bench's subscriber durable"
# One subscriber more: the durable reader is one more subscriber; "one plain subscriber
# more" is the same reader with a key that is not durable, so the difference to it is
# what durability costs, and the difference to "no durable key" what one more durable
# subscriber costs.
NO_KEY, PLAIN_MORE, DURABLE_MORE = "no durable key", "one plain subscriber more", "one durable subscriber"
VARIANTS = {
    SUB_PLAIN: Variant(durable=False, reader=False, bench_sub=True),
    SUB_DURABLE: Variant(durable=True, reader=False, bench_sub=True),
    NO_KEY: Variant(durable=False, reader=False, bench_sub=False),
    PLAIN_MORE: Variant(durable=False, reader=True, bench_sub=False),
    DURABLE_MORE: Variant(durable=True, reader=True, bench_sub=False),
}


def baseline_label(label: str, name: str) -> str:
    return f"{label} ({name})"


def live_cost(
    rounds: int, duration: float, baseline: tuple[str, str] | None = None
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per scenario and label: (rate, broker CPU µs per message) of each round. The CPU
    is the broker's, every thread, over the whole bench run (warm-up included; the bench
    ends when its subscribers have verified every message) and, with an extra reader,
    until that reader has received everything (a durable reader may be behind the
    publishers), divided by rate x duration: steadier than the rate on a machine that
    is not quiet."""
    figures: dict[str, dict[str, list[tuple[float, float]]]] = {"pubsub-100": {}, "fanout": {}}
    variants = dict(VARIANTS)
    if baseline is not None:
        for label in (SUB_DURABLE, DURABLE_MORE):
            variants[baseline_label(label, baseline[0])] = VARIANTS[label]._replace(exe=baseline[1])
    for _ in range(rounds):
        for scenario in figures:
            for label, v in variants.items():
                with broker(v.durable, v.reader or v.bench_sub, exe=v.exe) as (port, proc, _tmp):
                    reader = None
                    if v.reader:
                        reader = Reader(port)
                        reader.start()
                    try:
                        cpu = cpu_s(proc.pid)
                        record = bench(port, scenario, duration, *(("--sub-ident", "dur") if v.bench_sub else ()))
                        if reader is not None:
                            reader.wait_quiet()  # what it has yet to receive is the bench's too
                        cpu = cpu_s(proc.pid) - cpu
                    finally:
                        if reader is not None:
                            reader.stopping = True
                    value = float(record["value"])
                    us = cpu / (value * duration) * 1e6
                    figures[scenario].setdefault(label, []).append((value, us))
                    # A writer that falls behind by more than the pending bound stores less
                    # and so costs less: a rate with messages not stored is not the cost.
                    lost = f"  {unstored(proc):,} not stored" if v.durable else ""
                    print(
                        f"{scenario:10} {label:40} {value:12,.0f}  {us:6.3f} µs CPU/msg"
                        f"  broker {record.get('broker_cpu_pct', '?')} % CPU  drain {record['drain_s']:.3f} s{lost}",
                        flush=True,
                    )
    return figures


def summary(scenario: str, by_label: dict[str, list[tuple[float, float]]], label: str, against: str) -> str:
    """``label`` against ``against``: medians of the rate and of the broker's CPU per message."""
    rate = statistics.median(v for v, _ in by_label[label])
    us = statistics.median(us for _, us in by_label[label])
    base = statistics.median(v for v, _ in by_label[against])
    base_us = statistics.median(us for _, us in by_label[against])
    return (
        f"{scenario}: {label} against {against}: median {base:,.0f} msg/s there, {rate:,.0f} here"
        f" ({rate / base - 1:+.1%}); broker CPU {base_us:.3f} µs/msg there, {us:.3f} here ({us / base_us - 1:+.1%})"
    )


def log_bytes(segments: Path) -> int:
    return sum(f.stat().st_size for f in segments.rglob("*.seg"))


def replay(backlog_mib: int, paced: bool = True) -> dict[str, float]:
    """A backlog of ``backlog_mib`` filled while its key is away, then replayed. ``paced``: the
    fill waits, every 16 MiB, for the log to have written what was sent (the replay is
    measured, not the fill; a single publisher outruns the writer where new page-cache
    pages are slow, and what it cannot queue is not stored, counted)."""
    payload = b"x" * 100
    frame = encode_publish(b"bench", b"bench", payload)
    count = backlog_mib * 1024 * 1024 // len(frame)
    # The whole backlog kept: at the default --durable-max-bytes (1 GiB of frames and
    # record headers) a 1 GiB backlog would lose its oldest messages.
    with broker(durable=True, extra=("--durable-max-bytes", str(2 * backlog_mib * 2**20))) as (port, proc, tmp):
        reader = Reader(port)  # the key follows the channel from its AUTH
        time.sleep(0.5)  # (its AUTH handled: not synchronisation of what is measured)
        reader.sock.close()  # away: what follows is its backlog
        pub = socket.create_connection(("127.0.0.1", port))
        info = Decoder.for_client().feed(pub.recv(4096))[0]
        assert isinstance(info, Info)
        pub.sendall(encode_auth(b"bench", sign(info.nonce, b"bench")))
        batch = frame * 1000
        segments = tmp / "data" / "durable" / "channels"
        step = 16 * 2**20 // len(batch)
        fill_start = time.monotonic()
        for i in range(count // 1000):
            pub.sendall(batch)
            if paced and i % step == step - 1:
                wait_until = time.monotonic() + 120
                while log_bytes(segments) < (i + 1) * len(batch) and time.monotonic() < wait_until:
                    time.sleep(0.01)
        pub.close()
        expected = (count // 1000) * 1000
        # Written when the log stops growing (records need not take a frame's bytes per
        # message: the count is checked at the reader, which must receive every frame).
        deadline = time.monotonic() + 600
        size, last_growth = -1, time.monotonic()
        while time.monotonic() - last_growth < 1.0:
            if time.monotonic() > deadline:
                raise RuntimeError("the backlog was never written")
            now_size = log_bytes(segments)
            if now_size != size:
                size, last_growth = now_size, time.monotonic()
            time.sleep(0.1)
        fill_s = last_growth - fill_start
        disk = log_bytes(segments)
        not_stored = unstored(proc)
        if not_stored:
            print(f"replay: {not_stored:,} of {expected:,} messages not stored by the fill", flush=True)
            expected -= not_stored
        rss_before = rss_mib(proc.pid)
        reader = Reader(port)
        start = time.monotonic()
        reader.start()
        peak = rss_before
        received, last_progress = 0, start
        while reader.received < expected * len(frame):
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.05)
            if reader.received != received:
                received, last_progress = reader.received, time.monotonic()
            elif time.monotonic() - last_progress > 30:
                said = [line for line in (tmp / "broker.log").read_text().splitlines() if "durable log:" in line]
                raise RuntimeError(
                    f"replay stalled at {reader.received:,} of {expected * len(frame):,} bytes"
                    f" ({reader.received / len(frame):,.1f} of {expected:,} messages); the broker said:\n"
                    + "\n".join(said)
                )
        elapsed = time.monotonic() - start
        reader.stopping = True
        return {
            "messages": expected,
            "backlog_mib": expected * len(frame) / 2**20,
            "replay_msgs_per_s": expected / elapsed,
            "replay_mib_per_s": expected * len(frame) / 2**20 / elapsed,
            "fill_s": fill_s,
            "fill_paced": paced,
            "not_stored": not_stored,
            "rss_before_mib": rss_before,
            "rss_peak_mib": peak,
            "disk_bytes_per_message": disk / expected,
            "frame_bytes": len(frame),
        }


def log_cost(mib: int) -> dict[str, float]:
    """The log alone, in this process: runs of 550 frames (64 KiB, a read's worth) appended,
    and read back as a durable feed does, every 16 runs; CPU per message on the caller's
    thread (append, read) and of the process (the writer and syncer included). Per call,
    so steadier than the rates on a machine that is not quiet."""
    from hpfeeds3.broker.durable import DurableConfig, SegmentLog
    from hpfeeds3.broker.durable.feed import CHUNK_BYTES

    frame = encode_publish(b"bench", b"bench", b"x" * 100)
    run = frame * 550
    runs = mib * 2**20 // len(run)
    with tempfile.TemporaryDirectory() as d:
        log = SegmentLog.open(DurableConfig(data_dir=d))
        try:
            log.follow("dur", b"bench")
            reader = log.open_reader(b"bench", 0)
            append_s = read_s = 0.0
            read = 0
            cpu = time.process_time()
            for i in range(runs):
                t = time.thread_time()
                log.append(b"bench", run, 550)
                append_s += time.thread_time() - t
                if i % 16 == 15 or i == runs - 1:
                    if not log.sync(60):
                        raise RuntimeError("the log was not written")
                    t = time.thread_time()
                    while (chunk := reader.read(CHUNK_BYTES)) is not None:
                        read += chunk.frames
                    read_s += time.thread_time() - t
            cpu = time.process_time() - cpu
            reader.close()
        finally:
            log.close()
    messages = runs * 550
    if read != messages:
        raise RuntimeError(f"read {read} of {messages} messages")
    return {
        "log_messages": messages,
        "append_ns_per_msg": append_s / messages * 1e9,
        "feed_read_ns_per_msg": read_s / messages * 1e9,
        "process_cpu_ns_per_msg": cpu / messages * 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="live rounds (0: none)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--backlog-mib", type=int, default=256, help="backlog replayed (0: none)")
    p.add_argument("--log-mib", type=int, default=256, help="appended and read in-process (0: none)")
    p.add_argument(
        "--unpaced-fill",
        action="store_true",
        help="fill the backlog as fast as one publisher can, not waiting for the writer (what it drops is counted)",
    )
    p.add_argument(
        "--baseline",
        metavar="NAME=BROKER",
        help="the durable rows on this hpfeeds-broker executable too, in every round",
    )
    args = p.parse_args()
    baseline = None
    if args.baseline:
        name, _, exe = args.baseline.partition("=")
        if not exe:
            p.error("--baseline wants NAME=BROKER")
        baseline = (name, exe)
    steady_before = machine_noise.steadiness() if args.rounds > 0 else ""
    figures = live_cost(args.rounds, args.duration, baseline)
    if args.rounds > 0:
        # A difference smaller than the machine's own spread is the machine's (machine_noise.py).
        print(f"Machine steadiness before the rounds: {steady_before}; after: {machine_noise.steadiness()}")
        print("One of the bench's subscribers durable vs not (the same subscribers):")
        for scenario, by_label in figures.items():
            print(summary(scenario, by_label, SUB_DURABLE, SUB_PLAIN))
            if baseline is not None:
                print(summary(scenario, by_label, SUB_DURABLE, baseline_label(SUB_DURABLE, baseline[0])))
        print("One durable subscriber more (an extra reader beside the bench's subscribers):")
        for scenario, by_label in figures.items():
            for against in (NO_KEY, PLAIN_MORE):
                print(summary(scenario, by_label, DURABLE_MORE, against))
            if baseline is not None:
                print(summary(scenario, by_label, DURABLE_MORE, baseline_label(DURABLE_MORE, baseline[0])))
    if args.log_mib > 0:
        print(json.dumps(log_cost(args.log_mib), indent=1))
    if args.backlog_mib > 0:
        print(json.dumps(replay(args.backlog_mib, paced=not args.unpaced_fill), indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
