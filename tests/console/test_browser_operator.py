"""What an operator sees in a real headless Chromium: the sensors that stopped (also after a
restart), charts matching the counts, a kick with confirmation and the client's return,
names with hidden characters escaped, messages, dialogs, the unreachable banner, events by kind.

Screenshots are saved by these tests (into docs/console/ with ``CONSOLE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from hpfeeds3.broker.auth.base import make_key
from hpfeeds3.broker.keys import open_store
from hpfeeds3.client import Backoff, BlockingClient
from hpfeeds3.protocol import encode_subscribe
from tests.reliability.support import _authed_socket
from tests.support.broker import RawClient, sqlite_add_key

from .conftest import (
    Console,
    authenticates,
    console_broker,
    fail_auth,
    publish,
    sensor,
    wait_key_usable,
    wait_until,
)
from .test_browser import by_id, click_in_row, fill, idents, login, row_of, rows, tab, view, wait

# Seconds of silence that flag a sensor, set through the page (minutes, fractional).
SILENT_S = 1.2
FAST = Backoff(initial_s=0.05, max_s=0.2)


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def silent_after(browser: Any, seconds: float) -> None:
    fill(browser, "silent-minutes", str(seconds / 60))
    by_id(browser, "silent-minutes").send_keys("\t")  # change


def add_key(console: Console, ident: str, pub: list[str], sub: list[str] = []) -> str:  # noqa: B006
    r = console.admin().post("/api/v1/keys", {"ident": ident, "owner": "eu-team", "pubchans": pub, "subchans": sub})
    assert r.status == 201, r.body
    return str(r.body["secret"])


def chart_total(browser: Any, img: Any) -> int:
    """The count an SVG chart of the page says it draws (its data-total), fetched by the page itself."""
    src = img.get_attribute("src")
    text = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => r.text()).then(done);", src
    )
    return int(text.split('data-total="', 1)[1].split('"', 1)[0])


def test_stopped_sensors_land_first_and_keep_their_since_across_a_restart(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        stopped = add_key(console, "cowrie-eu-01", ["cowrie.sessions"])
        live = add_key(console, "cowrie-eu-02", ["cowrie.sessions"])
        collector = add_key(console, "hpfeeds-logger", [], ["cowrie.sessions"])
        wait_key_usable(console, "cowrie-eu-01", stopped)
        with sensor(console, "cowrie-eu-01", stopped) as client:
            publish(client, "cowrie.sessions", *(f"s{i}" for i in range(5)))
        api = console.admin()
        before = wait(
            browser,
            lambda d: next(
                (
                    s
                    for s in api.get("/api/v1/sensors").body["sensors"]
                    if s["ident"] == "cowrie-eu-01" and s["last_1h"] == 5
                ),
                None,
            ),
        )
    with console_broker(tmp_path) as console:  # a restart: the same data directory
        browser.delete_all_cookies()
        login(browser, console, console.admin_token)
        with sensor(console, "cowrie-eu-02", live) as client, sensor(console, "hpfeeds-logger", collector) as col:
            col.subscribe("cowrie.sessions")
            silent_after(browser, SILENT_S)
            view(browser, "stopped")  # the landing view
            # Only the sensor that stopped: not the one publishing, not the collector, not the never-used key.
            for i in range(3):
                publish(client, "cowrie.sessions", f"live{i}")
            wait(browser, lambda d: idents(d) == ["cowrie-eu-01"])
            state = row_of(browser, "sensors-table", "cowrie-eu-01")
            assert state is not None and state[2].startswith("silent since " + utc(before["last_publish"]))
            assert state[7] == "5"  # its last hour, from before the restart
            browser.save_screenshot(str(screenshots / "sensors-stopped.png"))
            # The chart on its row draws the same count.
            img = browser.find_element(By.CSS_SELECTOR, '#sensors-table tr[data-ident="cowrie-eu-01"] img.spark')
            assert chart_total(browser, img) == 5
            # Its 24-hour chart, on a click on its name.
            browser.find_element(By.CSS_SELECTOR, '#sensors-table tr[data-ident="cowrie-eu-01"] .ident-link').click()
            wait(browser, lambda d: by_id(d, "detail-box").is_displayed())
            wait(browser, lambda d: d.execute_script("return document.getElementById('detail-chart').naturalWidth") > 0)
            assert chart_total(browser, by_id(browser, "detail-chart")) == 5
            browser.save_screenshot(str(screenshots / "sensor-detail.png"))
            by_id(browser, "detail-dismiss").click()
            # Never-used keys and collectors are one click away.
            view(browser, "never")
            wait(browser, lambda d: idents(d) == ["existing-sensor"])
            view(browser, "collectors")
            wait(browser, lambda d: idents(d) == ["hpfeeds-logger"])
            view(browser, "sensors")
            wait(browser, lambda d: set(idents(d)) == {"cowrie-eu-01", "cowrie-eu-02"})


def test_why_a_sensor_sends_nothing_is_on_its_row(browser: Any, tmp_path: Path, screenshots: Path) -> None:
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        secret = add_key(console, "dionaea-eu-01", ["dionaea.capture"])
        wait_key_usable(console, "dionaea-eu-01", secret)
        login(browser, console, console.admin_token)
        with sensor(console, "dionaea-eu-01", secret) as client:
            client.publish("dionaea.captrue", b"misspelled")
            client.flush(5)
            fail_auth(console, "dionaea-eu-01")
            silent_after(browser, SILENT_S)
            view(browser, "stopped")
            why = wait(browser, lambda d: (r := row_of(d, "sensors-table", "dionaea-eu-01")) and "failed" in r[9] and r)
        assert "1 refused publishes" in why[9] and "does not allow" in why[9]
        assert "1 failed logins" in why[9] and "wrong secret" in why[9]
        browser.save_screenshot(str(screenshots / "sensors-why.png"))


def test_disconnect_asks_first_and_the_client_comes_back(browser: Any, tmp_path: Path, screenshots: Path) -> None:
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        login(browser, console, console.admin_token)
        client = BlockingClient("127.0.0.1", console.port, "existing-sensor", "s3cret", backoff=FAST)
        try:
            client.connect(timeout_s=5)
            tab(browser, "connections")
            first = wait(
                browser, lambda d: next((r for r in rows(d, "connections-table") if r[1] == "existing-sensor"), None)
            )
            browser.save_screenshot(str(screenshots / "connections.png"))
            click_in_row(browser, "connections-table", first[0], 0, "Disconnect")
            # One click only arms it: the connection is still there.
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#connections-table button[data-armed]"))
            assert any(r[0] == first[0] for r in rows(browser, "connections-table"))
            click_in_row(browser, "connections-table", first[0], 0, "Really")
            wait(browser, lambda d: "Disconnected " + first[0] in by_id(d, "messages").text)
            # The project's client reconnects after the kick: a new connection of the same ident.
            wait(
                browser,
                lambda d: any(r[1] == "existing-sensor" and r[0] != first[0] for r in rows(d, "connections-table")),
                timeout=20,
            )
            # The success message stays until dismissed, across refreshes.
            time.sleep(2.5)  # a refresh period: the message must outlive it (not synchronisation)
            assert "Disconnected" in by_id(browser, "messages").text
            by_id(browser, "messages").find_element(By.TAG_NAME, "button").click()
            wait(browser, lambda d: by_id(d, "messages").text == "")
        finally:
            client.close()


def test_hidden_characters_are_shown_escaped(browser: Any, tmp_path: Path, screenshots: Path) -> None:
    """A right-to-left override or a zero-width space cannot make a second "cowrie-eu-01"."""
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        twins = ["cowrie-eu-01", "cowrie-eu-01\u200b", "cowrie-eu-\u202e10"]
        for ident in twins:
            add_key(console, ident, ["cowrie.sessions"])
        login(browser, console, console.admin_token)
        tab(browser, "keys")
        wait(browser, lambda d: len(rows(d, "keys-table")) == 4)
        shown = [r[0] for r in rows(browser, "keys-table")]
        assert "cowrie-eu-01" in shown and "cowrie-eu-01\\u{200b}" in shown and "cowrie-eu-\\u{202e}10" in shown
        assert len(browser.find_elements(By.CSS_SELECTOR, "#keys-table td span.escaped")) == 2
        browser.save_screenshot(str(screenshots / "escaped.png"))


def test_secret_and_deploy_dialog_events_by_kind_and_the_unreachable_banner(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        login(browser, console, console.admin_token)
        assert by_id(browser, "asof").text.startswith("as of ") or wait(browser, lambda d: by_id(d, "asof").text)
        wait(browser, lambda d: by_id(d, "asof").text.endswith(" UTC"))
        tab(browser, "keys")
        # Scroll down first: the one-time secret opens where the operator looks (a dialog).
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        fill(browser, "new-ident", "conpot-eu-01")
        fill(browser, "new-pub", "conpot.events")
        browser.find_element(By.CSS_SELECTOR, "#key-create-form button").click()
        wait(browser, lambda d: by_id(d, "secret-box").is_displayed())
        secret = by_id(browser, "secret-value").text
        snippets = by_id(browser, "secret-deploy").text
        assert "[output_hpfeeds3]" in snippets and secret in snippets and "conpot-eu-01" in snippets
        box = by_id(browser, "secret-box").rect
        assert 0 <= box["y"] < browser.execute_script("return window.innerHeight")
        browser.save_screenshot(str(screenshots / "deploy.png"))
        by_id(browser, "secret-dismiss").click()
        wait(browser, lambda d: "Key conpot-eu-01 added" in by_id(d, "messages").text)

        fail_auth(console, "conpot-eu-01")
        tab(browser, "events")
        wait(browser, lambda d: len(Select(by_id(d, "events-kind")).options) > 1)
        Select(by_id(browser, "events-kind")).select_by_value("admin_change")
        wait(browser, lambda d: (r := rows(d, "events-table")) and all(x[1] == "admin_change" for x in r))
        Select(by_id(browser, "events-kind")).select_by_value("auth_failed")
        wait(browser, lambda d: (r := rows(d, "events-table")) and all(x[1] == "auth_failed" for x in r))
        browser.save_screenshot(str(screenshots / "events.png"))

        # A selection in a table survives the refreshes.
        browser.execute_script(
            "const td = document.querySelector('#events-table tbody td'); window.kept = td;"
            "const r = document.createRange(); r.selectNodeContents(td);"
            "window.getSelection().removeAllRanges(); window.getSelection().addRange(r);"
        )
        time.sleep(2.5)  # a refresh period (not synchronisation)
        assert browser.execute_script("return window.kept.isConnected && !window.getSelection().isCollapsed")
        browser.execute_script("window.getSelection().removeAllRanges()")

        console.broker.stop()
        wait(browser, lambda d: by_id(d, "banner").is_displayed(), timeout=20)
        assert "does not answer" in by_id(browser, "banner").text and "as of" in by_id(browser, "banner").text
        browser.save_screenshot(str(screenshots / "unreachable.png"))


def keys_store(tmp_path: Path, *keys: Any) -> None:
    """The console broker's sqlite key store, made before it starts, with ``keys`` in it."""
    db = tmp_path / "keys.db"
    sqlite_add_key(db, "existing-sensor", "s3cret", ["honeypot.events"], [], owner="ops")
    with open_store(f"sqlite:{db}", create=True) as store:
        for key in keys:
            store.add(key)


