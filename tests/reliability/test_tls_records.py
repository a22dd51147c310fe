"""TLS records inside the per-turn budget.

The client's records are built by hand (``tls13.RecordClient``) after a real
TLS 1.3 handshake with the broker: KeyUpdates and one-byte records cost the
broker a record's work each and yield little or no plaintext. The broker
decrypts a bounded amount per loop turn (reading paused meanwhile) and closes
a connection whose records carry too little plaintext
(``tls_records_without_data``); a canary sensor on the same broker measures
publish→deliver latency meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import cast

import psutil
import pytest

from hpfeeds3.protocol import Decoder, Error, Frame, Info, Publish, encode_auth, encode_publish, encode_subscribe, sign

from .support import Canary, CanaryStats, metric, record, speed_bound, wait_metric, wait_subscribed
from .test_attacks import CLOSED, authed, read_frame, readable, tls_endpoint
from .tls13 import ALERT, RecordClient

REASON = "tls_records_without_data"
KEY_UPDATES = 60_000  # about 1.5 MiB in one burst
ONE_BYTE_RECORDS = 200_000
CANARY_MEDIAN_SLACK_MS = 1.0


def _tls_broker(reliable_broker, tmp_path: Path, *args: str):  # type: ignore[no-untyped-def]
    flags, tls_port, _ = tls_endpoint(tmp_path)
    return reliable_broker(*flags, *args), tls_port, str(tmp_path / "ca.pem")


def _client(port: int, ca: str, tmp_path: Path, name: str) -> tuple[RecordClient, Info]:
    client = RecordClient(port, ca, tmp_path / f"{name}.keylog")
    frames = Decoder.for_client().feed(client.read_plain())
    assert isinstance(frames[0], Info), frames
    return client, frames[0]


def _auth(client: RecordClient, info: Info, ident: str) -> None:
    client.send(client.record(encode_auth(ident.encode(), sign(info.nonce, f"{ident}-secret".encode()))))


ATTACK_WINDOW_S = 1.0


def _attack_window(canary: Canary, t0: float) -> CanaryStats:
    """The canary from the attack's first byte (the last window) over ATTACK_WINDOW_S."""
    time.sleep(max(0.0, t0 + ATTACK_WINDOW_S - time.monotonic()))
    return canary.window()


def _closed_once_and_canary_held(
    test: str, samples: dict, canary: Canary, total: CanaryStats, p50_moved_ms: float
) -> None:
    assert metric(samples, CLOSED, reason=REASON) == 1
    assert metric(samples, "hpfeeds_broker_limit_rejections_total", limit="max_tls_records_without_data") == 1
    assert total.lost == 0 and total.received == total.sent and canary.errors == []
    speed_bound(test, "canary p50 ms over the quiet one", p50_moved_ms, below=CANARY_MEDIAN_SLACK_MS)


def _baseline(canary: Canary) -> float:
    canary.window()  # from now: a window of the quiet broker
    time.sleep(1.0)
    return canary.window().p50_ms


def test_a_burst_of_key_updates_before_auth_is_closed_within_a_turn(reliable_broker, tmp_path: Path) -> None:
    """60,000 TLS 1.3 KeyUpdates (about 1.5 MiB) in one burst right after the
    handshake, before AUTH: the connection is closed (tls_records_without_data,
    counted) after a small bound of them, and the canary's median moves by
    less than 1 ms (it was held for about 1 s when every record was decrypted
    in one turn)."""
    b, tls_port, ca = _tls_broker(reliable_broker, tmp_path)
    client, _ = _client(tls_port, ca, tmp_path, "keyupdates")
    # Built before the canary runs: its threads share this process.
    burst = b"".join(client.key_update() for _ in range(KEY_UPDATES))
    canary = Canary(b.port).start()
    baseline_p50 = _baseline(canary)
    try:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # closed (reset) while sending: what the broker should do
            client.send(burst)
        closed_after = time.monotonic() - t0
        samples = wait_metric(b.exporter_port, lambda m: metric(m, CLOSED, reason=REASON) >= 1)
        during = _attack_window(canary, t0)
        total = canary.stop()
    finally:
        client.close()
    record(
        "tls_key_update_burst",
        key_updates=KEY_UPDATES,
        burst_kib=len(burst) // 1024,
        send_s=round(closed_after, 3),
        closed_tls_records_without_data=metric(samples, CLOSED, reason=REASON),
        baseline_p50_ms=round(baseline_p50, 3),
        **during.summary(),
    )
    assert "too many TLS records without data" in b.log()
    _closed_once_and_canary_held("tls_key_update_burst", samples, canary, total, during.p50_ms - baseline_p50)


