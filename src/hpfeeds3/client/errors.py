"""What the clients raise.

``BrokerError`` and its subclasses carry the text of an ERROR frame the broker
sent (``str(err)`` and ``err.message``); the class says what kind of refusal it
was, decided from the text in either broker's wording (ours starts with a
token such as ``authfail:``; the reference says "Authentication failed for").
Everything else a client raises is a ``ClientError`` (or ``OSError``/
``TimeoutError`` while connecting, as the standard library raises them, or
``ValueError``/``TypeError`` for an argument that can never be sent).
"""

from __future__ import annotations


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


def classify(text: str) -> BrokerError:
    """Map an ERROR frame's text to the most specific ``BrokerError``."""
    lowered = text.lower()
    if "try again" in lowered:
        # e.g. our broker's key store being unavailable: worth a reconnect.
        return BrokerError(text)
    if lowered.startswith("authfail") or "authentication failed" in lowered:
        return AuthenticationFailed(text)
    if lowered.startswith("accessfail") or "not allowed to" in lowered:
        return AccessDenied(text)
    return BrokerError(text)
