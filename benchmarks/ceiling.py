#!/usr/bin/env python3
"""The ceiling: the least work a Python process can do per hpfeeds message.

Not a broker to run: a yardstick for ``benchmarks/compare``. It sends INFO,
accepts any AUTH without checking it, reads only each frame's length, opcode
and channel, handles SUBSCRIBE/UNSUBSCRIBE, and forwards the consecutive
PUBLISH frames of one read that go to the same channel with ONE write per
subscriber. No permissions, no limits, no metrics, no logging.

Its descriptor table is grown at start, as the broker's is
(``hpfeeds3.broker.fdtable``): in a process with threads (here
libuv's resolver pool) each growth of the table waits for an RCU grace period
inside ``accept()``, a stall of the kernel that is no work per message and
that a storm of 10,000 sensors would otherwise meet eight times.

Flow control is the one thing it adds, so that a slow subscriber cannot grow
its memory without bound during a benchmark: while any subscriber's transport
is above its high-water mark, every connection stops reading.

    python benchmarks/ceiling.py --bind 127.0.0.1:10000 [--tlscert C --tlskey K]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import struct

from hpfeeds3.broker.fdtable import presize_fd_table

INFO = struct.pack(">IB", 5 + 1 + 7 + 4, 1) + b"\x07ceiling" + os.urandom(4)
_unpack = struct.Struct(">IB").unpack_from

channels: dict[bytes, list[asyncio.Transport]] = {}
connections: set[Forwarder] = set()
paused = 0  # subscribers above their high-water mark


class Forwarder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.subscribed: set[bytes] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(INFO)  # type: ignore[attr-defined]
        connections.add(self)
        if paused:
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        end = len(buf)
        pos = 0
        run_start = 0
        run_channel = None
        # opcode + str8(ident) + str8(channel) of the frame before: a frame
        # that starts the same way is part of the same run, with no parsing.
        prefix = b"\xff"
        from_bytes = int.from_bytes
        while end - pos >= 5:
            length = from_bytes(buf[pos : pos + 4])
            if end - pos < length:
                break
            if not buf.startswith(prefix, pos + 4):
                opcode = buf[pos + 4]
                if opcode == 3:  # PUBLISH: str8 ident, str8 channel, payload
                    c = pos + 6 + buf[pos + 5]
                    channel = buf[c + 1 : c + 1 + buf[c]]
                    prefix = buf[pos + 4 : c + 1 + buf[c]]
                    if channel != run_channel:
                        if run_channel is not None:
                            self.forward(run_channel, buf[run_start:pos])
                        run_start, run_channel = pos, channel
                else:
                    prefix = b"\xff"
                    if run_channel is not None:
                        self.forward(run_channel, buf[run_start:pos])
                        run_channel = None
                    if opcode == 4 or opcode == 5:  # (UN)SUBSCRIBE: str8 ident, channel
                        self.subscription(opcode == 4, buf[pos + 6 + buf[pos + 5] : pos + length])
                    # AUTH (2) is accepted unchecked; anything else is ignored.
            pos += length
        if run_channel is not None:
            self.forward(run_channel, buf[run_start:pos])
        self.pending = buf[pos:]

    def subscription(self, subscribe: bool, channel: bytes) -> None:
        subs = channels.setdefault(channel, [])
        if subscribe and channel not in self.subscribed:
            self.subscribed.add(channel)
            subs.append(self.transport)  # type: ignore[arg-type]
        elif not subscribe and channel in self.subscribed:
            self.subscribed.discard(channel)
            subs.remove(self.transport)  # type: ignore[arg-type]

    @staticmethod
    def forward(channel: bytes, frames: bytes) -> None:
        subs = channels.get(channel)
        if subs:
            for transport in subs:
                transport.write(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        connections.discard(self)
        for channel in self.subscribed:
            channels[channel].remove(self.transport)  # type: ignore[arg-type]
        self.subscribed.clear()

    def pause_writing(self) -> None:
        global paused
        paused += 1
        if paused == 1:
            for c in connections:
                c.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        global paused
        paused -= 1
        if paused == 0:
            for c in connections:
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.resume_reading()


async def serve(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    presize_fd_table(1 << 16)  # or up to the open-files limit
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Forwarder, host, port, ssl=tls, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ceiling broker listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default="127.0.0.1:10000", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--tlscert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tlskey", help="and this key (PEM)")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    tls = None
    if args.tlscert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tlscert, args.tlskey)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, int(port), tls))
    else:
        uvloop.run(serve(host, int(port), tls))


if __name__ == "__main__":
    main()
