"""The console's HTTP side: the JSON API under ``/api/v1/``, login, and the static page.

Who may do what:

- every ``/api/v1/`` request names a token, by ``Authorization: Bearer TOKEN``
  (scripts) or by the session cookie a browser got from ``POST /login``;
- ``GET`` needs any role; every change (``POST``) and watching payloads needs
  ``admin`` (a ``viewer`` gets 403);
- a change made with the cookie also needs the session's CSRF token in
  ``X-CSRF-Token`` and, when the browser sends one, an ``Origin`` equal to the
  console's own; bodies must be ``application/json``, which a cross-site form
  cannot send;
- failed logins and bad bearer tokens are counted per address: over the limit
  the address gets 429 for a while, without the token being checked;
- every change writes one log line (``event=admin_change``) naming the token.

Everything a client chose (idents, channels, owners, payloads) is returned as
JSON data, never as markup; the page renders it with ``textContent``. Every
response carries a strict Content-Security-Policy (no inline script, nothing
from another origin).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import importlib.resources
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from .. import metrics
from ..durable.tcpack import CloseKind, unacked_in_kernel
from ..events import AdminChange, AdminLoginFailed, AuthBlocked
from ..keys import BadArguments, IdentExists, InvalidKey, NoSuchIdent, StoreUnavailable
from ..ratelimit import AuthFailureLimiter, AuthLimits
from ..reasons import CloseReason
from . import charts, deploy
from .activity import DAY, ActivityStore
from .keystore import ConsoleKeys, KeyStoreError, ReadOnlyKeys, public
from .sessions import COOKIE, Session, Sessions, csrf_ok
from .tokens import Principal, TokenFile
from .tracker import FAILURES, NOTABLE, Tracker
from .watch import Watches

if TYPE_CHECKING:
    from ..state import Broker

log = logging.getLogger("hpfeeds3.broker.admin")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Failed logins (and bad bearer tokens) before they are refused, and for how long:
# LOGIN_FAILURES with one token from one address refuse that token there (a
# forgotten script with a removed token blocks itself alone), LOGIN_FAILURES_PER_ADDRESS
# with any tokens refuse the address. Refused attempts are not counted.
LOGIN_FAILURES = 10
LOGIN_FAILURES_PER_ADDRESS = 50
LOGIN_WINDOW_S = 60.0
LOGIN_BLOCK_S = 300.0
# Largest request body accepted.
MAX_BODY_BYTES = 64 * 1024
# The key list the Sensors and Keys views read is reused until the store
# reports a change (``Broker.auth_generation``) or the console writes a key;
# at most this long in any case (a change no feed reported).
KEYS_CACHE_MAX_S = 30.0

# A view (path and query) is built at most once per VIEW_CACHE_S and the answer
# shared by every viewer asking meanwhile; what a token may have built beyond
# that is paced: VIEW_BUILDS_PER_S on average after a burst of VIEW_BUILD_BURST
# (a chart costs CHART_COST of a build); a request waits its turn, and with
# VIEW_BUILD_BURST already waiting it gets 429.
VIEW_CACHE_S = 1.0
MAX_CACHED_VIEWS = 256
VIEW_BUILDS_PER_S = 4.0
VIEW_BUILD_BURST = 12.0
CHART_COST = 0.05

# Items walked per event-loop turn when a view goes through every connection or key.
SLICE = 500
# Rows per page of a list (``limit``): the default and the most.
DEFAULT_PAGE = 200
MAX_PAGE = 1_000
# Publisher and subscriber idents listed per channel (their number is given in full).
NAMES_PER_CHANNEL = 50
# Sort columns of the Connections view (index into its rows); rate: messages delivered per second.
CONNECTION_COLUMNS = {"ident": 0, "peer": 1, "since": 2, "backlog": 3, "rate": 4}
# Sort columns of the Sensors view (index into its rows).
SENSOR_COLUMNS = {
    "ident": 0,
    "owner": 1,
    "connected": 2,
    "last_seen": 3,
    "last_publish": 4,
    "last_5m": 5,
    "last_1h": 6,
    "silent_since": 9,
}

STATIC = {
    "/": ("index.html", "text/html"),
    "/static/app.js": ("app.js", "text/javascript"),
    "/static/app.css": ("app.css", "text/css"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

# Who a request authenticated as, kept in the request. aiohttp 3.14 warns about a
# plain string key; older releases (the project accepts 3.9 on) have no RequestKey.
PRINCIPAL: Any = web.RequestKey("hpfeeds_principal", Principal) if hasattr(web, "RequestKey") else "hpfeeds_principal"


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        # ensure_ascii: a lone surrogate in any string cannot break the encoding.
        body=json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode("ascii"),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{what} must be a list of strings")
    return value


class Console:
    """The console's state: tokens, sessions, the tracker, watches, and the key adapter."""

    def __init__(
        self, broker: Broker, tokens: TokenFile, *, secure_cookie: bool, store: ActivityStore | None = None
    ) -> None:
        self.broker = broker
        self.tokens = tokens
        self.secure_cookie = secure_cookie
        self.sessions = Sessions()
        self.tracker = Tracker(broker, store)
        self.watches = Watches(broker.router, broker.frame_limits)
        self.keys = ConsoleKeys(broker.config.auth, self._recheck)
        self.limiter = AuthFailureLimiter(
            AuthLimits(
                per_ident=LOGIN_FAILURES,
                per_address=LOGIN_FAILURES_PER_ADDRESS,
                window_s=LOGIN_WINDOW_S,
                block_s=LOGIN_BLOCK_S,
            )
        )
        # (generation read before the list, when, the list); reading a 10,000-key
        # store costs the broker more than the views that show it.
        self._keys_cache: tuple[Any, float, list[Any]] | None = None
        self._key_writes = 0
        # Derived from one key list (compared by identity): ident -> owner, and every key channel.
        self._key_derived: tuple[list[Any], dict[str, str], frozenset[str], dict[str, str]] | None = None
        # Sensors view: key idents in sort order, by owner (True) or by ident (False).
        self._quiet_orders: dict[bool, tuple[dict[str, str], list[str]]] = {}
        self._followed: tuple[int, int] | None = None
        self.tracker.known = self._is_key
        self._token_error = ""
        # (path, query) -> (when built, the answer once built: status, body, content type, headers)
        self._views: dict[tuple[str, str], tuple[float, asyncio.Future[tuple[int, bytes, str, Any] | None]]] = {}
        # token name -> (builds it may still start, when that was counted)
        self._build_budget: dict[str, tuple[float, float]] = {}

    def _recheck(self, idents: set[str]) -> None:
        self.broker.spawn(self.broker.recheck(idents))

    # --- who is asking -------------------------------------------------------------

    def _reload_tokens(self) -> None:
        try:
            self.tokens.reload()
            self._token_error = ""
        except Exception as e:  # keep the last good file; say why once
            if str(e) != self._token_error:
                self._token_error = str(e)
                log.error("console token file: %s; keeping the previous tokens", e)

    def _address(self, request: web.Request) -> str:
        return request.remote or "?"

    def _failed(self, request: web.Request, how: str, token: str) -> None:
        metrics.CONSOLE_LOGINS.labels("failed").inc()
        address = self._address(request)
        block = self.limiter.record_failure(address, _fingerprint(token), time.monotonic())
        self.broker.emit(AdminLoginFailed(address, how))
        if block is not None:
            self.broker.emit(AuthBlocked(address, LOGIN_BLOCK_S, block, console=True))

    def _blocked(self, request: web.Request, token: str) -> bool:
        """This token from this address, or this address, is refused for now."""
        if self.limiter.blocked(self._address(request), _fingerprint(token), time.monotonic()):
            metrics.CONSOLE_LOGINS.labels("blocked").inc()
            return True
        return False

    def session_of(self, request: web.Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None and not self.tokens.current(session.principal):
            self.sessions.end(session.id)
            return None
        return session

    def audit(self, request: web.Request, what: str, *, ident: str | None = None, channel: str | None = None) -> None:
        principal = request[PRINCIPAL]
        metrics.CONSOLE_CHANGES.inc()
        self.broker.emit(AdminChange(self._address(request), principal.name, principal.role, what, ident, channel))

    # --- middleware ------------------------------------------------------------------

    @web.middleware
    async def headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            response = await handler(request)
        except ApiError as e:
            response = _error(e.status, e.message)
        except web.HTTPException as e:
            response = e
        response.headers.update(SECURITY_HEADERS)
        return response

    @web.middleware
    async def authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        self._reload_tokens()
        changes = request.method not in ("GET", "HEAD")
        auth = request.headers.get("Authorization", "")
        principal: Principal | None = None
        if auth:
            scheme, _, token = auth.partition(" ")
            token = token.strip()
            if self._blocked(request, token):
                return _error(429, "too many failed attempts with this token from this address; try later")
            principal = self.tokens.check(token) if scheme.lower() == "bearer" else None
            if principal is None:
                self._failed(request, "bearer token", token)
                return _error(401, "unknown token")
        else:
            session = self.session_of(request)
            if session is None:
                return _error(401, "log in first")
            principal = session.principal
            if changes:
                origin = request.headers.get("Origin")
                if origin is not None and origin != f"{request.scheme}://{request.host}":
                    return _error(403, "cross-origin request refused")
                if not csrf_ok(session, request.headers.get("X-CSRF-Token")):
                    return _error(403, "missing or wrong CSRF token")
        if changes and request.content_type != "application/json":
            return _error(415, "send application/json")
        request[PRINCIPAL] = principal
        if not changes:
            return await handler(request)
        try:
            return await handler(request)
        finally:
            self._views.clear()  # the next view shows the change

    def _build_delay(self, name: str, cost: float, now: float) -> float | None:
        """Seconds token ``name`` waits before its next build of ``cost`` (its budget refills at
        ``VIEW_BUILDS_PER_S``); None when ``VIEW_BUILD_BURST`` more are already waiting."""
        tokens, then = self._build_budget.get(name, (VIEW_BUILD_BURST, now))
        tokens = min(VIEW_BUILD_BURST, tokens + (now - then) * VIEW_BUILDS_PER_S) - cost
        if tokens < -VIEW_BUILD_BURST:
            return None
        self._build_budget[name] = (tokens, now)
        return max(0.0, -tokens / VIEW_BUILDS_PER_S)

    def _shared(self, handler: Handler, cost: float = 1.0) -> Handler:
        """``handler`` (a GET view, the same for every role) built once per ``VIEW_CACHE_S``
        per address, its answer shared; a token's own builds limited (``_may_build``)."""

        async def view(request: web.Request) -> web.StreamResponse:
            key = (request.path, request.query_string)
            now = time.monotonic()
            hit = self._views.get(key)
            if hit is not None and now - hit[0] < VIEW_CACHE_S:
                answer = await asyncio.shield(hit[1])
                if answer is not None:
                    return _replay(answer)
            delay = self._build_delay(request[PRINCIPAL].name, cost, now)
            if delay is None:
                return web.Response(
                    status=429,
                    body=b'{"error":"too many requests for this token; slow down"}',
                    content_type="application/json",
                    headers={"Retry-After": "1", "Cache-Control": "no-store"},
                )
            if delay:
                await asyncio.sleep(delay)
                hit = self._views.get(key)  # another viewer's build, meanwhile
                if hit is not None and time.monotonic() - hit[0] < VIEW_CACHE_S:
                    answer = await asyncio.shield(hit[1])
                    if answer is not None:
                        return _replay(answer)
            now = time.monotonic()
            future: asyncio.Future[tuple[int, bytes, str, Any] | None] = asyncio.get_running_loop().create_future()
            if len(self._views) >= MAX_CACHED_VIEWS:
                for old in [k for k, (t, f) in self._views.items() if f.done()][: MAX_CACHED_VIEWS // 2]:
                    del self._views[old]
            self._views[key] = (now, future)
            self.tracker.settle()  # what the tracker noted since the last poll, counted
            try:
                response = await handler(request)
            except BaseException:
                future.set_result(None)  # those waiting build their own (and get its error)
                if self._views.get(key, (0, None))[1] is future:
                    del self._views[key]
                raise
            if isinstance(response, web.Response) and isinstance(response.body, bytes) and response.status == 200:
                future.set_result((response.status, response.body, response.content_type, dict(response.headers)))
            else:
                future.set_result(None)
                del self._views[key]
            return response

        return view

    # --- login ---------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return _error(415, "send application/json")
        try:
            body = await self._body(request)
        except ApiError:
            self._failed(request, "login", "")  # a body no browser sends: a failed attempt like any other
            raise
        token = body.get("token")
        token = token if isinstance(token, str) else ""
        if self._blocked(request, token):
            return _error(429, "too many failed logins with this token from this address; try later")
        self._reload_tokens()
        principal = self.tokens.check(token) if token else None
        if principal is None:
            self._failed(request, "login", token)
            return _error(401, "unknown token")
        self.sessions.end(request.cookies.get(COOKIE))
        session = self.sessions.create(principal)
        if session is None:  # this token logged in too often lately (sessions.LOGINS_PER_TOKEN)
            metrics.CONSOLE_LOGINS.labels("blocked").inc()
            return _error(429, "too many logins with this token; try later")
        metrics.CONSOLE_LOGINS.labels("ok").inc()
        log.info(
            "console: %s (%s) logged in from %s",
            principal.name,
            principal.role,
            self._address(request),
            extra={"event": "admin_login", "peer": self._address(request)},
        )
        response = _json({"name": principal.name, "role": principal.role, "csrf": session.csrf})
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="Strict",
            secure=self.secure_cookie,
            path="/",
            max_age=int(self.sessions.ttl_s),
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            if not csrf_ok(session, request.headers.get("X-CSRF-Token")):
                return _error(403, "missing or wrong CSRF token")
            self.sessions.end(session.id)
        response = _json({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def session(self, request: web.Request) -> web.StreamResponse:
        principal = request[PRINCIPAL]
        s = self.session_of(request)
        return _json(
            {
                "name": principal.name,
                "role": principal.role,
                "csrf": s.csrf if s is not None else None,
                "node": self.broker.config.name,
                "cluster": bool(self.broker.config.cluster),
                "keys_writable": self.keys.writable,
            }
        )

    # --- helpers ---------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise ApiError(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    def _admin(self, request: web.Request) -> None:
        if not request[PRINCIPAL].is_admin:
            raise ApiError(403, "needs the admin role")

    def _scope(self) -> dict[str, Any]:
        return {"node": self.broker.config.name, "scope": "this node"}

    async def _all_keys(self) -> list[Any]:
        """Every key of the writable store, read again only after a change; ``KeyStoreError``."""
        generation = (self.broker.auth_generation, self._key_writes)
        cached = self._keys_cache
        if cached is not None and cached[0] == generation and time.monotonic() - cached[1] < KEYS_CACHE_MAX_S:
            return cached[2]
        keys = await self.keys.all()
        # The generation from before the read: a change during it reads again next time.
        self._keys_cache = (generation, time.monotonic(), keys)
        return keys

    def _is_key(self, ident: str) -> bool:
        """``ident`` has a key, in the key list as last read."""
        index = self._key_derived
        return index is not None and ident in index[1]

    async def follow_keys(self) -> None:
        """Read the key list when it is not read yet or the store reported a change since
        (once per change, whether or not the read succeeds): the tracker knows which idents
        have keys while nobody looks at the page."""
        generation = (self.broker.auth_generation, self._key_writes)
        if self._followed != generation:
            self._followed = generation
            await self._key_index()

    async def _key_list(self) -> list[Any]:
        """The key list for the Sensors view: the last one read while the store cannot answer."""
        try:
            return await self._all_keys()
        except KeyStoreError as e:
            log.warning("console: cannot list keys: %s", e)
            return self._keys_cache[2] if self._keys_cache is not None else []

    async def _key_index(self) -> tuple[dict[str, str], frozenset[str], dict[str, str]]:
        """Owners by ident, every channel of a key, and each key's role (``sensor``: it
        may publish; ``collector``: it only subscribes), built once per key list."""
        keys = await self._key_list()
        index = self._key_derived
        if index is None or index[0] is not keys:
            owners = {k.ident: k.owner for k in keys}
            channels = frozenset(c for k in keys for c in (*k.pubchans, *k.subchans))
            roles = {k.ident: "sensor" if k.pubchans else "collector" for k in keys}
            index = self._key_derived = (keys, owners, channels, roles)
        return index[1], index[2], index[3]

    # --- views -----------------------------------------------------------------------
    #
    # A broker may hold 10,000 connections and keys: lists are filtered, sorted
    # and cut to one page (``limit``, ``offset``) before anything is built, and
    # the whole set is walked SLICE items per event-loop turn, so a view never
    # stalls message delivery for long.

    async def connections(self, request: web.Request) -> web.StreamResponse:
        """Live connections by ident (``sort``: ``ident``, ``peer``, ``since``, ``backlog``
        or ``rate``, messages delivered per second; ``-`` first: descending).
        ``backlog_bytes`` is the transport's buffer plus the kernel's send queue
        (``SIOCOUTQ``, Linux); ``cut_fraction`` how near the slow-consumer cut (1.0: cut)."""
        offset, limit = _page(request)
        q = request.query.get("q", "").casefold()
        sort = request.query.get("sort", "ident")
        column = CONNECTION_COLUMNS.get(sort.lstrip("-"))
        if column is None:
            raise ApiError(400, f"sort must be one of {', '.join(CONNECTION_COLUMNS)} (- in front: descending)")
        tracker = self.tracker
        rates, delivered = tracker.rates, tracker.delivered_per_s
        rows: list[tuple[Any, ...]] = []
        async for conn in _slices(list(self.broker.connections)):
            ident = conn.session.ident or ""
            if not q or q in ident.casefold() or q in conn.peer.casefold():
                queued = conn.write_buffer_size()
                rows.append((ident, conn.peer, conn.connected_at, queued, delivered(conn), conn))
        rows.sort(key=itemgetter(column, 0, 1), reverse=sort.startswith("-"))
        hard = self.broker.backlog_bounds.hard_bytes
        out = []
        for _, _, _, queued, messages_per_s, conn in rows[offset : offset + limit]:
            session = conn.session
            kernel = _kernel_queued(conn)
            feed = conn.feed
            out.append(
                {
                    "id": str(conn.id),
                    "peer": conn.peer,
                    "ident": session.ident,
                    "owner": session.owner,
                    "since": conn.connected_at,
                    "tls": conn.tls,
                    "subscriptions": sorted(c.decode("utf-8", "backslashreplace") for c in session.subscriptions),
                    "publish": {
                        c.decode("utf-8", "backslashreplace"): {"messages": st.count, "bytes": st.bytes}
                        for c, st in list(session.publish_stats.items())
                    },
                    "received_bytes": conn.received_bytes,
                    "sent_bytes": conn.sent_bytes,
                    "queued_bytes": queued,
                    "kernel_queued_bytes": kernel,
                    "backlog_bytes": queued + (kernel or 0),
                    "cut_fraction": _cut_fraction(conn, queued, hard),
                    "delivered_messages_per_s": round(messages_per_s, 1),
                    "delivered_bytes_per_s": round(rates.get(conn.id, 0.0), 1),
                    "durable": self._durable(feed.ident) if feed is not None else None,
                }
            )
        return _json({**self._scope(), "total": len(rows), "offset": offset, "connections": out})

    def _durable(self, ident: str) -> dict[str, Any] | None:
        """A durable ident's stored backlog (``Broker.durable_state``), the bounds past
        which its oldest messages are dropped (``max_bytes``, ``max_age_s``) and, while a
        connection consumes it, the messages that connection has not acknowledged yet
        (``unacknowledged``: what it is behind; the stored backlog of a connected key also
        holds the last messages it acknowledged, kept as the overlap a crash replays)."""
        broker = self.broker
        state = broker.durable_state(ident)
        if state is None:
            return None
        limits = broker.config.limits
        conn = broker.feeds.get(ident)
        behind = None
        if conn is not None and conn.feed is not None and broker.durable is not None:
            behind = _unacknowledged(broker.durable, ident, conn.feed, conn.session.subchans)
        return {
            **state,
            "max_bytes": limits.durable_max_bytes,
            "max_age_s": limits.durable_max_age_s,
            "unacknowledged": behind,
        }

    async def close_connection(self, request: web.Request) -> web.StreamResponse:
        self._admin(request)
        body = await self._body(request)
        async for conn in _slices(list(self.broker.connections)):
            if str(conn.id) == body.get("id"):
                self.audit(request, f"disconnected {conn.peer}", ident=conn.session.ident)
                conn.close(CloseReason.KICKED, "disconnected by an operator")
                return _json({"closed": conn.peer})
        return _error(404, "no such connection")

    async def sensors(self, request: web.Request) -> web.StreamResponse:
        """Every ident with a key or seen, sorted by ``sort`` (``-`` first: descending).

        A sensor is a key that may publish (or an ident that published), a
        collector one that only subscribes. A sensor is silent when its last
        publish (or, never published, its oldest live connection or its last
        visit) is older than ``silent_after`` seconds, connected or not; a key
        never seen is ``never_used``, not silent. ``show``: ``all`` (the
        default), ``active`` (never-used keys left out) or ``never``;
        ``role``: ``sensor`` or ``collector`` for one of them."""
        now = time.time()
        minute = int(now // 60)
        offset, limit = _page(request)
        q = request.query.get("q", "").casefold()
        sort = request.query.get("sort", "ident")
        column = SENSOR_COLUMNS.get(sort.lstrip("-"))
        if column is None:
            raise ApiError(400, f"sort must be one of {', '.join(SENSOR_COLUMNS)} (- in front: descending)")
        silent_after = _number(request, "silent_after", 0.0)
        only_silent = request.query.get("only_silent") in ("1", "true")
        show = request.query.get("show", "all")
        role_wanted = request.query.get("role", "")
        if show not in ("all", "active", "never") or role_wanted not in ("", "sensor", "collector"):
            raise ApiError(400, "show must be all, active or never; role sensor or collector")
        owners, _, roles = await self._key_index()
        live: dict[str, list[Any]] = {}
        async for conn in _slices(list(self.broker.connections)):
            ident = conn.session.ident
            if ident is not None:
                live.setdefault(ident, []).append(conn)
        tracker = self.tracker
        # Idents with something to show (connected, published or seen) get a
        # row each. The rest, keys never seen (most of a large store), all
        # have the same row but for ident and owner: they come from an order
        # made once per key list, merged in for the page only.
        # An ident with failed logins (a key with a wrong secret, or whose address is
        # blocked) tried: it is not "never used", even if it never got in.
        active = live.keys() | tracker.published.keys() | tracker.last_seen.keys() | tracker.trouble.keys()
        rows: list[tuple[Any, tuple[Any, ...]]] = []  # (sort key, row)
        silent_count = 0
        history, seen, published, owner_of, conns_of = (
            tracker.idents.get,
            tracker.last_seen.get,
            tracker.published.get,
            owners.get,
            live.get,
        )
        idents = list(active) if show != "never" else []
        for start in range(0, len(idents), SLICE):
            if start:
                await asyncio.sleep(0)
            for ident in idents[start : start + SLICE]:
                if q and q not in ident.casefold():
                    continue
                last_publish = published(ident)
                role = roles.get(ident) or ("sensor" if last_publish else "collector")
                if role_wanted and role != role_wanted:
                    continue
                hist = history(ident)
                last_5m, last_1h = hist.windows(minute) if hist is not None else (0, 0)
                conns = conns_of(ident)
                connected = len(conns) if conns else 0
                last_seen = now if connected else seen(ident)
                since = last_publish or (min(c.connected_at for c in conns) if conns else last_seen)
                silent = bool(silent_after) and role == "sensor" and (since is None or now - since > silent_after)
                silent_count += silent
                if only_silent and not silent:
                    continue
                owner = owner_of(ident)
                row = (ident, owner, connected, last_seen, last_publish, last_5m, last_1h, silent, role, since)
                rows.append((_sort_key(row, column), row))
        descending = sort.startswith("-")
        rows.sort(key=itemgetter(0), reverse=descending)
        # Never-seen keys: never silent (never used is a state of its own).
        if only_silent or show == "active":
            quiet: list[str] = []
        else:
            quiet = [
                i
                for i in self._quiet_order(owners, column)
                if i not in active and (not q or q in i.casefold()) and (not role_wanted or roles[i] == role_wanted)
            ]
        if descending:
            quiet.reverse()
        quiet_rows = ((_sort_key(r, column), r) for r in (_quiet_row(i, owners[i], roles[i]) for i in quiet))
        merged = heapq.merge(rows, quiet_rows, key=itemgetter(0), reverse=descending)
        page = list(itertools.islice(merged, offset, offset + limit))
        total = len(rows) + len(quiet)
        trouble = tracker.trouble.get
        durable = self.broker.durable
        followers = frozenset(durable.idents()) if durable is not None else frozenset()
        delivered = tracker.delivered_per_s
        hard = self.broker.backlog_bounds.hard_bytes
        out = []
        for _, (ident, owner, connected, last_seen, last_publish, last_5m, last_1h, silent, role, since) in page:
            t = trouble(ident)
            mine = live.get(ident, ())
            never = last_seen is None and not connected and t is None
            out.append(
                {
                    "ident": ident,
                    "owner": owner,
                    "has_key": ident in owners,
                    "role": role,
                    "state": "never_used" if never else "silent" if silent else "ok",
                    "connected": connected,
                    "peers": sorted(c.peer for c in live.get(ident, ())),
                    "last_seen": last_seen,
                    "last_publish": last_publish,
                    "silent_since": since if silent else None,
                    "last_5m": last_5m,
                    "last_1h": last_1h,
                    "silent": silent,
                    "trouble": t.view() if t is not None else None,
                    "channels": tracker.channels(ident, minute),
                    "delivered_messages_per_s": round(sum(delivered(c) for c in mine), 1),
                    "backlog_bytes": sum(c.write_buffer_size() + (_kernel_queued(c) or 0) for c in mine),
                    "cut_fraction": max(
                        (_cut_fraction(c, c.write_buffer_size(), hard) or 0.0 for c in mine), default=0.0
                    ),
                    "durable": self._durable(ident) if ident in followers else None,
                }
            )
        return _json(
            {**self._scope(), "time": now, "total": total, "silent": silent_count, "offset": offset, "sensors": out}
        )

    def _quiet_order(self, owners: dict[str, str], column: int) -> list[str]:
        """Key idents in the order of ``column`` for rows with nothing but an ident and
        an owner: by owner for the owner column, else by ident. Made once per key list."""
        by_owner = column == SENSOR_COLUMNS["owner"]
        cached = self._quiet_orders.get(by_owner)
        if cached is None or cached[0] is not owners:
            if by_owner:
                order = sorted(owners, key=lambda i: _sort_key(_quiet_row(i, owners[i], ""), column))
            else:
                order = sorted(owners)
            cached = self._quiet_orders[by_owner] = (owners, order)
        return cached[1]

    async def channels(self, request: web.Request) -> web.StreamResponse:
        """Every channel of a key, published lately or used by a live connection, by name.

        Names are gathered from everything; the entries (publishers,
        subscribers, rates) are built for the page shown only: a store of
        10,000 keys has as many channels."""
        minute = int(time.time() // 60)
        offset, limit = _page(request)
        _, key_channels, _ = await self._key_index()
        pairs = list(self.tracker.pairs.items())
        conns = [c for c in self.broker.connections if c.session.ident is not None]
        used: dict[Any, tuple[list[str], list[str]]] = {}  # conn -> its channels as text
        names = set(key_channels)
        names.update(channel for (_, channel), _ in pairs)
        for start in range(0, len(conns), SLICE):
            if start:
                await asyncio.sleep(0)
            for conn in conns[start : start + SLICE]:
                subscribed = [c.decode("utf-8", "backslashreplace") for c in conn.session.subscriptions]
                published = [c.decode("utf-8", "backslashreplace") for c in conn.session.publish_stats]
                used[conn] = (subscribed, published)
                names.update(subscribed)
                names.update(published)
        q = request.query.get("q", "").casefold()
        page = sorted(n for n in names if not q or q in n.casefold())
        total = len(page)
        page = page[offset : offset + limit]
        chans: dict[str, dict[str, Any]] = {
            name: {"channel": name, "publishers": set(), "subscribers": set(), "last_5m": 0, "last_1h": 0}
            for name in page
        }
        for start in range(0, len(pairs), SLICE):
            if start:
                await asyncio.sleep(0)
            for (ident, channel), act in pairs[start : start + SLICE]:
                e = chans.get(channel)
                if e is None:
                    continue
                last_5m, last_1h = act.windows(minute)
                e["last_5m"] += last_5m
                e["last_1h"] += last_1h
                if last_1h:
                    e["publishers"].add(ident)
        for conn, (subscribed, published) in used.items():
            for c in subscribed:
                if c in chans:
                    chans[c]["subscribers"].add(conn.session.ident)
            for c in published:
                if c in chans:
                    chans[c]["publishers"].add(conn.session.ident)
        out = []
        for name in page:
            e = chans[name]
            for side in ("publishers", "subscribers"):
                # A channel may have thousands: their number, and the first names.
                e[f"{side}_total"] = len(e[side])
                if len(e[side]) > SLICE:
                    await asyncio.sleep(0)
                e[side] = heapq.nsmallest(NAMES_PER_CHANNEL, e[side])
            e["rate_per_s"] = round(e["last_5m"] / 300.0, 3)
            # Published to and nobody listening: the messages go nowhere.
            e["unheard"] = e["publishers_total"] > 0 and e["subscribers_total"] == 0
            e["watched"] = self.watches.get(name.encode("utf-8", "backslashreplace")) is not None
            out.append(e)
        return _json({**self._scope(), "total": total, "offset": offset, "channels": out})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Notable events, newest first (``kind``: of one kind only; ``q``: peer, ident or
        message containing it). Failed AUTHs and console logins have a ring of their
        own and blocks a table of their own, so a flood of them hides neither."""
        tracker = self.tracker
        kind = request.query.get("kind", "")
        q = request.query.get("q", "").casefold()
        failures = list(tracker.failures)
        by_address: dict[str, int] = {}
        by_ident: dict[str, int] = {}
        for e in failures:
            if e["event"] == "auth_failed":
                host = (e["peer"] or "?").rsplit(":", 1)[0]
                by_address[host] = by_address.get(host, 0) + 1
                by_ident[e["ident"] or "?"] = by_ident.get(e["ident"] or "?", 0) + 1
        now = time.time()
        blocked: dict[str, dict[str, Any]] = {}
        for e in tracker.blocks.values():
            until = e["time"] + e["block_s"]
            if until > now:
                host = e["peer"] if e["console"] else (e["peer"] or "?").rsplit(":", 1)[0]
                blocked[host] = {"address": host, "until": until, "what": "console" if e["console"] else "AUTH"}
        if kind in FAILURES:
            source: Any = failures
        elif kind:
            source = tracker.events
        else:  # both rings, in the order the events came
            source = heapq.merge(tracker.events, failures, key=itemgetter("id"))
        shown = [
            e
            for e in source
            if (not kind or e["event"] == kind)
            and (not q or any(q in (e[f] or "").casefold() for f in ("peer", "ident", "message")))
        ]
        offset, limit = _page(request)
        newest = shown[::-1]
        return _json(
            {
                **self._scope(),
                "total": len(newest),
                "offset": offset,
                "events": newest[offset : offset + limit],
                "kinds": sorted(k.value for k in NOTABLE),
                "blocked": sorted(blocked.values(), key=lambda b: b["address"]),
                "failed_auth_by_address": sorted(by_address.items(), key=lambda kv: -kv[1]),
                "failed_auth_by_ident": sorted(by_ident.items(), key=lambda kv: -kv[1]),
            }
        )

    async def chart(self, request: web.Request) -> web.StreamResponse:
        """Messages per minute of one ident (``ident``) or channel (``channel``) as SVG:
        the last hour (``minutes=60``, the default) or the last 24 hours (``1440``)."""
        minutes = int(_number(request, "minutes", 60))
        if minutes not in (60, DAY):
            raise ApiError(400, f"minutes must be 60 or {DAY}")
        if "ident" in request.query:
            hist = self.tracker.idents.get(request.query["ident"])
        elif "channel" in request.query:
            hist = self.tracker.chans.get(request.query["channel"])
        else:
            raise ApiError(400, "give ident or channel")
        now_minute = int(time.time() // 60)
        counts = hist.series(now_minute, minutes) if hist is not None else [0] * minutes
        return web.Response(
            body=charts.svg(counts, wide=minutes == DAY).encode("ascii"),
            content_type="image/svg+xml",
            # The page asks for it once a minute (the minute is in its address).
            headers={"Cache-Control": "private, max-age=60"},
        )

    # --- keys ------------------------------------------------------------------------

    async def key_list(self, request: web.Request) -> web.StreamResponse:
        offset, limit = _page(request)
        q = request.query.get("q", "")
        try:
            keys = await self._all_keys()
        except KeyStoreError as e:
            return _error(503, str(e))
        if q:
            q = q.casefold()
            keys = [k for k in keys if q in k.ident.casefold() or q in k.owner.casefold()]
        # durable_state: stored backlog, drops, the oldest unread message's age (None: no log)
        page = [
            {**public(k), "durable": k.durable, "durable_state": self._durable(k.ident) if k.durable else None}
            for k in keys[offset : offset + limit]
        ]
        return _json({"writable": self.keys.writable, "total": len(keys), "offset": offset, "keys": page})

    def _deploy(self, request: web.Request, key: Any, with_secret: bool) -> dict[str, str]:
        """Configuration snippets for ``key``: the broker at the host the console was reached
        by, on its first TLS listener (else its first)."""
        endpoints = self.broker.config.endpoints
        endpoint = next((e for e in endpoints if e.kind == "tls"), endpoints[0])
        host = request.url.host or "BROKER-HOST"
        secret = key.secret if with_secret else None
        return deploy.snippets(
            host, endpoint.port, endpoint.kind == "tls", key.ident, secret, list(key.pubchans), list(key.subchans)
        )

    async def key_deploy(self, request: web.Request) -> web.StreamResponse:
        """A key's snippets, its secret left as a placeholder (it is shown once, when made); admin."""
        self._admin(request)
        ident = request.query.get("ident", "")
        try:
            keys = await self._all_keys()
        except KeyStoreError as e:
            return _error(503, str(e))
        key = next((k for k in keys if k.ident == ident), None)
        if key is None:
            return _error(404, "no such ident")
        return _json({"ident": ident, "deploy": self._deploy(request, key, False)})

    async def _key_change(self, request: web.Request, change: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
        self._admin(request)
        body = await self._body(request)
        try:
            return await change(body)
        except (InvalidKey, BadArguments) as e:
            raise ApiError(400, str(e)) from None
        except NoSuchIdent as e:
            raise ApiError(404, str(e)) from None  # "no such ident: 'x'"
        except (IdentExists, ReadOnlyKeys) as e:
            raise ApiError(409, str(e)) from None
        except StoreUnavailable as e:
            raise ApiError(503, str(e)) from None
        finally:
            self._key_writes += 1  # the next view reads the store again

    async def key_create(self, request: web.Request) -> web.StreamResponse:
        async def change(body: dict[str, Any]) -> web.StreamResponse:
            owner = body.get("owner") or ""
            key = await self.keys.create(
                body.get("ident"),  # type: ignore[arg-type]  # make_key checks it
                owner if isinstance(owner, str) else "",
                _strings(body.get("pubchans"), "pubchans"),
                _strings(body.get("subchans"), "subchans"),
            )
            self.audit(request, f"created key {key.ident!r}", ident=key.ident)
            return _json({"key": public(key), "secret": key.secret, "deploy": self._deploy(request, key, True)}, 201)

        result: web.StreamResponse = await self._key_change(request, change)
        return result

    def _channels_change(self, grant: bool) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            async def change(body: dict[str, Any]) -> web.StreamResponse:
                pub = _strings(body.get("pubchans"), "pubchans")
                sub = _strings(body.get("subchans"), "subchans")
                if not pub and not sub:
                    raise ApiError(400, "give pubchans or subchans")
                ident = _ident(body)
                key = await self.keys.change_channels(ident, pub, sub, grant=grant)
                verb = "granted" if grant else "revoked"
                self.audit(request, f"{verb} pub {pub} sub {sub} for {ident!r}", ident=ident)
                return _json({"key": public(key)})

            result: web.StreamResponse = await self._key_change(request, change)
            return result

        return handler

    async def key_rotate(self, request: web.Request) -> web.StreamResponse:
        async def change(body: dict[str, Any]) -> web.StreamResponse:
            key = await self.keys.rotate(_ident(body))
            self.audit(request, f"rotated the secret of {key.ident!r}", ident=key.ident)
            return _json({"key": public(key), "secret": key.secret, "deploy": self._deploy(request, key, True)})

        result: web.StreamResponse = await self._key_change(request, change)
        return result

    async def key_remove(self, request: web.Request) -> web.StreamResponse:
        async def change(body: dict[str, Any]) -> web.StreamResponse:
            key = await self.keys.remove(_ident(body))
            self.audit(request, f"removed key {key.ident!r}", ident=key.ident)
            return _json({"removed": key.ident})

        result: web.StreamResponse = await self._key_change(request, change)
        return result

    # --- watching a channel ------------------------------------------------------------

    async def watch_start(self, request: web.Request) -> web.StreamResponse:
        self._admin(request)
        body = await self._body(request)
        channel = body.get("channel")
        if self.watches.start(_channel(channel)) is None:
            return _error(429, "too many channels watched at once; stop one first")
        self.audit(request, f"started watching channel {channel!r}", channel=channel)
        return _json({"watching": channel})

    async def watch_stop(self, request: web.Request) -> web.StreamResponse:
        self._admin(request)
        body = await self._body(request)
        channel = body.get("channel")
        self.watches.stop(_channel(channel))
        return _json({"stopped": channel})

    async def watch_read(self, request: web.Request) -> web.StreamResponse:
        self._admin(request)
        channel = request.query.get("channel", "")
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            after = 0
        watch = self.watches.get(_channel(channel))
        if watch is None:
            return _error(404, "not watching this channel; POST /api/v1/watch first")
        return _json({"channel": channel, "messages": watch.read(after)})

    # --- the page ------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.StreamResponse:
        name, content_type = STATIC[request.path]
        body = importlib.resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.headers, self.authorize], client_max_size=MAX_BODY_BYTES)
        r = app.router
        for path in STATIC:
            r.add_get(path, self.static)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/api/v1/session", self.session)
        r.add_get("/api/v1/connections", self._shared(self.connections))
        r.add_post("/api/v1/connections/close", self.close_connection)
        r.add_get("/api/v1/sensors", self._shared(self.sensors))
        r.add_get("/api/v1/channels", self._shared(self.channels))
        r.add_get("/api/v1/events", self._shared(self.events))
        r.add_get("/api/v1/chart", self._shared(self.chart, CHART_COST))
        r.add_get("/api/v1/keys", self._shared(self.key_list))
        r.add_get("/api/v1/keys/deploy", self.key_deploy)
        r.add_post("/api/v1/keys", self.key_create)
        r.add_post("/api/v1/keys/grant", self._channels_change(grant=True))
        r.add_post("/api/v1/keys/revoke", self._channels_change(grant=False))
        r.add_post("/api/v1/keys/rotate", self.key_rotate)
        r.add_post("/api/v1/keys/remove", self.key_remove)
        r.add_post("/api/v1/watch", self.watch_start)
        r.add_post("/api/v1/watch/stop", self.watch_stop)
        r.add_get("/api/v1/watch", self.watch_read)
        return app


async def _slices(items: list[T]) -> AsyncIterator[T]:
    """``items``, with an event-loop turn after every ``SLICE``."""
    for i, item in enumerate(items):
        if i and not i % SLICE:
            await asyncio.sleep(0)
        yield item


def _fingerprint(token: str) -> str:
    """What the login limiter counts a token by (not the token itself)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _replay(answer: tuple[int, bytes, str, Any]) -> web.Response:
    status, body, content_type, headers = answer
    headers = {k: v for k, v in headers.items() if k.lower() in ("cache-control",)}
    return web.Response(status=status, body=body, content_type=content_type, headers=headers)


def _kernel_queued(conn: Any) -> int | None:
    """Bytes in the kernel's send queue of ``conn``'s socket (``SIOCOUTQ``); None where unknown."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return unacked_in_kernel(sock) if sock is not None else None


def _cut_fraction(conn: Any, queued: int, hard: int) -> float | None:
    """How near ``conn`` is to the slow-consumer cut, 0 to 1: its buffer toward the hard
    bound and, while the buffer is watched, the time without progress or over the soft
    bound (whichever is nearest); None without a hard bound."""
    if not hard:
        return None
    near = min(1.0, queued / hard)
    watch = conn.backlog_watch
    watched = watch.closeness() if watch is not None else None
    return round(max(near, watched) if watched is not None else near, 3)


def _unacknowledged(durable: Any, ident: str, feed: Any, channels: Any) -> int:
    """Messages the log holds on ``channels`` for durable ``ident`` that its connection
    (``feed``) has not acknowledged: what TCP proved it received, else its position."""
    acked = feed.tracker.positions(CloseKind.CLEAN)
    behind = 0
    for channel in channels:
        at = acked.get(channel)
        if at is None:
            at = durable.position(ident, channel)
        if at is not None:
            behind += max(0, durable.written(channel) - at)
    return behind


def _quiet_row(ident: str, owner: str, role: str) -> tuple[Any, ...]:
    """The Sensors row of a key never seen: (ident, owner, connected, last_seen,
    last_publish, last_5m, last_1h, silent, role, since), as the view builds for the others."""
    return (ident, owner, 0, None, None, 0, 0, False, role, None)


def _sort_key(row: tuple[Any, ...], column: int) -> tuple[Any, ...]:
    """Sort key of a Sensors row: None before every number and string of its column, then the ident."""
    value = row[column]
    return (value is not None, value if value is not None else 0, row[0])


def _number(request: web.Request, name: str, default: float) -> float:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a number") from None
    if not 0 <= number < 1e12:
        raise ApiError(400, f"{name} must be a non-negative number")
    return number


def _page(request: web.Request) -> tuple[int, int]:
    """``offset`` and ``limit`` (at most ``MAX_PAGE``) from the query."""
    offset = int(_number(request, "offset", 0))
    limit = int(_number(request, "limit", DEFAULT_PAGE))
    return offset, max(1, min(limit, MAX_PAGE))


def _channel(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "give a channel")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "channel is not valid UTF-8") from None


def _ident(body: dict[str, Any]) -> str:
    ident = body.get("ident")
    if not isinstance(ident, str) or not ident:
        raise ApiError(400, "give an ident")
    return ident
