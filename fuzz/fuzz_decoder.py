"""atheris target: the sans-I/O decoder, fed in fuzzer-chosen chunks.

Contract checked (issue 7, item 5): nothing but ``ProtocolError`` escapes
``Decoder.feed``; the decoder never holds more than one frame's cap plus one
read; one ``feed()`` of at most 64 KiB returns within 10 ms (reported, and
fatal with ``HPFEEDS3_FUZZ_STRICT_TIME=1``: a loaded machine makes it noisy).

Run (see fuzz/README.md)::

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_decoder.py -atheris_runs=2000000 -max_len=70000 fuzz/corpus
"""

from __future__ import annotations

import os
import sys
import time

import atheris

with atheris.instrument_imports():
    from hpfeeds3.protocol import BROKER_TO_CLIENT, CLIENT_TO_BROKER, Decoder, ProtocolError

FEED_BOUND_S = 0.010
MAX_CHUNK = 64 * 1024
STRICT_TIME = os.environ.get("HPFEEDS3_FUZZ_STRICT_TIME") == "1"
slowest = 0.0


def test_one_input(data: bytes) -> None:
    global slowest
    fdp = atheris.FuzzedDataProvider(data)
    decoder = Decoder(CLIENT_TO_BROKER if fdp.ConsumeBool() else BROKER_TO_CLIENT)
    cap = max(decoder._max_len)
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, MAX_CHUNK))
        t0 = time.perf_counter()
        try:
            decoder.feed(chunk)
        except ProtocolError:
            decoder = Decoder(CLIENT_TO_BROKER)
        took = time.perf_counter() - t0
        if took > slowest:
            slowest = took
            print(f"slowest feed so far: {took * 1000:.2f} ms for {len(chunk)} bytes", file=sys.stderr)
        if STRICT_TIME and took > FEED_BOUND_S:
            raise AssertionError(f"feed of {len(chunk)} bytes took {took * 1000:.1f} ms")
        if decoder.buffered > cap + len(chunk):
            raise AssertionError(f"decoder holds {decoder.buffered} bytes (cap {cap} + read {len(chunk)})")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
