"""DSNs and URLs made fit for logs, error messages and ``/healthz``.

Every DSN or URL the broker shows (the PostgreSQL key store, the cluster's
NATS servers) goes through ``redact_url``: the password in the userinfo and
the value of every query parameter that carries a credential are replaced by
``***``. Parsing is ``urllib.parse``'s, so ``user:p@ss@host``, IPv6 hosts and
percent-encoding are split the way a client library would split them.
"""

from __future__ import annotations

import urllib.parse

MASK = "***"

# Query parameters (libpq's, asyncpg's, NATS's and the usual ones) whose value is a credential.
SECRET_PARAMS = frozenset(
    {
        "password",
        "pass",
        "passwd",
        "pwd",
        "sslpassword",
        "sslkey",
        "token",
        "auth_token",
        "access_token",
        "secret",
        "apikey",
        "api_key",
        "nkey",
        "nkeys_seed",
        "creds",
        "user_credentials",
    }
)


# Schemes whose userinfo alone (no ``:password``) is a token, not a user name.
TOKEN_USERINFO_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


def _secret_param(piece: str) -> bool:
    name = urllib.parse.unquote_plus(piece.partition("=")[0])
    return name.lower() in SECRET_PARAMS


def redact_url(url: str) -> str:
    """``url`` with its password and credential parameters replaced by ``***``.

    Text that is not a ``scheme://...`` URL is returned unchanged; a URL that
    ``urllib.parse`` cannot split is replaced by its scheme alone, so a
    malformed DSN never reaches a log with its password. Everything else is
    kept as written.
    """
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if at:
            user, colon, _password = userinfo.partition(":")
            if colon:
                netloc = f"{user}:{MASK}@{hostport}"
            elif parts.scheme.lower() in TOKEN_USERINFO_SCHEMES:
                netloc = f"{MASK}@{hostport}"
        query = "&".join(
            f"{piece.partition('=')[0]}={MASK}" if _secret_param(piece) else piece for piece in parts.query.split("&")
        )
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url.partition("://")[0] + "://" + MASK


def redact_urls(urls: str) -> str:
    """A comma-separated list of URLs (as NATS takes its servers), each redacted."""
    return ",".join(redact_url(u.strip()) for u in urls.split(","))


def url_secrets(url: str) -> list[str]:
    """The credential values in ``url`` (password, secret query parameters), raw and percent-decoded."""
    found: list[str] = []
    try:
        parts = urllib.parse.urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        elif at and parts.scheme.lower() in TOKEN_USERINFO_SCHEMES:
            found.append(userinfo)
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if name.lower() in SECRET_PARAMS:
                found.append(value)
    except ValueError:
        return []
    found += [urllib.parse.unquote(v) for v in found]
    return sorted({v for v in found if v}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (an error from a driver given ``url``) with ``url`` and its credentials masked."""
    text = text.replace(url, redact_url(url))
    for secret in url_secrets(url):
        text = text.replace(secret, MASK)
    return text
