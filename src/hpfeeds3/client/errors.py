"""What the clients raise.

``BrokerError`` and its subclasses carry the text of an ERROR frame the broker
sent (``str(err)`` and ``err.message``); the class says what kind of refusal it
was, decided from the text in either broker's wording (ours starts with a
token such as ``authfail:`` or ``kicked:``; the reference says "Authentication failed for").
Everything else a client raises is a ``ClientError`` (or ``OSError``/
``TimeoutError`` while connecting, as the standard library raises them, or
``ValueError``/``TypeError`` for an argument that can never be sent).
"""

from __future__ import annotations

import re


class ClientError(Exception):
    """Base class of every error specific to the hpfeeds clients."""


class BrokerError(ClientError):
    """The broker sent an ERROR frame; ``message`` is its text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthenticationFailed(BrokerError):
    """The broker refused the ident/secret. Fatal: the client stops, no reconnect."""


class AccessDenied(BrokerError):
    """The ident may not publish or subscribe to a channel.

    Our broker keeps the connection open (the refused frame has no effect), so
    this is reported and the client goes on. The reference broker closes the
    connection after it; then the error is fatal, because reconnecting would
    only repeat the refusal.

    ``action`` (``"publish"`` or ``"subscribe"``) and ``channel`` are read from
    the text when it is in either broker's wording, else ``None``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.action: str | None = None
        self.channel: str | None = None
        for pattern in _DENIAL_PATTERNS:
            found = pattern.search(message)
            if found is not None:
                verb = found.group("action")
                self.action = "publish" if verb.startswith("pub") else "subscribe"
                self.channel = found.group("channel")
                break


class Kicked(BrokerError):
    """The broker's operator disconnected this client (ours: ``kicked:``).

    Not a refusal: the key is still valid, so the client reconnects with its
    backoff (with ``reconnect=True``); it is logged once and handed to
    ``on_error``, never raised by the iteration. Without reconnect it is the
    fatal error.
    """


class ConnectionLost(ClientError, ConnectionError):
    """The connection ended and the client will not reconnect (``reconnect=False``),
    or it ended before the broker's INFO arrived while connecting."""


class NoGreeting(ConnectionLost, TimeoutError):
    """The TCP connection was made but the broker sent no INFO: it stayed silent
    until ``connect_timeout_s`` or closed without a byte. What a plain client
    meets on a TLS port (a TLS server waits for the client to speak first).
    Also a ``ConnectionLost`` and a ``TimeoutError``."""


class PublishQueueFull(ClientError):
    """``publish`` while disconnected found the pending-publish queue full.

    The message was *not* queued; nothing already queued was dropped. Retry
    later, or give up on this message knowingly.
    """


class ClientClosed(ClientError):
    """The client was closed by its owner; it cannot be used any more."""


#: How each broker names the channel it refused: ours ("accessfail: IDENT may
#: not subscribe to channel 'NAME'") and the reference ("Authkey not allowed to
#: sub here. ident=IDENT, chan=NAME").
_DENIAL_PATTERNS = (
    re.compile(r"may not (?P<action>publish|subscribe) to channel '(?P<channel>.*)'$", re.DOTALL),
    re.compile(r"not allowed to (?P<action>pub|sub) here\. ident=.*, chan=(?P<channel>.*)$", re.DOTALL),
)


def classify(text: str) -> BrokerError:
    """Map an ERROR frame's text to the most specific ``BrokerError``."""
    lowered = text.lower()
    if "try again" in lowered:
        # e.g. our broker's key store being unavailable: worth a reconnect.
        return BrokerError(text)
    if lowered.startswith("kicked"):
        return Kicked(text)
    if lowered.startswith("authfail") or "authentication failed" in lowered:
        return AuthenticationFailed(text)
    if lowered.startswith("accessfail") or "not allowed to" in lowered:
        return AccessDenied(text)
    return BrokerError(text)
