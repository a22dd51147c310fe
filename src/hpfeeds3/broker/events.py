"""Broker events: what happened to a connection, as typed values.

The broker (``Broker.emit``) hands each event to its observers, registered
with ``Broker.observe``: the log lines (``log_event``, always registered) and,
with ``--admin``, the console's tracker. Nothing parses log records; an
observer reads the event's fields.

Events are values: observers read them and never change them (they are
plain slotted dataclasses, not frozen ones, because three are made on every
handshake and a frozen one costs several times more to build). Every event
has a ``kind`` (the ``event=`` field of its log line), a log ``level`` and
``text()`` (the line's message). Connection ids count up from 1 in each
broker process and are never reused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from .logs import info_later
from .reasons import CloseReason


class Kind(StrEnum):
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    AUTH_FAILED = "auth_failed"
    AUTH_UNAVAILABLE = "auth_unavailable"
    AUTH_BLOCKED = "auth_blocked"
    AUTH_REFUSED = "auth_refused"
    REFUSED = "refused"
    CLOSED = "closed"
    REVOKED = "revoked"
    SLOW_CONSUMER = "slow_consumer"
    SLOW_PRODUCER = "slow_producer"
    TLS_FAILED = "tls_failed"
    ADMIN_LOGIN_FAILED = "admin_login_failed"
    ADMIN_CHANGE = "admin_change"


_CONNECTION = "hpfeeds3.broker.connection"
_BROKER = "hpfeeds3.broker"
_ADMIN = "hpfeeds3.broker.admin"


@dataclass(slots=True)
class Event:
    kind: ClassVar[Kind]
    level: ClassVar[int] = logging.INFO
    logger: ClassVar[str] = _CONNECTION
    # Logged at all (a refusal is said by the close that follows), and logged on
    # every handshake (the line is built by the log writer: logs.info_later).
    logged: ClassVar[bool] = True
    frequent: ClassVar[bool] = False
    # Its text names each of its fields, none empty, as a whole token (logs.LazyLine).
    fields_said: ClassVar[bool] = False
    peer: str

    def text(self) -> str:  # pragma: no cover - every event says its own
        raise NotImplementedError

    @property
    def ident(self) -> str | None:
        return None

    @property
    def reason(self) -> str | None:
        return None

    @property
    def channel(self) -> str | None:
        return None

    def fields(self) -> dict[str, Any]:
        """The structured fields of its log line."""
        out: dict[str, Any] = {"event": self.kind.value, "peer": self.peer}
        if self.ident is not None:
            out["ident"] = self.ident
        if self.reason is not None:
            out["reason"] = self.reason
        if self.channel is not None:
            out["channel"] = self.channel
        return out


@dataclass(slots=True)
class Connected(Event):
    kind = Kind.CONNECTED
    # Logged with --debug only: the line that follows names the same peer (its
    # AUTH, or its close with the reason), and a third line per handshake cost
    # the log writer about a third of the logging's share of a handshake.
    level = logging.DEBUG
    conn_id: int

    def text(self) -> str:
        return f"connected from {self.peer}"


@dataclass(slots=True)
class Authenticated(Event):
    kind = Kind.AUTHENTICATED
    frequent = True
    fields_said = True  # "PEER authenticated as IDENT" (an ident is never empty)
    conn_id: int
    who: str

    @property
    def ident(self) -> str:
        return self.who

    def fields(self) -> dict[str, Any]:
        return {"event": "authenticated", "peer": self.peer, "ident": self.who}

    def text(self) -> str:
        return f"{self.peer} authenticated as {self.who}"


@dataclass(slots=True)
class AuthFailed(Event):
    """A verified AUTH failed. ``shown``: the ident as sent, escaped for a log or a page."""

    kind = Kind.AUTH_FAILED
    shown: str
    why: str  # unknown_ident | wrong_secret (the client is told neither)

    @property
    def ident(self) -> str:
        return self.shown

    @property
    def reason(self) -> str:
        return self.why

    def text(self) -> str:
        return f"authentication failed for {self.shown} from {self.peer} ({self.why})"


@dataclass(slots=True)
class KeyStoreUnavailable(Event):
    kind = Kind.AUTH_UNAVAILABLE
    level = logging.WARNING
    shown: str
    why: str

    @property
    def ident(self) -> str:
        return self.shown

    def text(self) -> str:
        return f"auth store unavailable for {self.shown} from {self.peer}: {self.why}"


@dataclass(slots=True)
class AuthBlocked(Event):
    """Failed AUTHs (or console logins) from ``peer`` reached the limiter's bound."""

    kind = Kind.AUTH_BLOCKED
    level = logging.WARNING
    block_s: float
    block: str  # what is blocked, as the limiter says it
    console: bool = False

    @property
    def reason(self) -> str:
        return "console_login_rate_limited" if self.console else "auth_rate_limited"

    def text(self) -> str:
        if self.console:
            return f"console: refusing {self.peer} for {self.block_s:g} s: {self.block}"
        return f"refusing for {self.block_s:g} s: {self.block}"


@dataclass(slots=True)
class AuthRefused(Event):
    """An AUTH refused unverified: the failed-AUTH limiter blocks ``source`` (an address,
    or an IPv6 /64) for ``block_s`` more seconds, whole (``whole_address``) or for this
    ident. ``claimed`` is the ident the AUTH names, as sent: it proves nothing."""

    kind = Kind.AUTH_REFUSED
    logged = False
    source: str
    claimed: str
    whole_address: bool
    block_s: float

    def text(self) -> str:
        return f"refused an AUTH from {self.peer}: {self.source} is blocked for {self.block_s:g} s"


