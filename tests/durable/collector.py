"""A collector process for the durable tests: ``python collector.py PORT IDENT SECRET CHANNEL OUT [--tls CA]``.

It stores each message before it consumes it from the socket: it peeks
what the socket holds (``MSG_PEEK``), appends the numbers of the whole frames
to ``OUT`` with one ``write(2)`` (in the kernel when the process is killed),
then reads those frames off the socket (a frame's start alone is consumed
only when nothing whole is there: its rest is still unread). So whatever it has not stored is still unread in its
socket when it is killed, and its kernel answers the close with RST: the
broker replays it (a duplicate at most). Each connection starts with a line
``C``; each message is a line with its number. ``--tls``: over TLS (no
peeking there: TLS records cannot be peeked; a read frame is stored at once).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys

from hpfeeds3.protocol import OP_INFO, OP_PUBLISH, encode_auth, encode_subscribe, sign


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise SystemExit(0)  # the broker closed
        data += part
    return data


def main() -> None:
    port, ident, secret, channel, out = sys.argv[1:6]
    tls_ca = sys.argv[7] if len(sys.argv) > 7 and sys.argv[6] == "--tls" else None
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    raw = socket.socket()
    raw.connect(("127.0.0.1", int(port)))
    sock: socket.socket = raw
    if tls_ca is not None:
        ctx = ssl.create_default_context(cafile=tls_ca)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    header = _recv_exact(sock, 5)
    length, op = struct.unpack("!IB", header)
    assert op == OP_INFO
    body = _recv_exact(sock, length - 5)
    nonce = body[1 + body[0] :]
    who = ident.encode()
    sock.sendall(encode_auth(who, sign(nonce, secret.encode())) + encode_subscribe(who, channel.encode()))
    os.write(fd, b"C\n")
    peek = socket.MSG_PEEK if tls_ca is None else 0
    pending = b""  # a frame's start, consumed: its rest is unread in the socket
    while True:
        data = sock.recv(262144, peek)
        if not data:
            return
        buf = pending + data
        lines, at = [], 0
        while at + 5 <= len(buf):
            length, op = struct.unpack_from("!IB", buf, at)
            if at + length > len(buf):
                break
            frame = buf[at : at + length]
            if op == OP_PUBLISH:
                p = 5
                p += 1 + frame[p]  # ident
                p += 1 + frame[p]  # channel
                lines.append(frame[p:].split(b" ", 1)[0])
            else:
                lines.append(b"E " + frame[5:].replace(b"\n", b" "))
            at += length
        if lines:
            os.write(fd, b"\n".join(lines) + b"\n")  # stored, then consumed
        if not peek:
            pending = buf[at:]
        elif lines:
            _recv_exact(sock, at - len(pending))  # the whole frames: the tail stays unread
            pending = b""
        else:
            _recv_exact(sock, len(data))  # a frame's start only
            pending = buf


if __name__ == "__main__":
    main()
