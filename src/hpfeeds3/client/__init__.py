"""hpfeeds clients: ``Client`` (asyncio) and ``BlockingClient`` (threads).

Both authenticate, subscribe to any number of channels, publish, reconnect
with exponential backoff and jitter (re-subscribing every channel), hold
publishes made while disconnected in a bounded queue (``PublishQueueFull``
when it is full, never a silent drop) and raise the broker's ERROR frames as
``BrokerError``. See docs/client.md. Stdlib only.
"""

from .aio import Client, make_ssl_context
from .backoff import Backoff
from .blocking import BlockingClient
from .errors import (
    AccessDenied,
    AuthenticationFailed,
    BrokerError,
    ClientClosed,
    ClientError,
    ConnectionLost,
    Kicked,
    NoGreeting,
    PublishQueueFull,
)
from .message import Message

__all__ = [
    "AccessDenied",
    "AuthenticationFailed",
    "Backoff",
    "BlockingClient",
    "BrokerError",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "Kicked",
    "Message",
    "NoGreeting",
    "PublishQueueFull",
    "make_ssl_context",
]