def durable_of(console: Console, ident: str) -> dict[str, Any]:
    key = console.admin().get(f"/api/v1/keys?q={ident}").body["keys"][0]
    return key["durable_state"] or {}


def test_a_durable_collector_away_shows_its_stored_backlog(browser: Any, tmp_path: Path, screenshots: Path) -> None:
    """A durable collector comes once, goes, and a backlog builds while it is away: the Keys
    and Collectors views say how much is stored, how old the oldest unread message is and
    how close that is to the drop bound; back, it is replayed and the page says so."""
    keys_store(
        tmp_path,
        make_key("hpfeeds-logger-01", "col-secret", "soc", [], ["cowrie.sessions"], durable=True),
        make_key("cowrie-eu-01", "sensor-secret", "eu-team", ["cowrie.sessions"]),
    )
    browser.delete_all_cookies()
    with console_broker(tmp_path) as console:
        with sensor(console, "hpfeeds-logger-01", "col-secret") as col:
            col.subscribe("cowrie.sessions")
            wait_until(lambda: durable_of(console, "hpfeeds-logger-01").get("consuming"), what="consuming")
        wait_until(lambda: not durable_of(console, "hpfeeds-logger-01")["consuming"], what="away")
        with sensor(console, "cowrie-eu-01", "sensor-secret") as client:
            publish(client, "cowrie.sessions", *(f"session {i}" for i in range(25)))
        wait_until(lambda: durable_of(console, "hpfeeds-logger-01")["backlog_messages"] == 25, what="25 stored")

        login(browser, console, console.admin_token)
        tab(browser, "keys")
        key = wait(browser, lambda d: (r := row_of(d, "keys-table", "hpfeeds-logger-01")) and "stored" in r[4] and r)
        assert key[4].startswith("yes; away: 25 msgs stored (") and "oldest unread" in key[4]
        assert "toward the drop bound (1.00 GiB, 1.0 d)" in key[4] and "dropped" not in key[4]
        assert row_of(browser, "keys-table", "cowrie-eu-01")[4] == "no"  # type: ignore[index]
        behind = browser.find_element(By.CSS_SELECTOR, '#keys-table tr[data-ident="hpfeeds-logger-01"]')
        assert "behind" in behind.get_attribute("class")
        browser.save_screenshot(str(screenshots / "keys-durable.png"))

        tab(browser, "sensors")
        view(browser, "collectors")
        shown = wait(browser, lambda d: (r := row_of(d, "sensors-table", "hpfeeds-logger-01")) and r[10] and r)
        assert shown[10].startswith("durable, away: 25 msgs stored (") and "oldest unread" in shown[10]
        browser.save_screenshot(str(screenshots / "collectors-durable.png"))

        # Back: the backlog is replayed, and delivered at a rate in messages per second.
        with (
            sensor(console, "hpfeeds-logger-01", "col-secret") as col,
            sensor(console, "cowrie-eu-01", "sensor-secret") as client,
        ):
            col.subscribe("cowrie.sessions")
            got = [col.get(10) for _ in range(25)]
            assert [m.payload for m in got if m is not None] == [f"session {i}".encode() for i in range(25)]

            def live_and_replayed(d: Any) -> Any:
                publish(client, "cowrie.sessions", "live")  # one message per look: a rate to show
                r = row_of(d, "sensors-table", "hpfeeds-logger-01")
                if r is None or "connected: 0 msgs not yet acknowledged" not in r[10]:
                    return None
                return not r[10].startswith("0 msgs/s") and r

            shown = wait(browser, live_and_replayed, timeout=30)
            assert " msgs/s, backlog " in shown[10]


