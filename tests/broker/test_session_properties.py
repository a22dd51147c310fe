"""Properties of the Session, by hypothesis.

- Only ``ProtocolError`` is handled inside; nothing escapes ``receive``.
- The actions for a stream are the same however it is split into reads
  (publishes compared after merging what a read boundary splits).
- The run fast path does what a frame-by-frame reference does, for random
  mixes of channels, idents, denials, control frames and junk.
- Merging a closed connection's publish counters into the totals adds them,
  slot by slot, whatever the payload sizes.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.session import PublishStats
from hpfeeds3.protocol import (
    HEADER,
    Auth,
    Decoder,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    encode,
    encode_auth,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
)

from .session_support import auth_frame, drain, make_session, normalized

EXAMPLES = int(os.environ.get("HPFEEDS3_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX_DENIALS = 6
MAX_SUBSCRIPTIONS = 2

_VALID = [
    encode_publish(b"alice", b"chan1", b"payload"),
    encode_publish(b"alice", b"chan1", b""),
    encode_publish(b"alice", b"chan2", b"x" * 40),
    encode_publish(b"alice", b"denied", b"x"),
    encode_publish(b"mallory", b"chan1", b"spoof"),
    encode_subscribe(b"alice", b"chan1"),
    encode_subscribe(b"alice", b"chan2"),
    encode_subscribe(b"alice", b"denied"),
    encode_subscribe(b"mallory", b"chan1"),
    encode_unsubscribe(b"alice", b"chan1"),
    encode_unsubscribe(b"mallory", b"chan2"),
    encode_auth(b"alice", b"\x00" * 20),
]
_valid_frames = st.lists(st.sampled_from(_VALID), max_size=40)
_pieces = st.one_of(
    st.sampled_from(_VALID),
    st.sampled_from(_VALID),
    st.binary(max_size=24),
    st.builds(lambda n, op: HEADER.pack(n, op), st.integers(0, 2**32 - 1), st.integers(0, 7)),
)


def _splits(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces, pos = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[pos:cut])
        pos = cut
    return pieces


def _run_session(pieces: list[bytes], budget: int) -> list[tuple]:
    session, rec = make_session(max_denials=MAX_DENIALS, max_subscriptions=MAX_SUBSCRIPTIONS, budget=budget)
    drain(session, auth_frame())
    rec.log.clear()
    for piece in pieces:
        drain(session, piece)
    assert rec.pre_auth_left == 1
    return normalized(rec.log)


def _shape(log: list[tuple]) -> list[tuple]:
    """Sends and closes compared by their ERROR token; publishes and subscriptions exactly."""
    out = []
    for entry in log:
        if entry[0] == "send":
            out.append(("send", entry[1][5:].split(b":")[0]))
        elif entry[0] == "close":
            out.append(("close", entry[1]))
        else:
            out.append(entry)
    return out


def _reference(stream: bytes) -> list[tuple]:
    """Frame by frame, the rules as PROTOCOL.md states them."""
    decoder = Decoder.for_broker()
    decoder.receive(stream)
    out: list[tuple] = []
    denials = 0
    subscriptions: set[bytes] = set()
    allowed = {b"chan1", b"chan2"}

    def close(reason: CloseReason) -> list[tuple]:
        for channel in subscriptions:
            out.append(("unsubscribe", channel))
        out.append(("close", reason))
        return normalized(out)

    while True:
        try:
            frame = decoder.next_item()
        except ProtocolError as e:
            return close(CloseReason.FRAME_TOO_LARGE if e.reason == "frame_too_large" else CloseReason.BAD_FRAME)
        if frame is None:
            return normalized(out)
        denied = None
        if isinstance(frame, Auth):
            return close(CloseReason.SECOND_AUTH)
        if frame.ident != b"alice":
            denied = b"identfail"
        elif isinstance(frame, Publish):
            if frame.channel in allowed:
                out.append(("publish", frame.channel, encode(frame), 1))
            else:
                denied = b"accessfail"
        elif isinstance(frame, Subscribe):
            if frame.channel not in allowed:
                denied = b"accessfail"
            elif frame.channel not in subscriptions:
                if len(subscriptions) >= MAX_SUBSCRIPTIONS:
                    denied = b"limit"
                else:
                    subscriptions.add(frame.channel)
                    out.append(("subscribe", frame.channel))
        elif isinstance(frame, Unsubscribe) and frame.channel in subscriptions:
            subscriptions.discard(frame.channel)
            out.append(("unsubscribe", frame.channel))
        if denied is not None:
            denials += 1
            if denials > MAX_DENIALS:
                return close(CloseReason.TOO_MANY_DENIALS)
            out.append(("send", denied))


@PROPERTY
@given(st.lists(_pieces, max_size=50), st.data(), st.integers(1, 8))
def test_actions_do_not_depend_on_how_the_stream_is_split(pieces: list[bytes], data, budget: int) -> None:
    stream = b"".join(pieces)
    whole = _run_session([stream], budget=1024)
    assert _run_session(_splits(data, stream), budget) == whole


@PROPERTY
@given(st.lists(_pieces, max_size=50), st.data(), st.integers(1, 8))
def test_run_fast_path_matches_the_frame_by_frame_reference(pieces: list[bytes], data, budget: int) -> None:
    stream = b"".join(pieces)
    got = _run_session(_splits(data, stream), budget)
    # The reference does not close for the session's own unsubscribes: compare the same shape.
    assert _shape(got) == _reference(stream)


@PROPERTY
@given(_valid_frames, st.data())
def test_decoder_runs_expand_to_the_frames_received(frames: list[bytes], data) -> None:
    stream = b"".join(frames)
    runs_decoder = Decoder.for_broker(runs=True)
    expanded: list[bytes] = []
    for piece in _splits(data, stream):
        for item in runs_decoder.feed(piece):
            if isinstance(item, Publish | Subscribe | Unsubscribe | Auth):
                expanded.append(encode(item))
            else:
                # A run: its frames, one by one, must be the publish frames received.
                inner = Decoder.for_broker().feed(item.data)
                assert len(inner) == item.frames
                assert all(f.ident == item.ident and f.channel == item.channel for f in inner)
                lens = item.payload_lens or [item.payload_len] * item.frames
                assert [len(f.payload) for f in inner] == lens
                expanded.extend(encode(f) for f in inner)  # type: ignore[arg-type]  # no runs: runs=False
    assert expanded == frames
    assert runs_decoder.buffered == 0


def _stats(sizes: list[int]) -> PublishStats:
    stats = PublishStats()
    for size in sizes:
        stats.count += 1
        stats.bytes += size
        stats.bits[(size - 1).bit_length()] += 1
    return stats


def test_the_largest_payload_a_frame_can_carry_has_a_size_class() -> None:
    """A frame's length is a u32: its payload, after the header and a 1-byte ident and
    channel (str8 each), is counted in the last size class, not past the end."""
    largest = 2**32 - 1 - 5 - 2 - 2
    stats = PublishStats()
    stats.bits[(largest - 1).bit_length()] += 1
    assert stats.bits[-1] == 1 and sum(stats.bits) == 1


@PROPERTY
@given(st.lists(st.lists(st.sampled_from([0, 1, 2, 3, 100, 5000, 2**20, 2**32 - 1]), max_size=6), max_size=6))
def test_merged_publish_counters_are_the_sums(connections: list[list[int]]) -> None:
    """One size class or several, none at all, a count already in the totals."""
    total = PublishStats()
    for sizes in connections:
        total.merge(_stats(sizes))
    everything = [size for sizes in connections for size in sizes]
    expected = _stats(everything)
    assert (total.count, total.bytes, total.bits) == (expected.count, expected.bytes, expected.bits)
