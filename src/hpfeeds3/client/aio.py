"""The asyncio hpfeeds client: connect, authenticate, subscribe, publish, reconnect.

Rules of this module:

- One ``Client`` owns at most one live connection (an ``asyncio.Protocol``)
  at a time, plus a reconnect task while that connection is down.
- Everything on the wire goes through ``hpfeeds3.protocol``; a broker that
  breaks the protocol gets its connection closed (and the client reconnects).
- Nothing is silently dropped by the client: a publish is either written to a
  live connection, held in the bounded pending queue, or refused with an
  exception. What the *network* loses after a write cannot be known: hpfeeds
  has no acknowledgements (see ``Client.publish``).
- Stdlib only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..protocol import (
    DEFAULT_LIMITS,
    Decoder,
    Error,
    FrameLimits,
    Info,
    ProtocolError,
    Publish,
    encode_auth,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    sign,
)
from .backoff import Backoff
from .errors import (
    AccessDenied,
    AuthenticationFailed,
    BrokerError,
    ClientClosed,
    ClientError,
    ConnectionLost,
    Kicked,
    NoGreeting,
    PublishQueueFull,
    classify,
)
from .message import Message, to_bytes, to_text

log = logging.getLogger("hpfeeds3.client")

Text = str | bytes | bytearray | memoryview
ErrorCallback = Callable[[BrokerError], object]

#: Defaults, each named once; every one is a ``Client`` argument too.
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # TCP + TLS + INFO; the broker's own TLS deadline is 10 s
DEFAULT_MAX_PENDING = 10_000  # publishes held while disconnected
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024  # their encoded size
DEFAULT_MAX_BUFFERED_MESSAGES = 10_000  # received, not yet read: then stop reading the socket
DEFAULT_READY_GRACE_S = 0.5  # how long wait_ready listens for an objection
DEFAULT_CLOSE_TIMEOUT_S = 5.0  # flushing the socket on close
#: A connection that lasted this long resets the backoff to its first step; a
#: broker that accepts and drops us at once keeps us backing off.
STABLE_CONNECTION_S = 5.0
#: Reported-but-unread ERRORs kept for ``wait_ready``/the iterator; older ones
#: are logged and forgotten so a chatty broker cannot grow memory.
MAX_UNREAD_ERRORS = 100


def make_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker: against ``cafile`` if given,
    else the system's trusted CAs; the host name is checked."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


# --- TLS session resumption ------------------------------------------------------------
#
# asyncio's create_connection has no ``session`` argument: its SSLProtocol
# builds the SSLObject with ``context.wrap_bio(incoming, outgoing, ...)``
# synchronously inside create_connection, before the handshake starts. So the
# context's ``sslobject_class`` (the documented hook for what wrap_bio
# returns) is one that takes the session to resume from a context variable
# the client sets around its create_connection: it is seen only by that
# task's connection, never by another client sharing the context.

_RESUME: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar("hpfeeds3_resume", default=None)


class _ResumingSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that resumes the session in ``_RESUME`` when one is set."""

    @classmethod
    def _create(cls, *args: Any, session: ssl.SSLSession | None = None, **kwargs: Any) -> ssl.SSLObject:
        create = super()._create  # type: ignore[misc]  # ssl's constructor, not in the stubs
        return create(*args, session=session or _RESUME.get(), **kwargs)  # type: ignore[no-any-return]


