"""Pre-auth memory (issue 7, item 2): 1,000 connections each declaring a 4 GiB
AUTH frame and streaming junk, and 1,000 more sending half an AUTH and
stalling. Broker RSS grows by at most 64 MiB; the first wave is closed at the
header (frame_too_large), the second at the AUTH deadline (auth_timeout).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time

from hpfeeds3.protocol import HEADER, encode_auth

from .support import MiB, PeakSampler, Probe, metric, raise_nofile, record, scrape, wait_metric

WAVE = 1000
AUTH_TIMEOUT_S = 4.0
RSS_GROWTH_BYTES = 64 * MiB


def _connect_all(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _send_until_closed(
    socks: list[socket.socket], first: bytes, junk: bytes, timeout: float
) -> tuple[int, list[float]]:
    """Send ``first`` then ``junk`` on every socket until the broker closes each."""
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    pending: dict[socket.socket, bytes] = {}
    for sock in socks:
        pending[sock] = first
        sel.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ)
    sent = 0
    closed_after: list[float] = []
    open_ = set(socks)
    while open_ and time.monotonic() - started < timeout:
        for key, events in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                if events & selectors.EVENT_READ:
                    while s.recv(65536):
                        pass
                    raise ConnectionResetError  # EOF
                if events & selectors.EVENT_WRITE:
                    n = s.send(pending[s] or junk)
                    sent += n
                    pending[s] = pending[s][n:]
            except BlockingIOError:
                continue
            except OSError:
                closed_after.append(time.monotonic() - started)
                sel.unregister(s)
                open_.discard(s)
    sel.close()
    return sent, closed_after


def test_pre_auth_floods_cost_at_most_64_mib(reliable_broker) -> None:
    raise_nofile()
    b = reliable_broker(
        "--auth-timeout",
        str(AUTH_TIMEOUT_S),
        "--max-unauthenticated",
        "4096",
        "--max-unauthenticated-per-address",
        "4096",
    )
    probe = Probe(b.pid)
    time.sleep(0.2)
    rss_before = probe.rss()
    half_auth = encode_auth(b"alice", b"\x00" * 20)[:15]
    stallers: list[socket.socket] = []
    floods: list[socket.socket] = []
    try:
        with PeakSampler(probe) as peak:
            # Wave 2 first, so both waves are open at the same time.
            t_stall = time.monotonic()
            stallers = _connect_all(b.port, WAVE)
            # Every one accepted (the pre-auth gauge counts it) before its half AUTH.
            unauthenticated = "hpfeeds_broker_unauthenticated_connections"
            wait_metric(b.exporter_port, lambda m: metric(m, unauthenticated) >= WAVE, timeout=15)
            for s in stallers:
                with contextlib.suppress(OSError):
                    s.send(half_auth)
            # Wave 1: 4 GiB declared on the header, then junk until closed.
            floods = _connect_all(b.port, WAVE)
            header = HEADER.pack(2**32 - 1, 2)
            sent, flood_closed = _send_until_closed(floods, header, os.urandom(16384), timeout=20)
            # Wave 2 is closed at the deadline: wait for it.
            _, stall_closed = _send_until_closed(stallers, b"", b"", timeout=AUTH_TIMEOUT_S + 5)
            stall_closed_s = time.monotonic() - t_stall
        # A close is counted once the socket is gone: after the ERROR, the broker
        # reads and discards for up to a second. Wait for the counts, bounded.
        deadline = time.monotonic() + 5
        while True:
            samples = scrape(b.exporter_port)
            done = metric(samples, "hpfeeds_broker_connections_closed_total", reason="auth_timeout")
            if done >= WAVE or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for s in stallers + floods:
            s.close()
    growth = peak.peak - rss_before
    too_large = metric(samples, "hpfeeds_broker_connections_closed_total", reason="frame_too_large")
    timeouts = metric(samples, "hpfeeds_broker_connections_closed_total", reason="auth_timeout")
    record(
        "pre_auth_memory",
        rss_before_mib=round(rss_before / MiB, 1),
        rss_peak_mib=round(peak.peak / MiB, 1),
        rss_growth_mib=round(growth / MiB, 1),
        flood_closed=len(flood_closed),
        flood_junk_sent_mib=round(sent / MiB, 2),
        flood_last_closed_s=round(max(flood_closed, default=0), 2),
        stallers_closed=len(stall_closed),
        stallers_all_closed_after_s=round(stall_closed_s, 2),
        closed_frame_too_large=too_large,
        closed_auth_timeout=timeouts,
    )
    assert len(flood_closed) == WAVE
    assert len(stall_closed) == WAVE
    assert too_large == WAVE
    assert timeouts == WAVE
    # Closed at the header: junk sent is what sat in socket buffers, not what the broker kept.
    assert growth <= RSS_GROWTH_BYTES
    assert stall_closed_s <= AUTH_TIMEOUT_S + 0.5 + 3  # deadline + slack for closing 1,000 sockets on 2 cores
