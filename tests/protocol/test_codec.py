"""The sans-I/O codec: round trips, any split, garbage, limits on the header."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpfeeds3.protocol import (
    CLIENT_TO_BROKER,
    HEADER,
    Auth,
    Decoder,
    Error,
    FrameLimits,
    FrameTooLarge,
    Info,
    MalformedFrame,
    ProtocolError,
    Publish,
    PublishRun,
    Subscribe,
    UnexpectedOpcode,
    Unsubscribe,
    encode,
    encode_auth,
    encode_info,
    encode_publish,
    info_head,
    new_nonce,
    sign,
    verify,
)

name = st.binary(min_size=1, max_size=255)
payload = st.binary(max_size=2048)

client_frames = st.one_of(
    st.builds(Auth, name, st.binary(min_size=20, max_size=20)),
    st.builds(Publish, name, name, payload),
    st.builds(Subscribe, name, name),
    st.builds(Unsubscribe, name, name),
)
broker_frames = st.one_of(
    st.builds(Error, st.text(max_size=200)),
    st.builds(Info, st.binary(max_size=255), st.binary(min_size=4, max_size=4)),
    st.builds(Publish, name, name, payload),
)


def all_decoder() -> Decoder:
    return Decoder(CLIENT_TO_BROKER | {0, 1})


@given(st.lists(st.one_of(client_frames, broker_frames), max_size=20))
def test_encode_decode_round_trip(frames: list) -> None:
    assert all_decoder().feed(b"".join(encode(f) for f in frames)) == frames


@given(st.lists(client_frames, min_size=1, max_size=10), st.data())
def test_any_split_of_the_stream_yields_the_same_frames(frames: list, data: st.DataObject) -> None:
    stream = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Decoder.for_broker()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert got == frames
    assert decoder.buffered == 0


@settings(max_examples=500)
@given(st.binary(max_size=4096))
def test_random_bytes_raise_nothing_but_protocol_error(data: bytes) -> None:
    for decoder in (Decoder.for_broker(), Decoder.for_client()):
        with contextlib.suppress(ProtocolError):
            decoder.feed(data)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=30))
def test_random_chunks_raise_nothing_but_protocol_error(chunks: list[bytes]) -> None:
    decoder = Decoder.for_broker()
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except ProtocolError:
            decoder = Decoder.for_broker()


def test_huge_declared_length_is_refused_on_the_header_without_allocating() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            Decoder.for_broker().feed(HEADER.pack(0xFFFFFFFF, 3) + b"junk")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (HEADER.pack(0, 3), MalformedFrame),  # length < header: the reference hangs on this
        (HEADER.pack(4, 3), MalformedFrame),
        (HEADER.pack(2**31, 3), FrameTooLarge),
        (HEADER.pack(5 + 1024 * 1024 + 1, 3), FrameTooLarge),
        (HEADER.pack(1000, 2), FrameTooLarge),  # AUTH over its cap
        (HEADER.pack(600, 4), FrameTooLarge),  # SUBSCRIBE over its cap
        (HEADER.pack(10, 9), UnexpectedOpcode),
        (HEADER.pack(10, 1) + b"\x00" * 5, UnexpectedOpcode),  # client-sent INFO
        (HEADER.pack(10, 0) + b"x" * 5, UnexpectedOpcode),  # client-sent ERROR
        (HEADER.pack(8, 3) + b"\x05ab", MalformedFrame),  # str8 past the end
        (HEADER.pack(5 + 1 + 1 + 19, 2) + b"\x01a" + b"d" * 19, MalformedFrame),  # digest 19 bytes
        (HEADER.pack(5 + 1 + 20, 2) + b"\x00" + b"d" * 20, MalformedFrame),  # empty ident
        (HEADER.pack(5 + 2 + 1 + 1, 3) + b"\x01a\x00x", MalformedFrame),  # empty channel
        (HEADER.pack(5 + 2, 4) + b"\x01a", MalformedFrame),  # subscribe without channel
        (HEADER.pack(5 + 1 + 1 + 21, 2) + b"\x01a" + b"d" * 21, MalformedFrame),  # digest 21 bytes
        (HEADER.pack(5 + 1 + 20, 2) + b"\x15" + b"d" * 20, MalformedFrame),  # AUTH ident past the end
        (HEADER.pack(5 + 1 + 20, 2) + b"\x14" + b"d" * 20, MalformedFrame),  # AUTH ident, then no digest
        (HEADER.pack(5, 2), MalformedFrame),  # AUTH of a header only
        (HEADER.pack(5 + 1 + 1, 4) + b"\x00a", MalformedFrame),  # subscribe with an empty ident
        (HEADER.pack(5 + 1 + 2, 4) + b"\x09ab", MalformedFrame),  # subscribe ident past the end
        (HEADER.pack(5, 4), MalformedFrame),  # SUBSCRIBE of a header only
    ],
)
def test_bad_headers_and_bodies_raise_protocol_errors(data: bytes, error: type) -> None:
    with pytest.raises(error):
        Decoder.for_broker().feed(data)


def test_limits_are_configurable() -> None:
    decoder = Decoder.for_broker(FrameLimits(max_publish_frame_bytes=100))
    decoder.feed(encode_publish(b"a", b"b", b"x" * 90))
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_publish(b"a", b"b", b"x" * 92))


def test_each_limits_object_gets_its_own_table_however_many_there_are() -> None:
    """Each limits object keeps its tables: equal limits share a table, other limits
    never get theirs, and more pairs than the shared cache keeps still work."""
    for size in [*range(100, 300), 100, 150]:
        decoder = Decoder.for_broker(FrameLimits(max_publish_frame_bytes=size))
        frame = encode_publish(b"a", b"b", b"x" * (size - 9))
        assert len(frame) == size and decoder.feed(frame) == [Publish(b"a", b"b", b"x" * (size - 9))]
        with pytest.raises(FrameTooLarge):
            Decoder.for_broker(FrameLimits(max_publish_frame_bytes=size)).feed(
                encode_publish(b"a", b"b", b"x" * (size - 8))
            )
    small = FrameLimits(max_publish_frame_bytes=50)
    assert small.table(CLIENT_TO_BROKER) is FrameLimits(max_publish_frame_bytes=50).table(CLIENT_TO_BROKER)
    assert small.table(CLIENT_TO_BROKER) != FrameLimits(max_publish_frame_bytes=51).table(CLIENT_TO_BROKER)


def test_clear_drops_what_was_buffered() -> None:
    decoder = Decoder.for_broker()
    frame = encode_publish(b"a", b"b", b"x" * 40)
    assert decoder.feed(frame + frame[:20]) == [Publish(b"a", b"b", b"x" * 40)]
    assert decoder.buffered == 20 and decoder.pending_frame_bytes == len(frame)
    decoder.clear()
    assert decoder.buffered == 0 and decoder.pending_frame_bytes == 0
    assert decoder.feed(frame) == [Publish(b"a", b"b", b"x" * 40)]


def test_frame_exactly_at_the_cap_is_accepted() -> None:
    frame = encode_publish(b"a", b"b", b"x" * 40)
    limits = FrameLimits(max_publish_frame_bytes=len(frame))
    assert Decoder.for_broker(limits).feed(frame) == [Publish(b"a", b"b", b"x" * 40)]
    [run] = Decoder.for_broker(limits, runs=True).feed(frame * 3)
    assert isinstance(run, PublishRun) and run.frames == 3 and run.data == frame * 3
    with pytest.raises(FrameTooLarge):
        Decoder.for_broker(FrameLimits(max_publish_frame_bytes=len(frame) - 1)).feed(frame)


@pytest.mark.parametrize(
    "sizes",
    [[4, 4, 4], [5, 3, 5, 7, 3], [5, 9], [9, 5], [0, 0, 1], [7, 7, 2, 2]],
    ids=["equal", "mixed", "longer", "shorter", "empty-first", "equal-then-shorter"],
)
def test_a_run_counts_each_payload_at_its_own_length(sizes: list[int]) -> None:
    """Per-channel byte counters and the size histogram come from the run's lengths."""
    frames = b"".join(encode_publish(b"a", b"b", b"x" * n) for n in sizes)
    [run] = Decoder.for_broker(runs=True).feed(frames)
    assert isinstance(run, PublishRun) and run.frames == len(sizes) and run.data == frames
    assert run.payload_len == sizes[0]
    assert (run.payload_lens or [run.payload_len] * run.frames) == sizes
    assert run.payload_lens is None or len(set(sizes)) > 1