def test_a_sensor_behind_a_blocked_address_says_blocked_address(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    """Another ident at the sensors' address fails until the address is blocked: their own
    AUTHs are refused unverified, and their rows say "blocked address" in the default view
    (a name holding markup stays text)."""
    hostile = 'cowrie-nat<img src=x onerror="window.pwned=1">'
    browser.delete_all_cookies()
    with console_broker(tmp_path, "--auth-fail-address-limit", "3", "--auth-fail-limit", "0") as console:
        secrets = {ident: add_key(console, ident, ["cowrie.sessions"]) for ident in ("cowrie-nat-02", hostile)}
        login(browser, console, console.admin_token)
        view(browser, "never")
        wait(browser, lambda d: {"cowrie-nat-02", hostile} <= set(idents(d)))  # the console read the keys
        for _ in range(3):
            fail_auth(console, "cowrie-nat-01")  # no key
        api = console.admin()
        wait_until(lambda: api.get("/api/v1/events").body["blocked"], what="the address blocked")
        for ident, secret in secrets.items():
            assert not authenticates(console, ident, secret, 1.0)
        silent_after(browser, SILENT_S)
        view(browser, "stopped")
        wait(browser, lambda d: set(idents(d)) == {"cowrie-nat-02", hostile})
        for ident in secrets:
            r = row_of(browser, "sensors-table", ident)
            assert r is not None and r[2] == "never logged in"
            assert "1 failed logins" in r[9] and "blocked address 127.0.0.1" in r[9]
        assert browser.execute_script("return window.pwned === undefined")
        browser.save_screenshot(str(screenshots / "sensors-blocked.png"))


def test_after_a_weekend_the_stopped_sensor_and_the_lagging_collector_stand_out(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    """50 sensors, one of them stopped; a live collector keeping up and a durable one that
    reads nothing: the stopped sensor is alone in the landing view, and the Collectors
    view says which collector is behind (and by how much) and which keeps up."""
    sensors = [f"cowrie-eu-{i:02d}" for i in range(1, 51)]
    keys_store(
        tmp_path,
        *(make_key(ident, "s-" + ident, "eu-team", ["cowrie.sessions"]) for ident in sensors),
        make_key("hpfeeds-logger", "live-secret", "soc", [], ["cowrie.sessions"]),
        make_key("archive-durable", "durable-secret", "soc", [], ["cowrie.sessions"], durable=True),
    )
    browser.delete_all_cookies()
    with console_broker(tmp_path, "--send-stall-timeout", "120") as console:
        lagging = _authed_socket(console.port, "archive-durable", "durable-secret", rcvbuf=4096)
        clients: dict[str, RawClient] = {}
        try:
            lagging.sendall(encode_subscribe(b"archive-durable", b"cowrie.sessions"))
            wait_until(lambda: durable_of(console, "archive-durable").get("consuming"), what="consuming")
            with sensor(console, "hpfeeds-logger", "live-secret") as collector:
                collector.subscribe("cowrie.sessions")
                for ident in sensors:
                    clients[ident] = RawClient(console.port).auth(ident, "s-" + ident)
                    clients[ident].publish("cowrie.sessions", b"session " + ident.encode())
                clients.pop("cowrie-eu-17").close()  # stopped
                login(browser, console, console.admin_token)
                silent_after(browser, SILENT_S)
                view(browser, "stopped")

                def publishing(check: Any) -> Any:
                    def look(d: Any) -> Any:
                        for client in clients.values():  # the others go on publishing
                            client.publish("cowrie.sessions", b"x" * 1000)
                        while collector.get(0) is not None:  # the live collector keeps up
                            pass
                        return check(d)

                    return look

                wait(browser, publishing(lambda d: idents(d) == ["cowrie-eu-17"]), timeout=30)
                stopped = row_of(browser, "sensors-table", "cowrie-eu-17")
                assert stopped is not None and stopped[2].startswith("silent since ")
                assert by_id(browser, "sensors-count").text == "1 shown, 1 silent"
                browser.save_screenshot(str(screenshots / "sensors-weekend.png"))

                view(browser, "collectors")

                def collectors(d: Any) -> Any:
                    live = row_of(d, "sensors-table", "hpfeeds-logger")
                    behind = row_of(d, "sensors-table", "archive-durable")
                    if not live or not behind or live[10].startswith("0 msgs/s"):
                        return None
                    lag = behind[10].split("connected: ", 1)[-1].split(" msgs not yet acknowledged", 1)[0]
                    return lag.isdigit() and int(lag) > 100 and (live, behind)

                live, behind = wait(browser, publishing(collectors), timeout=30)
                assert " msgs/s, backlog " in behind[10] and "; durable, connected: " in behind[10]
                assert "durable" not in live[10] and "backlog " in live[10]
                browser.save_screenshot(str(screenshots / "collectors.png"))
        finally:
            lagging.close()
            for client in clients.values():
                client.close()
