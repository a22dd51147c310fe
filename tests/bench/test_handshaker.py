"""The load generator's sensors behave as sensors' own hosts would."""

from __future__ import annotations

import socket
import time

from hpfeeds3.bench.handshake import Handshaker
from hpfeeds3.bench.wire import Target

TLS_HANDSHAKE_RECORD = 0x16


def test_a_tls_sensor_sends_its_client_hello_at_connect_not_at_the_next_read_pass() -> None:
    """A storm's sensor is a host of its own: its ClientHello follows the TCP handshake at
    once. The generator opens hundreds of connections between two read passes; a
    ClientHello held until the pass would leave the broker that many silent
    connections, which its admission rightly takes for idle."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        hs = Handshaker(Target(port=listener.getsockname()[1], tls=True))
        try:
            for i in range(3):
                hs.start(b"c%d" % i, None)  # no step(): no read pass
            for _ in range(3):
                server_side, _ = listener.accept()
                with server_side:
                    server_side.settimeout(5.0)
                    first = server_side.recv(5)
                    assert first and first[0] == TLS_HANDSHAKE_RECORD, first
        finally:
            hs.shutdown()


def test_a_plain_sensor_waits_for_info() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        hs = Handshaker(Target(port=listener.getsockname()[1]))
        try:
            hs.start(b"c", None)
            server_side, _ = listener.accept()
            with server_side:
                server_side.setblocking(False)
                time.sleep(0.2)  # nothing is due: a window in which a wrong byte would show
                try:
                    data = server_side.recv(5)
                except BlockingIOError:
                    data = None
                assert data is None, data
        finally:
            hs.shutdown()
