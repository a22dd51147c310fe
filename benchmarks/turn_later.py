#!/usr/bin/env python3
"""What delivering each run one loop turn later costs, with no log at all: a
yardstick for the durable subscriber's cost (docs/durable.md, "Cost").

A durable subscriber is sent a run only once the log's writer has written
it, so the broker holds every run past the loop turn that read it. This runs
``hpfeeds-bench`` pubsub-100 (the bench's subscriber 0 as key ``dur``, as
``durable_cost.py`` does) against fresh brokers, interleaved:

- ``plain``: ``dur`` not durable;
- ``a turn later``: the same, with the broker's router patched to deliver
  each run in the next loop turn (``loop.call_soon``), no log involved;
- ``a turn later, heap kept``: the same with glibc told not to give freed
  memory back (``GLIBC_TUNABLES`` trim and mmap thresholds), so each read's
  buffer reuses memory already mapped;
- ``3 ms later, heap kept``: each loop turn's runs delivered 3 ms later
  (``loop.call_later``), as long as a busy log writer pauses between
  batches (``durable.segments.BUSY_PAUSE_S``): runs held as long as a
  durable subscriber's are, still with no log;
- ``durable``: ``dur`` durable;
- ``durable, no checksum``: the same with the log's CRC-32C not computed (a
  zero in its place: a log no restart could recover, for this yardstick
  only), to see what the checksum, which holds the interpreter's lock, costs;
- ``durable, written on the loop``: the same with the log's writes made by the
  event loop itself, each run as it is appended, and the durable subscriber
  fed in the same call: no writer thread between the read and the send (the
  writer thread still syncs and keeps the bounds, racing the loop's writes:
  for this yardstick only, as DESIGN.md keeps the log's writes off the loop).
  What is left of the cost once no thread hands anything over;
- ``durable, 256 MiB kept``: ``durable`` with 256 MiB of just-written records
  kept in memory (``durable.segments.RECENT_BYTES``) instead of 2 MiB: the
  yardstick for the next one;
- ``durable, nothing stored``: the same 256 MiB kept, no checksum, and the
  log's ``writev`` only counting the bytes it was given: nothing reaches the
  file (the feed never reads it: every record it sends is still in memory).
  The durable subscriber with storage taken out: what the delivery itself
  costs (for this yardstick only, a log that keeps nothing);
- ``plain, memory copied beside it``: ``plain`` while another process copies
  ``--copy-mbs`` MB a second from one buffer into a 64 MiB ring, as the
  log's writer moves each message through memory beside the loop (its
  checksum reads it, its ``writev`` copies it into the page cache): what
  that traffic alone costs the loop on this machine.

Reported per variant: the rate, the broker's CPU per message, split into its
event loop's (the main thread) and the other threads' (the log's writer and
syncer, the log-line writer), and its minor page faults per 1,000 messages,
medians over the rounds (every round listed). The loop's share is what
bounds the rate: the broker's other threads run on the other core.

    .venv/bin/python benchmarks/turn_later.py [--rounds 5] [--duration 5] [--copy-mbs 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import durable_cost as dc  # the same brokers and bench runs
import machine_noise

HEAP_KEPT = "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432"
VARIANTS = (
    "plain",
    "a turn later",
    "a turn later, heap kept",
    "3 ms later, heap kept",
    "durable",
    "durable, no checksum",
    "durable, written on the loop",
    "durable, 256 MiB kept",
    "durable, nothing stored",
    "plain, memory copied beside it",
)
# How each variant's broker is started: ``--as-broker MODE``, or this environment's broker.
MODES = {
    "a turn later": "turn-0",
    "a turn later, heap kept": "turn-0",
    "3 ms later, heap kept": "turn-0.003",
    "durable, no checksum": "no-checksum",
    "durable, written on the loop": "on-the-loop",
    "durable, 256 MiB kept": "kept-256m",
    "durable, nothing stored": "nothing-stored",
}
KEPT_BYTES = 256 * 1024 * 1024  # of just-written records, for the two variants that keep more


def serve(mode: str, argv: list[str]) -> int:
    """Run ``hpfeeds-broker argv``, patched as ``mode`` says."""
    from hpfeeds3.broker.cli import main

    if mode == "no-checksum":
        without_checksum()
    elif mode == "on-the-loop":
        written_on_the_loop()
    elif mode == "kept-256m":
        kept_in_memory()
    elif mode == "nothing-stored":
        kept_in_memory()
        without_checksum()
        nothing_written()
    else:
        deliver_a_turn_later(float(mode.removeprefix("turn-")))
    sys.argv = ["hpfeeds-broker", *argv]
    return main()


def without_checksum() -> None:
    """Records written with a zero where their CRC-32C goes (this process's readers
    do not check it again: docs/durable.md)."""
    from hpfeeds3.broker.durable import format as fmt
    from hpfeeds3.broker.durable import segments

    def encode_header(first_seq: int, count: int, time_ms: int, payload: bytes, magic: bytes = fmt.MAGIC) -> bytes:
        return fmt.HEADER.pack(magic, len(payload), first_seq, count, time_ms, 0)

    segments.encode_header = encode_header  # type: ignore[assignment]


def written_on_the_loop() -> None:
    """Each run written by the caller of ``append`` (the event loop) as it is appended;
    the writer thread writes nothing (it still syncs and keeps the bounds)."""
    from hpfeeds3.broker.durable.segments import SegmentLog

    append = SegmentLog.append

    def append_and_write(self: SegmentLog, channel: bytes, data: bytes, frames: int) -> int:
        end = append(self, channel, data, frames)
        self._write_channel(self._channels[channel])
        self.written_batches += 1  # the router feeds the durable connections now
        return end

    SegmentLog._write_pending = lambda self: False  # type: ignore[method-assign]
    SegmentLog.append = append_and_write  # type: ignore[method-assign]


def kept_in_memory() -> None:
    """``KEPT_BYTES`` of just-written records kept in memory, not 2 MiB."""
    from hpfeeds3.broker.durable import segments

    segments.RECENT_BYTES = KEPT_BYTES


def nothing_written() -> None:
    """The log's ``writev`` counts the bytes and writes none (its files stay empty)."""
    from hpfeeds3.broker.durable import segments

    counting_os = types.SimpleNamespace(**vars(os))
    counting_os.writev = lambda fd, buffers: sum(map(len, buffers))
    segments.os = counting_os  # type: ignore[assignment]


