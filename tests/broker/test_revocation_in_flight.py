"""Revocation has no window: a key removed while an AUTH lookup for it is in
flight does not log the client in.

The store is a real sqlite store whose lookup is slowed: it reads the row,
then waits until the test lets it answer, as a remote store would while the
row changes. The broker is the real one (``serve``), in a thread of its own
(``serving_in_thread``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from hpfeeds3.broker.auth import AccessKey, WouldBlock
from hpfeeds3.broker.auth.sqlite import SqliteStore
from hpfeeds3.broker.config import BrokerConfig
from hpfeeds3.protocol import Error
from tests.support.broker import RawClient, sqlite_add_key
from tests.support.inprocess import serving_in_thread

WAIT_S = 5.0


class SlowSqliteStore(SqliteStore):
    """Reads the key at once, answers only when ``gate`` is set; no synchronous path."""

    def __init__(self, path: str) -> None:
        super().__init__(path, poll_s=0.05)
        self.reads = 0
        self.read = threading.Event()
        self.gate = threading.Event()

    def lookup_now(self, ident: str) -> AccessKey | None:
        raise WouldBlock

    async def lookup(self, ident: str) -> AccessKey | None:
        key = await super().lookup(ident)
        self.reads += 1
        self.read.set()
        await asyncio.to_thread(self.gate.wait, WAIT_S)
        return key


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_key_removed_during_an_auth_lookup_does_not_log_in(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    sqlite_add_key(db, "bob", "bob-secret", ["chan1"], ["chan1"])
    store = SlowSqliteStore(str(db))
    with serving_in_thread(BrokerConfig(), authenticator=store) as (broker, port):
        try:
            with RawClient(port) as client:
                client.auth("bob", "bob-secret")
                assert store.read.wait(WAIT_S), "the lookup never ran"
                generation = broker.auth_generation
                conn = sqlite3.connect(db)
                with conn:
                    conn.execute("delete from authkeys where ident = 'bob'")
                conn.close()
                # The change feed saw the removal while the lookup still holds the old key.
                wait_until(lambda: broker.auth_generation > generation, "the change feed")
                store.gate.set()
                try:
                    frames = client.expect_closed(timeout=WAIT_S)
                except TimeoutError:
                    frames = []  # still open: logged in
            assert frames, "logged in with a key removed during its lookup"
            assert isinstance(frames[-1], Error)
            assert frames[-1].message.startswith("authfail: Authentication failed for bob")
            assert store.reads == 2  # the lookup that saw the change was repeated
        finally:
            store.gate.set()
