"""The CLI tests share the client tests' brokers (one pool per session)."""

from tests.client.conftest import any_broker, broker_pool, channel, plain_broker, tls_broker

__all__ = ["any_broker", "broker_pool", "channel", "plain_broker", "tls_broker"]
