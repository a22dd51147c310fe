#!/usr/bin/env python3
"""The least CPU that storing messages costs this machine, a yardstick for the
durable log (docs/durable.md, "Cost"): ``--mib`` MiB written the way the log's
writer writes, with none of its work around the writes: one ``writev`` per
record of ``--record-kib`` KiB (the log's largest record), a new segment file
every 16 MiB, an ``fsync`` a second of the file being written and of the files
finished since (a roll does not wait for the disk), and at the end. Reported per message of
``--message-bytes`` (a PUBLISH frame of the bench's pubsub-100 is 120 bytes):

- the process's CPU (the kernel's copy into the page cache and the file
  system's work per page, nearly all of it system time);
- the whole machine's busy time from just before to two seconds after, which
  adds the kernel's writeback threads.

Each repeat writes into new files. On a virtual machine whose host takes back
memory the guest freed, the first repeats may be several times slower than the
later ones (new page-cache pages fault in from the host): the spread says so.

    .venv/bin/python benchmarks/storage_floor.py [--mib 1024] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

SEGMENT_BYTES = 16 * 1024 * 1024


def machine_busy_ticks() -> int | None:
    """Busy clock ticks of all CPUs so far (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]  # less idle and iowait


def store(directory: str, total: int, record: bytes, sync_every_s: float) -> tuple[float, float]:
    """Write ``total`` bytes in records into segment files under ``directory``; returns
    (process CPU seconds, wall seconds)."""
    written = 0
    segment = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(os.path.join(directory, f"{segment:020d}.seg"), flags, 0o600)
    finished: list[int] = []  # segment files rolled past, synced and closed at the next sync
    cpu0 = os.times()
    start = last_sync = time.monotonic()
    try:
        while written < total:
            written += os.writev(fd, [record])
            if written // SEGMENT_BYTES != segment:
                finished.append(fd)
                segment = written // SEGMENT_BYTES
                fd = os.open(os.path.join(directory, f"{segment:020d}.seg"), flags, 0o600)
            now = time.monotonic()
            if now - last_sync >= sync_every_s:
                for old in finished:
                    os.fsync(old)
                    os.close(old)
                finished.clear()
                os.fsync(fd)
                last_sync = now
        for old in finished:
            os.fsync(old)
        os.fsync(fd)
    finally:
        for old in finished:
            os.close(old)
        os.close(fd)
    wall = time.monotonic() - start
    cpu1 = os.times()
    return cpu1.user - cpu0.user + cpu1.system - cpu0.system, wall


def spread(values: list[float]) -> str:
    """The median and every value, in ns."""
    return f"{statistics.median(values):.1f} ns ({', '.join(f'{v:.1f}' for v in values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB written per repeat (default 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--message-bytes", type=int, default=120, help="bytes per message the figures are per (120)")
    parser.add_argument("--record-kib", type=int, default=256, help="bytes per writev, in KiB (256)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of writeback counted after each repeat")
    parser.add_argument("--dir", default=None, help="where to write (in a new temporary directory)")
    args = parser.parse_args(argv)
    if args.mib < 1 or args.repeats < 1 or args.message_bytes < 1 or args.record_kib < 1:
        parser.error("--mib, --repeats, --message-bytes and --record-kib must be at least 1")

    record = os.urandom(args.record_kib * 1024)
    total = args.mib * 1024 * 1024
    messages = total / args.message_bytes
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    process_ns: list[float] = []
    machine_ns: list[float] = []
    for i in range(args.repeats):
        directory = tempfile.mkdtemp(prefix="storage-floor-", dir=args.dir)
        try:
            before = machine_busy_ticks()
            cpu, wall = store(directory, total, record, 1.0)
            time.sleep(args.settle)
            after = machine_busy_ticks()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        process_ns.append(cpu / messages * 1e9)
        line = f"repeat {i + 1}: {args.mib} MiB in {wall:.2f} s; process CPU {process_ns[-1]:.1f} ns a message"
        if before is not None and after is not None:
            machine_ns.append((after - before) * tick_s / messages * 1e9)
            line += f"; machine busy {machine_ns[-1]:.1f} ns a message (writeback included)"
        print(line, flush=True)
    summary = f"median of {args.repeats}, {args.message_bytes}-byte messages: process CPU {spread(process_ns)}"
    if machine_ns:
        summary += f"; machine busy {spread(machine_ns)}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
