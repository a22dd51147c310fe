"""The NATS backplane: several brokers behave as one.

Contract:
- Local delivery stays direct; every local publish run is also published to
  the channel's subject (``subjects.py``) with the PUBLISH frames unchanged as
  the NATS payload (``wire.py``: headers, split frames, inbound checks).
- A frame larger than the server's ``max_payload`` travels in several NATS
  messages and is delivered whole, in order, or not at all (counted lost), so
  a NATS with its defaults (1 MiB) works.
- A node subscribes to a channel's subject only while some local client
  subscribes to that channel. ``no_echo``: a node never receives its own
  publishes, so nothing is delivered twice.
- Order: one NATS connection per node, publishes sent in order by one pump
  task, so per-publisher order holds across nodes.
- Nothing from NATS is trusted: only whole, well-formed PUBLISH frames whose
  channel is the one their subject encodes, from a broker's headers, are
  delivered; the rest is dropped, counted by reason and logged once per
  origin per minute. With ``--cluster-key-file`` every message is signed with
  the cluster key and one that does not verify is dropped before it changes
  anything, so a NATS client that is not a broker cannot speak as one.
- The receive path yields to the event loop every ``RECEIVE_BATCH`` messages
  of a subscription, so a flood from NATS delays local clients by a batch at
  most; what it can make the broker hold is bounded (``wire.Inbound``).
- Bounded: the outbox holds at most ``outbox_bytes`` (past it messages are
  counted as unforwarded, as when the link is down); split frames being
  reassembled, the NATS client's buffers and its per-subscription queues are
  bounded too (``tuning.py``).
- Faults: NATS down at start → local clients are served at once, the
  ``unreachable`` line is logged and the link joins when NATS appears; NATS
  lost → local delivery goes on, nothing is queued for the gap; receivers see
  the gap in the per-(origin, channel) sequence and count the messages they
  missed (``lost``) with a log line. Reconnects forever.
- The NATS URLs are logged without their user, password or token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ...protocol import FrameLimits
from .. import metrics
from ..config import ClusterAuth, ConfigError
from ..redact import redact_url, redact_urls
from ..text import escape, printable
from ..tuning import (
    CLUSTER_CLOSE_WAIT_S,
    CLUSTER_HEADER_ALLOWANCE_BYTES,
    CLUSTER_JOIN_BYTES,
    CLUSTER_MAX_OUTSTANDING_PINGS,
    CLUSTER_NATS_PENDING_BYTES,
    CLUSTER_PING_INTERVAL_S,
    CLUSTER_REASSEMBLY_FRAMES,
    CLUSTER_RECONNECT_WAIT_S,
    CLUSTER_REJECT_LOG_INTERVAL_S,
    CLUSTER_REJECT_LOG_ORIGINS,
    CLUSTER_SUB_PENDING_BYTES,
)
from .subjects import channel_to_subject
from .wire import MIN_CLUSTER_KEY_BYTES, Accepted, Inbound, Rejected, cluster_key, headers, new_origin, split

log = logging.getLogger("hpfeeds3.broker.cluster")

# Messages received (and handled by one subscription's callback) before the
# event loop runs others: nats-py parses every message of its buffer, and hands
# a subscription's queued messages over, without a turn in between, so a flood
# from NATS would otherwise hold the loop (local canary median 0.17 -> 11 ms).
RECEIVE_BATCH = 16
# Messages a subscription may hold unread (nats-py's default is 524,288, and
# its byte bound counts payloads only: 200,000 one-byte messages, a few
# hundred bytes of headers each, held 170 MiB). Past it nats-py drops them;
# the sequence gap counts them as lost.
SUB_PENDING_MSGS = 8_192


class _OncePer:
    """Says whether to log about ``key`` now: once per interval per key, at most ``size`` keys remembered."""

    def __init__(self, interval_s: float, size: int) -> None:
        self.interval_s = interval_s
        self.size = size
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) >= self.size:
            self._last.clear()
        self._last[key] = now
        return True


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def pace_receiving(nc: Any, batch: int = RECEIVE_BATCH) -> None:
    """Make nats-py's reader give the event loop a turn every ``batch`` messages.

    Its parser awaits ``_process_msg`` for each message of a read, and its read
    returns at once while its buffer holds data, so nothing else runs while
    NATS keeps sending. That method is the one place every received message
    passes; it is wrapped on this connection (a nats-py without it is left as
    it is)."""
    process = getattr(nc, "_process_msg", None)
    if process is None:
        return
    handled = 0

    async def paced(*args: Any) -> None:
        nonlocal handled
        await process(*args)
        handled += 1
        if handled >= batch:
            handled = 0
            await asyncio.sleep(0)

    nc._process_msg = paced


def load_cluster_key(path: str) -> bytes:
    """The signing key from ``--cluster-key-file``; ``ConfigError`` if unreadable or short."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"--cluster-key-file: cannot read {path!r}: {e.strerror}") from None
    if len(secret) < MIN_CLUSTER_KEY_BYTES:
        raise ConfigError(
            f"--cluster-key-file {path!r}: the key is {len(secret)} bytes, at least {MIN_CLUSTER_KEY_BYTES} are "
            "needed (e.g. openssl rand -hex 32)"
        )
    return cluster_key(secret)


