"""Failed-AUTH limits on the wire: ``--auth-fail-address-limit`` counts the
failures of one address over all idents and then refuses that address, even
a right secret, while other addresses authenticate."""

from __future__ import annotations

import re

from tests.support.broker import auth_reply

# The refusal says how long the block has left: 300 s when it starts.
BLOCKED = re.compile(r"authfail: Authentication failed for alice: too many failed attempts, try again in (2\d\d|300) s")


def test_address_limit_over_all_idents_blocks_the_address_only(start_broker) -> None:
    b = start_broker("--auth-fail-address-limit", "5")
    replies = [auth_reply(b.port, f"guess{i}", "x") for i in range(5)]  # 5 idents, 1 failure each
    assert replies == [f"authfail: Authentication failed for guess{i}" for i in range(5)]
    b.wait_log("refusing for 300 s: 5 failed AUTHs from 127.0.0.1 within 60 s")
    assert BLOCKED.fullmatch(auth_reply(b.port, "alice", "alice-secret"))
    assert auth_reply(b.port, "alice", "alice-secret", source="127.0.0.2") == "ok"


def test_address_limit_zero_disables_it(start_broker) -> None:
    b = start_broker("--auth-fail-address-limit", "0", "--auth-fail-limit", "3")
    replies = [auth_reply(b.port, f"guess{i}", "x") for i in range(8)]
    assert replies == [f"authfail: Authentication failed for guess{i}" for i in range(8)]
    assert auth_reply(b.port, "alice", "alice-secret") == "ok"
    assert "refusing for" not in b.log()
