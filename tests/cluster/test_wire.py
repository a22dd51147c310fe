"""What brokers put on NATS and what they accept from it, with plain bytes (no NATS)."""

from __future__ import annotations

import pytest

from hpfeeds3.broker.backplane.wire import Accepted, Inbound, Rejected, cluster_key, headers, split
from hpfeeds3.broker.redact import redact_url
from hpfeeds3.protocol import DEFAULT_LIMITS, MiB, encode_auth, encode_error, encode_publish, encode_subscribe

ORIGIN = "0123456789abcdef"
# The largest frame a broker accepts by default: a 1 MiB body (what a stock NATS refuses in one message).
BIG = encode_publish(b"sensor", b"c", (bytes(range(256)) * 4096)[: MiB - 2 - len(b"sensor") - 1])


def pub(payload: bytes, channel: bytes = b"c", ident: bytes = b"sensor") -> bytes:
    return encode_publish(ident, channel, payload)


def inbound() -> Inbound:
    return Inbound(DEFAULT_LIMITS, 4 * DEFAULT_LIMITS.max_publish_frame_bytes)


def send(rx: Inbound, data: bytes, seq: int, count: int, limit: int, channel: bytes = b"c") -> list[Accepted]:
    """Split as a sender does and feed every piece; return what was accepted."""
    out = []
    for piece, s, n, part in split(data, seq, count, limit):
        assert len(piece) <= limit
        got = rx.receive(channel, headers(ORIGIN, s, n, part), piece)
        assert not isinstance(got, Rejected), got
        if got is not None:
            out.append(got)
    return out


def test_a_frame_above_the_nats_limit_travels_in_parts_and_arrives_whole() -> None:
    assert len(BIG) == DEFAULT_LIMITS.max_publish_frame_bytes > MiB
    rx = inbound()
    got = send(rx, BIG, 0, 1, 64 * 1024)
    assert [(a.data, a.count, a.missed) for a in got] == [(BIG, 1, 0)]
    assert rx.partial_bytes == 0


def test_small_frames_around_a_big_one_keep_their_order_and_sequence_numbers() -> None:
    small = [pub(str(i).encode() * 100) for i in range(50)]
    data = b"".join(small[:25]) + BIG + b"".join(small[25:])
    pieces = list(split(data, 10, 51, 4096))
    assert [p[1] for p in pieces if p[3] is None or p[3][0] == 0] == sorted({p[1] for p in pieces})
    rx = inbound()
    got = send(rx, data, 10, 51, 4096)
    assert b"".join(a.data for a in got) == data
    assert sum(a.count for a in got) == 51
    assert rx.expected(ORIGIN, b"c") == 61


def test_what_fits_is_one_message() -> None:
    data = pub(b"x") * 3
    assert list(split(data, 5, 3, 1024)) == [(data, 5, 3, None)]


def test_a_frame_with_a_missing_part_is_never_delivered_and_counted_as_lost() -> None:
    rx = inbound()
    parts = list(split(BIG, 0, 1, 256 * 1024))
    assert len(parts) == 5
    for piece, s, n, part in parts[:2] + parts[3:]:  # part 2 lost in transit
        assert rx.receive(b"c", headers(ORIGIN, s, n, part), piece) is None
    assert rx.partial_bytes == 0
    nxt = pub(b"next")
    got = rx.receive(b"c", headers(ORIGIN, 1, 1), nxt)
    assert isinstance(got, Accepted) and got.data == nxt and got.missed == 1


def test_a_frame_cut_short_by_the_next_one_is_dropped_whole() -> None:
    rx = inbound()
    parts = list(split(BIG, 0, 1, 256 * 1024))
    for piece, s, n, part in parts[:3]:
        assert rx.receive(b"c", headers(ORIGIN, s, n, part), piece) is None
    got = send(rx, BIG, 1, 1, 256 * 1024)  # the sender's next frame starts
    assert len(got) == 1 and got[0].data == BIG and got[0].missed == 1


