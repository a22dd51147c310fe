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
- ``durable``: ``dur`` durable.

Reported per variant: the rate, the broker's CPU per message and its minor
page faults per 1,000 messages, medians over the rounds (every round listed).

    .venv/bin/python benchmarks/turn_later.py [--rounds 5] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import durable_cost as dc  # the same brokers and bench runs

HEAP_KEPT = "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432"
VARIANTS = ("plain", "a turn later", "a turn later, heap kept", "3 ms later, heap kept", "durable")
HELD_S = {"a turn later": 0.0, "a turn later, heap kept": 0.0, "3 ms later, heap kept": 0.003}


def serve_a_turn_later(held_s: float, argv: list[str]) -> int:
    """Run ``hpfeeds-broker argv`` with each run delivered in the next loop turn,
    or ``held_s`` seconds after the turn that read it."""
    from hpfeeds3.broker.cli import main
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
    sys.argv = ["hpfeeds-broker", *argv]
    return main()


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])


def one(variant: str, launcher: str, duration: float) -> dict[str, Any]:
    env = {"GLIBC_TUNABLES": HEAP_KEPT} if variant.endswith("heap kept") else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        exe = f"{launcher}-{HELD_S[variant]:g}" if variant in HELD_S else ""
        with dc.broker(variant == "durable", True, exe=exe) as (port, proc, _tmp):
            cpu0, faults0 = dc.cpu_s(proc.pid), minor_faults(proc.pid)
            rec = dc.bench(port, "pubsub-100", duration, "--sub-ident", "dur")
            cpu1, faults1 = dc.cpu_s(proc.pid), minor_faults(proc.pid)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    messages = rec["value"] * duration
    return {
        "rate": rec["value"],
        "ns": (cpu1 - cpu0) / messages * 1e9,
        "faults": (faults1 - faults0) / messages * 1000,
    }


def main() -> int:
    if sys.argv[1:2] == ["--as-broker"]:
        return serve_a_turn_later(float(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as d:
        launcher = os.path.join(d, "hpfeeds-broker-held")
        for held_s in set(HELD_S.values()):
            script = Path(f"{launcher}-{held_s:g}")
            me = Path(__file__).resolve()
            script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{me}" --as-broker {held_s:g} "$@"\n')
            script.chmod(0o755)
        for r in range(args.rounds):
            for variant in VARIANTS:
                got = one(variant, launcher, args.duration)
                runs[variant].append(got)
                print(
                    f"round {r + 1} {variant}: {got['rate']:,.0f} msg/s, {got['ns']:.0f} ns of broker CPU a message,"
                    f" {got['faults']:.2f} minor faults per 1,000 messages",
                    flush=True,
                )
    base = statistics.median(x["rate"] for x in runs["plain"])
    print(f"\npubsub-100, medians of {args.rounds} rounds (per round in brackets):\n")
    print("| variant | msg/s | against plain | broker ns a message | minor faults per 1,000 messages |")
    print("|---|---:|---:|---:|---:|")
    for variant, rows in runs.items():
        rate = statistics.median(x["rate"] for x in rows)
        each = ", ".join(f"{x['rate'] / 1e6:.2f}" for x in rows)
        print(
            f"| {variant} | {rate / 1e6:.2f} M ({each}) | {rate / base - 1:+.1%} |"
            f" {statistics.median(x['ns'] for x in rows):.0f} | {statistics.median(x['faults'] for x in rows):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