def test_one_byte_records_after_auth_are_closed_within_a_turn(reliable_broker, tmp_path: Path) -> None:
    """An authenticated publisher sends a PUBLISH as 200,000 one-byte TLS
    records: closed (tls_records_without_data) after a small bound of them, the
    frame never delivered, and the canary's median moves by less than 1 ms."""
    b, tls_port, ca = _tls_broker(reliable_broker, tmp_path)
    canary = Canary(b.port).start()
    subscriber = authed(b.port, "bob")
    subscriber.sendall(encode_subscribe(b"bob", b"chan1"))
    wait_subscribed(b.exporter_port, "bob", "chan1", 1)
    client, info = _client(tls_port, ca, tmp_path, "onebyte")
    _auth(client, info, "alice")
    frame = encode_publish(b"alice", b"chan1", b"x" * (ONE_BYTE_RECORDS - 17))
    assert len(frame) == ONE_BYTE_RECORDS
    stream = client.records(frame, 1)
    baseline_p50 = _baseline(canary)
    try:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            client.send(stream)
        samples = wait_metric(b.exporter_port, lambda m: metric(m, CLOSED, reason=REASON) >= 1)
        error = Decoder.for_client().feed(client.read_plain())
        during = _attack_window(canary, t0)
        total = canary.stop()
        delivered = readable(subscriber)  # anything (the frame) sent to the subscriber
    finally:
        client.close()
        subscriber.close()
    record(
        "tls_one_byte_records",
        records=ONE_BYTE_RECORDS,
        stream_kib=len(stream) // 1024,
        closed_tls_records_without_data=metric(samples, CLOSED, reason=REASON),
        baseline_p50_ms=round(baseline_p50, 3),
        **during.summary(),
    )
    assert error and isinstance(error[0], Error) and "too many TLS records without data" in error[0].message
    assert not delivered
    _closed_once_and_canary_held("tls_one_byte_records", samples, canary, total, during.p50_ms - baseline_p50)


SMALL_RECORD = 16  # plaintext bytes: the smallest average the broker accepts (tuning.TLS_MIN_RECORD_PLAINTEXT)
UPLOAD = 512 * 1024
FULL_REPEAT = 32  # 16 MiB: enough CPU time for the process clock's ticks


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def test_small_records_are_delivered_at_a_small_multiple_of_plain_tcp(reliable_broker, tmp_path: Path) -> None:
    """A 512 KiB PUBLISH as 16-byte TLS records (the smallest average the
    broker accepts) is accepted and delivered; the
    broker's CPU per plaintext KiB is recorded against the same frame over
    plain TCP and over TLS in full records."""
    b, tls_port, ca = _tls_broker(reliable_broker, tmp_path)
    proc = psutil.Process(b.pid)
    subscriber = authed(b.port, "bob")
    subscriber.sendall(encode_subscribe(b"bob", b"chan1"))
    wait_subscribed(b.exporter_port, "bob", "chan1", 1)
    payload = b"s" * (UPLOAD - 17)
    frame = encode_publish(b"alice", b"chan1", payload)
    decoder, pending = Decoder.for_client(), cast(list[Frame], [])
    subscriber.settimeout(30)
    cost: dict[str, float] = {}

    def measured(name: str, repeat: int, send) -> None:  # type: ignore[no-untyped-def]
        before = _cpu_s(proc)
        for _ in range(repeat):
            send()
            got = read_frame(subscriber, decoder, pending)
            assert isinstance(got, Publish) and got.payload == payload, name
        cost[name] = (_cpu_s(proc) - before) * 1000 / (repeat * UPLOAD / 1024)

    try:
        plain = authed(b.port, "alice")
        measured("tcp", FULL_REPEAT, lambda: plain.sendall(frame))
        plain.close()
        for name, size, repeat in (("tls_16k_records", 16384, FULL_REPEAT), ("tls_small_records", SMALL_RECORD, 2)):
            client, info = _client(tls_port, ca, tmp_path, name)
            _auth(client, info, "alice")
            streams = [client.records(frame, size) for _ in range(repeat)]
            measured(name, repeat, lambda: client.send(streams.pop(0)))  # noqa: B023 - called at once
            client.close()
    finally:
        subscriber.close()
    record(
        "tls_small_records_cost",
        upload_kib=UPLOAD // 1024,
        cpu_ms_per_kib={k: round(v, 4) for k, v in cost.items()},
        small_over_tcp=round(cost["tls_small_records"] / max(cost["tcp"], 1e-6), 1),
        small_over_full_records=round(cost["tls_small_records"] / max(cost["tls_16k_records"], 1e-6), 1),
    )
    assert set(cost) == {"tcp", "tls_16k_records", "tls_small_records"}


