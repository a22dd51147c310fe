"""atheris target: the decoder and the broker's session, fed in fuzzer-chosen chunks.

What runs on a live broker is what is fuzzed: the same ``Decoder`` (frames
for clients, runs for the broker) and the broker's ``Session`` behind it.

Contract checked: nothing but ``ProtocolError`` escapes the decoder, and
nothing at all escapes the session (a protocol error closes the connection
with a protocol close reason); the decoder never holds more than one frame's
cap plus one read; the session's subscriptions stay within its key's
channels. One ``feed()`` of at most 64 KiB returns within 10 ms (reported,
and fatal with ``HPFEEDS3_FUZZ_STRICT_TIME=1``: a loaded machine makes it noisy).

Run (see fuzz/README.md)::

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_decoder.py -atheris_runs=2000000 -max_len=70000 fuzz/corpus
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import atheris

# The session is driven through the test suite's recorder of its actions.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from tests.broker.session_support import auth_frame, drain, make_session

    from hpfeeds3.broker.reasons import CloseReason
    from hpfeeds3.broker.session import CLOSED
    from hpfeeds3.protocol import BROKER_TO_CLIENT, CLIENT_TO_BROKER, Decoder, ProtocolError

FEED_BOUND_S = 0.010
MAX_CHUNK = 64 * 1024
STRICT_TIME = os.environ.get("HPFEEDS3_FUZZ_STRICT_TIME") == "1"
PROTOCOL_CLOSES = {
    CloseReason.BAD_FRAME,
    CloseReason.FRAME_TOO_LARGE,
    CloseReason.SECOND_AUTH,
    CloseReason.TOO_MANY_DENIALS,
}
slowest = 0.0


def _timed(what: str, size: int, started: float) -> None:
    global slowest
    took = time.perf_counter() - started
    if took > slowest:
        slowest = took
        print(f"slowest {what} so far: {took * 1000:.2f} ms for {size} bytes", file=sys.stderr)
    if STRICT_TIME and took > FEED_BOUND_S:
        raise AssertionError(f"{what} of {size} bytes took {took * 1000:.1f} ms")


def fuzz_decoder(fdp: atheris.FuzzedDataProvider, runs: bool) -> None:
    accepted = CLIENT_TO_BROKER if runs or fdp.ConsumeBool() else BROKER_TO_CLIENT
    decoder = Decoder(accepted, runs=runs)
    cap = max(decoder._max_len)
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, MAX_CHUNK))
        started = time.perf_counter()
        try:
            decoder.feed(chunk)
        except ProtocolError:
            decoder = Decoder(accepted, runs=runs)
        _timed("decoder feed", len(chunk), started)
        if decoder.buffered > cap + len(chunk):
            raise AssertionError(f"decoder holds {decoder.buffered} bytes (cap {cap} + read {len(chunk)})")


def fuzz_session(fdp: atheris.FuzzedDataProvider) -> None:
    session, _ = make_session(max_denials=8, max_subscriptions=4, budget=fdp.ConsumeIntInRange(1, 64))
    drain(session, auth_frame())
    while fdp.remaining_bytes() and session.state != CLOSED:
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, MAX_CHUNK))
        started = time.perf_counter()
        drain(session, chunk)  # any exception is a crash
        _timed("session receive", len(chunk), started)
        if not session.subscriptions <= {b"chan1", b"chan2"}:
            raise AssertionError(f"subscribed beyond the key: {session.subscriptions}")
    if session.state == CLOSED and session.close_reason not in PROTOCOL_CLOSES:
        raise AssertionError(f"closed with {session.close_reason}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 2:
        fuzz_session(fdp)
    else:
        fuzz_decoder(fdp, runs=bool(mode))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
