"""What the console answers through its API: activity across restarts, silent sensors,
why a sensor sends nothing, collector health, charts, deploy snippets, events by kind."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from hpfeeds3.protocol import encode_subscribe
from tests.reliability.support import _authed_socket

from .conftest import (
    Console,
    Http,
    authenticates,
    console_broker,
    fail_auth,
    publish,
    sensor,
    wait_key_usable,
    wait_until,
)


def row(c: Http, ident: str, **params: str) -> dict | None:
    query = "&".join(f"{k}={v}" for k, v in {"limit": "1000", **params}.items())
    return next((s for s in c.get(f"/api/v1/sensors?{query}").body["sensors"] if s["ident"] == ident), None)


def chart_total(c: Http, what: str, name: str, minutes: int = 60) -> int:
    r = c.get(f"/api/v1/chart?{what}={name}&minutes={minutes}")
    assert r.status == 200 and r.headers["Content-Type"].startswith("image/svg+xml")
    svg = r.body if isinstance(r.body, str) else str(r.body)
    match = re.search(r'data-total="(\d+)"', svg)
    assert match, svg[:200]
    return int(match.group(1))


def add_key(c: Http, console: Console, ident: str, pub: list[str], sub: list[str], *, use: bool = True) -> str:
    """A new key; ``use``: wait until it authenticates (which is a visit of its own)."""
    r = c.post("/api/v1/keys", {"ident": ident, "pubchans": pub, "subchans": sub})
    assert r.status == 201, r.body
    if use:
        wait_key_usable(console, ident, r.body["secret"])
    return str(r.body["secret"])


def test_since_and_counts_survive_a_restart(tmp_path: Path) -> None:
    with console_broker(tmp_path) as console:
        c = console.admin()
        secret = add_key(c, console, "cowrie-eu-01", ["cowrie.sessions"], [])
        with sensor(console, "cowrie-eu-01", secret) as client:
            publish(client, "cowrie.sessions", *(f"m{i}" for i in range(4)))
            wait_until(lambda: (r := row(c, "cowrie-eu-01")) and r["last_1h"] == 4, what="4 messages counted")
        before = wait_until(lambda: (r := row(c, "cowrie-eu-01")) and r["connected"] == 0 and r, what="closed")
        assert before["last_publish"] and chart_total(c, "ident", "cowrie-eu-01") == 4
    assert (tmp_path / "hpfeeds-data" / "console" / "activity.db").exists()

    with console_broker(tmp_path) as console:  # the same data directory: a restart
        c = console.admin()
        after = row(c, "cowrie-eu-01", silent_after="1")
        assert after is not None
        assert after["last_publish"] == before["last_publish"] and after["last_seen"] == before["last_seen"]
        assert after["last_1h"] == 4 and after["state"] in ("ok", "silent")
        wait_until(lambda: row(c, "cowrie-eu-01", silent_after="1")["silent"], what="silent after 1 s")  # type: ignore[index]
        silent = row(c, "cowrie-eu-01", silent_after="1", only_silent="1", role="sensor")
        assert silent is not None and silent["silent_since"] == before["last_publish"]
        assert chart_total(c, "ident", "cowrie-eu-01") == 4
        assert chart_total(c, "channel", "cowrie.sessions", 1440) == 4


def test_silent_collectors_and_never_used_keys_are_apart(console: Console) -> None:
    c = console.admin()
    sensor_secret = add_key(c, console, "dionaea-01", ["dionaea.capture"], [])
    collector_secret = add_key(c, console, "collector-01", [], ["dionaea.capture"])
    add_key(c, console, "never-01", ["dionaea.capture"], [], use=False)
    with sensor(console, "dionaea-01", sensor_secret), sensor(console, "collector-01", collector_secret) as col:
        col.subscribe("dionaea.capture")
        # Connected, publishing nothing: silent once the threshold passes; the collector never is.
        wait_until(
            lambda: (r := row(c, "dionaea-01", silent_after="1")) and r["silent"], what="a connected sensor silent"
        )
        collector = row(c, "collector-01", silent_after="1")
        assert collector is not None and collector["role"] == "collector" and not collector["silent"]
        stopped = c.get("/api/v1/sensors?role=sensor&only_silent=1&show=active&silent_after=1").body["sensors"]
        assert [s["ident"] for s in stopped] == ["dionaea-01"]
        assert stopped[0]["connected"] == 1 and stopped[0]["silent_since"]
        collectors = c.get("/api/v1/sensors?role=collector&show=active").body["sensors"]
        assert [s["ident"] for s in collectors] == ["collector-01"]
        never = c.get("/api/v1/sensors?show=never").body["sensors"]
        assert {s["ident"] for s in never} == {"never-01", "existing-sensor"}
        assert all(s["state"] == "never_used" and not s["silent"] for s in never)


def test_refused_publishes_and_failed_logins_show_on_the_row(console: Console) -> None:
    c = console.admin()
    secret = add_key(c, console, "conpot-01", ["conpot.events"], [])
    with sensor(console, "conpot-01", secret) as client:
        client.publish("conpot.evnets", b"misspelled")  # not its channel
        client.publish("conpot.events", b"fine")
        client.flush(5)
        refused = wait_until(lambda: (r := row(c, "conpot-01")) and r["trouble"] and r["trouble"]["refused"] and r)
    assert refused["trouble"]["refused"] == 1 and "does not allow" in refused["trouble"]["refused_reason"]
    fail_auth(console, "conpot-01")
    failed = wait_until(lambda: (r := row(c, "conpot-01")) and r["trouble"]["failed_logins"] and r)
    assert failed["trouble"]["failed_logins"] == 1 and failed["trouble"]["failed_reason"] == "wrong secret"


def test_a_sensor_refused_at_a_blocked_address_says_so_on_its_row(tmp_path: Path) -> None:
    """Another ident behind the same address fails until the address is blocked: the
    sensor's own AUTHs are then refused unverified, and its row says "blocked address"
    (it tried: it is a stopped sensor, not "never used"); an ident without a key, refused
    the same way, leaves nothing."""
    with console_broker(tmp_path, "--auth-fail-address-limit", "3", "--auth-fail-limit", "0") as console:
        c = console.admin()
        secret = add_key(c, console, "cowrie-nat-02", ["cowrie.sessions"], [], use=False)
        wait_until(lambda: row(c, "cowrie-nat-02", show="never"), what="the key listed")
        for _ in range(3):
            fail_auth(console, "cowrie-nat-01")  # no key: an unknown ident
        wait_until(lambda: c.get("/api/v1/events").body["blocked"], what="the address blocked")
        assert not authenticates(console, "cowrie-nat-02", secret, 1.0)  # right secret or not
        fail_auth(console, "ghost<img src=x>")
        r = wait_until(lambda: (x := row(c, "cowrie-nat-02", silent_after="1")) and x["trouble"] and x, what="its row")
        assert r["trouble"]["failed_logins"] == 1 and r["state"] == "silent"
        assert r["trouble"]["failed_reason"] == "blocked address 127.0.0.1 (too many failed logins from it)"
        stopped = c.get("/api/v1/sensors?role=sensor&only_silent=1&show=active&silent_after=1").body["sensors"]
        assert [s["ident"] for s in stopped] == ["cowrie-nat-02"]
        everything = json.dumps(c.get("/api/v1/sensors?show=all&limit=1000").body)
        assert "ghost" not in everything and "cowrie-nat-01" not in everything


def test_collector_backlog_counts_the_kernel_and_unheard_channels_are_flagged(console: Console) -> None:
    c = console.admin()
    add_key(c, console, "hpfeeds-logger", [], ["cowrie.sessions"])
    secret = add_key(c, console, "cowrie-02", ["cowrie.sessions", "cowrie.nobody"], [])
    # A collector that reads nothing, with a small receive window: what it has not read
    # waits in the broker's kernel send queue first.
    lagging = _authed_socket(console.port, "hpfeeds-logger", _secret_of(c, console, "hpfeeds-logger"), rcvbuf=4096)
    try:
        lagging.sendall(encode_subscribe(b"hpfeeds-logger", b"cowrie.sessions"))
        wait_until(lambda: _conn(c, "hpfeeds-logger")["subscriptions"] == ["cowrie.sessions"], what="subscribed")
        with sensor(console, "cowrie-02", secret) as client:
            client.publish("cowrie.nobody", b"into the void")
            for _ in range(40):
                client.publish("cowrie.sessions", b"x" * 4000)
            client.flush(5)
            conn = wait_until(lambda: (x := _conn(c, "hpfeeds-logger")) and (x["kernel_queued_bytes"] or 0) > 0 and x)
            assert conn["backlog_bytes"] == conn["queued_bytes"] + conn["kernel_queued_bytes"]
            assert 0 <= conn["cut_fraction"] <= 1
            chans = {ch["channel"]: ch for ch in c.get("/api/v1/channels").body["channels"]}
            wait_until(lambda: _channel(c, "cowrie.nobody")["unheard"], what="an unheard channel flagged")
            assert chans["cowrie.sessions"]["unheard"] is False
    finally:
        lagging.close()


def test_a_stalled_collector_shows_how_near_it_is_to_the_cut(tmp_path: Path) -> None:
    """A collector that reads nothing is cut once nothing drained for --send-stall-timeout,
    its buffer far below the hard bound: its rows say how near that is before it happens,
    and that it was cut, and why, after."""
    with console_broker(tmp_path, "--send-stall-timeout", "6") as console:
        c = console.admin()
        add_key(c, console, "hpfeeds-logger", [], ["cowrie.sessions"])
        secret = add_key(c, console, "cowrie-03", ["cowrie.sessions"], [])
        stalled = _authed_socket(console.port, "hpfeeds-logger", _secret_of(c, console, "hpfeeds-logger"), rcvbuf=4096)
        try:
            stalled.sendall(encode_subscribe(b"hpfeeds-logger", b"cowrie.sessions"))
            wait_until(lambda: _conn(c, "hpfeeds-logger")["subscriptions"] == ["cowrie.sessions"], what="subscribed")
            with sensor(console, "cowrie-03", secret) as client:
                for _ in range(128):  # 8 MB: more than the kernel takes, a quarter of the hard bound
                    client.publish("cowrie.sessions", b"x" * 64_000)
                client.flush(10)

                def near() -> dict | None:
                    conns = [x for x in c.get("/api/v1/connections?q=hpfeeds-logger").body["connections"]]
                    assert conns, "cut before its row said it was near"
                    return conns[0] if conns[0]["cut_fraction"] >= 0.5 else None

                conn = wait_until(near, timeout=6, what="half way to the cut")
                assert conn["queued_bytes"] < 0.3 * 32 * 1024 * 1024  # the time rule nears, not the bytes
                logger = row(c, "hpfeeds-logger")
                assert logger is not None and logger["cut_fraction"] >= 0.5
                # Cut: its row says so, and why.
                cut = wait_until(lambda: (r := row(c, "hpfeeds-logger")) and r["trouble"] and r["trouble"], what="cut")
                assert cut["cuts"] == 1 and cut["cut_reason"] == "nothing drained for 6 s"
        finally:
            stalled.close()


def _secret_of(c: Http, console: Console, ident: str) -> str:
    r = c.post("/api/v1/keys/rotate", {"ident": ident})
    assert r.status == 200
    wait_key_usable(console, ident, r.body["secret"])
    return str(r.body["secret"])


def _conn(c: Http, ident: str) -> dict:
    return next(x for x in c.get("/api/v1/connections").body["connections"] if x["ident"] == ident)


def _channel(c: Http, name: str) -> dict:
    return next(x for x in c.get(f"/api/v1/channels?q={name}").body["channels"] if x["channel"] == name)


def test_a_new_key_comes_with_deploy_snippets(console: Console) -> None:
    c = console.admin()
    r = c.post("/api/v1/keys", {"ident": "cowrie-eu-03", "pubchans": ["cowrie.sessions"], "subchans": []})
    deploy, secret = r.body["deploy"], r.body["secret"]
    assert set(deploy) == {
        "cowrie (etc/cowrie.cfg)",
        "conpot (conpot.cfg)",
        "dionaea (ihandlers-enabled/hpfeeds.yaml)",
        "hpfeeds-logger (logger.json)",
        "hpfeeds command",
    }
    port = str(console.port)
    for text in deploy.values():
        assert "cowrie-eu-03" in text and secret in text and port in text
    assert "[output_hpfeeds3]" in deploy["cowrie (etc/cowrie.cfg)"]
    # The command runs as shown: its words are the ident, secret and channel given.
    words = shlex.split(deploy["hpfeeds command"])
    assert words[:2] == ["hpfeeds", "publish"] and words[words.index("-i") + 1] == "cowrie-eu-03"
    # On the key's row later: the secret is not there any more.
    later = c.get("/api/v1/keys/deploy?ident=cowrie-eu-03").body["deploy"]
    assert all(secret not in t for t in later.values())
    assert console.client(console.viewer_token).get("/api/v1/keys/deploy?ident=cowrie-eu-03").status == 403
    # A name an INI file cannot hold: no INI snippet; the others quote it.
    hostile = "evil\n[output_jsonlog]\nenabled = true"
    d = c.post("/api/v1/keys", {"ident": hostile, "pubchans": ["x"]}).body["deploy"]
    assert "cowrie (etc/cowrie.cfg)" not in d and "conpot (conpot.cfg)" not in d
    assert shlex.split(d["hpfeeds command"])[shlex.split(d["hpfeeds command"]).index("-i") + 1] == hostile


def test_events_by_kind_and_text(console: Console) -> None:
    c = console.admin()
    add_key(c, console, "glastopf-01", ["glastopf.events"], [])
    for _ in range(3):
        fail_auth(console, "glastopf-01")
    changes = wait_until(lambda: c.get("/api/v1/events?kind=admin_change").body["events"])
    assert changes and all(e["event"] == "admin_change" for e in changes)
    failed = wait_until(lambda: len(c.get("/api/v1/events?kind=auth_failed").body["events"]) == 3 or None)
    assert failed
    assert c.get("/api/v1/events?q=GLASTOPF").body["total"] >= 4  # case-insensitive
    body = c.get("/api/v1/events").body
    assert "auth_failed" in body["kinds"] and body["total"] == len(body["events"])


def test_a_viewer_in_a_loop_is_paced_not_refused(console: Console) -> None:
    """The same view asked for again within a second is the same answer; a token's
    builds beyond the burst wait their turn."""
    v = console.client(console.viewer_token)
    first = v.get("/api/v1/sensors")
    assert v.get("/api/v1/sensors").body == first.body
    statuses = [v.get(f"/api/v1/sensors?offset={i}").status for i in range(20)]  # past the burst
    assert statuses == [200] * 20


def test_a_data_directory_that_cannot_be_written_leaves_the_console_working(tmp_path: Path) -> None:
    """The history's place is taken by a file: said once in the log, the console works from memory."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the data directory should be\n")
    with console_broker(tmp_path, "--data-dir", str(blocked)) as console:
        c = console.admin()
        with sensor(console, "existing-sensor", "s3cret") as client:
            publish(client, "honeypot.events", "one", "two")
            wait_until(lambda: (r := row(c, "existing-sensor")) and r["last_1h"] == 2, what="counted in memory")
        log = console.broker.wait_log("console activity history")
        assert "keeping it in memory only" in log
        assert log.count("console activity history") == 1
