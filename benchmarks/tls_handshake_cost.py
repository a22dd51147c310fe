#!/usr/bin/env python3
"""Server-side CPU of one TLS handshake with the broker's own context
(``make_tls_context``): RSA-2048 vs ECDSA P-256 certificate, full vs resumed,
TLS 1.3 and 1.2.

Client and server run in one process over memory BIOs and only the server's
calls are timed (thread CPU time), so the figure is the broker's cost whatever
the load generator does; the median of N handshakes each.

The last rows answer whether TLS 1.3 resumption could be made cheaper: a
resumed TLS 1.3 handshake still runs an ECDHE key exchange (``psk_dhe_ke``).
Resuming without it (``psk_ke``) needs ``SSL_OP_ALLOW_NO_DHE_KEX`` on both
sides, which Python's ``ssl`` does not name (the bit is set by number here);
even then an OpenSSL 3.0 server picks ``psk_dhe_ke`` whenever the client
offers it too, as OpenSSL clients do (OpenSSL 3.3 adds
``SSL_OP_PREFER_NO_DHE_KEX``), so these rows cost what the plain TLS 1.3 ones
do. And ``psk_ke`` has no forward secrecy (whoever gets the ticket key reads
the resumed sessions): the broker does not set it.

    .venv/bin/python benchmarks/tls_handshake_cost.py [N]
"""

from __future__ import annotations

import contextlib
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trustme

from hpfeeds3.broker.server import make_tls_context

# OpenSSL's SSL_OP_ALLOW_NO_DHE_KEX (ssl.h: SSL_OP_BIT(10), 1.1.1 and 3.x); not in Python's ssl.
ALLOW_NO_DHE_KEX = 1 << 10


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[float, ssl.SSLObject]:
    """One handshake, then an INFO-sized write (TLS 1.3 tickets travel with it);
    returns the server's CPU seconds and the client end."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server_cpu = 0.0
    done_c = done_s = False
    for _ in range(20):
        if not done_c:
            try:
                cli.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        t = time.thread_time()
        if not done_s:
            try:
                srv.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        if done_s:
            srv.write(b"x" * 40)
        server_cpu += time.thread_time() - t
        c_in.write(s_out.read())
        if done_c and done_s:
            with contextlib.suppress(ssl.SSLWantReadError):
                cli.read(4096)
            break
    return server_cpu, cli


def measure(
    key_type: trustme.KeyType, version: ssl.TLSVersion, n: int, tmp: Path, no_dhe: bool = False
) -> tuple[float, float, int]:
    """Median server µs of a full and of a resumed handshake, and how many resumed;
    ``no_dhe``: both sides allow resuming without a key exchange (TLS 1.3 psk_ke)."""
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("localhost", key_type=key_type)
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    server = make_tls_context(str(tmp / "cert.pem"), str(tmp / "key.pem"))
    client = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    client.minimum_version = client.maximum_version = version
    if no_dhe:
        server.options |= ALLOW_NO_DHE_KEX
        client.options |= ALLOW_NO_DHE_KEX
    full, resumed, reused = [], [], 0
    for _ in range(n):
        cpu, first = handshake(server, client)
        full.append(cpu)
        cpu, again = handshake(server, client, first.session)
        resumed.append(cpu)
        reused += bool(again.session_reused)
    return statistics.median(full) * 1e6, statistics.median(resumed) * 1e6, reused


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print("| protocol | certificate | full handshake | resumed | resumed sessions |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            for name, key_type in (("RSA-2048", trustme.KeyType.RSA), ("ECDSA P-256", trustme.KeyType.ECDSA)):
                full, resumed, reused = measure(key_type, version, n, Path(tmp))
                label = version.name.replace("v", " ").replace("_", ".")
                print(f"| {label} | {name} | {full:.0f} µs | {resumed:.0f} µs | {reused}/{n} |")
        for name, key_type in (("RSA-2048", trustme.KeyType.RSA), ("ECDSA P-256", trustme.KeyType.ECDSA)):
            full, resumed, reused = measure(key_type, ssl.TLSVersion.TLSv1_3, n, Path(tmp), no_dhe=True)
            label = "TLS 1.3, psk_ke allowed (no forward secrecy)"
            print(f"| {label} | {name} | {full:.0f} µs | {resumed:.0f} µs | {reused}/{n} |")


if __name__ == "__main__":
    main()
