"""Load generator for the soak test: ``python -m tests.reliability.soak_load``.

One asyncio process with many hpfeeds clients (publishers, stable and churning
subscribers) on one broker. Prints one JSON object with what it saw.

- Publishers publish at a fixed total rate, each to its own channel
  (``s<publisher>``); payload = (publisher, epoch, seq). A publisher
  that reconnects (churn) starts a new epoch.
- Stable subscribers (ident ``stable``) subscribe before publishing starts
  (the broker's /metrics counts each one first) and never change: they must
  receive every message of every epoch published to their channel.
- Churning subscribers switch to a channel they have not used on this
  connection every few seconds (UNSUBSCRIBE + SUBSCRIBE) and reconnect at
  random: per subscription, each sender's sequence must have no gap and no
  reordering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import struct
import time
from collections import defaultdict

from hpfeeds3.protocol import (
    Decoder,
    Error,
    Info,
    Publish,
    encode_auth,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    sign,
)

from .support import scrape

SUBSCRIPTIONS = "hpfeeds_broker_subscriptions"

STAMP = struct.Struct(">IIQ")  # publisher, epoch, seq


class Stats:
    def __init__(self) -> None:
        self.sent: dict[tuple[int, int], int] = defaultdict(int)  # (publisher, epoch) -> messages
        self.received = 0
        self.gaps = 0
        self.reordered = 0
        self.incomplete_stable = 0
        self.errors: list[str] = []
        self.reconnects = 0
        self.switches = 0
        self.connects = 0


# Sensors come from many hosts: clients take their source address from a pool
# of loopback addresses (all of 127.0.0.0/8 is local on Linux), as a fleet's
# reconnect storm would, instead of all 1,000 from one address.
_SOURCES = itertools.cycle([f"127.0.{a}.{b}" for a in range(1, 3) for b in range(1, 33)])


async def connect(port: int, ident: bytes, secret: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Decoder]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(next(_SOURCES), 0))
    decoder = Decoder.for_client()
    frames: list = []
    while not frames:
        data = await reader.read(4096)
        if not data:
            raise ConnectionError("closed before INFO")
        frames = decoder.feed(data)
    info = frames[0]
    assert isinstance(info, Info), info
    writer.write(encode_auth(ident, sign(info.nonce, secret)))
    return reader, writer, decoder


async def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def publisher(n: int, args: argparse.Namespace, stats: Stats, start: asyncio.Event, end: float) -> None:
    channel = f"s{n % args.publishers}".encode()
    interval = args.publishers / args.rate
    epoch = 0
    await start.wait()
    await asyncio.sleep(random.random() * interval)
    while time.monotonic() < end:
        _, writer, _ = await connect(args.port, b"pub", b"pub-secret")
        stats.connects += 1
        seq = 0
        next_at = time.monotonic()
        life = random.expovariate(args.churn) if args.churn else float("inf")
        born = time.monotonic()
        while time.monotonic() < end and time.monotonic() - born < life:
            writer.write(encode_publish(b"pub", channel, STAMP.pack(n, epoch, seq) + b"x" * args.payload))
            stats.sent[(n, epoch)] += 1
            seq += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await close(writer)
        epoch += 1
        stats.reconnects += 1
    stats.reconnects -= 1


async def subscriber(
    n: int, args: argparse.Namespace, stats: Stats, ready: asyncio.Event, end: float, stable: bool, expect: dict
) -> None:
    rng = random.Random(n)
    while time.monotonic() < end + (1.5 if stable else 0):
        ident = b"stable" if stable else b"sub"
        reader, writer, decoder = await connect(args.port, ident, ident + b"-secret")
        stats.connects += 1
        used: set[bytes] = set()
        channel = f"s{n % args.publishers if stable else rng.randrange(args.channels)}".encode()
        used.add(channel)
        writer.write(encode_subscribe(ident, channel))
        if stable:
            expect[n] = (channel, defaultdict(list))
        last: dict[tuple[bytes, int, int], int] = {}
        born = time.monotonic()
        life = float("inf") if stable or not args.churn else rng.expovariate(args.churn)
        next_switch = born + rng.uniform(1, 2 * args.switch_every)
        if stable:
            ready.set() if n == args.stable - 1 else None
        while True:
            now = time.monotonic()
            if now > end + (1.5 if stable else 0) or now - born > life:
                break
            if not stable and now > next_switch and len(used) < args.channels:
                new = channel
                while new in used:
                    new = f"s{rng.randrange(args.channels)}".encode()
                writer.write(encode_unsubscribe(b"sub", channel) + encode_subscribe(b"sub", new))
                used.add(new)
                channel = new
                stats.switches += 1
                next_switch = now + rng.uniform(1, 2 * args.switch_every)
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            if not data:
                stats.errors.append(f"subscriber {n} closed by broker")
                break
            for frame in decoder.feed(data):
                if isinstance(frame, Error):
                    stats.errors.append(frame.message)
                    continue
                assert isinstance(frame, Publish)
                p, epoch, seq = STAMP.unpack_from(frame.payload)
                stats.received += 1
                key = (frame.channel, p, epoch)
                prev = last.get(key)
                if prev is not None:
                    if seq <= prev:
                        stats.reordered += 1
                    elif seq != prev + 1:
                        stats.gaps += 1
                last[key] = seq
                if stable:
                    expect[n][1][(p, epoch)].append(seq)
        await close(writer)
        if stable:
            return
        stats.reconnects += 1


def wait_stable_subscribed(exporter: int, n: int, timeout: float = 30.0) -> None:
    """Until the broker counts every stable subscription (ident ``stable``) on /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(exporter)
        count = sum(v for (name, labels), v in samples.items() if name == SUBSCRIPTIONS and 'ident="stable"' in labels)
        if count == n:
            return
        assert time.monotonic() < deadline, f"{count} of {n} stable subscriptions in place"
        time.sleep(0.05)


