"""What the kernel knows of a connection's socket that asyncio does not say.

Plain functions over a connection's transport (None once it is lost: then
nothing is known), asked by the pre-auth pool and the broker while a
connection is not read yet (admission.py, ``Broker._release_held_back``):

- ``bytes_waiting``: bytes from the client have arrived and are not read
  (``FIONREAD``): a ClientHello or an AUTH queued behind a storm of accepts
  is progress;
- ``peer_gone``: the client has closed its side (a FIN or a reset waits:
  ``poll`` with ``POLLRDHUP``, a reset alone where that is missing).
"""

from __future__ import annotations

import fcntl
import select
import termios
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

# poll() events of a peer that has closed or reset (Linux: POLLRDHUP; elsewhere a reset only).
_GONE = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def bytes_waiting(transport: asyncio.BaseTransport | None) -> bool:
    """Bytes from the client have arrived and are not read yet."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        return fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0") != b"\0\0\0\0"
    except OSError:
        return False


def peer_gone(transport: asyncio.BaseTransport | None) -> bool:
    """The client has closed its side: one held back gave up waiting, and its
    handshake would be work for nobody."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _GONE)
    return bool(poller.poll(0))