def test_over_cap_publish_after_a_valid_one_in_the_same_read_is_refused() -> None:
    """A frame that would continue a run is checked against the cap like the first one."""
    decoder = Decoder.for_broker(FrameLimits(max_publish_frame_bytes=100), runs=True)
    decoder.receive(encode_publish(b"a", b"b", b"x" * 10) + encode_publish(b"a", b"b", b"x" * 200))
    first = decoder.next_item()
    assert isinstance(first, PublishRun) and first.frames == 1
    with pytest.raises(FrameTooLarge):
        decoder.next_item()


@settings(max_examples=300)
@given(
    st.integers(min_value=12, max_value=120),
    st.lists(st.tuples(st.sampled_from([b"c", b"d"]), st.integers(0, 150)), min_size=1, max_size=12),
    st.booleans(),
)
def test_no_frame_over_the_cap_comes_out_of_one_read(cap: int, shape: list, runs: bool) -> None:
    """Small limits, so over-cap frames are generated: the frames before the
    first one over the cap come out, then ``FrameTooLarge``; never a frame over it."""
    frames = [encode_publish(b"a", channel, b"x" * n) for channel, n in shape]
    decoder = Decoder.for_broker(FrameLimits(max_publish_frame_bytes=cap), runs=runs)
    decoder.receive(b"".join(frames))
    out: list[bytes] = []
    raised = False
    try:
        while (item := decoder.next_item()) is not None:
            out.append(item.data if isinstance(item, PublishRun) else encode(item))
    except FrameTooLarge:
        raised = True
    fitting = list(itertools.takewhile(lambda f: len(f) <= cap, frames))
    assert b"".join(out) == b"".join(fitting)
    assert raised == (len(fitting) < len(frames))


