"""The console's JSON API against a real broker: roles, CSRF, login rate limit, escaping, keys and live data."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import ssl
import subprocess
import time
import urllib.request
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from hpfeeds3.broker.admin import api as api_mod
from hpfeeds3.broker.admin.api import Console as ApiConsole
from hpfeeds3.broker.admin.tokens import TokenFile, parse_tokens
from hpfeeds3.broker.admin.tokens import main as token_main
from hpfeeds3.broker.cli import build_parser, config_from_args
from hpfeeds3.broker.config import ConfigError
from tests.support.broker import BIN, BrokerProcess, RawClient, free_port
from tests.support.inprocess import idle_broker

from .conftest import (
    Console,
    Http,
    console_broker,
    fail_auth,
    publish,
    sensor,
    wait_key_usable,
    wait_until,
    write_tokens,
)

XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def _conn_of(c: Http, ident: str) -> list[dict]:
    return [x for x in c.get("/api/v1/connections").body["connections"] if x["ident"] == ident]


def test_every_api_needs_a_token(console: Console) -> None:
    anon = console.client()
    for path in ("/api/v1/session", "/api/v1/sensors", "/api/v1/connections", "/api/v1/keys", "/api/v1/events"):
        assert anon.get(path).status == 401, path
    assert anon.post("/api/v1/keys", {"ident": "x"}).status == 401
    assert console.client("hpfc_wrong").get("/api/v1/sensors").status == 401
    # The page itself loads without a token (it shows the login form).
    page = anon.get("/")
    assert page.status == 200 and "login-form" in page.body


def test_security_headers_on_every_response(console: Console) -> None:
    anon = console.client()
    for path in ("/", "/static/app.js", "/api/v1/sensors"):
        h = anon.get(path).headers
        csp = h["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["X-Frame-Options"] == "DENY"


def test_page_has_no_inline_script_and_never_uses_innerhtml() -> None:
    static = files("hpfeeds3.broker.admin").joinpath("static")
    html = static.joinpath("index.html").read_text()
    js = static.joinpath("app.js").read_text()
    # Every <script> has a src and no body; no inline handlers or styles.
    assert html.count("<script") == html.count('<script src="/static/app.js" defer></script>') == 1
    assert not re.search(r"<[^>]*\son\w+\s*=", html, re.IGNORECASE)
    assert "style=" not in html
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink


def test_login_sets_a_strict_httponly_cookie(console: Console) -> None:
    c = console.client()
    r = c.login(console.admin_token)
    assert r.status == 200 and r.body["role"] == "admin" and r.body["name"] == "alice"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the TLS test
    assert c.get("/api/v1/session").body["role"] == "admin"
    assert c.post("/logout").status == 200
    assert c.get("/api/v1/session").status == 401


def test_viewer_sees_but_cannot_change(console: Console) -> None:
    for viewer in (console.client(console.viewer_token), console.client()):
        if viewer.bearer is None:
            assert viewer.login(console.viewer_token).status == 200
        assert viewer.get("/api/v1/sensors").status == 200
        keys = viewer.get("/api/v1/keys")
        assert keys.status == 200 and [k["ident"] for k in keys.body["keys"]] == ["existing-sensor"]
        assert all("secret" not in k for k in keys.body["keys"])
        for path, body in (
            ("/api/v1/keys", {"ident": "new"}),
            ("/api/v1/keys/grant", {"ident": "existing-sensor", "pubchans": ["x"]}),
            ("/api/v1/keys/revoke", {"ident": "existing-sensor", "pubchans": ["honeypot.events"]}),
            ("/api/v1/keys/rotate", {"ident": "existing-sensor"}),
            ("/api/v1/keys/remove", {"ident": "existing-sensor"}),
            ("/api/v1/connections/close", {"id": "1"}),
            ("/api/v1/watch", {"channel": "honeypot.events"}),
        ):
            assert viewer.post(path, body).status == 403, path
        assert viewer.get("/api/v1/watch?channel=honeypot.events").status == 403
    admin = console.client(console.admin_token)
    assert [k["ident"] for k in admin.get("/api/v1/keys").body["keys"]] == ["existing-sensor"]


def post_routes(tokens: Path) -> list[str]:
    """Every POST path of the console's app, read from its router."""
    loop = asyncio.new_event_loop()
    try:
        broker = idle_broker(loop)
        app = ApiConsole(broker, TokenFile(str(tokens)), secure_cookie=False).app()
        return sorted({route.resource.canonical for route in app.router.routes() if route.method == "POST"})
    finally:
        loop.close()


