"""The key store layer's vocabulary: the access key, what makes one valid,
the errors, and the capabilities a store may have.

Every backend (``sqlite``, ``jsonfile``, ``env``, ``postgres``, ``chain``) is
one module holding its schema, its row codec, its reader and its writer. The
broker uses the reader side; ``hpfeeds-broker keys`` the writer side through
``keys/blocking.py``. Both decode rows with ``make_key``, so a key the broker
serves is a key ``keys`` shows, and a row ``keys`` refuses the broker refuses.

Capabilities are typing Protocols, checked once when the broker starts:

- ``KeyReader``: ``await lookup(ident)``, every store has it;
- ``SyncLookup``: ``lookup_now(ident)`` answers without waiting or raises
  ``WouldBlock`` (sqlite, JSON, env): it saves a task per AUTH;
- ``ChangeFeed``: ``changes()`` yields the idents whose key changed (``None``:
  anything may have), so live sessions are re-checked (revocation);
- ``KeyWriter``: what ``keys`` needs (not the env store: it is read-only).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar, runtime_checkable

from ..config import UsageError

log = logging.getLogger("hpfeeds3.broker.auth")

R = TypeVar("R")

# An ident or a channel travels in a str8 field: one length byte.
MAX_NAME_BYTES = 255
# Idents whose invalid key was logged; beyond this the memory is cleared (and each logged again once).
MAX_LOGGED_INVALID = 4096


@dataclass(frozen=True, slots=True)
class AccessKey:
    """One key: who may publish and subscribe where. Build it with ``make_key``."""

    ident: str
    secret: str
    owner: str = ""
    pubchans: tuple[str, ...] = ()
    subchans: tuple[str, ...] = ()
    # Opt-in per key: the broker keeps what this key may read while it is away
    # (docs/durable.md). Stored beside the key, never in the reference's columns.
    durable: bool = False


# --- errors -------------------------------------------------------------------------------


class ExitCode(IntEnum):
    """What ``hpfeeds-broker keys`` returns for each error class."""

    OK = 0
    # Anything unexpected (a bug): the traceback goes to stderr.
    FAILURE = 1
    # Bad arguments, unknown store spec, unreadable or malformed import file.
    BAD_ARGUMENTS = 2
    IDENT_EXISTS = 3
    NO_SUCH_IDENT = 4
    # The store cannot be reached or created, is locked beyond the busy timeout, or is not a key store.
    STORE_UNAVAILABLE = 5
    # An ident, secret or channel name is not valid, or a stored key is malformed.
    INVALID_KEY = 6


class KeyStoreError(Exception):
    """Base: a one-line message (never holding a secret) and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE


class BadArguments(KeyStoreError):
    exit_code = ExitCode.BAD_ARGUMENTS


class BadSpec(BadArguments, UsageError):
    """A store spec no backend accepts: exit code 2 for ``keys``, a refusal to start for the broker."""


class IdentExists(KeyStoreError):
    exit_code = ExitCode.IDENT_EXISTS

    def __init__(self, idents: str | list[str]) -> None:
        self.idents = [idents] if isinstance(idents, str) else list(idents)
        shown = ", ".join(repr(i) for i in self.idents[:10]) + (" ..." if len(self.idents) > 10 else "")
        super().__init__(f"ident already exists: {shown}")


class NoSuchIdent(KeyStoreError):
    exit_code = ExitCode.NO_SUCH_IDENT

    def __init__(self, ident: str) -> None:
        self.ident = ident
        super().__init__(f"no such ident: {ident!r}")


class StoreUnavailable(KeyStoreError):
    """The store could not answer (down, locked, timed out). For the broker:
    the client gets a clear auth error; everyone else is served."""

    exit_code = ExitCode.STORE_UNAVAILABLE


# The broker's name for it (connections catch this one).
AuthUnavailable = StoreUnavailable


class InvalidKey(KeyStoreError):
    exit_code = ExitCode.INVALID_KEY


# Called with an invalid stored key's ident and what is wrong with it.
SkipInvalid = Callable[[str, InvalidKey], None]


class WouldBlock(Exception):
    """``lookup_now`` cannot answer without waiting: use ``await lookup``."""


# --- validation: the one codec every backend decodes with ------------------------------------


def _kind(value: object) -> str:
    """A value's type for an error message: never the value, which may be a secret."""
    return "null" if value is None else type(value).__name__


