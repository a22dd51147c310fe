"""The shared state of one broker process: what every Connection reaches.

Connections, the router, the authenticator and its limiter, per-ident
indexes for revocation, totals of closed connections for the metrics, and the
bounded shutdown drain. Built by ``server.serve``; no sockets or listeners here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..protocol import info_head
from . import metrics
from .admission import PreAuthPool, address_group
from .auth import AccessKey, Authenticator, AuthUnavailable, SyncLookup, WouldBlock
from .backplane import Backplane
from .config import BrokerConfig
from .deadlines import Deadlines
from .durable.base import DurableLog
from .durable.feed import DurableFeed, FeedOutput, FeedStats
from .durable.tcpack import CloseKind
from .events import AuthBlocked, AuthFailed, AuthRefused, Event, Refused, Revoked, SlowProducer, log_event
from .metrics import Limit, PublishStats
from .policies import BacklogBounds, ReceiveRate
from .ratelimit import AuthFailureLimiter
from .reasons import CloseReason
from .router import Router
from .session import CLOSED, Refusal
from .sockinfo import bytes_waiting, peer_gone
from .text import printable
from .tuning import (
    AUTH_LOOKUP_ATTEMPTS,
    AUTH_LOOKUP_TIMEOUT_S,
    HELD_BACK_MAX_S,
    HELD_BACK_RECHECK_S,
    MAX_CHANNEL_SETS,
    PARTIAL_FRAME_GRACE_S,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .linger import LingeringClose

log = logging.getLogger("hpfeeds3.broker")


class Broker:
    """Shared state of one broker process: what every Connection reaches.

    It is the sessions' ``session.Port`` (publish, subscribe, unsubscribe,
    channel interning, leaving the pre-auth pool, a failed AUTH, a refusal
    counted), and connections reach its state through methods (``admit``,
    ``authenticated``, ``forget``, ``lingering_add``...), not its containers.
    """

    def __init__(self, config: BrokerConfig, authenticator: Authenticator, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.authenticator = authenticator
        # Capabilities, found once: a store without a synchronous lookup always goes through ``lookup``.
        self._lookup_now = authenticator.lookup_now if isinstance(authenticator, SyncLookup) else None
        # Bumped when the store reports a change: a lookup that saw it change is repeated.
        self.auth_generation = 0
        self.loop = loop
        self.router = Router()
        self.auth_limiter = AuthFailureLimiter(config.auth_limits)
        self.name_bytes = config.name.encode("utf-8")[:255]
        self.info_head = info_head(self.name_bytes)  # + a connection's nonce: its INFO
        self.frame_limits = config.limits.frame_limits()
        self.send_hard_bytes = config.limits.send_buffer_hard_bytes
        # The connections' clock-driven policies (policies.py), fed loop.time() by them.
        self.backlog_bounds = BacklogBounds(
            hard_bytes=config.limits.send_buffer_hard_bytes,
            soft_bytes=config.limits.send_buffer_soft_bytes,
            soft_window_s=config.limits.send_buffer_soft_window_s,
            stall_timeout_s=config.limits.send_stall_timeout_s,
        )
        self.receive_rate = ReceiveRate(config.limits.min_receive_rate_bytes, PARTIAL_FRAME_GRACE_S)
        self.max_connections = config.limits.max_connections
        self.connections: set[Connection] = set()
        # The authenticated connections of each ident (revocation): the connection
        # itself while it is the ident's only one, as a sensor with its own key is,
        # a set from the second on (a set of one is 216 bytes and one more object
        # for the cyclic GC to scan, per sensor). ``of_ident`` reads it.
        self.by_ident: dict[str, Connection | set[Connection]] = {}
        self._channel_sets: dict[tuple[str, ...], frozenset[bytes]] = {}
        limits = config.limits
        # Connections not authenticated yet, by address group (admission.py).
        self.pre_auth: PreAuthPool[Connection] = PreAuthPool(
            limits.max_unauthenticated,
            limits.max_unauthenticated_per_address,
            lambda conn: bytes_waiting(conn.transport),
        )
        # Accepted while the pool was full of connections making progress: not read
        # yet, started oldest first as slots free, or over the bound once held
        # HELD_BACK_MAX_S (loop time they were held back at).
        self.held_back: dict[Connection, float] = {}
        # Deadlines of the TLS handshake (from admission) and of AUTH (from INFO), on one timer each.
        self.tls_deadlines: Deadlines[Connection] = Deadlines(loop, limits.tls_handshake_timeout_s, _tls_due)
        self.auth_deadlines: Deadlines[Connection] = Deadlines(loop, limits.auth_timeout_s, _auth_due)
        self._held_back_timer: asyncio.TimerHandle | None = None
        self._releasing = False
        # Bytes held in incomplete frames: by connection (with the ident and
        # address group they are counted under), their sum, and running sums by
        # ident (None: not authenticated) and by address group within an ident;
        # each group's connections in the order of their last change, stalest first.
        self.partial_holders: dict[Connection, tuple[int, str | None, str]] = {}
        self.partial_bytes = 0
        self._partial_by_ident: dict[str | None, int] = {}
        self._partial_by_group: dict[str | None, dict[str, int]] = {}
        self._partial_members: dict[tuple[str | None, str], dict[Connection, None]] = {}
        # Connections lingering after a closing ERROR, oldest first: at the
        # connection limit the oldest is cut to make room (linger.py).
        self.lingering: dict[Connection, LingeringClose] = {}
        self.state = "starting"  # starting | serving | stopping
        self.backplane: Backplane | None = None  # --cluster: set once, by attach_backplane
        self._tasks: set[asyncio.Task[Any]] = set()
        # Counts of closed connections, so counters never go backwards.
        self.retired_publish: dict[tuple[str, str], PublishStats] = {}
        self.retired_send_fill: dict[str, int] = {}
        self.retired_recv_fill: dict[str, int] = {}
        self.retired_total_recv = 0
        self.retired_total_sent = 0
        # Observers of broker events (events.py): the log lines, the console's tracker.
        self._observers: list[Callable[[Event], None]] = [log_event]
        # Told of every refused frame or connection (the console's per-sensor refusals).
        self.refusal_observers: list[Callable[[Refusal, str | None], None]] = []
        self._ids = itertools.count(1)
        # Durable keys (durable/feed.py): the log, once opened (attach_durable); the
        # connection consuming each durable ident (one at a time); its counts.
        self.durable: DurableLog | None = None
        self.feeds: dict[str, Connection] = {}
        self.feed_stats: dict[str, FeedStats] = {}
        self._feed_exact: dict[str, dict[bytes, int]] = {}
        self._written_pending = False

    def next_connection_id(self) -> int:
        return next(self._ids)

    # --- events ---------------------------------------------------------------------

    def observe(self, observer: Callable[[Event], None]) -> None:
        """Call ``observer`` with every broker event from now on (on the event loop)."""
        self._observers.append(observer)

    def unobserve(self, observer: Callable[[Event], None]) -> None:
        self._observers.remove(observer)

    def emit(self, event: Event) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not break the broker
                log.exception("internal error in an observer of %s", event.kind.value)

    def attach_backplane(self, backplane: Backplane) -> None:
        """The cluster link (``--cluster``): the router forwards through it from now on. Once."""
        if self.backplane is not None:
            raise RuntimeError("the broker already has a backplane")
        self.backplane = backplane
        self.router.attach(backplane)

    # --- durable keys ------------------------------------------------------------------

    def attach_durable(self, durable: DurableLog) -> None:
        """The durable log, opened (off the loop) at start: the router logs what durable keys follow."""
        self.durable = durable
        self.router.durable = durable
        self.router.on_written = self._written_here
        durable.set_on_written(self._written_elsewhere)
        for channel in durable.followed():
            self.router.subscribe(channel, _KEEP)

    def _keep(self, channel: bytes) -> None:
        """``channel`` is kept in the log: the router wants it (from other brokers too) while
        no subscriber is connected."""
        self.router.subscribe(channel, _KEEP)

    def _written_elsewhere(self) -> None:
        """The log's writer thread wrote messages: feed the durable connections on the loop."""
        if not self._written_pending:
            self._written_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to feed
                self.loop.call_soon_threadsafe(self._written)

    def _written(self) -> None:
        self._written_pending = False
        self._written_here()

    def _written_here(self) -> None:
        """The writer wrote more (the router saw it between publishes, or ``_written``)."""
        for conn in list(self.feeds.values()):
            conn.feed_pump()

    def durable_attach(
        self, conn: Connection, ident: str, output: FeedOutput, schedule: Callable[[Callable[[], object]], None]
    ) -> DurableFeed | None:
        """``conn`` authenticated with a durable key: its feed (``output``: the connection's
        writes, ``schedule``: its guarded call_soon), replacing (closing) an older connection
        of the same key, whose positions are committed first."""
        durable = self.durable
        if durable is None:
            return None
        older = self.feeds.get(ident)
        if older is not None and older is not conn:
            older.feed_finish(CloseKind.ABORTIVE)
            log.info(
                "durable key %s: %s replaces %s, which is closed",
                ident,
                conn.peer,
                older.peer,
                extra={"event": "durable_replaced", "ident": ident, "peer": conn.peer},
            )
            try:
                older.close(CloseReason.REPLACED, f"a newer connection of durable key {ident} consumes it")
            except Exception:
                older.internal_error("closing a replaced durable connection")
        stats = self.feed_stats.get(ident)
        if stats is None:
            stats = self.feed_stats[ident] = FeedStats()
        feed = DurableFeed(
            ident,
            durable,
            output,
            self.config.limits.durable_overlap_bytes,
            stats,
            self._feed_exact.setdefault(ident, {}),
            schedule,
        )
        self.feeds[ident] = conn
        # Every channel the key may read is kept from now on, subscribed or not.
        for channel in conn.session.subchans:
            durable.follow(ident, channel)
            self._keep(channel)
        return feed

    def durable_detach(self, conn: Connection, ident: str) -> None:
        if self.feeds.get(ident) is conn:
            del self.feeds[ident]

    def durable_state(self, ident: str) -> dict[str, Any] | None:
        """A durable ident's backlog and counts (the API, the metrics); None without a log or positions."""
        durable = self.durable
        if durable is None:
            return None
        backlog = durable.backlog(ident)
        stats = self.feed_stats.get(ident) or FeedStats()
        return {
            "consuming": ident in self.feeds,
            "backlog_messages": backlog.messages,
            "backlog_bytes": backlog.bytes,
            "oldest_unread_age_s": round(backlog.oldest_age_s, 3),
            "dropped": backlog.dropped,
            "replayed": stats.replayed,
            "overlap_duplicates": stats.duplicates,
        }

    @property
    def unauthenticated(self) -> int:
        return self.pre_auth.total

    def hold_partial(self, conn: Connection, held: int) -> None:
        """``conn`` now holds ``held`` bytes of an incomplete frame (0: none).

        Past ``max_partial_frames_bytes`` over all connections, connections are
        closed (``slow_producer``) until it is met again, each time from the
        ident holding the most (connections not authenticated yet count as one),
        within it the address group holding the most, and within that the
        connection whose frame moved last longest ago: a key that parks many
        frames loses its own connections, not another key's large upload. The
        victim comes from running sums (a ``max`` over idents, then over that
        ident's groups), never from a sort of every holder."""
        if conn in self.partial_holders:
            self._unhold_partial(conn)
        if held:
            ident, group = conn.session.ident, conn.group[1]  # the address (IPv6: its /64)
            self.partial_holders[conn] = (held, ident, group)
            self.partial_bytes += held
            self._partial_by_ident[ident] = self._partial_by_ident.get(ident, 0) + held
            groups = self._partial_by_group.setdefault(ident, {})
            groups[group] = groups.get(group, 0) + held
            self._partial_members.setdefault((ident, group), {})[conn] = None
        limit = self.config.limits.max_partial_frames_bytes
        while self.partial_bytes > limit and self.partial_holders:
            by_ident = self._partial_by_ident
            ident = max(by_ident, key=by_ident.__getitem__)
            ident_bytes = by_ident[ident]
            groups = self._partial_by_group[ident]
            group = max(groups, key=groups.__getitem__)
            victim = next(iter(self._partial_members[(ident, group)]))
            size = self.partial_holders[victim][0]
            total = self.partial_bytes
            # Out of the sums before it is closed: a fault while closing it cannot stall this loop.
            self._unhold_partial(victim)
            metrics.limit_rejected(Limit.MAX_PARTIAL_FRAMES)
            owner = "connections not authenticated yet" if ident is None else ident
            why = (
                f"{size} bytes held in an incomplete frame; {ident_bytes} by {owner}, the most of any ident, "
                f"{total} over all connections (limit {limit})"
            )
            self.emit(SlowProducer(victim.peer, victim.session.ident, why))
            try:
                victim.close(
                    CloseReason.SLOW_PRODUCER, f"incomplete frames hold more than {limit} bytes: the largest are closed"
                )
            except Exception:
                victim.internal_error("closing a holder of incomplete frames")

    def _unhold_partial(self, conn: Connection) -> None:
        held, ident, group = self.partial_holders.pop(conn)
        self.partial_bytes -= held
        left = self._partial_by_ident[ident] - held
        groups = self._partial_by_group[ident]
        members = self._partial_members[(ident, group)]
        del members[conn]
        if left:
            self._partial_by_ident[ident] = left
            in_group = groups[group] - held
            if members:
                groups[group] = in_group
                return
            del groups[group]
        else:
            del self._partial_by_ident[ident], self._partial_by_group[ident]
        del self._partial_members[(ident, group)]

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 200 while serving (``degraded`` while a cluster link is down), else 503."""
        body: dict[str, Any] = {
            "status": self.state,
            "name": self.config.name,
            "connections": len(self.connections),
        }
        if self.backplane is not None:
            body["cluster"] = self.backplane.status
            if self.state == "serving" and not self.backplane.connected:
                body["status"] = "degraded"
        if self.durable is not None:
            st = self.durable.stats()
            body["durable"] = {
                "degraded": st.degraded,
                "last_error": st.last_error,
                "unstored": st.unstored,
                "disk_bytes": st.disk_bytes,
            }
            if self.state == "serving" and st.degraded:
                body["status"] = "degraded"  # live traffic is served; the log cannot store
        return (200 if self.state == "serving" else 503), body

    # --- called by connections ---------------------------------------------------

    def admit(self, conn: Connection) -> None:
        """Count ``conn`` from its accept and put it in the pre-auth pool, making room at
        a bound, then start it; or hold it back while the pool is full of connections
        making progress; or refuse (and close) it.

        At a pre-auth bound the oldest idle pre-auth connection (of the address,
        or of the busiest address of the busiest network) is closed. When every
        one is making progress (admission.py), nobody is cut: ``conn`` waits,
        unread, and is started in its turn once a slot frees. At the connection
        limit (the descriptor limit) the oldest connection lingering after its
        closing ERROR is cut, else the oldest idle pre-auth connection; the
        newcomer is refused only when neither exists. A fault while closing
        another connection closes that one alone."""
        self.connections.add(conn)
        if len(self.connections) > self.max_connections:
            if self.lingering:
                next(iter(self.lingering.values())).cut()
            else:
                evict = self.pre_auth.oldest_idle(self.loop.time())
                if evict is None:
                    message = f"too many connections (limit {self.max_connections})"
                    self._make_room(conn, Limit.MAX_CONNECTIONS, CloseReason.TOO_MANY_CONNECTIONS, message)
                    return
                self._close_to_make_room(evict, "connections")
                if conn.session.state == CLOSED:
                    return
        now = self.loop.time()
        if self.held_back or not self.pre_auth.has_room(now):
            self.held_back[conn] = now
            conn.hold_back()
            self._recheck_held_back()
            return
        self._enter_pool(conn, held=False)

    def _enter_pool(self, conn: Connection, *, held: bool, over_bound: bool = False) -> None:
        evict, bound = self.pre_auth.admit(conn, conn.group, self.loop.time(), over_bound)
        if evict is not None:
            self._close_to_make_room(evict, bound)
            if evict is conn:
                return
        conn.start(held)

    def _close_to_make_room(self, evict: Connection, bound: str) -> None:
        try:
            self._evict(evict, bound)
        except Exception:
            evict.internal_error("making room for a new connection")

    def progress(self, conn: Connection) -> None:
        """``conn``'s bytes arrived before it authenticated (admission.py)."""
        self.pre_auth.progress(conn, conn.group, self.loop.time())

    def _release_held_back(self) -> None:
        """Start the connections held back, oldest first, while the pool has room, and
        those held HELD_BACK_MAX_S whether it has or not (before their clients give up)."""
        held_back = self.held_back
        pool = self.pre_auth
        if self.state == "stopping" or self._releasing:
            return  # the loop below goes on when an eviction in it frees a slot
        self._releasing = True
        try:
            while held_back:
                now = self.loop.time()
                conn, since = next(iter(held_back.items()))
                room = pool.has_room(now)
                if not room and since > now - HELD_BACK_MAX_S:
                    break
                del held_back[conn]
                try:
                    if peer_gone(conn.transport):
                        conn.close(CloseReason.CLIENT_CLOSED, None, abort=True)  # it gave up waiting
                        continue
                    self._enter_pool(conn, held=True, over_bound=not room)
                except Exception:
                    conn.internal_error("starting a connection held back")
        finally:
            self._releasing = False
        self._recheck_held_back()

    def _recheck_held_back(self) -> None:
        # Members making progress go idle again without an event: look again soon.
        if self.held_back and self._held_back_timer is None:
            self._held_back_timer = self.loop.call_later(HELD_BACK_RECHECK_S, self._on_held_back_timer)

    def _on_held_back_timer(self) -> None:
        self._held_back_timer = None
        self._release_held_back()

    def _evict(self, conn: Connection, bound: str) -> None:
        limits = self.config.limits
        if bound == "connections":
            message = f"too many connections (limit {self.max_connections}): the oldest unauthenticated is closed"
            self._make_room(conn, Limit.MAX_CONNECTIONS, CloseReason.TOO_MANY_CONNECTIONS, message)
        elif bound == "total":
            message = f"too many unauthenticated connections (limit {limits.max_unauthenticated}): the oldest is closed"
            self._make_room(conn, Limit.MAX_UNAUTHENTICATED, CloseReason.TOO_MANY_UNAUTHENTICATED, message)
        else:
            message = (
                f"too many unauthenticated connections from this address "
                f"(limit {limits.max_unauthenticated_per_address}): the oldest is closed"
            )
            limit = Limit.MAX_UNAUTHENTICATED_PER_ADDRESS
            self._make_room(conn, limit, CloseReason.TOO_MANY_UNAUTHENTICATED, message)

    def _make_room(self, conn: Connection, limit: Limit, reason: CloseReason, message: str) -> None:
        metrics.limit_rejected(limit)
        self.emit(Refused(conn.peer, conn.id, limit))
        conn.close(reason, message)

    def authenticated(self, conn: Connection) -> None:
        """``conn``'s session is READY: index it by ident (revocation)."""
        ident = conn.session.ident
        assert ident is not None
        held = self.by_ident.get(ident)
        if held is None:
            self.by_ident[ident] = conn
        elif isinstance(held, set):
            held.add(conn)
        elif held is not conn:
            self.by_ident[ident] = {held, conn}

    def of_ident(self, ident: str) -> list[Connection]:
        """The authenticated connections of ``ident`` now."""
        held = self.by_ident.get(ident)
        if held is None:
            return []
        return list(held) if isinstance(held, set) else [held]

    def forget(self, conn: Connection) -> None:
        """``conn`` is lost: out of every table, its counts folded into the totals."""
        self.lingering.pop(conn, None)
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.held_back.pop(conn, None)
        self.retire(conn)
        ident = conn.session.ident
        if ident is not None:
            held = self.by_ident.get(ident)
            if held is conn:
                del self.by_ident[ident]
            elif isinstance(held, set):
                held.discard(conn)
                if len(held) == 1:
                    self.by_ident[ident] = held.pop()  # one again: no set of one

    def lingering_add(self, conn: Connection, linger: LingeringClose) -> None:
        self.lingering[conn] = linger

    def lingering_discard(self, conn: Connection) -> None:
        self.lingering.pop(conn, None)

    def auth_blocked_for(self, host: str, ident: str) -> float:
        """Seconds the failed-AUTH limiter still blocks this address (or address and ident); 0: not blocked."""
        limiter = self.auth_limiter
        if not limiter.blocking:
            return 0.0
        now = self.loop.time()
        return limiter.blocked_for(host, ident, now) if limiter.blocked(host, ident, now) else 0.0

    def auth_refused(self, conn: Connection, ident: str, block_s: float) -> None:
        """``conn``'s AUTH naming ``ident`` is refused unverified (blocked): told to the
        observers (the console puts "blocked address" on a known ident's row)."""
        host = conn.peer_host
        whole = self.auth_limiter.address_blocked(host, self.loop.time())
        self.emit(AuthRefused(conn.peer, address_group(host), ident, whole, block_s))

    # --- session.Port ---------------------------------------------------------------

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        return self.router.publish(channel, data, frames)

    def subscribe(self, channel: bytes, output: Connection) -> None:
        feed = output.feed
        if feed is not None:
            feed.add(channel)  # fed from the log, not the router
        else:
            self.router.subscribe(channel, output)

    def unsubscribe(self, channel: bytes, output: Connection) -> None:
        feed = output.feed
        if feed is not None:
            feed.remove(channel)
        else:
            self.router.unsubscribe(channel, output)

    def left_pre_auth(self, output: Connection) -> None:
        self.pre_auth.remove(output, output.group)
        if self.held_back:
            self._release_held_back()

    def auth_failed(self, output: Connection, ident: str | None, shown: str, why: str) -> None:
        self.emit(AuthFailed(output.peer, shown, why))
        limiter = self.auth_limiter
        if not limiter.enabled or ident is None:
            return
        block = limiter.record_failure(output.peer_host, ident, self.loop.time())
        if block is not None:
            self.emit(AuthBlocked(output.peer, limiter.limits.block_s, block))

    def refused(self, refusal: Refusal, ident: str | None) -> None:
        metrics.count_refusal(refusal, ident)
        for observer in self.refusal_observers:
            observer(refusal, ident)

    def channel_set(self, channels: tuple[str, ...]) -> frozenset[bytes]:
        """The channels of a key as the bytes the hot path compares, one shared set per distinct list."""
        found = self._channel_sets.get(channels)
        if found is None:
            if len(self._channel_sets) >= MAX_CHANNEL_SETS:
                self._channel_sets.clear()
            # map, not a generator: no Python frame per channel list (a storm of sensors
            # with their own channels misses this cache every time).
            found = self._channel_sets[channels] = frozenset(map(str.encode, channels))
        return found

    @property
    def task_count(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection task", exc_info=task.exception())

    def lookup_now(self, ident: str) -> AccessKey | None:
        """The key without waiting, or ``WouldBlock`` (then use ``lookup``)."""
        now = self._lookup_now
        if now is None:
            raise WouldBlock
        try:
            return now(ident)
        except (WouldBlock, AuthUnavailable):
            raise
        except Exception as e:
            log.exception("auth lookup for %r failed", ident)
            raise AuthUnavailable(str(e)) from e

    async def lookup(self, ident: str) -> AccessKey | None:
        """The key, read after the last change the store reported.

        A lookup that was in flight when a change arrived may hold the key
        as it was before (a removed key, an old secret): it is repeated, at
        most ``AUTH_LOOKUP_ATTEMPTS`` times within ``AUTH_LOOKUP_TIMEOUT_S``.
        """
        try:
            # asyncio.timeout, not wait_for: no extra task per AUTH.
            async with asyncio.timeout(AUTH_LOOKUP_TIMEOUT_S):
                for _attempt in range(AUTH_LOOKUP_ATTEMPTS):
                    generation = self.auth_generation
                    key = await self.authenticator.lookup(ident)
                    if generation == self.auth_generation:
                        return key
        except TimeoutError as e:
            raise AuthUnavailable(f"lookup took longer than {AUTH_LOOKUP_TIMEOUT_S:g} s") from e
        except AuthUnavailable:
            raise
        except Exception as e:
            log.exception("auth lookup for %r failed", ident)
            raise AuthUnavailable(str(e)) from e
        raise AuthUnavailable(f"the key store changed during each of {AUTH_LOOKUP_ATTEMPTS} lookups")

    def retire(self, conn: Connection) -> None:
        """Fold a closed connection's counts into the totals."""
        self.retired_total_recv += conn.received_bytes
        self.retired_total_sent += conn.sent_bytes
        session = conn.session
        ident = session.ident
        if ident is None:
            return
        self.retired_send_fill[ident] = self.retired_send_fill.get(ident, 0) + conn.sent_bytes
        self.retired_recv_fill[ident] = self.retired_recv_fill.get(ident, 0) + conn.received_bytes
        retired = self.retired_publish
        for chan, st in session.publish_stats.items():
            key = (ident, chan.decode("utf-8", "backslashreplace"))
            total = retired.get(key)
            if total is None:
                total = retired[key] = PublishStats()
            total.merge(st)

    # --- revocation ----------------------------------------------------------------

    async def recheck(self, idents: set[str] | None) -> None:
        """Re-read the keys of live sessions after the store changed.

        A removed key or a rotated secret closes that ident's connections; a
        channel taken away unsubscribes it (and stops publishes to it).
        ``None`` means "anything may have changed": every live ident is checked.
        Lookups still in flight are repeated (``lookup``), so a session that
        is not yet in ``by_ident`` cannot finish AUTH with the old key.
        """
        self.auth_generation += 1
        targets = list(self.by_ident) if idents is None else [i for i in idents if i in self.by_ident]
        for ident in targets:
            try:
                key = await self.lookup(ident)
            except AuthUnavailable:
                continue  # keep sessions while the store cannot answer
            for conn in self.of_ident(ident):
                try:
                    self._apply_change(conn, key)
                except Exception:
                    conn.internal_error("applying a key change")

    def _apply_change(self, conn: Connection, key: AccessKey | None) -> None:
        session = conn.session
        ident = session.ident or ""
        if key is None or key.secret != session.secret_seen:
            why = "key removed" if key is None else "secret rotated"
            self.emit(Revoked(conn.peer, ident, why))
            metrics.REVOCATIONS.labels("closed").inc()
            conn.close(CloseReason.REVOKED, f"access key for {ident} was {why.split()[-1]}")
            return
        lost = session.apply_key(key)
        if lost:
            self.emit(Revoked(conn.peer, ident, "", tuple(sorted(printable(c) for c in lost))))
            metrics.REVOCATIONS.labels("unsubscribed").inc()

    # --- shutdown ----------------------------------------------------------------------

    async def drain_and_close(self, drain_s: float) -> None:
        """Stop reading, flush queued output for at most ``drain_s``, then close all."""
        self.state = "stopping"
        for conn in list(self.connections):
            t = conn.transport
            if t is not None and not t.is_closing():
                with contextlib.suppress(Exception):
                    t.pause_reading()
        deadline = self.loop.time() + drain_s
        while self.loop.time() < deadline:
            if not any(_queued(c) for c in list(self.connections)):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            try:
                conn.close(CloseReason.SHUTDOWN, None, abort=conn.write_buffer_size() > 0)
            except Exception:
                conn.internal_error("closing at shutdown")
        # Let connection_lost callbacks run.
        for _ in range(20):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        self.tls_deadlines.close()
        self.auth_deadlines.close()


def _tls_due(conn: Connection) -> None:
    conn._run_guarded(conn._on_tls_handshake_timeout)


def _auth_due(conn: Connection) -> None:
    conn._run_guarded(conn._on_auth_timeout)


class _Keep:
    """The router's subscriber for channels kept in the durable log: with ``--cluster`` the
    broker then receives them from other brokers whoever is connected here. Takes nothing."""

    __slots__ = ()

    def deliver(self, data: bytes) -> None:
        pass

    def delivery_failed(self) -> None:  # pragma: no cover - deliver cannot raise
        pass


_KEEP = _Keep()


def _queued(conn: Connection) -> int:
    """Bytes queued to ``conn``; a fault closes it alone (then nothing is waited for)."""
    try:
        return conn.write_buffer_size()
    except Exception:
        conn.internal_error("reading the outgoing buffer at shutdown")
        return 0
