"""The ``KeyStore`` interface and how a store spec string picks one.

A store spec is written exactly like the broker's ``--auth``:

==============================  ==========================================
``sqlite``                      ``./sqlite.db`` (the broker's default)
``sqlite:PATH``                 an sqlite file (the reference's schema)
``PATH.json``                   a JSON file ``{ident: {owner, secret, ...}}``
``postgresql://user:pw@h/db``   a PostgreSQL database (``postgres://`` too)
==============================  ==========================================

Stores are synchronous: the ``keys`` CLI does one thing per process. Every
write is atomic (one transaction, or one rename) and safe while a broker is
reading the same store: the broker looks keys up at every AUTH, so a change
applies to the next connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from ..auth.base import AccessKey
from .errors import BadArguments

DEFAULT_SQLITE_PATH = "sqlite.db"


@dataclass(frozen=True, slots=True)
class StoreSpec:
    kind: str  # "sqlite" | "json" | "postgresql" | "env"
    target: str  # a path, a DSN, or "" for env

    def describe(self) -> str:
        if self.kind == "postgresql":
            return redact_dsn(self.target)
        return self.target or self.kind


def parse_store_spec(spec: str) -> StoreSpec:
    """Parse an ``--auth`` value; ``BadArguments`` names the accepted forms."""
    spec = spec.strip()
    if spec == "sqlite":
        return StoreSpec("sqlite", DEFAULT_SQLITE_PATH)
    if spec.startswith("sqlite:"):
        return StoreSpec("sqlite", spec[len("sqlite:") :] or DEFAULT_SQLITE_PATH)
    if spec.startswith(("postgresql://", "postgres://")):
        return StoreSpec("postgresql", spec)
    if spec == "env":
        return StoreSpec("env", "")
    if spec.lower().endswith(".json"):
        return StoreSpec("json", spec)
    raise BadArguments(
        f"unknown store {spec!r}: use sqlite, sqlite:PATH, PATH.json or postgresql://user:password@host:port/db"
    )


def redact_dsn(dsn: str) -> str:
    """A DSN fit for logs and error messages: the password replaced by ``***``."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    authority, slash, tail = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hostport}{slash}{tail}"


class KeyStore(ABC):
    """Read and write access keys in one store.

    Contract: ``add`` raises ``IdentExists``; ``modify``/``remove`` raise
    ``NoSuchIdent``; any failure of the store itself is ``StoreUnavailable``.
    Writes are all-or-nothing.
    """

    description: str

    @abstractmethod
    def keys(self) -> list[AccessKey]:
        """All keys, sorted by ident."""

    @abstractmethod
    def get(self, ident: str) -> AccessKey | None: ...

    @abstractmethod
    def add(self, key: AccessKey) -> None: ...

    @abstractmethod
    def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        """Read, change and write back one key atomically; returns the new key.

        ``change`` must keep the ident.
        """

    @abstractmethod
    def remove(self, ident: str) -> AccessKey:
        """Delete a key; returns what was removed."""

    @abstractmethod
    def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        """Add many keys at once (import). Without ``replace``, any ident that
        exists already fails the whole import with ``IdentExists`` naming them
        all; with it, those keys are overwritten. Keys not in ``keys`` are kept.
        Returns the number written."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_store(spec: str, *, create: bool = False) -> KeyStore:
    """Open the store named by ``spec``.

    ``create``: make the sqlite/JSON file (and the table) when missing; without
    it a missing file is ``StoreUnavailable``, so a mistyped path is an error
    rather than an empty store.
    """
    parsed = parse_store_spec(spec)
    if parsed.kind == "sqlite":
        from .sqlite import SqliteKeyStore

        return SqliteKeyStore(parsed.target, create=create)
    if parsed.kind == "json":
        from .jsonfile import JsonKeyStore

        return JsonKeyStore(parsed.target, create=create)
    if parsed.kind == "postgresql":
        from .postgres import PostgresKeyStore

        return PostgresKeyStore(parsed.target, create=create)
    raise BadArguments(
        "the env store is read-only: set HPFEEDS_<IDENT>_SECRET, _PUBCHANS and _SUBCHANS in the broker's environment"
    )