@pytest.mark.parametrize(
    ("data", "hdrs", "why"),
    [
        (pub(b"x"), None, Rejected.HEADERS),
        (pub(b"x"), {"Hpfeeds-Origin": "nope", "Hpfeeds-Seq": "0", "Hpfeeds-Count": "1"}, Rejected.HEADERS),
        (pub(b"x"), {"Hpfeeds-Origin": ORIGIN, "Hpfeeds-Seq": "-1", "Hpfeeds-Count": "1"}, Rejected.HEADERS),
        (pub(b"x"), headers(ORIGIN, 0, 0), Rejected.HEADERS),
        (pub(b"x"), headers(ORIGIN, 0, 1, (1, 1)), Rejected.HEADERS),
        (encode_error("you are compromised"), headers(ORIGIN, 0, 1), Rejected.NOT_PUBLISH),
        (encode_auth(b"sensor", b"\0" * 20), headers(ORIGIN, 0, 1), Rejected.NOT_PUBLISH),
        (encode_subscribe(b"sensor", b"c"), headers(ORIGIN, 0, 1), Rejected.NOT_PUBLISH),
        (pub(b"x", channel=b"other"), headers(ORIGIN, 0, 1), Rejected.CHANNEL),
        (pub(b"x") + pub(b"y", channel=b"other"), headers(ORIGIN, 0, 2), Rejected.CHANNEL),
        (pub(b"x")[:-1], headers(ORIGIN, 0, 1), Rejected.PARTIAL),
        (pub(b"x") * 2, headers(ORIGIN, 0, 1), Rejected.COUNT),
        (b"\x00\x00\x00\x02\x03", headers(ORIGIN, 0, 1), Rejected.MALFORMED),
        (b"\x00\x00\x00\x07\x03\x00\x00", headers(ORIGIN, 0, 1), Rejected.MALFORMED),
        (b"\x7f\x00\x00\x00\x03", headers(ORIGIN, 0, 1), Rejected.TOO_LARGE),
        (b"", headers(ORIGIN, 0, 1), Rejected.COUNT),
    ],
)
def test_anything_but_whole_publish_frames_of_the_subjects_channel_is_rejected(data, hdrs, why) -> None:
    assert inbound().receive(b"c", hdrs, data) == why


def test_a_sequence_number_going_backwards_is_rejected() -> None:
    rx = inbound()
    assert isinstance(rx.receive(b"c", headers(ORIGIN, 0, 2), pub(b"a") + pub(b"b")), Accepted)
    assert rx.receive(b"c", headers(ORIGIN, 1, 1), pub(b"b")) == Rejected.SEQUENCE
    assert isinstance(rx.receive(b"c", headers(ORIGIN, 2, 1), pub(b"c")), Accepted)


def test_a_split_frame_larger_than_the_limit_is_rejected() -> None:
    rx = inbound()
    limit = DEFAULT_LIMITS.max_publish_frame_bytes
    chunk = b"\0" * (limit // 2 + 1)
    assert rx.receive(b"c", headers(ORIGIN, 0, 1, (0, 3)), chunk) is None
    assert rx.receive(b"c", headers(ORIGIN, 0, 1, (1, 3)), chunk) == Rejected.TOO_LARGE
    assert rx.partial_bytes == 0


def test_reassembly_memory_is_bounded_over_many_origins() -> None:
    rx = inbound()
    chunk = b"\0" * (512 * 1024)
    for i in range(100):
        rx.receive(b"c", headers(f"{i:016x}", 0, 1, (0, 4)), chunk)
        assert rx.partial_bytes <= rx.reassembly_bytes
    assert rx.partial_bytes > rx.reassembly_bytes - len(chunk)


def test_unsubscribing_forgets_the_channel() -> None:
    rx = inbound()
    rx.receive(b"c", headers(ORIGIN, 5, 1), pub(b"a"))
    rx.receive(b"c", headers(ORIGIN, 0, 1, (0, 2)), b"\0" * 10)
    rx.forget(b"c")
    assert len(rx) == 0 and rx.partial_bytes == 0
    got = rx.receive(b"c", headers(ORIGIN, 9, 1), pub(b"b"))
    assert isinstance(got, Accepted) and got.missed == 0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://alice:s3cret@nats.example:4222", "nats://alice:***@nats.example:4222"),
        ("nats://tok3n@nats.example", "nats://***@nats.example"),
        ("tls://nats.example:4443", "tls://nats.example:4443"),
        ("nats://u:p@[::1]:4222", "nats://u:***@[::1]:4222"),
        ("nats://nats.example:4222?token=abc", "nats://nats.example:4222?token=***"),
    ],
)
def test_urls_are_logged_without_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_entries_are_bounded_least_recently_used_first() -> None:
    """200 fake origins on a table of 100: the table holds 100, and a real origin
    that keeps sending keeps its baseline."""
    rx = Inbound(DEFAULT_LIMITS, DEFAULT_LIMITS.max_publish_frame_bytes, max_entries=100)
    for i in range(200):
        assert isinstance(rx.receive(b"c", headers(ORIGIN, i, 1), pub(b"real")), Accepted)
        assert isinstance(rx.receive(b"c", headers(f"{i:016x}", 0, 1), pub(b"fake")), Accepted)
        assert len(rx) <= 100
    assert rx.expected(ORIGIN, b"c") == 200
    assert rx.evicted == 201 - 100  # fakes only: the real origin, used at every turn, is never the oldest
    assert rx.expected("0000000000000000", b"c") is None