def test_a_viewer_gets_403_from_every_post_route_but_login_and_logout(console: Console) -> None:
    """Enumerated from the router, so a route added later is covered by itself."""
    changes = [path for path in post_routes(console.tokens_path) if path not in ("/login", "/logout")]
    assert {"/api/v1/keys", "/api/v1/watch", "/api/v1/watch/stop", "/api/v1/connections/close"} <= set(changes)
    admin = console.admin()
    assert admin.post("/api/v1/watch", {"channel": "honeypot.events"}).status == 200
    for viewer in (console.client(console.viewer_token), console.client()):
        if viewer.bearer is None:
            assert viewer.login(console.viewer_token).status == 200
        for path in changes:
            body = {"ident": "existing-sensor", "channel": "honeypot.events", "id": "1", "pubchans": ["x"]}
            assert viewer.post(path, body).status == 403, path
    # The admin's watch is still running.
    assert admin.get("/api/v1/watch?channel=honeypot.events").status == 200
    assert [k["ident"] for k in admin.get("/api/v1/keys").body["keys"]] == ["existing-sensor"]


def test_cookie_changes_need_the_csrf_token_and_same_origin(console: Console) -> None:
    c = console.admin()
    body = {"ident": "csrf-test", "pubchans": ["a"]}
    assert c.post("/api/v1/keys", body, csrf=False).status == 403
    assert c.request("POST", "/api/v1/keys", body, {"X-CSRF-Token": "forged"}).status == 403
    cross = {"X-CSRF-Token": c.csrf or "", "Origin": "http://evil.example"}
    assert c.request("POST", "/api/v1/keys", body, cross).status == 403
    # A form post (what another site could make a browser send) is refused too.
    form = c.request(
        "POST",
        "/api/v1/keys",
        raw=b"ident=csrf-test",
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": c.csrf or ""},
    )
    assert form.status == 415
    assert c.get("/api/v1/keys").body["keys"][0]["ident"] == "existing-sensor"
    assert len(c.get("/api/v1/keys").body["keys"]) == 1
    ok = c.post("/api/v1/keys", body)
    assert ok.status == 201 and ok.body["secret"]
    # Bearer tokens carry no ambient authority: no CSRF token needed.
    bearer = console.client(console.admin_token)
    assert bearer.post("/api/v1/keys/remove", {"ident": "csrf-test"}).status == 200


def test_failed_logins_are_rate_limited_and_counted(tmp_path: Path) -> None:
    metrics_port = free_port()
    with console_broker(tmp_path, "--exporter", f"127.0.0.1:{metrics_port}") as console:
        c = console.client()
        limit = api_mod.LOGIN_FAILURES_PER_ADDRESS
        statuses = [c.login(f"hpfc_guess{i}").status for i in range(limit + 2)]
        assert statuses[:limit] == [401] * limit
        assert statuses[limit:] == [429, 429]
        # Blocked: even the right token is refused from this address for a while, and bearer too.
        assert c.login(console.admin_token).status == 429
        assert console.client("hpfc_wrong").get("/api/v1/sensors").status == 429
        log = console.broker.wait_log("console_login_rate_limited")
        assert "console login failed" in log
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert f'hpfeeds_broker_console_logins_total{{result="failed"}} {float(limit)}' in body
        assert 'hpfeeds_broker_console_logins_total{result="blocked"} 4.0' in body


def test_a_stale_token_in_a_script_blocks_itself_alone(console: Console) -> None:
    """A forgotten script with a removed token, from the operator's own address: after
    LOGIN_FAILURES that token is refused there, and the operator still logs in."""
    stale = console.client("hpfc_removed_long_ago")
    statuses = [stale.get("/api/v1/sensors").status for _ in range(api_mod.LOGIN_FAILURES + 5)]
    assert statuses == [401] * api_mod.LOGIN_FAILURES + [429] * 5
    assert console.client().login(console.admin_token).status == 200
    assert console.client(console.viewer_token).get("/api/v1/sensors").status == 200


