"""trickle: 1 MiB PUBLISH frames arriving in small writes.

Sensors on slow links deliver large frames (binaries, session logs) in
MSS-sized pieces, and a hostile client can cut them smaller still. The
broker's cost per byte received must not depend on how the bytes are cut:
this scenario sends the same 1 MiB frames in 128-byte, 1,448-byte (one
Ethernet MSS) and 64 KiB writes, with TCP_NODELAY so each write leaves as
its own segment, and reports the broker's CPU time per MiB received for
each, and the ratio of the small writes to the 64 KiB ones.

Every frame carries its sequence number and is checked on a subscriber:
a lost, reordered or corrupted frame fails the run.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

from ..protocol import MiB, Publish, encode_publish
from .wire import SETUP_PREFIX, BenchError, Target

WRITE_SIZES = (128, 1448, 64 * 1024)
BASELINE_WRITE = 64 * 1024
# Small writes are paced, as a slow link delivers them: unpaced, they pile up
# in the socket buffer and the broker reads them in large chunks, which hides
# the cost of small reads. 100 µs between writes: 10,000 writes/s.
PACE_S = {128: 100e-6, 1448: 100e-6}
FRAMES_PER_SIZE = 4
SMOKE_FRAMES_PER_SIZE = 1
_SEQ = struct.Struct(">Q")


def _cpu_seconds(pid: int) -> float:
    """CPU time of the broker's main thread (its event loop), in nanoseconds' precision.

    /proc/PID/schedstat counts in ns; /proc/PID/stat only in clock ticks
    (10 ms), too coarse for a few MiB."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _frames(target: Target, count: int, write: int) -> list[bytes]:
    # The largest PUBLISH the broker accepts: ident + channel + payload = 1 MiB.
    payload_len = MiB - 2 - len(target.ident) - len(target.channel)
    filler = bytes(range(256)) * (payload_len // 256 + 1)
    return [
        encode_publish(target.ident, target.channel, _SEQ.pack(write) + _SEQ.pack(i) + filler[: payload_len - 16])
        for i in range(count)
    ]


def _send_in_pieces(sock: Any, frames: list[bytes], write: int, failure: list[BaseException]) -> None:
    pace = PACE_S.get(write, 0.0)
    try:
        for frame in frames:
            view = memoryview(frame)
            for off in range(0, len(view), write):
                sock.sendall(view[off : off + write])
                if pace:
                    time.sleep(pace)
    except BaseException as e:  # reported by the receiving side
        failure.append(e)


def run_trickle(target: Target, *, broker_pid: int | None, smoke: bool) -> dict[str, Any]:
    count = SMOKE_FRAMES_PER_SIZE if smoke else FRAMES_PER_SIZE
    sub = target.sub_client()
    pub = target.client()
    try:
        sub.subscribe_confirmed(target.channel, SETUP_PREFIX + b"trickle", timeout=10.0)
        result: dict[str, Any] = {"frames_per_size": count, "frame_bytes": 0}
        per_mib: dict[int, float] = {}
        for write in WRITE_SIZES:
            frames = _frames(target, count, write)
            overhead = 5 + 2 + len(target.ident) + len(target.channel)
            result["frame_bytes"] = len(frames[0])
            failure: list[BaseException] = []
            cpu_before = _cpu_seconds(broker_pid) if broker_pid else None
            started = time.monotonic()
            sender = threading.Thread(target=_send_in_pieces, args=(pub.sock, frames, write, failure), daemon=True)
            sender.start()
            for i in range(count):
                frame = sub.read_frame(timeout=60.0)
                if not isinstance(frame, Publish) or frame.channel != target.channel:
                    raise BenchError(f"trickle: unexpected frame {frame!r:.80}")
                got = (_SEQ.unpack_from(frame.payload, 0)[0], _SEQ.unpack_from(frame.payload, 8)[0])
                if got != (write, i):
                    raise BenchError(f"trickle: expected frame {i} of the {write}-byte run, got {got}")
                if not frames[i].endswith(frame.payload) or len(frames[i]) - len(frame.payload) != overhead:
                    raise BenchError(f"trickle: frame {i} of the {write}-byte run arrived corrupted")
            sender.join(60.0)
            if failure:
                raise BenchError(f"trickle: sending failed: {failure[0]!r}")
            wall = time.monotonic() - started
            mib = count * len(frames[0]) / MiB
            result[f"wall_ms_per_mib_w{write}"] = round(1000 * wall / mib, 2)
            if cpu_before is not None and broker_pid:
                per_mib[write] = 1000 * (_cpu_seconds(broker_pid) - cpu_before) / mib
                result[f"broker_cpu_ms_per_mib_w{write}"] = round(per_mib[write], 2)
        pub.check_no_error()
        if per_mib:
            base = max(per_mib[BASELINE_WRITE], 1e-3)
            for write in WRITE_SIZES[:-1]:
                result[f"ratio_w{write}_vs_64k"] = round(per_mib[write] / base, 2)
            result["worst_ratio"] = max(result[f"ratio_w{w}_vs_64k"] for w in WRITE_SIZES[:-1])
        return result
    finally:
        pub.close()
        sub.close()
