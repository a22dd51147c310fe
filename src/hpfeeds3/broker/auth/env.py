"""Keys from the environment, for test brokers (the spec's "Test authentication").

Schema: ident ``james`` is the variables ``HPFEEDS_JAMES_SECRET`` (required),
``HPFEEDS_JAMES_PUBCHANS`` and ``HPFEEDS_JAMES_SUBCHANS`` (comma-separated)
``HPFEEDS_JAMES_OWNER`` (default: the ident) and ``HPFEEDS_JAMES_DURABLE``
(``1``/``true``/``yes`` or ``0``/``false``/``no``; default no): the variable
names carry the ident upper-cased, as the reference maps it.

Only the canonical spelling matches: an env ident is lower-case ASCII
letters, digits, ``_``, ``-`` and ``.``, so each variable set is exactly one
ident (``james``) and ``James``, ``JAMES`` or ``\u017fames`` (long s) are unknown idents,
not new spellings of the same key. Read at every AUTH, so the process
environment is the whole store; it is read-only (no writer, no change feed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .base import AccessKey, InvalidKey, InvalidKeyLog, make_key

# What an env ident may be: one spelling per variable set (upper-casing these is one-to-one).
ENV_IDENT = re.compile(r"[a-z0-9_.\-]+")


def variable_prefix(ident: str) -> str | None:
    """``HPFEEDS_<IDENT>_`` for a canonical env ident, else ``None``."""
    if not ENV_IDENT.fullmatch(ident):
        return None
    return f"HPFEEDS_{ident.upper()}_"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _channels(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def _flag(value: str) -> object:
    """``HPFEEDS_<IDENT>_DURABLE``: a bool, or the text itself (``make_key`` refuses it)."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return value


class EnvStore:
    """``--auth env``."""

    description = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._invalid = InvalidKeyLog("env")

    @classmethod
    def from_spec(cls, target: str, *, poll_s: float = 1.0) -> EnvStore:
        return cls()  # read at every AUTH

    def __repr__(self) -> str:
        return "env"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lookup(self, ident: str) -> AccessKey | None:
        return self.lookup_now(ident)

    def lookup_now(self, ident: str) -> AccessKey | None:
        prefix = variable_prefix(ident)
        if prefix is None:
            return None
        env = self._environ
        secret = env.get(prefix + "SECRET")
        if secret is None:
            return None
        try:
            return make_key(
                ident,
                secret,
                env.get(prefix + "OWNER", ident),
                _channels(env.get(prefix + "PUBCHANS", "")),
                _channels(env.get(prefix + "SUBCHANS", "")),
                _flag(env.get(prefix + "DURABLE", "")),
            )
        except InvalidKey as e:
            self._invalid.report(ident, e)
            return None
