"""Keys from the environment, for test brokers (the spec's "Test authentication").

``HPFEEDS_<IDENT>_SECRET`` (required), ``_PUBCHANS`` and ``_SUBCHANS``
(comma-separated), ``_OWNER`` (default: the ident). ``<IDENT>`` is the ident
upper-cased, as the reference maps it: ident ``test`` ← ``HPFEEDS_TEST_SECRET``.
Read at every AUTH, so the process environment is the whole store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import AccessKey


def _channels(value: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in value.split(",") if c.strip())


class EnvAuthenticator:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def __repr__(self) -> str:
        return "env"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lookup(self, ident: str) -> AccessKey | None:
        return self.lookup_now(ident)

    def lookup_now(self, ident: str) -> AccessKey | None:
        prefix = f"HPFEEDS_{ident.upper()}_"
        env = self._environ
        secret = env.get(prefix + "SECRET")
        if not secret:
            return None
        return AccessKey(
            ident=ident,
            secret=secret,
            owner=env.get(prefix + "OWNER", ident),
            pubchans=_channels(env.get(prefix + "PUBCHANS", "")),
            subchans=_channels(env.get(prefix + "SUBCHANS", "")),
        )
