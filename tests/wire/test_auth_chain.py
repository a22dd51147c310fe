"""A repeated ``--auth``: the first backend that knows an ident decides (a wrong
secret there does not fall through to the next), and the env backend's
``HPFEEDS_<IDENT>_OWNER`` is the owner operators see in the metrics."""

from __future__ import annotations

import re
import urllib.request

from tests.conftest import USERS
from tests.support.broker import RawClient, auth_reply, confirm_subscribed, free_port, write_users_json

ENV = {
    "HPFEEDS_SENSOR_SECRET": "sensor-secret",
    "HPFEEDS_SENSOR_PUBCHANS": "chan1",
    "HPFEEDS_SENSOR_SUBCHANS": "chan1",
    "HPFEEDS_SENSOR_OWNER": "team-red",
    # alice is in users.json too (alice-secret); env comes first on the command line
    "HPFEEDS_ALICE_SECRET": "alice-env-secret",
    "HPFEEDS_ALICE_PUBCHANS": "chan1",
    "HPFEEDS_ALICE_SUBCHANS": "chan1",
}


def authenticated_owners(exporter: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{exporter}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = r'^hpfeeds_client_authenticated_connections\{ident="([^"]*)",owner="([^"]*)"\} 1\.0$'
    return dict(re.findall(pattern, text, re.M))


def test_first_backend_that_knows_the_ident_decides(start_broker, tmp_path) -> None:
    write_users_json(tmp_path / "users.json", USERS)
    exporter = free_port()
    b = start_broker("--auth", "env", "--auth", "users.json", "--exporter", f"127.0.0.1:{exporter}", env=ENV)
    assert auth_reply(b.port, "alice", "alice-env-secret") == "ok"
    assert auth_reply(b.port, "alice", "alice-secret") == "authfail: Authentication failed for alice"
    assert auth_reply(b.port, "bob", "bob-secret") == "ok"  # only in users.json
    assert auth_reply(b.port, "nobody", "x") == "authfail: Authentication failed for nobody"
    with RawClient(b.port) as sensor, RawClient(b.port) as bob:
        sensor.auth("sensor", "sensor-secret")
        sensor.subscribe("chan1")
        bob.auth("bob", "bob-secret")
        confirm_subscribed(sensor, "chan1", sensor)  # both AUTHs are done by now
        confirm_subscribed(bob, "chan1", sensor)
        assert authenticated_owners(exporter) == {"sensor": "team-red", "bob": "bob"}