def connect_options(servers: Sequence[str], auth: ClusterAuth) -> dict[str, Any]:
    """nats-py ``connect`` keywords for authentication and TLS (secrets read from their files now)."""
    opts: dict[str, Any] = {}
    try:
        if auth.user and auth.password_file:
            opts["user"] = auth.user
            opts["password"] = _read_secret(auth.password_file)
        if auth.token_file:
            opts["token"] = _read_secret(auth.token_file)
        if auth.nkey_file:
            opts["nkeys_seed"] = auth.nkey_file
        if auth.creds_file:
            opts["user_credentials"] = auth.creds_file
        if auth.wants_tls() or any(s.startswith("tls://") for s in servers):
            ctx = ssl.create_default_context(cafile=auth.tls_ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if auth.tls_cert:
                ctx.load_cert_chain(auth.tls_cert, auth.tls_key)
            opts["tls"] = ctx
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cluster: cannot load the NATS credentials or TLS files: {e}") from e
    return opts


class NatsBackplane:
    def __init__(
        self,
        servers: Sequence[str],
        deliver: Callable[[bytes, bytes, int], object],
        *,
        limits: FrameLimits,
        name: str = "hpfeeds",
        outbox_bytes: int = 64 * 1024 * 1024,
        auth: ClusterAuth | None = None,
    ) -> None:
        self.servers = list(servers)
        self.where = redact_urls(",".join(self.servers))
        self.deliver = deliver
        self.name = name
        self.origin = new_origin(os.urandom(8))
        self.connected = False
        self.status = "connecting"
        self.outbox_limit = outbox_bytes
        auth = auth or ClusterAuth()
        self._options = connect_options(self.servers, auth)
        # With a cluster key every message is signed, and unsigned ones are rejected.
        self._key = load_cluster_key(auth.key_file) if auth.key_file else None
        self._nc: Any = None
        self._ever_linked = False
        # (channel, frames, sequence number of the first frame, frame count)
        self._outbox: deque[tuple[bytes, bytes, int, int]] = deque()
        self.outbox_bytes = 0
        self._outbox_ready = asyncio.Event()
        self._outbox_full_logged = 0.0
        self._wanted: set[bytes] = set()
        self._subs: dict[bytes, Any] = {}
        self._reconcile = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq_out: dict[bytes, int] = {}
        self.inbound = Inbound(limits, CLUSTER_REASSEMBLY_FRAMES * limits.max_publish_frame_bytes, key=self._key)
        # Log lines about what other nodes (or anyone on NATS) send: once per origin per minute.
        self._log_reject = _OncePer(CLUSTER_REJECT_LOG_INTERVAL_S, CLUSTER_REJECT_LOG_ORIGINS)
        self._log_lost = _OncePer(CLUSTER_REJECT_LOG_INTERVAL_S, CLUSTER_REJECT_LOG_ORIGINS)
        # Link errors: the first of each kind, then once a minute.
        self._log_error_kind = _OncePer(CLUSTER_REJECT_LOG_INTERVAL_S, CLUSTER_REJECT_LOG_ORIGINS)
        self._stopping = False
        self.unforwarded = 0
        self.lost = 0
        self.rejected = 0

    # --- Backplane (sync, on the hot path: O(1), never await) ---------------------

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        seq = self._seq_out.get(channel, 0)
        self._seq_out[channel] = seq + count
        if not self.connected:
            self._unforwarded(count, "link_down")
            return
        size = len(data)
        if self.outbox_bytes + size > self.outbox_limit:
            self._unforwarded(count, "outbox_full")
            now = time.monotonic()
            if now - self._outbox_full_logged >= CLUSTER_REJECT_LOG_INTERVAL_S:
                self._outbox_full_logged = now
                log.warning(
                    "cluster: NATS is not taking messages as fast as they come: %d bytes queued "
                    "(--cluster-outbox); messages for other nodes are counted as unforwarded, not queued",
                    self.outbox_bytes,
                )
            return
        self.outbox_bytes += size
        self._outbox.append((channel, data, seq, count))
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()

    def want(self, channel: bytes) -> None:
        self._wanted.add(channel)
        self._reconcile.set()

    def unwant(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        self.inbound.forget(channel)
        self._reconcile.set()

    def _unforwarded(self, count: int, reason: str) -> None:
        self.unforwarded += count
        metrics.CLUSTER_UNFORWARDED.labels(reason).inc(count)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start linking in the background (never blocks on NATS)."""
        metrics.CLUSTER_OUTBOX_BYTES.set_function(lambda: self.outbox_bytes)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._link()),
            loop.create_task(self._pump()),
            loop.create_task(self._reconciler()),
        ]

    async def close(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        # Bounded, and cancelled again while waiting: nats-py's connect runs
        # asyncio.wait_for, which on Python 3.11 can swallow a cancellation
        # that lands as the connection attempt fails; the task then goes on.
        deadline = asyncio.get_running_loop().time() + CLUSTER_CLOSE_WAIT_S
        pending = set(self._tasks)
        while pending:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(left, 0.1))
            for t in pending:
                t.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2)
        self.connected = False

    # --- the link -------------------------------------------------------------------

    async def _link(self) -> None:
        import nats
        import nats.errors

        log.info("cluster: connecting to NATS %s", self.where)
        while not self._stopping:
            try:
                # The first connection is retried here, not inside nats-py
                # (max_reconnect_attempts=1: each server tried twice, then
                # NoServersError; -1 would loop inside connect for ever, out
                # of reach of _stopping). Once linked, the client reconnects
                # by itself, for ever.
                nc = await nats.connect(
                    servers=self.servers,
                    name=f"hpfeeds3:{self.name}:{self.origin}",
                    no_echo=True,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=CLUSTER_RECONNECT_WAIT_S,
                    connect_timeout=2,
                    pending_size=CLUSTER_NATS_PENDING_BYTES,
                    ping_interval=CLUSTER_PING_INTERVAL_S,
                    max_outstanding_pings=CLUSTER_MAX_OUTSTANDING_PINGS,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                    **self._options,
                )
            except nats.errors.NoServersError:
                # Every attempt failed; each failure went to error_cb already.
                await asyncio.sleep(CLUSTER_RECONNECT_WAIT_S)
                continue
            except Exception as e:
                self._log_error(e)
                await asyncio.sleep(CLUSTER_RECONNECT_WAIT_S)
                continue
            if self._stopping:  # linked as shutdown began
                with contextlib.suppress(Exception):
                    await nc.close()
                return
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            pace_receiving(nc)
            self._nc = nc
            self._mark_connected()
            self._reconcile.set()
            return

    def _mark_connected(self) -> None:
        self.connected = True
        self._ever_linked = True
        self.status = "connected"
        metrics.CLUSTER_LINK_UP.set(1)
        url = self._nc.connected_url if self._nc is not None else None
        where = redact_url(url.geturl()) if url is not None else self.where
        log.info(
            "cluster: linked to NATS %s as origin %s (max_payload %d bytes)",
            where,
            self.origin,
            self._nc.max_payload if self._nc is not None else 0,
        )

    async def _on_disconnected(self) -> None:
        if self.connected and not self._stopping:  # closing it ourselves is no loss
            log.warning("cluster: NATS link lost; local delivery continues, cross-node messages are not forwarded")
        self.connected = False
        self.status = "disconnected"
        metrics.CLUSTER_LINK_UP.set(0)

    async def _on_reconnected(self) -> None:
        self._mark_connected()
        self._reconcile.set()

    async def _on_error(self, e: Exception) -> None:
        if type(e).__name__ == "SlowConsumerError":
            # One per message dropped by a full subscription queue: a flood, so kept cheap.
            if self._log_error_kind("SlowConsumerError"):
                log.warning(
                    "cluster: messages from NATS arrive faster than this node handles them; the excess is "
                    "dropped (counted as lost by the sequence gaps), logged again in %g s",
                    CLUSTER_REJECT_LOG_INTERVAL_S,
                )
            return
        self._log_error(e)

    def _log_error(self, e: Exception) -> None:
        """An error of the link: the first of each kind logged, then once a minute; status follows it."""
        kind = type(e).__name__
        text = str(e) or kind
        refused = "authorization" in text.lower() or "authentication" in text.lower()
        if not self.connected:
            if refused:
                self.status = "unauthorized"
            elif isinstance(e, OSError) and not isinstance(e, ConnectionResetError | BrokenPipeError):
                # Refused, timed out, no route, unknown host; not a server
                # hanging up on us (which follows an authorization error).
                self.status = "unreachable"
        if not self._log_error_kind(kind):
            log.debug("cluster: NATS error: %s", escape(text))
            return
        if refused:
            log.error(
                "cluster: NATS %s refused our credentials (%s); serving local clients, retrying",
                self.where,
                escape(text),
            )
        elif not self.connected:
            log.warning(
                "cluster: NATS %s unreachable (%s); serving local clients, retrying every %g s",
                self.where,
                escape(text),
                CLUSTER_RECONNECT_WAIT_S,
            )
        else:
            log.warning("cluster: NATS error: %s", escape(text))

    async def _on_closed(self) -> None:
        self.connected = False
        metrics.CLUSTER_LINK_UP.set(0)

    # --- subscriptions: follow the set of locally wanted channels --------------------

    async def _reconciler(self) -> None:
        while not self._stopping:
            await self._reconcile.wait()
            self._reconcile.clear()
            nc = self._nc
            if nc is None or nc.is_closed:
                continue
            for channel in list(self._subs.keys() - self._wanted):
                sub = self._subs.pop(channel)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for channel in list(self._wanted - self._subs.keys()):
                try:
                    self._subs[channel] = await nc.subscribe(
                        channel_to_subject(channel),
                        cb=self._receiver(channel),
                        pending_bytes_limit=CLUSTER_SUB_PENDING_BYTES,
                        pending_msgs_limit=SUB_PENDING_MSGS,
                    )
                except Exception as e:
                    log.warning("cluster: cannot subscribe to %s: %s", printable(channel), escape(str(e)))
                    self._reconcile.set()
                    await asyncio.sleep(CLUSTER_RECONNECT_WAIT_S)

    def _receiver(self, channel: bytes) -> Any:
        deliver = self.deliver
        receive = self.inbound.receive
        wanted = self._wanted
        handled = 0

        async def on_message(msg: Any) -> None:
            nonlocal handled
            handled += 1
            if handled >= RECEIVE_BATCH:
                handled = 0
                await asyncio.sleep(0)  # let local clients (and other subscriptions) run
            if channel not in wanted:
                # Still arriving while the subscription is torn down: nobody
                # here wants it, and it must not set a stale sequence baseline.
                return
            got = receive(channel, msg.headers, msg.data)
            if type(got) is Accepted:
                if got.missed:
                    self._count_lost(channel, got.origin, got.missed)
                deliver(channel, got.data, got.count)
            elif got is not None:
                self._reject(channel, msg.headers, got)  # type: ignore[arg-type]

        return on_message

    def _count_lost(self, channel: bytes, origin: str, missed: int) -> None:
        self.lost += missed
        metrics.CLUSTER_LOST.inc(missed)
        if self._log_lost(origin):
            log.warning(
                "cluster: %d message(s) on %s from node %s were lost in transit; more gaps from "
                "this node are counted (hpfeeds_broker_cluster_lost_messages_total), logged again in %g s",
                missed,
                printable(channel),
                origin,
                CLUSTER_REJECT_LOG_INTERVAL_S,
            )

    def _reject(self, channel: bytes, hdrs: dict[str, str] | None, why: Rejected) -> None:
        self.rejected += 1
        metrics.CLUSTER_REJECTED.labels(why.value).inc()
        origin = escape(str((hdrs or {}).get("Hpfeeds-Origin", "?"))[:64])
        if not self._log_reject(origin):
            return
        log.warning(
            "cluster: dropped a message from NATS on channel %s (origin %s): %s; "
            "more from this origin are counted (hpfeeds_broker_cluster_rejected_total), logged again in %g s",
            printable(channel),
            origin,
            why.value,
            CLUSTER_REJECT_LOG_INTERVAL_S,
        )

    # --- the outgoing pump: one task, in order ------------------------------------

    async def _pump(self) -> None:
        outbox = self._outbox
        while not self._stopping:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                channel, data, seq, count = outbox.popleft()
                self.outbox_bytes -= len(data)
                nc = self._nc
                max_payload = nc.max_payload if nc is not None else CLUSTER_JOIN_BYTES
                limit = max(max_payload - CLUSTER_HEADER_ALLOWANCE_BYTES, max_payload // 2)
                # Join the following runs of the same channel into one NATS message.
                parts = [data]
                size = len(data)
                join = min(CLUSTER_JOIN_BYTES, limit)
                while outbox and outbox[0][0] == channel and size + len(outbox[0][1]) <= join:
                    _, more, _, more_count = outbox.popleft()
                    self.outbox_bytes -= len(more)
                    parts.append(more)
                    size += len(more)
                    count += more_count
                if nc is None or not self.connected:
                    self._unforwarded(count, "link_down")
                    continue
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                subject = channel_to_subject(channel)
                failed = -1
                for piece, piece_seq, piece_count, part in split(payload, seq, count, limit):
                    if piece_seq == failed:
                        continue  # the rest of a split frame whose first parts could not be sent
                    try:
                        hdrs = headers(
                            self.origin, piece_seq, piece_count, part, key=self._key, channel=channel, data=piece
                        )
                        await nc.publish(subject, piece, headers=hdrs)
                    except Exception as e:
                        failed = piece_seq
                        self._unforwarded(piece_count, "publish_failed")
                        log.debug("cluster: publish failed: %s", e)
