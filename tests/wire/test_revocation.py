"""Revocation reaches live sessions: JSON file and sqlite stores (PostgreSQL in tests/keys)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from tests.support.broker import RawClient, confirm_subscribed, sqlite_add_key, write_users_json

USERS = {
    "bob": {"secret": "bob-secret", "pubchans": ["chan1"], "subchans": ["chan1", "chan2"]},
    "alice": {"secret": "alice-secret", "pubchans": ["chan1", "chan2"], "subchans": []},
}


def test_json_channel_revoked_then_key_removed_reaches_live_sessions(start_broker, tmp_path: Path) -> None:
    b = start_broker(users=USERS)
    with RawClient(b.port) as sub, RawClient(b.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1", "chan2")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan2", sub)  # chan1 came first on the same connection
        users = json.loads((tmp_path / "users.json").read_text())
        users["bob"]["subchans"] = ["chan1"]
        t0 = time.monotonic()
        (tmp_path / "users.json").write_text(json.dumps(users))
        b.wait_log("unsubscribing", timeout=5)
        assert time.monotonic() - t0 < 5
        pub.publish("chan2", b"not for bob any more")
        pub.publish("chan1", b"still for bob")
        assert sub.messages(1)[0].payload == b"still for bob"
        del users["bob"]
        (tmp_path / "users.json").write_text(json.dumps(users))
        frames = sub.expect_closed(timeout=5)
        assert frames[-1].message == "authfail: access key for bob was removed"
    b.wait_log("(bob): revoked")
    with RawClient(b.port) as again:
        again.auth("bob", "bob-secret")
        assert again.expect_closed()[0].message.startswith("authfail: Authentication failed")


def test_sqlite_rotated_secret_closes_live_session(start_broker, tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    sqlite_add_key(db, "bob", "old-secret", ["chan1"], ["chan1"])
    write_users_json(tmp_path / "unused.json", {})
    b = start_broker("--auth", f"sqlite:{db}", "--revocation-poll", "0.2", users=None)
    with RawClient(b.port) as c:
        c.auth("bob", "old-secret")
        c.subscribe("chan1")
        confirm_subscribed(c, "chan1", c)
        t0 = time.monotonic()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("update authkeys set secret = 'new-secret' where ident = 'bob'")
        conn.close()
        frames = c.expect_closed(timeout=5)
        assert frames[-1].message == "authfail: access key for bob was rotated"
        assert time.monotonic() - t0 < 2
    with RawClient(b.port) as c:
        c.auth("bob", "new-secret")
        c.subscribe("chan1")
        c.publish("chan1", b"new secret works")
        assert c.messages(1)[0].payload == b"new secret works"


def test_revocation_closes_every_connection_of_the_ident_and_no_other(start_broker, tmp_path: Path) -> None:
    """The ident index holds one connection or several (the broker keeps no set for
    an ident's only connection): removing the key closes each connection of the
    ident still open, whether it was the first, a later one, or alone again after
    the others left, and no connection of another ident."""
    users = {**USERS, "carol": {"secret": "carol-secret", "pubchans": [], "subchans": ["chan1"]}}
    b = start_broker(users=users)
    with RawClient(b.port) as alone, RawClient(b.port) as carol:
        alone.auth("bob", "bob-secret")
        alone.subscribe("chan1")
        carol.auth("carol", "carol-secret")
        carol.subscribe("chan1")
        confirm_subscribed(alone, "chan1", alone, carol)  # both READY and indexed
        with RawClient(b.port) as second, RawClient(b.port) as third:
            second.auth("bob", "bob-secret")
            third.auth("bob", "bob-secret")
            second.subscribe("chan1")
            third.subscribe("chan1")
            confirm_subscribed(alone, "chan1", alone, second, third, carol)
        # The two later ones left: bob is down to its first connection again.
        b.wait_log("closed", timeout=5)
        deadline = time.monotonic() + 5
        while b.log().count("(bob): ") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with RawClient(b.port) as fourth:
            fourth.auth("bob", "bob-secret")
            fourth.subscribe("chan1")
            confirm_subscribed(alone, "chan1", alone, fourth, carol)
            del users["bob"]
            (tmp_path / "users.json").write_text(json.dumps(users))
            for c in (alone, fourth):
                assert c.expect_closed(timeout=5)[-1].message == "authfail: access key for bob was removed"
        with RawClient(b.port) as alice:
            alice.auth("alice", "alice-secret")
            alice.publish("chan1", b"carol is still here")
            assert carol.messages(1)[0].payload == b"carol is still here"