async def main_async(args: argparse.Namespace) -> dict:
    stats = Stats()
    start, ready = asyncio.Event(), asyncio.Event()
    t0 = time.monotonic()
    end = t0 + args.seconds
    expect: dict = {}
    tasks = []
    churners = args.clients - args.publishers - args.stable
    for n in range(args.stable):
        tasks.append(asyncio.create_task(subscriber(n, args, stats, ready, end, True, expect)))
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    for n in range(args.stable, args.stable + churners):
        tasks.append(asyncio.create_task(subscriber(n, args, stats, ready, end, False, expect)))
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.to_thread(wait_stable_subscribed, args.exporter, args.stable)
    tasks += [asyncio.create_task(publisher(n, args, stats, start, end)) for n in range(args.publishers)]
    start.set()
    publishing_from = time.monotonic()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    # Stable subscribers: every message of every epoch published to their channel, in order.
    for _n, (channel, got) in expect.items():
        ch = int(channel[1:])
        for (p, epoch), count in stats.sent.items():
            if p % args.publishers == ch and got.get((p, epoch)) != list(range(count)):
                stats.incomplete_stable += 1
    sent = sum(stats.sent.values())
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "clients": args.clients,
        "publishers": args.publishers,
        "stable_subscribers": args.stable,
        "churning_subscribers": churners,
        "messages_sent": sent,
        "publishing_s": round(end - publishing_from, 1),
        "publish_rate_msg_s": round(sent / max(0.1, end - publishing_from)),
        "deliveries_received": stats.received,
        "gaps": stats.gaps,
        "reordered": stats.reordered,
        "incomplete_stable_sender_streams": stats.incomplete_stable,
        "connects": stats.connects,
        "reconnects": stats.reconnects,
        "channel_switches": stats.switches,
        "errors": stats.errors[:10],
        "error_count": len(stats.errors),
        "task_failures": failures[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exporter", type=int, required=True, help="the broker's /metrics port")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--publishers", type=int, default=200)
    p.add_argument("--stable", type=int, default=100)
    # Publisher n publishes to channel s<n>; churning subscribers pick among
    # all channels, so most of their picks are quiet (fan-out ~1.4 per message).
    p.add_argument("--channels", type=int, default=800)
    p.add_argument("--rate", type=float, default=5000)
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--churn", type=float, default=0.02, help="reconnects per client per second")
    p.add_argument("--switch-every", type=float, default=3.0, help="mean seconds between channel switches")
    args = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
