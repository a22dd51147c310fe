"""Authenticators: ``lookup(ident) -> AccessKey | None`` over several stores.

``--auth`` specs, as the reference broker takes them and more:
``sqlite`` (./sqlite.db), ``sqlite:PATH``, ``env``, ``PATH.json``,
``postgresql://user:pass@host/db``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import UsageError
from .base import AccessKey, Authenticator, AuthUnavailable, WouldBlock
from .chain import ChainAuthenticator
from .env import EnvAuthenticator
from .jsonfile import JsonFileAuthenticator
from .sqlite import SqliteAuthenticator

__all__ = [
    "AccessKey",
    "AuthUnavailable",
    "Authenticator",
    "ChainAuthenticator",
    "EnvAuthenticator",
    "JsonFileAuthenticator",
    "SqliteAuthenticator",
    "WouldBlock",
    "build_authenticator",
    "from_spec",
]


def from_spec(spec: str, *, poll_s: float = 1.0) -> Authenticator:
    """One backend; ``poll_s``: how often a polled store (sqlite) is checked for changes."""
    if spec == "sqlite":
        return SqliteAuthenticator("sqlite.db", poll_s=poll_s)
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:") :]
        if not path:
            raise UsageError("--auth sqlite:PATH needs a path")
        return SqliteAuthenticator(path, poll_s=poll_s)
    if spec == "env":
        return EnvAuthenticator()
    if spec.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresAuthenticator

        return PostgresAuthenticator(spec)
    if spec.endswith(".json"):
        return JsonFileAuthenticator(spec)
    raise UsageError(f"--auth {spec!r}: expected sqlite, sqlite:PATH, env, PATH.json or postgresql://user:pass@host/db")


def build_authenticator(specs: Sequence[str], *, poll_s: float = 1.0) -> Authenticator:
    backends = [from_spec(s, poll_s=poll_s) for s in specs]
    return backends[0] if len(backends) == 1 else ChainAuthenticator(backends)