def test_keys_lifecycle_through_the_store_with_audit_lines(console: Console) -> None:
    c = console.admin()
    r = c.post("/api/v1/keys", {"ident": "sensor-9", "owner": "bob", "pubchans": ["a", "b"], "subchans": ["c"]})
    assert r.status == 201
    secret = r.body["secret"]
    assert len(secret) >= 24 and r.body["key"] == {
        "ident": "sensor-9",
        "owner": "bob",
        "pubchans": ["a", "b"],
        "subchans": ["c"],
    }
    assert c.post("/api/v1/keys", {"ident": "sensor-9"}).status == 409
    listed = {k["ident"]: k for k in c.get("/api/v1/keys").body["keys"]}
    assert "secret" not in listed["sensor-9"]
    assert c.post("/api/v1/keys/grant", {"ident": "sensor-9", "subchans": ["d"]}).body["key"]["subchans"] == ["c", "d"]
    assert c.post("/api/v1/keys/revoke", {"ident": "sensor-9", "pubchans": ["a"]}).body["key"]["pubchans"] == ["b"]
    rotated = c.post("/api/v1/keys/rotate", {"ident": "sensor-9"})
    assert rotated.status == 200 and rotated.body["secret"] != secret
    assert c.post("/api/v1/keys/remove", {"ident": "sensor-9"}).status == 200
    gone = c.post("/api/v1/keys/remove", {"ident": "sensor-9"})
    assert gone.status == 404 and gone.body["error"].count("no such ident") == 1, gone.body
    assert c.post("/api/v1/keys", {"ident": "", "pubchans": []}).status == 400
    assert c.post("/api/v1/keys", {"ident": "x", "pubchans": "a"}).status == 400
    # A lone surrogate (valid JSON, not UTF-8) is refused, not a server error.
    assert c.post("/api/v1/keys", {"ident": "\ud800"}).status == 400
    assert c.post("/api/v1/watch", {"channel": "\ud800"}).status == 400
    json_headers = {"Content-Type": "application/json", "X-CSRF-Token": c.csrf or ""}
    assert c.request("POST", "/api/v1/keys", raw=b"[1]", headers=json_headers).status == 400
    assert c.request("POST", "/api/v1/keys", raw=b"{", headers=json_headers).status == 400
    # The same store the keys CLI reads: the broker's sqlite file.
    rows = sqlite3.connect(console.db).execute("select ident from authkeys").fetchall()
    assert rows == [("existing-sensor",)]
    log = console.broker.wait_log("removed key 'sensor-9'")
    for line in ("alice (admin) created key 'sensor-9'", "alice (admin) rotated the secret of 'sensor-9'"):
        assert line in log
    assert secret not in log and rotated.body["secret"] not in log
    events = c.get("/api/v1/events").body["events"]
    assert any(e["event"] == "admin_change" and e["ident"] == "sensor-9" for e in events)