def deliver_a_turn_later(held_s: float) -> None:
    """Each run delivered in the next loop turn, or ``held_s`` seconds after the turn that read it."""
    from hpfeeds3.broker.router import Router

    deliver_now = Router.deliver_local
    held: dict[Router, list[tuple[bytes, bytes, int]]] = {}

    def deliver_local(self: Router, channel: bytes, data: bytes, count: int) -> int:
        runs = held.get(self)
        if runs is None:
            runs = held[self] = []
            loop = asyncio.get_running_loop()
            if held_s:
                loop.call_later(held_s, flush, self)
            else:
                loop.call_soon(flush, self)
        runs.append((channel, data, count))
        return 1

    def flush(router: Router) -> None:
        for channel, data, count in held.pop(router):
            deliver_now(router, channel, data, count)

    Router.deliver_local = deliver_local  # type: ignore[method-assign]


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread (the event loop), user and system."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_memory(mb_per_s: float) -> NoReturn:
    """Copy 256 KiB at a time into a 64 MiB ring, ``mb_per_s`` MB a second, until killed."""
    ring = bytearray(64 * 1024 * 1024)
    chunk = os.urandom(256 * 1024)
    at = done = 0
    start = time.perf_counter()
    while True:
        ring[at : at + len(chunk)] = chunk
        at = (at + len(chunk)) % len(ring)
        done += len(chunk)
        ahead = done / (mb_per_s * 1e6) - (time.perf_counter() - start)
        if ahead > 0:
            time.sleep(ahead)