def test_split_frames_in_flight_are_evicted_with_their_entry() -> None:
    rx = Inbound(DEFAULT_LIMITS, DEFAULT_LIMITS.max_publish_frame_bytes, max_entries=10)
    for i in range(30):
        rx.receive(b"c", headers(f"{i:016x}", 0, 1, (0, 3)), b"\0" * 1000)
    assert len(rx) == 10 and rx.partial_bytes == 10 * 1000


def test_forgetting_a_channel_touches_its_entries_only() -> None:
    rx = inbound()
    for i in range(50):
        rx.receive(b"c", headers(f"{i:016x}", 0, 1), pub(b"x"))
        rx.receive(b"d", headers(f"{i:016x}", 0, 1), pub(b"x", channel=b"d"))
    rx.forget(b"c")
    assert len(rx) == 50
    assert rx.expected(ORIGIN, b"c") is None and rx.expected("0000000000000000", b"d") == 1
    rx.forget(b"d")
    assert len(rx) == 0


def test_a_sequence_jump_beyond_the_window_is_not_trusted() -> None:
    """One message with a real origin and sequence number 9e17 no longer makes the
    origin's later messages look replayed: it is rejected and only held."""
    rx = Inbound(DEFAULT_LIMITS, DEFAULT_LIMITS.max_publish_frame_bytes, window=1000)
    assert isinstance(rx.receive(b"c", headers(ORIGIN, 0, 1), pub(b"a")), Accepted)
    assert rx.receive(b"c", headers(ORIGIN, 9 * 10**17, 1), pub(b"forged")) == Rejected.JUMP
    got = [rx.receive(b"c", headers(ORIGIN, i, 1), pub(b"real")) for i in range(1, 21)]
    assert all(isinstance(g, Accepted) and g.missed == 0 for g in got)
    # A long gap that is real: the first message after it is held, the next one confirms it.
    assert rx.receive(b"c", headers(ORIGIN, 5000, 1), pub(b"after")) == Rejected.JUMP
    after = rx.receive(b"c", headers(ORIGIN, 5001, 1), pub(b"after"))
    assert isinstance(after, Accepted) and after.missed == 5001 - 21


def test_with_a_cluster_key_only_signed_messages_are_accepted() -> None:
    key = cluster_key(b"0123456789abcdef0123456789abcdef")
    rx = Inbound(DEFAULT_LIMITS, DEFAULT_LIMITS.max_publish_frame_bytes, key=key)
    data = pub(b"a")
    assert rx.receive(b"c", headers(ORIGIN, 0, 1), data) == Rejected.SIGNATURE
    assert (
        rx.receive(
            b"c", headers(ORIGIN, 0, 1, key=cluster_key(b"another key, 16+ bytes"), channel=b"c", data=data), data
        )
        == Rejected.SIGNATURE
    )
    signed = headers(ORIGIN, 0, 1, key=key, channel=b"c", data=data)
    assert rx.receive(b"c", {**signed, "Hpfeeds-Seq": "9"}, data) == Rejected.SIGNATURE
    assert rx.receive(b"c", signed, pub(b"b")) == Rejected.SIGNATURE
    assert len(rx) == 0  # nothing unsigned reached the tables
    assert isinstance(rx.receive(b"c", signed, data), Accepted)
    parts = list(split(BIG, 1, 1, 256 * 1024))
    got = [rx.receive(b"c", headers(ORIGIN, s, n, part, key=key, channel=b"c", data=p), p) for p, s, n, part in parts]
    assert isinstance(got[-1], Accepted) and got[-1].data == BIG
