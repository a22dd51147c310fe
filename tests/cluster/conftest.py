"""Fixtures of the cluster tests: a real NATS with its defaults, keys in a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hpfeeds3.broker.auth import AccessKey
from hpfeeds3.broker.keys import open_store
from tests.cluster.nodes import CHANNELS
from tests.support.nats import NatsServer


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def cluster_keys(postgres_dsn: str) -> str:
    with open_store(postgres_dsn, create=True) as store:
        for ident in ("n0", "n1", "n2"):
            store.add(AccessKey(ident, f"{ident}-secret", "test", tuple(CHANNELS), tuple(CHANNELS)))
    return postgres_dsn
