"""Browser sessions of the console: a random id in an HttpOnly cookie, a CSRF token per session.

A browser logs in with its token once (``POST /login``) and then holds only
the session cookie (``HttpOnly``: no script can read it; ``SameSite=Strict``:
no other site's page can make the browser send it; ``Secure`` under TLS).
Every request that changes something with a cookie must also carry the
session's CSRF token in the ``X-CSRF-Token`` header, which only the console's
own script can read (from ``/api/v1/session``). Sessions live in memory: a
restart logs everyone out. Each session lasts at most ``SESSION_TTL_S``.

Bounds are per token, so no token holder can end another's sessions: at most
``MAX_SESSIONS_PER_TOKEN`` are kept for one token (logging in beyond it ends
that token's oldest), and one token logs in successfully at most
``LOGINS_PER_TOKEN`` times per ``LOGIN_WINDOW_S`` (past it, ``create`` says
no and the console answers 429). The whole table is then at most the number
of tokens in the file (the operator's) times ``MAX_SESSIONS_PER_TOKEN``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from .tokens import Principal

COOKIE = "hpfeeds_console"
# A session ends this long after login, used or not.
SESSION_TTL_S = 12 * 3600.0
# Sessions kept at once for one token; logging in beyond this ends that token's oldest.
MAX_SESSIONS_PER_TOKEN = 50
# Successful logins of one token per window; past it a login is refused (429).
LOGINS_PER_TOKEN = 30
LOGIN_WINDOW_S = 60.0


@dataclass(slots=True)
class Session:
    id: str
    principal: Principal
    csrf: str
    expires: float


class Sessions:
    def __init__(
        self,
        ttl_s: float = SESSION_TTL_S,
        max_per_token: int = MAX_SESSIONS_PER_TOKEN,
        logins_per_token: int = LOGINS_PER_TOKEN,
        login_window_s: float = LOGIN_WINDOW_S,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_per_token = max_per_token
        self.logins_per_token = logins_per_token
        self.login_window_s = login_window_s
        self._by_id: dict[str, Session] = {}
        # token name -> its sessions' ids, oldest first
        self._by_token: dict[str, OrderedDict[str, None]] = {}
        # token name -> times of its last logins (at most logins_per_token)
        self._logins: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def count(self, name: str) -> int:
        return len(self._by_token.get(name, ()))

    def create(self, principal: Principal) -> Session | None:
        """A new session for ``principal``; None when its token logged in too often lately."""
        now = time.monotonic()
        name = principal.name
        logins = self._logins.get(name)
        if logins is None:
            logins = self._logins[name] = deque(maxlen=self.logins_per_token)
        if len(logins) == self.logins_per_token and now - logins[0] < self.login_window_s:
            return None
        logins.append(now)
        mine = self._by_token.setdefault(name, OrderedDict())
        for sid in list(mine):  # this token's expired sessions (at most max_per_token)
            if self._by_id[sid].expires <= now:
                self._remove(sid)
        while len(mine) >= self.max_per_token:
            self._remove(next(iter(mine)))
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32), now + self.ttl_s)
        self._by_id[session.id] = session
        self._by_token.setdefault(name, mine)[session.id] = None
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            self._remove(session_id)
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id and session_id in self._by_id:
            self._remove(session_id)

    def end_for(self, names: set[str]) -> None:
        """End the sessions of tokens no longer in the token file."""
        for name in names:
            for sid in list(self._by_token.get(name, ())):
                self._remove(sid)
            self._logins.pop(name, None)

    def _remove(self, session_id: str) -> None:
        session = self._by_id.pop(session_id)
        mine = self._by_token[session.principal.name]
        del mine[session_id]
        if not mine:
            del self._by_token[session.principal.name]


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), (sent or "").encode())
