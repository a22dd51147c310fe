"""A JSON key file on a running broker: a broken version keeps the last good
keys (and live sessions), and an editor's save by rename (write a temporary
file, rename it over the original) is picked up like an in-place write."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import USERS
from tests.support.broker import (
    BrokerProcess,
    RawClient,
    auth_reply,
    confirm_subscribed,
    until_logged,
    write_users_json,
)


def authenticates(b: BrokerProcess, ident: str, secret: str) -> bool:
    return auth_reply(b.port, ident, secret) == "ok"


def test_broken_key_file_keeps_the_last_good_keys_and_live_sessions(start_broker, tmp_path: Path) -> None:
    b = start_broker()
    users_json = tmp_path / "users.json"
    with RawClient(b.port) as live:
        live.auth("alice", "alice-secret")
        live.subscribe("chan2")
        confirm_subscribed(live, "chan2", live)
        until_logged(b, "keeping the last good keys", lambda: users_json.write_text('{"alice": {"secret": "half-wr'))
        assert authenticates(b, "alice", "alice-secret")
        live.publish("chan2", b"still here")
        assert live.messages(1)[0].payload == b"still here"
        # Fixed again: read as usual (the watcher outlived the broken version).
        write_users_json(users_json, {**USERS, "carol": {"secret": "carol-secret", "pubchans": ["chan1"]}})
        b.wait_log("reloaded 4 keys")
    with RawClient(b.port) as carol:
        carol.auth("carol", "carol-secret")
        carol.publish("chan1", b"x")
        carol.publish("private", b"y")  # refused: a key was really read, with its channels
        assert carol.expect_error() == "accessfail: carol may not publish to channel 'private'"


def test_key_file_replaced_by_rename_is_reloaded(start_broker, tmp_path: Path) -> None:
    b = start_broker()
    users_json = tmp_path / "users.json"
    assert authenticates(b, "bob", "bob-secret")
    users = json.loads(users_json.read_text())
    del users["bob"]
    for round_ in range(2):  # twice: the watch follows the new file, not the replaced one
        carol_secret = f"carol-secret-{round_}"
        users["carol"] = {"secret": carol_secret, "pubchans": ["chan1"], "subchans": ["chan1"]}

        def save(text: str = json.dumps(users), tmp: Path = tmp_path / ".users.json.swp") -> None:
            tmp.write_text(text)
            os.replace(tmp, users_json)

        # Again until seen: right after start the watcher may not be watching yet.
        until_logged(b, f"reloaded 3 keys from users.json ({2 if round_ == 0 else 1} changed)", save)
        assert authenticates(b, "carol", carol_secret)
    assert not authenticates(b, "bob", "bob-secret")