@dataclass(slots=True)
class Refused(Event):
    """A connection closed to keep a limit (``limit``: the metric's label), with no log line of its own."""

    kind = Kind.REFUSED
    logged = False
    conn_id: int
    limit: str

    @property
    def reason(self) -> str:
        return self.limit

    def text(self) -> str:
        return f"refused {self.peer}: {self.limit}"


@dataclass(slots=True)
class Closed(Event):
    kind = Kind.CLOSED
    frequent = True
    fields_said = True  # "closed PEER (IDENT): REASON" (an ident is never empty)
    conn_id: int
    who: str | None
    why: CloseReason
    # Its publish counters per channel, final (the console counts what it published since its last poll).
    published: Mapping[bytes, Any] = field(default_factory=dict, compare=False)

    @property
    def ident(self) -> str | None:
        return self.who

    @property
    def reason(self) -> str:
        return self.why.value

    # fields() and text() of the lines every connection logs: written out, and the
    # reason's value read as the member's attribute (``.value`` is a Python-level
    # property, called twice a line).
    def fields(self) -> dict[str, Any]:
        return {"event": "closed", "peer": self.peer, "ident": self.who, "reason": self.why._value_}

    def text(self) -> str:
        if self.who:
            return f"closed {self.peer} ({self.who}): {self.why._value_}"
        return f"closed {self.peer}: {self.why._value_}"


@dataclass(slots=True)
class Revoked(Event):
    """A key change reached a live session: closed (key removed, secret rotated) or
    unsubscribed from ``channels`` taken away."""

    kind = Kind.REVOKED
    level = logging.WARNING
    logger = _BROKER
    who: str
    why: str  # "key removed" | "secret rotated" | "" (channels taken away)
    channels: tuple[str, ...] = ()

    @property
    def ident(self) -> str:
        return self.who

    @property
    def reason(self) -> str:
        return "channel_revoked" if self.channels else "revoked"

    def text(self) -> str:
        if self.channels:
            return f"unsubscribing {self.peer} ({self.who}) from revoked channel(s) {', '.join(self.channels)}"
        return f"revoking {self.peer} ({self.who}): {self.why}"


@dataclass(slots=True)
class _Cut(Event):
    """A connection closed for what it costs the others (its kind is the reason)."""

    who: str | None
    why: str

    @property
    def ident(self) -> str | None:
        return self.who

    @property
    def reason(self) -> str:
        return self.kind.value

    def fields(self) -> dict[str, Any]:
        return {"event": self.kind.value, "peer": self.peer, "ident": self.who, "reason": self.kind.value}


@dataclass(slots=True)
class SlowConsumerCut(_Cut):
    kind = Kind.SLOW_CONSUMER
    level = logging.WARNING
    queued: int

    def text(self) -> str:
        return f"cutting slow consumer {self.peer} ({self.who}): {self.why}, {self.queued} bytes queued"


@dataclass(slots=True)
class SlowProducer(_Cut):
    """A frame arrived too slowly, or incomplete frames held too much memory; ``why`` says which."""

    kind = Kind.SLOW_PRODUCER
    level = logging.WARNING

    def text(self) -> str:
        return f"closing {self.peer} ({self.who}): {self.why}"


@dataclass(slots=True)
class TlsFailed(Event):
    kind = Kind.TLS_FAILED
    why: str
    established: bool
    close: CloseReason | None = None  # when not a broken record or handshake

    @property
    def reason(self) -> str:
        if self.close is not None:
            return self.close.value
        return (CloseReason.BAD_FRAME if self.established else CloseReason.TLS_HANDSHAKE_FAILED).value

    def text(self) -> str:
        return f"TLS {'record' if self.established else 'handshake'} with {self.peer} failed: {self.why}"


@dataclass(slots=True)
class AdminLoginFailed(Event):
    kind = Kind.ADMIN_LOGIN_FAILED
    level = logging.WARNING
    logger = _ADMIN
    how: str

    @property
    def reason(self) -> str:
        return self.how

    def text(self) -> str:
        return f"console {self.how} failed from {self.peer}"


@dataclass(slots=True)
class AdminChange(Event):
    """An operator changed something through the console (the audit line)."""

    kind = Kind.ADMIN_CHANGE
    logger = _ADMIN
    principal: str
    role: str
    what: str
    who: str | None = None
    chan: str | None = None

    @property
    def ident(self) -> str | None:
        return self.who

    @property
    def channel(self) -> str | None:
        return self.chan

    def fields(self) -> dict[str, Any]:
        return {"event": "admin_change", "peer": self.peer, "ident": self.who, "channel": self.chan}

    def text(self) -> str:
        return f"console: {self.principal} ({self.role}) {self.what}"


_loggers: dict[str, logging.Logger] = {}


def log_event(event: Event) -> None:
    """The observer that writes an event's log line."""
    if not event.logged:
        return
    logger = _loggers.get(event.logger)
    if logger is None:
        logger = _loggers[event.logger] = logging.getLogger(event.logger)
    if event.frequent:
        info_later(logger, event)
    elif logger.isEnabledFor(event.level):
        logger.log(event.level, event.text(), extra=event.fields())
