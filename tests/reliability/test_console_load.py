"""A console viewer polling in a loop does not take the broker's core from its sensors.

Views are built at most once a second per address and shared, and a token's
builds are paced (docs/console.md): a script or a forgotten browser tab asking
as fast as it can moves the canary's publish->deliver median by under 1 ms
(a speed claim: recorded always, asserted under ``HPFEEDS3_TIMING_ASSERTS=1``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from hpfeeds3.broker.admin.tokens import generate_token, hash_token
from tests.console.conftest import Http
from tests.support.broker import free_port, wait_for_port, write_users_json

from .support import RELIABILITY_USERS, Canary, record, speed_bound

KEYS = 10_000
WINDOW_S = 4.0
# The views a heavy page reads, and the largest page.
VIEWS = ("/api/v1/sensors?limit=1000&show=all", "/api/v1/channels?limit=1000", "/api/v1/keys?limit=1000")


@pytest.mark.parametrize("addresses", ["same", "varied"])
def test_a_viewer_polling_in_a_loop_leaves_the_canary_alone(reliable_broker, tmp_path: Path, addresses: str) -> None:
    """``same``: a page left open asks for the same views (shared answers); ``varied``: a
    script changes the query every time (no answer shared: its builds are paced)."""
    users = dict(RELIABILITY_USERS)
    for i in range(KEYS):
        users[f"cowrie-{i:05d}"] = {"secret": "s", "owner": f"team-{i % 7}", "pubchans": [f"cowrie-{i:05d}.sessions"]}
    write_users_json(tmp_path / "keys.json", users)
    viewer = generate_token()
    (tmp_path / "tokens.txt").write_text(f"grafana viewer sha256:{hash_token(viewer)}\n")
    admin_port = free_port()
    b = reliable_broker(
        "--auth", "keys.json", "--admin", f"127.0.0.1:{admin_port}", "--admin-tokens", "tokens.txt", users=users
    )
    wait_for_port(admin_port, proc=b.process.proc)
    http = Http(f"http://127.0.0.1:{admin_port}", viewer)
    assert http.get(VIEWS[0]).status == 200  # the key list read once

    canary = Canary(b.port).start()
    stop = threading.Event()
    answers: dict[int, int] = {}
    try:
        time.sleep(1.0)  # a measurement window, not synchronisation
        canary.window()
        time.sleep(WINDOW_S)
        quiet = canary.window()

        def poll() -> None:
            client = Http(http.base, viewer)
            i = 0
            while not stop.is_set():
                path = VIEWS[i % len(VIEWS)] + (f"&offset={i}" if addresses == "varied" else "")
                status = client.get(path).status
                answers[status] = answers.get(status, 0) + 1
                i += 1

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(WINDOW_S)  # a measurement window, not synchronisation
        during = canary.window()
        stop.set()
        poller.join(15)
    finally:
        stop.set()
        total = canary.stop()
    record(
        "console_viewer_loop",
        addresses=addresses,
        keys=KEYS,
        requests=answers,
        quiet_p50_ms=round(quiet.p50_ms, 3),
        during_p50_ms=round(during.p50_ms, 3),
        during_p99_ms=round(during.p99_ms, 3),
        **total.summary(),
    )
    assert not canary.errors and total.lost == 0
    assert answers.get(200, 0) > 0 and set(answers) <= {200, 429}
    speed_bound(
        "console_viewer_loop", "canary median ms moved by a polling viewer", during.p50_ms - quiet.p50_ms, below=1.0
    )