def check_name(what: str, value: object) -> str:
    """An ident or channel: a non-empty str of at most 255 bytes of UTF-8."""
    if not isinstance(value, str):
        raise InvalidKey(f"{what} must be text, got {_kind(value)}")
    if value == "":
        raise InvalidKey(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey(f"{what} {value[:40]!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise InvalidKey(f"{what} {value[:40]!r}... is {size} bytes of UTF-8, at most {MAX_NAME_BYTES} allowed")
    return value


def check_channels(what: str, channels: Iterable[object]) -> tuple[str, ...]:
    """Validated channels, duplicates dropped, order kept."""
    out: dict[str, None] = {}
    for channel in channels:
        out[check_name(what, channel)] = None
    return tuple(out)


def make_key(
    ident: object,
    secret: object,
    owner: object = "",
    pubchans: Iterable[object] = (),
    subchans: Iterable[object] = (),
    durable: object = False,
) -> AccessKey:
    """A validated ``AccessKey``; ``InvalidKey`` says what is wrong (without the secret).

    Valid: a text ident, a non-empty text secret, text (or no) owner,
    channel names that are non-empty text, and a boolean ``durable``.
    """
    ident = check_name("ident", ident)
    if not isinstance(secret, str):
        raise InvalidKey(f"ident {ident!r}: secret must be text, got {_kind(secret)}")
    if secret == "":
        raise InvalidKey(f"ident {ident!r}: secret must not be empty")
    if owner is None:
        owner = ""
    if not isinstance(owner, str):
        raise InvalidKey(f"ident {ident!r}: owner must be text, got {_kind(owner)}")
    if not isinstance(durable, bool):
        raise InvalidKey(f"ident {ident!r}: durable must be true or false, got {_kind(durable)}")
    return AccessKey(
        ident=ident,
        secret=secret,
        owner=owner,
        pubchans=check_channels(f"ident {ident!r}: publish channel", pubchans),
        subchans=check_channels(f"ident {ident!r}: subscribe channel", subchans),
        durable=durable,
    )


def decode_channels(ident: str, what: str, value: object) -> list[object]:
    """A channel column or field: a JSON list in text (as the reference stores it), a list, or nothing."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            return list(_parse_channel_text(value))
        except ValueError as err:
            raise InvalidKey(f"ident {ident!r}: {what} {err}") from None
    if not isinstance(value, list):
        raise InvalidKey(f"ident {ident!r}: {what} must be a list of channels, got {_kind(value)}")
    return value


@functools.lru_cache(maxsize=4096)
def _parse_channel_text(text: str) -> tuple[object, ...]:
    # Every AUTH decodes the key's channel columns; the same text parses to the same tuple.
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError("is not a JSON list") from None
    if not isinstance(value, list):
        raise ValueError(f"must be a JSON list, got {_kind(value)}")
    return tuple(value)


def encode_channels(channels: Iterable[str]) -> str:
    """Channels as the reference stores them: a JSON list in a TEXT column."""
    return json.dumps(list(channels), ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def decode_row(
    ident: object, secret: object, owner: object, pubchans: object, subchans: object, durable: object = False
) -> AccessKey:
    """A key from the ``authkeys`` columns (sqlite, PostgreSQL); ``InvalidKey`` if it is not one.

    ``durable`` is whether the ident has a row in ``durable_keys`` (a table of
    its own, so the reference broker's ``authkeys`` stays as it is).

    Every AUTH decodes its row: the same columns give the same (immutable)
    key, so validating a key with many channels costs once, not per AUTH.
    """
    name = ident if isinstance(ident, str) else ""
    return make_key(
        ident,
        secret,
        owner,
        decode_channels(name, "pubchans", pubchans),
        decode_channels(name, "subchans", subchans),
        bool(durable),
    )


class InvalidKeyLog:
    """Log an invalid stored key once per ident and reason: the broker answers
    "no such key" for it at every AUTH, and the log says why only once."""

    def __init__(self, store: str) -> None:
        self.store = store
        self._seen: dict[str, str] = {}

    def serve(self, ident: str, row: R | None, codec: Callable[[R], AccessKey]) -> AccessKey | None:
        """The key in ``row``; ``None`` when there is no row or it is not a valid key (logged)."""
        if row is None:
            return None
        try:
            return codec(row)
        except InvalidKey as e:
            self.report(ident, e)
            return None

    def report(self, ident: str, err: InvalidKey) -> None:
        reason = str(err)
        if self._seen.get(ident) == reason:
            return
        if len(self._seen) >= MAX_LOGGED_INVALID:
            self._seen.clear()
        self._seen[ident] = reason
        log.warning("%s: the key for %r is not valid, treated as no such key: %s", self.store, ident, reason)


# --- capabilities -------------------------------------------------------------------------


@runtime_checkable
class KeyReader(Protocol):
    """What the broker needs of every store."""

    async def start(self) -> None:
        """Open connections, start watchers. Raise ``ConfigError`` if unusable."""

    async def close(self) -> None: ...

    async def lookup(self, ident: str) -> AccessKey | None:
        """The valid key for ``ident``, ``None`` if unknown or invalid; ``AuthUnavailable`` if the store failed."""
        ...


# The broker's name for a reader.
Authenticator = KeyReader


@runtime_checkable
class SyncLookup(Protocol):
    """A store that can answer in microseconds without I/O waits."""

    def lookup_now(self, ident: str) -> AccessKey | None:
        """What ``lookup`` would return, or ``WouldBlock``."""
        ...


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that can tell when keys change."""

    def changes(self) -> AsyncIterator[set[str] | None]:
        """The idents whose key changed, as they change; ``None``: anything may have changed."""
        ...


@runtime_checkable
class KeyWriter(Protocol):
    """What ``hpfeeds-broker keys`` needs. Every write is atomic and safe
    while a broker reads the same store; ``add`` raises ``IdentExists``,
    ``modify``/``remove`` raise ``NoSuchIdent``, a store failure is
    ``StoreUnavailable``."""

    description: str

    async def open(self, *, create: bool) -> None:
        """Connect; ``create``: make the file or table when missing (else a missing one is ``StoreUnavailable``)."""

    async def close(self) -> None: ...

    async def keys(self, *, skip_invalid: SkipInvalid | None = None) -> list[AccessKey]:
        """All keys, sorted by ident; ``InvalidKey`` names the first invalid one,
        unless ``skip_invalid`` is given: each invalid key's ident and error go
        to it, and the valid keys are returned."""
        ...

    async def get(self, ident: str) -> AccessKey | None:
        """The key, ``None`` if unknown; ``InvalidKey`` if the stored one is invalid."""
        ...

    async def add(self, key: AccessKey) -> None: ...

    async def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        """Read, change and write back one key atomically; ``change`` must keep the ident."""
        ...

    async def remove(self, ident: str) -> None:
        """Delete the ident's key, valid or not."""

    async def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        """Add many keys at once (import), all or nothing. Without ``replace``, any
        ident that exists fails the whole import with ``IdentExists`` naming them
        all; with it, those are overwritten. Returns the number written."""
        ...
