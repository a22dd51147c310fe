"""Browser sessions of the console: a random id in an HttpOnly cookie, a CSRF token per session.

A browser logs in with its token once (``POST /login``) and then holds only
the session cookie (``HttpOnly``: no script can read it; ``SameSite=Strict``:
no other site's page can make the browser send it; ``Secure`` under TLS).
Every request that changes something with a cookie must also carry the
session's CSRF token in the ``X-CSRF-Token`` header, which only the console's
own script can read (from ``/api/v1/session``). Sessions live in memory: a
restart logs everyone out. At most ``MAX_SESSIONS`` are kept (the oldest go
first), each for at most ``SESSION_TTL_S``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from .tokens import Principal

COOKIE = "hpfeeds_console"
# A session ends this long after login, used or not.
SESSION_TTL_S = 12 * 3600.0
# Sessions kept at once; logging in beyond this ends the oldest.
MAX_SESSIONS = 1_000


@dataclass(slots=True)
class Session:
    id: str
    principal: Principal
    csrf: str
    expires: float


class Sessions:
    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, principal: Principal) -> Session:
        self._prune()
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        session = Session(
            secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32), time.monotonic() + self.ttl_s
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._by_id[session_id]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)

    def end_for(self, names: set[str]) -> None:
        """End the sessions of tokens no longer in the token file."""
        for sid, s in list(self._by_id.items()):
            if s.principal.name in names:
                del self._by_id[sid]

    def _prune(self) -> None:
        now = time.monotonic()
        for sid, s in list(self._by_id.items()):
            if s.expires <= now:
                del self._by_id[sid]


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), (sent or "").encode())
