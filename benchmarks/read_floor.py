"""The event loop's own cost per read: the floor under ``hpfeeds-bench trickle``.

An empty ``asyncio.Protocol`` on uvloop receives 1 MiB in paced writes of 128
or 1,448 bytes (100 µs apart, as the trickle scenario sends them); its loop
thread's CPU time per MiB is what any Python broker pays for reads that small,
before it does any work of its own. Compare with the broker's
``broker_cpu_ms_per_mib_w128`` / ``_w1448`` figures.

    .venv/bin/python benchmarks/read_floor.py
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvloop

PACE_S = 100e-6
MiB = 1024 * 1024


class Empty(asyncio.Protocol):
    reads = 0

    def data_received(self, data: bytes) -> None:
        Empty.reads += 1


def thread_cpu_s() -> float:
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def measure(write: int) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Empty, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(MiB // write):
                s.sendall(b"x" * write)
                time.sleep(PACE_S)
            time.sleep(0.2)

    Empty.reads = 0
    started = thread_cpu_s()
    sender = threading.Thread(target=client)
    sender.start()
    while sender.is_alive():
        await asyncio.sleep(0.05)
    server.close()
    return Empty.reads, 1000 * (thread_cpu_s() - started)


async def main() -> None:
    for write in (128, 1448):
        reads, ms = await measure(write)
        print(f"{write:>5}-byte writes: {reads} reads, loop CPU {ms:.1f} ms per MiB")


if __name__ == "__main__":
    uvloop.run(main())