FRAMES_BEHIND_FIN = 8


@pytest.mark.parametrize("ending", ["fin", "close_notify"])
def test_frames_in_flight_behind_a_tls_clients_close_are_all_delivered(reliable_broker, tmp_path: Path, ending) -> None:
    """AUTH and 8 x 512 KiB PUBLISH over TLS in one write, then at once a FIN (or a
    close_notify): more than one turn's worth of records, decrypted over later
    turns, and every frame is delivered before the broker closes the connection."""
    b, tls_port, ca = _tls_broker(reliable_broker, tmp_path)
    subscriber = authed(b.port, "bob")
    subscriber.sendall(encode_subscribe(b"bob", b"chan1"))
    wait_subscribed(b.exporter_port, "bob", "chan1", 1)
    ctx = ssl.create_default_context(cafile=ca)
    payloads = [bytes([65 + i]) * (UPLOAD - 17) for i in range(FRAMES_BEHIND_FIN)]
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", tls_port), timeout=10), server_hostname="localhost"
    ) as s:
        info = Decoder.for_client().feed(s.recv(4096))[0]
        assert isinstance(info, Info)
        auth = encode_auth(b"alice", sign(info.nonce, b"alice-secret"))
        s.sendall(auth + b"".join(encode_publish(b"alice", b"chan1", p) for p in payloads))
        if ending == "fin":
            s.shutdown(socket.SHUT_WR)
        else:
            s.unwrap()
        decoder, pending = Decoder.for_client(), cast(list[Frame], [])
        subscriber.settimeout(30)
        got = [read_frame(subscriber, decoder, pending) for _ in payloads]
    subscriber.close()
    assert [g.payload if isinstance(g, Publish) else g for g in got] == payloads


def test_bytes_behind_a_close_notify_do_not_keep_the_connection_open(reliable_broker, tmp_path: Path) -> None:
    """An authenticated client's close_notify with bytes behind it in the same
    write: the broker answers and closes (the bytes are not waited on)."""
    b, tls_port, ca = _tls_broker(reliable_broker, tmp_path)
    client, info = _client(tls_port, ca, tmp_path, "closenotify")
    try:
        _auth(client, info, "alice")
        client.send(client.record(encode_subscribe(b"alice", b"chan1")))
        wait_subscribed(b.exporter_port, "alice", "chan1", 1)
        # close_notify, then more than one feed step of a record that never ends
        client.send(client.record(bytes([1, 0]), ALERT) + b"\x17\x03\x03\x40\x00" + b"j" * 8192)
        client.sock.settimeout(10)
        ended = b""
        while chunk := client.sock.recv(65536):
            ended += chunk
    finally:
        client.close()
    assert ended  # the broker's close_notify came, then EOF