def _resumable(ctx: ssl.SSLContext) -> bool:
    """Let ``ctx`` resume sessions for the client; False if it has an ``SSLObject`` class of its own."""
    if ctx.sslobject_class is ssl.SSLObject:
        ctx.sslobject_class = _ResumingSSLObject
    return ctx.sslobject_class is _ResumingSSLObject


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection to the broker; reports everything to its ``Client``."""

    def __init__(self, client: Client, limits: FrameLimits) -> None:
        self._client = client
        self._decoder = Decoder.for_client(limits)
        self.transport: asyncio.Transport | None = None
        self.ready = False  # INFO received, AUTH (and the rest) written
        self.broker_name = ""
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.errors: list[BrokerError] = []
        self.started = time.monotonic()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.received_any = False  # a byte arrived (a TLS port sends none to a plain client)
        #: Channels re-subscribed by the client itself on this (re)connection:
        #: subscribed on an earlier connection, not by a call the owner awaits.
        self.resubscribed: set[bytes] = set()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Notice a broker that vanished without a FIN (power loss, NAT drop).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if sys.platform.startswith("linux"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            log.warning("broker broke the protocol (%s); closing the connection", exc)
            self.abort()
            return
        for frame in frames:
            if type(frame) is Publish:
                if not self.ready:
                    log.warning("broker sent PUBLISH before INFO; closing the connection")
                    self.abort()
                    return
                self._client._deliver(Message(to_text(frame.ident), to_text(frame.channel), frame.payload))
            elif type(frame) is Error:
                err = classify(frame.message)
                self.errors.append(err)
                self._client._broker_error(self, err)
            elif type(frame) is Info:
                if self.ready:
                    log.warning("broker sent a second INFO; closing the connection")
                    self.abort()
                    return
                self.broker_name = to_text(frame.name)
                self._client._handshake(self, frame)
                if not self.handshake.done():
                    self.handshake.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            first = self.errors[0] if self.errors else None
            if first is None and not self.received_any and self._client._ssl is None:
                lost: ClientError = self._client._no_greeting("the connection was closed without a byte")
            else:
                lost = first or ConnectionLost(
                    f"connection closed before the broker's INFO arrived{f': {exc}' if exc else ''}"
                )
            self.handshake.set_exception(lost)
            # Nobody may be awaiting it if the connect attempt already timed out.
            self.handshake.exception()
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_drainers()
        self._client._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    # -- used by Client --------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(chunks)

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if not self._write_paused or self.closed.done():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def write_buffer_size(self) -> int:
        if self.transport is None or self.transport.is_closing():
            return 0
        return self.transport.get_write_buffer_size()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Client:
    """An asyncio hpfeeds client.

    Example::

        async with Client("127.0.0.1", 10000, "collector", "s3cret") as client:
            await client.subscribe("cowrie.sessions", "dionaea.capture")
            await client.wait_ready()          # raises if AUTH or a SUBSCRIBE was refused
            async for message in client:
                print(message.channel, message.ident, message.payload)

    **Connection.** ``connect()`` opens the first connection and returns once
    the broker's INFO arrived and AUTH, every SUBSCRIBE and the queued
    publishes were written. Brokers send nothing when AUTH or SUBSCRIBE
    succeed, so ``wait_ready(grace_s)`` listens a short moment for a refusal.
    TLS is used when ``tls`` is true, ``cafile`` is given (the CA to trust
    instead of the system's) or ``ssl_context`` is given.

    **Reconnect.** With ``reconnect=True`` (the default) a lost connection is
    re-opened after an exponential backoff with jitter (``backoff``); every
    channel subscribed is subscribed again, then the queued publishes are
    written, in order. Authentication failure is never retried (it is fatal),
    nor is an access denial that the broker follows with a close (the
    reference broker does; ours keeps the connection and the client carries on).
    An operator's kick (``Kicked``) is reconnected after, logged once. A
    reconnect over TLS resumes the previous session (``tls_resumption``;
    ``tls_session_reused`` says whether the latest one did).

    **Errors.** ERROR frames become ``BrokerError`` (``AuthenticationFailed``,
    ``AccessDenied``). With ``on_error`` they are passed to that callback (called
    in the event loop; keep it short); without it they are raised, in arrival
    order among the messages, by the ``async for`` iteration and by
    ``wait_ready``. A fatal error (authentication failed, or the connection
    lost with ``reconnect=False``) is raised by every later call.

    **Received messages** are buffered up to ``max_buffered_messages``; beyond
    that the client stops reading the socket until the buffer is half empty,
    so a slow reader slows the broker's sending rather than growing memory
    (the broker may then cut the client as a slow consumer; it reconnects).
    """

    def __init__(
        self,
        host: str,
        port: int,
        ident: Text,
        secret: Text,
        *,
        tls: bool = False,
        cafile: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_buffered_messages: int = DEFAULT_MAX_BUFFERED_MESSAGES,
        on_error: ErrorCallback | None = None,
        limits: FrameLimits = DEFAULT_LIMITS,
        tls_resumption: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self._ident = to_bytes(ident, "ident")
        self._secret = to_bytes(secret, "secret")
        encode_auth(self._ident, bytes(20))  # refuse an ident that cannot be sent, now
        if ssl_context is None and (tls or cafile):
            ssl_context = make_ssl_context(cafile)
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        # A reconnect resumes the previous connection's TLS session (no
        # certificate signature or key exchange); the broker falls back to a
        # full handshake by itself when it cannot resume.
        self._resume_tls = tls_resumption and ssl_context is not None and _resumable(ssl_context)
        self._tls_session: ssl.SSLSession | None = None
        self.tls_session_reused: bool | None = None
        """Whether the latest connection resumed the TLS session of the one before
        (``None`` without TLS)."""
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.connect_timeout_s = connect_timeout_s
        if max_pending < 0 or max_pending_bytes < 0 or max_buffered_messages < 1:
            raise ValueError("queue bounds must be positive")
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_buffered_messages = max_buffered_messages
        self.on_error = on_error
        """Where ERRORs go instead of the iteration; may be set or changed at any time."""
        self._limits = limits

        self._subscriptions: dict[bytes, None] = {}  # an ordered set
        self._sent_subscriptions: set[bytes] = set()  # written on some connection already
        self._refused: dict[str, AccessDenied] = {}
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._inbox: collections.deque[Message | BrokerError] = collections.deque()
        self._unread_errors = 0
        self._conn: _Connection | None = None  # the live, handshaken connection
        self._reading_paused: _Connection | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._attempt = 0  # reconnect attempts since the last stable connection
        self._opening = 0  # connection attempts in progress
        self._fatal: BaseException | None = None
        self._closing = False
        self._finishing = False  # finish(): the broker closing is expected
        self._changed: asyncio.Event | None = None
        self.connection_count = 0
        """How many times a connection was established (1 after ``connect``)."""
        self.broker_name = ""
        """The name the broker sent in its INFO frame (last connection)."""

    # -- public API ------------------------------------------------------------

    @property
    def ident(self) -> str:
        return to_text(self._ident)

    @property
    def connected(self) -> bool:
        """True while a connection is up and AUTH was written on it."""
        return self._conn is not None and self._conn.alive

    @property
    def pending(self) -> int:
        """Publishes waiting for a connection (see ``publish``)."""
        return len(self._pending)

    @property
    def subscriptions(self) -> list[str]:
        return [to_text(c) for c in self._subscriptions]

    @property
    def refused_channels(self) -> dict[str, AccessDenied]:
        """Channels the broker refused when the client subscribed them again
        after a reconnect (on the latest connection), with the refusal.

        Such a refusal is not raised (the other channels go on): it is handed to
        ``on_error``, or else logged once as a warning. The client asks for
        the channel again at every reconnect, in case it was granted again.
        """
        return dict(self._refused)

    async def connect(self, *, retry: bool = False) -> None:
        """Open the connection and authenticate.

        Raises ``OSError`` (e.g. ``ConnectionRefusedError``, ``ssl.SSLError``),
        ``TimeoutError`` after ``connect_timeout_s``, ``ConnectionLost`` if the
        broker closed before its INFO, or a ``BrokerError`` it sent instead.
        With ``retry=True`` those are retried with the backoff until a
        connection is made (authentication failure is still raised).
        Idempotent while connected.
        """
        self._check_usable()
        if self.connected:
            return
        while True:
            try:
                await self._open()
                return
            except (OSError, TimeoutError, ClientError) as exc:
                if not retry or isinstance(exc, AuthenticationFailed):
                    raise
                delay = self.backoff.delay(self._attempt)
                self._attempt += 1
                log.info("connecting to %s:%s failed (%s); retrying in %.2f s", self.host, self.port, exc, delay)
                await asyncio.sleep(delay)
                self._check_usable()

    async def subscribe(self, *channels: Text) -> None:
        """Subscribe to ``channels`` now (if connected) and after every reconnect.

        Subscribing twice to a channel is a no-op. A refusal arrives later as
        ``AccessDenied`` (see ``wait_ready``).
        """
        self._check_usable()
        new = [to_bytes(c, "channel") for c in channels]
        frames = [encode_subscribe(self._ident, c) for c in new if c not in self._subscriptions]
        for c in new:
            self._subscriptions[c] = None
        conn = self._conn
        if frames and conn is not None and conn.alive:
            self._sent_subscriptions.update(new)
            conn.writelines(frames)
            await conn.drain()

    async def unsubscribe(self, *channels: Text) -> None:
        """Stop receiving ``channels``; they are not subscribed again on reconnect."""
        self._check_usable()
        gone = [c for c in (to_bytes(c, "channel") for c in channels) if c in self._subscriptions]
        for c in gone:
            del self._subscriptions[c]
            self._sent_subscriptions.discard(c)
            self._refused.pop(to_text(c), None)
        conn = self._conn
        if gone and conn is not None and conn.alive:
            conn.writelines([encode_unsubscribe(self._ident, c) for c in gone])
            await conn.drain()

    async def publish(self, channel: Text, payload: Text) -> None:
        """Publish ``payload`` (``str`` is sent as UTF-8) on ``channel``.

        The guarantee, exactly:

        - While connected, the message is written to the connection's socket
          before this returns (awaiting while the socket's send buffer is over
          its high-water mark). If that connection then dies before the broker
          read it, the message is lost without notice: hpfeeds has no
          acknowledgements, so no client can know.
        - While disconnected (before ``connect``, or between a loss and the
          reconnect), the message is appended to the pending queue, which is
          written in order right after the next connection's AUTH and
          SUBSCRIBEs, before any later publish.
        - If the queue already holds ``max_pending`` messages, or this one
          would bring it over ``max_pending_bytes``, ``PublishQueueFull`` is
          raised and the message is not queued; nothing queued earlier is
          dropped.
        - After a fatal error or ``close`` the client raises instead of
          queuing; ``close`` returns how many queued messages it discarded.

        ``ValueError`` if the channel is over 255 bytes or the message is over
        the frame limit (1 MiB payload by default) that brokers enforce.
        """
        self._check_usable()
        frame = encode_publish(self._ident, to_bytes(channel, "channel"), to_bytes(payload, "payload"))
        if len(frame) > self._limits.max_publish_frame_bytes:
            raise ValueError(
                f"message frame of {len(frame)} bytes exceeds the limit of {self._limits.max_publish_frame_bytes}"
            )
        conn = self._conn
        if conn is not None and conn.alive:
            conn.write(frame)
            await conn.drain()
            return
        if len(self._pending) >= self.max_pending or self._pending_bytes + len(frame) > self.max_pending_bytes:
            raise PublishQueueFull(
                f"not connected and {len(self._pending)} messages ({self._pending_bytes} bytes) are already queued"
            )
        self._pending.append(frame)
        self._pending_bytes += len(frame)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every publish made so far has been written to the socket.

        That includes the pending queue (so this waits through a reconnect).
        Raises ``TimeoutError`` after ``timeout_s``; raises the fatal error if
        the client fails meanwhile. It says nothing about the broker having
        accepted the messages: follow with ``wait_ready`` for that.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                self._check_usable()
                conn = self._conn
                if not self._pending and conn is not None and conn.alive and conn.write_buffer_size() == 0:
                    return
                await self._wait_changed(0.01)

    async def wait_ready(self, grace_s: float = DEFAULT_READY_GRACE_S) -> None:
        """Wait until connected, then up to ``grace_s`` for the broker to object.

        Brokers acknowledge nothing: success is the absence of an ERROR. So
        this returns after ``grace_s`` of silence, and raises at once the oldest
        unread ``BrokerError`` (``AuthenticationFailed``, ``AccessDenied``, ...)
        or the fatal error when one arrives. Use it after ``connect`` and
        ``subscribe``, or after ``flush`` to check publishes. An error handed
        to ``on_error`` is not raised here.
        """
        self._check_usable()
        await self._wait_connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            self._raise_unread_error()
            self._check_usable()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await self._wait_changed(remaining)

    async def finish(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Flush, tell the broker nothing more is coming, hear its last word, close.

        On plain TCP the client half-closes and waits (up to ``timeout_s``)
        for the broker to close its side: both brokers first answer every frame
        already received, so a refused AUTH, PUBLISH or SUBSCRIBE is raised here
        (the oldest unread ``BrokerError``), however short the caller waited
        before. TLS has no half-close: there it listens ``DEFAULT_READY_GRACE_S``
        (as ``wait_ready``). The client is closed afterwards in every case.
        """
        try:
            self._check_usable()
            await self.flush(timeout_s)
            conn = self._conn
            if conn is not None and conn.transport is not None and conn.transport.can_write_eof():
                self._finishing = True
                with contextlib.suppress(OSError):  # the broker may have closed already
                    conn.transport.write_eof()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.closed), timeout_s)
                self._raise_unread_error()
                self._check_usable()
            else:
                await self.wait_ready()
        finally:
            await self.close(timeout_s)

    async def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:
        """Flush what was written (up to ``timeout_s``), close, stop reconnecting.

        Returns the number of queued publishes that were never sent (they
        needed a connection that was not there). Iteration then ends. Idempotent.
        """
        if self._closing:
            return 0
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnect_task
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()  # flushes the write buffer, then closes
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), timeout_s)
            except TimeoutError:
                conn.abort()
        discarded = len(self._pending)
        if discarded:
            log.warning("closing with %d queued publishes never sent", discarded)
        self._pending.clear()
        self._pending_bytes = 0
        self._wake()
        return discarded

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        """The next message; raises unread ``BrokerError``s in arrival order,
        the fatal error once the buffer is empty, ``StopAsyncIteration`` after
        ``close``."""
        while True:
            item = self._pop_inbox()
            if item is not None:
                if isinstance(item, BrokerError):
                    raise item
                return item
            if self._fatal is not None:
                raise self._fatal
            if self._closing:
                raise StopAsyncIteration
            await self._wait_changed(None)

    async def messages(self) -> list[Message]:
        """Every message buffered now, waiting for at least one (errors as in ``async for``)."""
        first = await self.__anext__()
        batch = [first]
        while self._inbox and isinstance(self._inbox[0], Message):
            item = self._pop_inbox()
            assert isinstance(item, Message)
            batch.append(item)
        return batch

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- connection management ---------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, self._limits)
        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            kwargs["server_hostname"] = self._server_hostname or self.host
            kwargs["ssl_handshake_timeout"] = self.connect_timeout_s
        self._opening += 1
        resume = _RESUME.set(self._tls_session if self._resume_tls else None)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                try:
                    await loop.create_connection(lambda: conn, self.host, self.port, **kwargs)
                finally:
                    _RESUME.reset(resume)
                await conn.handshake  # _handshake() has run inside data_received
        except NoGreeting:
            conn.abort()
            raise
        except TimeoutError:
            conn.abort()
            if conn.transport is not None and not conn.received_any and self._ssl is None:
                raise self._no_greeting(f"nothing arrived in {self.connect_timeout_s:g} s") from None
            raise
        except BaseException:
            conn.abort()
            raise
        finally:
            self._opening -= 1
            self._wake()
        self._check_usable()

    def _no_greeting(self, what: str) -> NoGreeting:
        return NoGreeting(
            f"connected to {self.host}:{self.port}, but {what} before the broker's INFO: "
            "is this a TLS port? (use tls=True)"
        )

    def _handshake(self, conn: _Connection, info: Info) -> None:
        """INFO arrived: write AUTH, the SUBSCRIBEs and the queued publishes in one go."""
        if self._closing:
            conn.abort()  # closed while this connection was being opened
            return
        chunks = [encode_auth(self._ident, sign(info.nonce, self._secret))]
        chunks += [encode_subscribe(self._ident, c) for c in self._subscriptions]
        conn.resubscribed = self._sent_subscriptions & self._subscriptions.keys()
        self._sent_subscriptions.update(self._subscriptions)
        self._refused.clear()
        chunks += self._pending
        conn.writelines(chunks)
        sent = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        conn.ready = True
        self._conn = conn
        self.connection_count += 1
        tls = conn.transport.get_extra_info("ssl_object") if conn.transport is not None else None
        if tls is not None:
            self.tls_session_reused = tls.session_reused
            self._keep_tls_session(tls)
        self.broker_name = conn.broker_name
        log.info(
            "connected to %s:%s (broker %r), %d subscriptions, %d queued publishes sent",
            self.host,
            self.port,
            conn.broker_name,
            len(self._subscriptions),
            sent,
        )
        self._wake()

    def _keep_tls_session(self, tls: ssl.SSLObject) -> None:
        # TLS 1.3 tickets come after the handshake: the session is read again
        # when the connection ends, so the latest ticket is the one resumed.
        session = tls.session
        if session is not None and (session.has_ticket or session.id):
            self._tls_session = session

    def _connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return  # a connect attempt that failed; _open reports it
        self._conn = None
        tls = conn.transport.get_extra_info("ssl_object") if conn.transport is not None else None
        if tls is not None:
            self._keep_tls_session(tls)
        if self._reading_paused is conn:
            self._reading_paused = None
        if time.monotonic() - conn.started >= STABLE_CONNECTION_S:
            self._attempt = 0
        # A refusal right before the close: the reference broker closes after
        # denying a channel. (Ours keeps the connection; an earlier refusal
        # says nothing about a later loss.)
        last = conn.errors[-1] if conn.errors else None
        refusal = last if isinstance(last, AuthenticationFailed | AccessDenied) else None
        kick = next((e for e in conn.errors if isinstance(e, Kicked)), None)
        if isinstance(refusal, AccessDenied) and refusal.channel in self._refused and self.reconnect:
            # A channel it had re-subscribed: drop it, keep the others.
            self._subscriptions.pop(refusal.channel.encode("utf-8", "surrogateescape"), None)
            log.warning("broker closed after refusing channel %r; reconnecting without it", refusal.channel)
            refusal = None
        if self._closing:
            pass
        elif refusal is not None:
            # Raised to the owner (and so reported once, by the owner).
            log.debug("broker closed the connection after refusing: %s", refusal)
            self._set_fatal(refusal)
        elif self._finishing:
            pass  # finish() asked for this close
        elif not self.reconnect:
            lost = f"connection to {self.host}:{self.port} lost{f': {exc}' if exc else ''}"
            self._set_fatal(kick or ConnectionLost(lost))
        else:
            if kick is not None:
                # The key is still good: come back, with the backoff as after any loss.
                log.warning(
                    "disconnected from %s:%s by the broker's operator (%s); reconnecting",
                    self.host,
                    self.port,
                    kick.message,
                )
            else:
                why = exc or "closed by broker"
                log.warning("connection to %s:%s lost (%s); reconnecting", self.host, self.port, why)
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())
        self._wake()

    async def _reconnect(self) -> None:
        while not self._closing and self._fatal is None:
            delay = self.backoff.delay(self._attempt)
            self._attempt += 1
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._open()
                return
            except AuthenticationFailed as exc:
                self._set_fatal(exc)
                return
            except (OSError, TimeoutError, ClientError) as exc:
                log.info("reconnect to %s:%s failed: %s", self.host, self.port, exc)

    # -- inbound ---------------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        self._inbox.append(message)
        if len(self._inbox) >= self.max_buffered_messages and self._reading_paused is None:
            conn = self._conn
            if conn is not None and conn.transport is not None:
                conn.transport.pause_reading()
                self._reading_paused = conn
        self._wake()

    def _broker_error(self, conn: _Connection, err: BrokerError) -> None:
        # Raised to the owner or handed to on_error: logging it too would report it twice.
        log.debug("broker error: %s", err.message)
        if isinstance(err, AuthenticationFailed):
            self._set_fatal(err)
        # Not the owner's doing, so not raised: a kick (the reconnect says so)
        # and a channel refused when the client re-subscribed it itself.
        automatic = isinstance(err, Kicked) or self._refused_again(conn, err)
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:
                log.exception("on_error callback raised")
        elif automatic:
            if isinstance(err, AccessDenied):
                log.warning(
                    "channel %r refused after reconnecting to %s:%s (%s); the other channels go on",
                    err.channel,
                    self.host,
                    self.port,
                    err.message,
                )
        elif not isinstance(err, AuthenticationFailed):
            if self._unread_errors >= MAX_UNREAD_ERRORS:
                log.warning("broker error not kept (%d unread already): %s", MAX_UNREAD_ERRORS, err.message)
                return
            self._inbox.append(err)
            self._unread_errors += 1
        self._wake()

    def _refused_again(self, conn: _Connection, err: BrokerError) -> bool:
        """Is ``err`` the refusal of a channel the client re-subscribed on ``conn``?"""
        if not isinstance(err, AccessDenied) or err.action != "subscribe" or err.channel is None:
            return False
        channel = err.channel.encode("utf-8", "surrogateescape")
        if channel not in conn.resubscribed:
            return False
        self._refused[err.channel] = err
        return True

    def _pop_inbox(self) -> Message | BrokerError | None:
        if not self._inbox:
            return None
        item = self._inbox.popleft()
        if isinstance(item, BrokerError):
            self._unread_errors -= 1
        paused = self._reading_paused
        if paused is not None and len(self._inbox) <= self.max_buffered_messages // 2:
            self._reading_paused = None
            if paused.alive and paused.transport is not None:
                paused.transport.resume_reading()
        return item

    def _raise_unread_error(self) -> None:
        if not self._unread_errors:
            return
        for item in self._inbox:
            if isinstance(item, BrokerError):
                self._inbox.remove(item)
                self._unread_errors -= 1
                raise item

    # -- state -------------------------------------------------------------------------

    def _set_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            # The fatal error is raised on its own; do not report it twice.
            if isinstance(exc, BrokerError) and exc in self._inbox:
                self._inbox.remove(exc)
                self._unread_errors -= 1
        if self._reconnect_task is not None and self._reconnect_task is not asyncio.current_task():
            self._reconnect_task.cancel()
        self._wake()

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ClientClosed("the client was closed")

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _wait_changed(self, timeout_s: float | None) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()

    async def _wait_connected(self) -> None:
        while not self.connected:
            self._check_usable()
            reconnecting = self._reconnect_task is not None and not self._reconnect_task.done()
            # A connection still held is closing: its connection_lost (next) decides
            # what follows, a reconnect or the fatal error, and wakes this loop.
            # Connecting now would send one more AUTH (to a broker that just refused one).
            closing = self._conn is not None
            if not self._opening and not reconnecting and not closing:
                await self.connect()  # nobody else is connecting: do it (and raise its error)
                continue
            await self._wait_changed(None)