@given(st.binary(max_size=255), st.integers(0, 64), st.data())
def test_an_info_head_and_a_nonce_are_the_info_frame(name: bytes, nonce_len: int, data: st.DataObject) -> None:
    nonce = data.draw(st.binary(min_size=nonce_len, max_size=nonce_len))
    assert info_head(name, nonce_len) + nonce == encode_info(name, nonce)
    fresh = new_nonce()
    assert Decoder.for_client().feed(info_head(name) + fresh) == [Info(name, fresh)]


def test_encoders_refuse_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        encode_publish(b"x" * 256, b"c", b"")
    with pytest.raises(ValueError):
        encode_auth(b"id", b"short")


def test_sign_is_sha1_of_nonce_then_secret() -> None:
    # Known answers (printf 'abcdsecret' | sha1sum): SHA1(nonce + secret), as every hpfeeds client computes it.
    assert sign(b"abcd", b"secret").hex() == "ee895c4fcd00f02507835e0e9554441bd8888388"
    assert sign(b"\x01\x02\x03\x04", b"s3cr3t").hex() == "bc723f7cdecbeb4c0b33ee9e3c32b1346c4257dd"


def test_nonces_are_fresh_across_a_read_and_a_fork() -> None:
    """Nonces come from one read of the OS's random source per 1,024; a forked
    worker must not hand out the nonces its parent hands out next."""
    nonces = [new_nonce() for _ in range(3000)]  # across three reads
    assert all(len(n) == 4 for n in nonces) and len(set(nonces)) > 2990
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"".join(new_nonce() for _ in range(8)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        child = f.read()
    assert len(child) == 32 and child != b"".join(new_nonce() for _ in range(8))


def test_challenge_sign_and_verify() -> None:
    digest = sign(b"abcd", b"secret")
    assert len(digest) == 20
    assert verify(b"abcd", b"secret", digest)
    assert not verify(b"abcd", b"other", digest)


def test_protocol_package_imports_neither_asyncio_nor_socket() -> None:
    code = "import sys, hpfeeds3.protocol; print(sorted({'asyncio', 'socket'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