def one(variant: str, launcher: str, duration: float, copy_mbs: float) -> dict[str, Any]:
    env = {"GLIBC_TUNABLES": HEAP_KEPT} if variant.endswith("heap kept") else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    copier = None
    if variant == "plain, memory copied beside it":
        me = str(Path(__file__).resolve())
        copier = subprocess.Popen([sys.executable, me, "--copy-memory", str(copy_mbs)])
    try:
        exe = f"{launcher}-{MODES[variant]}" if variant in MODES else ""
        with dc.broker(variant.startswith("durable"), True, exe=exe) as (port, proc, _tmp):
            cpu0, loop0, faults0 = dc.cpu_s(proc.pid), loop_cpu_s(proc.pid), minor_faults(proc.pid)
            rec = dc.bench(port, "pubsub-100", duration, "--sub-ident", "dur")
            cpu1, loop1, faults1 = dc.cpu_s(proc.pid), loop_cpu_s(proc.pid), minor_faults(proc.pid)
    finally:
        if copier is not None:
            copier.kill()
            copier.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    messages = rec["value"] * duration
    return {
        "rate": rec["value"],
        "ns": (cpu1 - cpu0) / messages * 1e9,
        "loop_ns": (loop1 - loop0) / messages * 1e9,
        "others_ns": ((cpu1 - cpu0) - (loop1 - loop0)) / messages * 1e9,
        "faults": (faults1 - faults0) / messages * 1000,
    }


def main() -> int:
    if sys.argv[1:2] == ["--as-broker"]:
        return serve(sys.argv[2], sys.argv[3:])
    if sys.argv[1:2] == ["--copy-memory"]:
        copy_memory(float(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument(
        "--copy-mbs", type=float, default=400.0, help="MB a second copied beside the plain broker (default 400)"
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    steady_before = machine_noise.steadiness()
    with tempfile.TemporaryDirectory() as d:
        launcher = os.path.join(d, "hpfeeds-broker-held")
        for mode in set(MODES.values()):
            script = Path(f"{launcher}-{mode}")
            me = Path(__file__).resolve()
            script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{me}" --as-broker {mode} "$@"\n')
            script.chmod(0o755)
        for r in range(args.rounds):
            for variant in VARIANTS:
                got = one(variant, launcher, args.duration, args.copy_mbs)
                runs[variant].append(got)
                print(
                    f"round {r + 1} {variant}: {got['rate']:,.0f} msg/s, {got['ns']:.0f} ns of broker CPU a message"
                    f" ({got['loop_ns']:.0f} the loop's, {got['others_ns']:.0f} the other threads'),"
                    f" {got['faults']:.2f} minor faults per 1,000 messages",
                    flush=True,
                )
    # A difference smaller than the machine's own spread is the machine's (machine_noise.py).
    print(f"\nMachine steadiness before the rounds: {steady_before}; after: {machine_noise.steadiness()}")
    base = statistics.median(x["rate"] for x in runs["plain"])
    print(f"\npubsub-100, medians of {args.rounds} rounds (per round in brackets):\n")
    print(
        "| variant | msg/s | against plain | broker ns a message | the loop's | the other threads'"
        " | minor faults per 1,000 messages |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, rows in runs.items():
        rate = statistics.median(x["rate"] for x in rows)
        each = ", ".join(f"{x['rate'] / 1e6:.2f}" for x in rows)
        print(
            f"| {variant} | {rate / 1e6:.2f} M ({each}) | {rate / base - 1:+.1%} |"
            f" {statistics.median(x['ns'] for x in rows):.0f} | {statistics.median(x['loop_ns'] for x in rows):.0f}"
            f" | {statistics.median(x['others_ns'] for x in rows):.0f}"
            f" | {statistics.median(x['faults'] for x in rows):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
