"""Fixtures for the client tests (the CLI tests import them too)."""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterator

import pytest

from tests.client.brokers import KINDS, BrokerPool
from tests.support.reference import Broker

_pool: BrokerPool | None = None


@pytest.fixture(scope="session")
def broker_pool() -> Iterator[BrokerPool]:
    """One pool per test session, even though two conftests expose this fixture.

    Its files live in a directory of its own, not under pytest's basetemp,
    which another pytest run on the machine may prune while this one runs.
    """
    global _pool
    if _pool is None:
        _pool = BrokerPool(pathlib.Path(tempfile.mkdtemp(prefix="hpfeeds3-client-tests-")))
    yield _pool
    _pool.close()


@pytest.fixture(params=KINDS)
def plain_broker(request: pytest.FixtureRequest, broker_pool: BrokerPool) -> Broker:
    """Each broker implementation, without TLS."""
    return broker_pool.get(request.param, tls=False)


@pytest.fixture(params=KINDS)
def tls_broker(request: pytest.FixtureRequest, broker_pool: BrokerPool) -> Broker:
    """Each broker implementation, with TLS (certificates from a test CA)."""
    return broker_pool.get(request.param, tls=True)


@pytest.fixture(
    params=[(k, tls) for k in KINDS for tls in (False, True)], ids=lambda p: f"{p[0]}-{'tls' if p[1] else 'plain'}"
)
def any_broker(request: pytest.FixtureRequest, broker_pool: BrokerPool) -> Broker:
    """Each broker implementation, plain and TLS."""
    kind, tls = request.param
    return broker_pool.get(kind, tls)


@pytest.fixture
def channel(broker_pool: BrokerPool) -> str:
    """A channel no other test uses."""
    return broker_pool.channel()