@pytest.mark.parametrize("store", ["sqlite", "json", "postgresql"])
def test_live_sensor_revocation_and_removal(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    if store == "postgresql":
        store = request.getfixturevalue("postgres_dsn")
    with console_broker(tmp_path, store=store) as console:
        check_live_sensor(console)


def check_live_sensor(console: Console) -> None:
    c = console.admin()
    secret = c.post("/api/v1/keys", {"ident": "sensor-live", "pubchans": ["feed"], "subchans": ["feed"]}).body["secret"]
    wait_key_usable(console, "sensor-live", secret)
    with sensor(console, "sensor-live", secret) as client:
        client.subscribe("feed")
        publish(client, "feed", *(f"m{i}" for i in range(5)))
        conn = wait_until(lambda: _conn_of(c, "sensor-live"), what="connection listed")[0]
        assert conn["peer"].startswith("127.0.0.1:") and conn["tls"] is False and conn["since"]
        wait_until(lambda: _conn_of(c, "sensor-live")[0]["subscriptions"] == ["feed"], what="subscription")
        wait_until(lambda: _conn_of(c, "sensor-live")[0]["publish"].get("feed", {}).get("messages") == 5)

        def sensor_row() -> dict:
            return next(s for s in c.get("/api/v1/sensors").body["sensors"] if s["ident"] == "sensor-live")

        assert sensor_row()["connected"] == 1
        wait_until(lambda: sensor_row()["last_5m"] == 5, what="5 messages in the last 5 minutes")
        chan = next(x for x in c.get("/api/v1/channels").body["channels"] if x["channel"] == "feed")
        assert chan["publishers"] == ["sensor-live"] and chan["subscribers"] == ["sensor-live"]

        assert c.post("/api/v1/keys/revoke", {"ident": "sensor-live", "subchans": ["feed"]}).status == 200
        wait_until(lambda: _conn_of(c, "sensor-live")[0]["subscriptions"] == [], what="subscription revoked")
        assert c.post("/api/v1/keys/remove", {"ident": "sensor-live"}).status == 200
        wait_until(lambda: not _conn_of(c, "sensor-live"), what="connection closed")
        events = c.get("/api/v1/events").body["events"]
        reasons = {e["reason"] for e in events if e["event"] == "revoked" and e["ident"] == "sensor-live"}
        assert reasons == {"channel_revoked", "revoked"}


def test_lists_are_filtered_sorted_and_paged(console: Console) -> None:
    c = console.client(console.admin_token)
    for i in range(5):
        assert c.post("/api/v1/keys", {"ident": f"pot-{i}", "owner": f"team-{i % 2}", "pubchans": ["p"]}).status == 201
    page = c.get("/api/v1/sensors?sort=-ident&limit=2").body
    assert page["total"] == 6 and [s["ident"] for s in page["sensors"]] == ["pot-4", "pot-3"]
    page = c.get("/api/v1/sensors?sort=ident&limit=2&offset=5").body
    assert [s["ident"] for s in page["sensors"]] == ["pot-4"]
    assert c.get("/api/v1/sensors?q=pot-1").body["total"] == 1
    with sensor(console, "existing-sensor", "s3cret"):
        wait_until(lambda: c.get("/api/v1/connections").body["total"] == 1, what="connection")
        # Keys never used are a state of their own, not silent; a sensor connected a
        # moment ago is not silent yet.
        silent = c.get("/api/v1/sensors?silent_after=60&only_silent=1&sort=ident").body
        assert silent["silent"] == 0 and silent["sensors"] == []
        never = c.get("/api/v1/sensors?show=never&sort=ident").body["sensors"]
        assert [s["ident"] for s in never] == [f"pot-{i}" for i in range(5)]
        assert {(s["state"], s["role"], s["silent"]) for s in never} == {("never_used", "sensor", False)}
        active = c.get("/api/v1/sensors?show=active").body["sensors"]
        assert [(s["ident"], s["state"]) for s in active] == [("existing-sensor", "ok")]
        assert c.get("/api/v1/sensors?q=POT-1").body["total"] == 1  # case-insensitive
        by_connected = c.get("/api/v1/sensors?sort=-connected&limit=1").body["sensors"]
        assert by_connected[0]["ident"] == "existing-sensor" and by_connected[0]["silent"] is False
        assert c.get("/api/v1/connections?q=nobody").body == {
            "node": "hpfeeds",
            "scope": "this node",
            "total": 0,
            "offset": 0,
            "connections": [],
        }
    keys = c.get("/api/v1/keys?q=team-1&limit=1").body
    assert keys["total"] == 2 and [k["ident"] for k in keys["keys"]] == ["pot-1"]
    assert c.get("/api/v1/channels?limit=1").body["total"] == 2  # p and honeypot.events
    for bad in ("sort=secret", "limit=x", "offset=-1", "silent_after=nan"):
        assert c.get(f"/api/v1/sensors?{bad}").status == 400, bad


def test_admin_disconnects_a_client_and_rotation_closes_its_sessions(console: Console) -> None:
    c = console.admin()
    with sensor(console, "existing-sensor", "s3cret"):
        conn = wait_until(lambda: _conn_of(c, "existing-sensor"), what="connection listed")[0]
        assert c.post("/api/v1/connections/close", {"id": "0"}).status == 404
        assert c.post("/api/v1/connections/close", {"id": conn["id"]}).body == {"closed": conn["peer"]}
        wait_until(lambda: not _conn_of(c, "existing-sensor"), what="connection closed")
    assert "disconnected " + conn["peer"] in console.broker.wait_log("event=admin_change")
    # Counted and logged as an operator's disconnect, not as a revoked key.
    assert f"closed {conn['peer']} (existing-sensor): kicked" in console.broker.wait_log(": kicked")
    with sensor(console, "existing-sensor", "s3cret"):
        wait_until(lambda: _conn_of(c, "existing-sensor"), what="connection listed")
        assert c.post("/api/v1/keys/rotate", {"ident": "existing-sensor"}).status == 200
        wait_until(lambda: not _conn_of(c, "existing-sensor"), what="closed after rotation")


def test_a_connection_id_is_never_reused(console: Console) -> None:
    """Connections are named by a counter: the id of a closed connection never names another."""
    c = console.admin()
    ids = []
    for _ in range(5):
        with sensor(console, "existing-sensor", "s3cret"):
            conn = wait_until(lambda: _conn_of(c, "existing-sensor"), what="connection listed")[0]
            ids.append(int(conn["id"]))
        wait_until(lambda: not _conn_of(c, "existing-sensor"), what="connection closed")
    assert ids == sorted(set(ids)), ids


def test_a_tls_client_is_listed_as_tls(tmp_path: Path) -> None:
    """TLS terminates inside the connection: the Connections view says so."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "b.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "bk.pem"))
    tls_port = free_port()
    endpoint = f"tls:port={tls_port}:interface=127.0.0.1:cert={tmp_path / 'b.pem'}:key={tmp_path / 'bk.pem'}"
    with console_broker(tmp_path, "-e", endpoint) as console:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        c = console.admin()
        with RawClient(tls_port, tls=ctx) as tls_client, RawClient(console.port) as plain:
            tls_client.auth("existing-sensor", "s3cret")
            plain.auth("existing-sensor", "s3cret")
            conns = wait_until(lambda: len(_conn_of(c, "existing-sensor")) == 2 and _conn_of(c, "existing-sensor"))
            by_port = {int(x["peer"].rsplit(":", 1)[1]): x["tls"] for x in conns}
            assert by_port == {
                tls_client.sock.getsockname()[1]: True,
                plain.sock.getsockname()[1]: False,
            }


def test_failed_auth_events_by_address_and_ident(console: Console) -> None:
    fail_auth(console, XSS)
    c = console.client(console.viewer_token)
    body = wait_until(lambda: c.get("/api/v1/events").body["failed_auth_by_ident"], what="failed auth event")
    assert body[0][0] == XSS  # data, as chosen: the page renders it as text
    assert c.get("/api/v1/events").body["failed_auth_by_address"][0][0] == "127.0.0.1"


def test_blocked_addresses_are_listed(tmp_path: Path) -> None:
    with console_broker(tmp_path, "--auth-fail-limit", "2") as console:
        for _ in range(3):
            fail_auth(console, "guessed")
        c = console.client(console.viewer_token)
        blocked = wait_until(lambda: c.get("/api/v1/events").body["blocked"], what="blocked address")
        assert blocked[0]["address"] == "127.0.0.1" and blocked[0]["what"] == "AUTH"
        assert blocked[0]["until"] > time.time() + 200  # the default block is 300 s


def test_admin_watches_a_channel_payloads_hostile_text_is_data(console: Console) -> None:
    c = console.admin()
    ident, chan = f"sensor{XSS}", f"chan{XSS}"
    secret = c.post("/api/v1/keys", {"ident": ident, "pubchans": [chan]}).body["secret"]
    assert c.get(f"/api/v1/watch?channel={quote(chan)}").status == 404
    assert c.post("/api/v1/watch", {"channel": chan}).status == 200
    with sensor(console, ident, secret) as client:
        publish(client, chan, XSS.encode() + b"\x00\xff" + b"x" * 2000)
        msgs = wait_until(lambda: c.get(f"/api/v1/watch?channel={quote(chan)}").body["messages"], what="message")
        m = msgs[0]
        assert m["ident"] == ident and m["size"] == len(XSS) + 2002 and m["truncated"] is True
        assert m["text"].startswith(XSS) and m["hex"].startswith(XSS.encode().hex())
        assert len(bytes.fromhex(m["hex"])) == 1024
        r = c.get("/api/v1/sensors")
        assert r.headers["Content-Type"].startswith("application/json")
        assert any(s["ident"] == ident for s in r.body["sensors"])
    assert c.post("/api/v1/watch/stop", {"channel": chan}).status == 200


def test_token_file_format_and_maker(capsys: pytest.CaptureFixture[str]) -> None:
    assert token_main(["ci-bot", "viewer"]) == 0
    out = capsys.readouterr()
    token = out.err.split(": ", 1)[1].strip()
    line = out.out.strip()
    assert token not in line
    principals = parse_tokens(line)
    assert next(iter(principals.values())).name == "ci-bot"
    for bad in ("x admin", "x root sha256:" + "0" * 64, "x admin md5:00", "", "a admin sha256:" + "0" * 63):
        with pytest.raises(ConfigError):
            parse_tokens(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_tokens(f"a admin sha256:{'0' * 64}\na viewer sha256:{'1' * 64}")


def test_removing_a_token_from_the_file_ends_its_sessions(console: Console) -> None:
    c = console.admin()
    assert c.get("/api/v1/session").status == 200
    lines = console.tokens_path.read_text().splitlines()
    # A file that does not parse keeps the previous tokens, and says so once.
    console.tokens_path.write_text("alice admin not-a-hash\n")
    for _ in range(3):
        assert c.get("/api/v1/session").status == 200
    assert console.broker.wait_log("keeping the previous tokens").count("keeping the previous tokens") == 1
    console.tokens_path.write_text("\n".join(line for line in lines if not line.startswith("alice")) + "\n")
    wait_until(lambda: c.get("/api/v1/session").status == 401, what="session ended")
    assert console.client(console.admin_token).get("/api/v1/sensors").status == 401
    assert console.client(console.viewer_token).get("/api/v1/sensors").status == 200


def test_admin_flags_are_checked() -> None:
    def cfg(*argv: str):
        return config_from_args(build_parser().parse_args(list(argv)))

    assert cfg().admin is None
    with pytest.raises(ConfigError, match="--admin-tokens"):
        cfg("--admin", "127.0.0.1:8080")
    with pytest.raises(ConfigError, match="need --admin"):
        cfg("--admin-tokens", "t.txt")
    with pytest.raises(ConfigError, match="together"):
        cfg("--admin", ":8080", "--admin-tokens", "t", "--admin-tlscert", "c")
    with pytest.raises(ConfigError, match="--workers"):
        cfg("--admin", ":8080", "--admin-tokens", "t", "--workers", "2", "--cluster", "nats://127.0.0.1:4222")
    a = cfg("--admin", "127.0.0.1:8080", "--admin-tokens", "t.txt").admin
    assert a is not None and (a.host, a.port, a.tokens) == ("127.0.0.1", 8080, "t.txt")


def test_console_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    write_tokens(tmp_path / "t.txt")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        b = BrokerProcess(
            ["--bind", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{port}", "--admin-tokens", "t.txt"],
            cwd=tmp_path,
        )
        code = b.proc.wait(30)
        b.stop()
    assert code != 0
    assert f"--admin 127.0.0.1:{port}: cannot listen" in b.log()


def test_console_over_tls_sets_secure_cookie(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    tls = ("--admin-tlscert", str(tmp_path / "c.pem"), "--admin-tlskey", str(tmp_path / "k.pem"))
    with console_broker(tmp_path, *tls, scheme="https") as console:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        req = urllib.request.Request(
            f"{console.base}/login",
            data=json.dumps({"token": console.admin_token}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


@pytest.mark.parametrize("store", ["sqlite", "json"])
def test_key_views_show_a_change_made_outside_once_the_store_reports_it(tmp_path: Path, store: str) -> None:
    """The key list is read once and reused until the store's change detection
    (sqlite poll, JSON watch) reports a change: a key added with the keys
    command shows in the Keys and Sensors views within seconds."""
    with console_broker(tmp_path, store=store) as console:
        c = console.admin()
        assert [k["ident"] for k in c.get("/api/v1/keys").body["keys"]] == ["existing-sensor"]
        spec = f"sqlite:{console.db}" if store == "sqlite" else str(console.db)
        added = subprocess.run(
            [str(BIN / "hpfeeds-broker"), "keys", "add", "newcomer", "--auth", spec],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 10  # well inside the list's 30 s longest reuse
        idents: list[str] = []
        while time.monotonic() < deadline:
            idents = [k["ident"] for k in c.get("/api/v1/keys").body["keys"]]
            if "newcomer" in idents:
                break
            time.sleep(0.2)
        assert idents == ["existing-sensor", "newcomer"]
        sensors = c.get("/api/v1/sensors").body
        assert "newcomer" in json.dumps(sensors)


def test_a_sensor_that_publishes_and_leaves_between_two_polls_is_counted(console: Console) -> None:
    """Publish counters are read every 2 s; a connection that closes between two
    reads (a cron job, a one-shot ``hpfeeds publish``) is read as it closes."""
    c = console.admin()
    secret = c.post("/api/v1/keys", {"ident": "sensor-brief", "pubchans": ["feed"]}).body["secret"]
    wait_key_usable(console, "sensor-brief", secret)
    for _ in range(3):
        with sensor(console, "sensor-brief", secret) as client:
            publish(client, "feed", "one", "two")

    def sensor_row() -> dict:
        return next(s for s in c.get("/api/v1/sensors").body["sensors"] if s["ident"] == "sensor-brief")

    wait_until(lambda: sensor_row()["last_5m"] >= 6, timeout=6, what="6 messages in the last 5 minutes")
    assert sensor_row()["last_5m"] == 6
    assert sensor_row()["channels"]["feed"]["last_5m"] == 6
