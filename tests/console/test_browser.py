"""The console in a real headless Chromium: log in, manage keys, watch live sensors, roles, hostile text.

Screenshots of every page are saved by these tests (into docs/console/ with
``CONSOLE_SCREENSHOTS=1``; see docs/console.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import Console, console_broker, fail_auth, publish, sensor

XSS_IDENT = 'sensor<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
XSS_CHANNEL = 'chan<img src=x onerror="window.pwned=3">'
XSS_PAYLOAD = '<script>window.pwned=4</script><img src=x onerror="window.pwned=5">'


@pytest.fixture
def console(tmp_path: Path, browser: Any) -> Iterator[Console]:
    with console_broker(tmp_path) as c:
        browser.delete_all_cookies()
        yield c


def wait(browser: Any, check: Callable[[Any], Any], timeout: float = 15.0) -> Any:
    def safe(d: Any) -> Any:
        try:
            return check(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(safe)


def by_id(browser: Any, name: str) -> Any:
    return browser.find_element(By.ID, name)


def login(browser: Any, console: Console, token: str) -> None:
    browser.get(console.base + "/")
    wait(browser, lambda d: by_id(d, "login-view").is_displayed())
    by_id(browser, "login-token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(browser, lambda d: by_id(d, "app").is_displayed())


def tab(browser: Any, name: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'nav button[data-tab="{name}"]').click()
    wait(browser, lambda d: by_id(d, f"tab-{name}").is_displayed())


def rows(browser: Any, table: str) -> list[list[str]]:
    out = []
    for tr in browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
        out.append([td.text for td in tr.find_elements(By.TAG_NAME, "td")])
    return out


def idents(browser: Any) -> list[str]:
    """The Sensors table's idents, top to bottom."""
    return [tr.get_attribute("data-ident") for tr in browser.find_elements(By.CSS_SELECTOR, "#sensors-table tbody tr")]


def row_of(browser: Any, table: str, first: str) -> list[str] | None:
    return next((r for r in rows(browser, table) if r and r[0].removeprefix("silent ") == first), None)


def click_in_row(browser: Any, table: str, first: str, index: int = 0, label: str = "") -> None:
    """Click the ``index``-th button (whose text starts with ``label``) of the row starting with ``first``.

    Rows are rebuilt by every refresh: find and click in one go, again if the row was replaced."""

    def go(d: Any) -> bool:
        for tr in d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
            tds = tr.find_elements(By.TAG_NAME, "td")
            if tds and tds[0].text.removeprefix("silent ") == first:
                buttons = tr.find_elements(By.TAG_NAME, "button")
                if buttons[index].text.startswith(label):
                    buttons[index].click()
                    return True
        return False

    wait(browser, go)


def view(browser: Any, name: str) -> None:
    """One of the Sensors tab's views (stopped, sensors, collectors, never, all)."""
    browser.find_element(By.CSS_SELECTOR, f'#sensor-views button[data-view="{name}"]').click()
    wait(
        browser,
        lambda d: (
            "active"
            in by_id(d, "sensor-views").find_element(By.CSS_SELECTOR, f'[data-view="{name}"]').get_attribute("class")
        ),
    )


def fill(browser: Any, field: str, text: str) -> None:
    e = by_id(browser, field)
    e.clear()
    e.send_keys(text)


def test_admin_adds_a_key_watches_the_sensor_revokes_and_removes(
    browser: Any, console: Console, screenshots: Path
) -> None:
    browser.get(console.base + "/")
    wait(browser, lambda d: by_id(d, "login-view").is_displayed())
    browser.save_screenshot(str(screenshots / "login.png"))
    login(browser, console, console.admin_token)
    assert by_id(browser, "who").text == "alice (admin)"

    # Add a key: the secret is shown once.
    tab(browser, "keys")
    fill(browser, "new-ident", "sensor-7")
    fill(browser, "new-owner", "ops")
    fill(browser, "new-pub", "cowrie.sessions")
    fill(browser, "new-sub", "cowrie.sessions")
    browser.find_element(By.CSS_SELECTOR, "#key-create-form button").click()
    wait(browser, lambda d: by_id(d, "secret-box").is_displayed())
    secret = by_id(browser, "secret-value").text
    assert by_id(browser, "secret-ident").text == "sensor-7" and len(secret) >= 24
    wait(browser, lambda d: row_of(d, "keys-table", "sensor-7"))
    browser.save_screenshot(str(screenshots / "keys.png"))
    by_id(browser, "secret-dismiss").click()
    assert not by_id(browser, "secret-box").is_displayed()
    browser.refresh()
    wait(browser, lambda d: by_id(d, "app").is_displayed())
    assert secret not in browser.page_source

    with sensor(console, "sensor-7", secret) as client:
        client.subscribe("cowrie.sessions")
        publish(client, "cowrie.sessions", *(f'{{"session": {i}}}' for i in range(3)))

        # The sensor appears, connected, with its count rising.
        tab(browser, "sensors")
        view(browser, "all")
        first = wait(browser, lambda d: (r := row_of(d, "sensors-table", "sensor-7")) and int(r[6]) >= 3 and r)
        assert first[3] == "1"
        publish(client, "cowrie.sessions", *(f'{{"session": {i}}}' for i in range(3, 10)))
        wait(browser, lambda d: int(row_of(d, "sensors-table", "sensor-7")[6]) == 10)  # type: ignore[index]
        never = row_of(browser, "sensors-table", "existing-sensor")
        assert never is not None and never[2] == "never used"
        assert by_id(browser, "sensors-table").find_element(By.CSS_SELECTOR, "tr.never").get_attribute(
            "data-ident"
        ) == ("existing-sensor")
        # Sorted by the server: Connected, then again for descending; the arrow says which.
        for _ in range(2):
            browser.find_element(By.CSS_SELECTOR, '#sensors-table th[data-sort="connected"]').click()
        wait(browser, lambda d: idents(d) == ["sensor-7", "existing-sensor"])
        arrow = browser.find_element(By.CSS_SELECTOR, '#sensors-table th[data-sort="connected"]')
        wait(browser, lambda d: "desc" in arrow.get_attribute("class"))
        browser.save_screenshot(str(screenshots / "sensors.png"))
        view(browser, "never")
        wait(browser, lambda d: idents(d) == ["existing-sensor"])
        view(browser, "sensors")
        wait(browser, lambda d: idents(d) == ["sensor-7"])
        view(browser, "all")
        fill(browser, "sensors-filter", "SENSOR-7")  # case-insensitive
        wait(browser, lambda d: idents(d) == ["sensor-7"])
        by_id(browser, "sensors-filter").clear()

        tab(browser, "connections")
        conn = wait(browser, lambda d: next((r for r in rows(d, "connections-table") if r[1] == "sensor-7"), None))
        assert conn[5] == "cowrie.sessions" and conn[4] == "no"
        browser.save_screenshot(str(screenshots / "connections.png"))

        tab(browser, "channels")
        wait(browser, lambda d: row_of(d, "channels-table", "cowrie.sessions"))
        browser.save_screenshot(str(screenshots / "channels.png"))
        # Watch the channel's latest messages.
        click_in_row(browser, "channels-table", "cowrie.sessions")
        wait(browser, lambda d: by_id(d, "tab-watch").is_displayed())
        publish(client, "cowrie.sessions", '{"session": "watched"}')
        wait(browser, lambda d: any('"watched"' in r[3] for r in rows(d, "watch-table")))
        browser.save_screenshot(str(screenshots / "watch.png"))

        # Revoke the subscription: it goes from the live connection.
        tab(browser, "keys")
        fill(browser, "chg-ident", "sensor-7")
        fill(browser, "chg-sub", "cowrie.sessions")
        by_id(browser, "chg-revoke").click()
        wait(browser, lambda d: row_of(d, "keys-table", "sensor-7")[3] == "")  # type: ignore[index]
        tab(browser, "connections")
        wait(browser, lambda d: next(r for r in rows(d, "connections-table") if r[1] == "sensor-7")[5] == "")

        # Remove the key (two clicks): the connection is closed.
        tab(browser, "keys")
        click_in_row(browser, "keys-table", "sensor-7", 2, "Remove")
        click_in_row(browser, "keys-table", "sensor-7", 2, "Really")
        wait(browser, lambda d: row_of(d, "keys-table", "sensor-7") is None)
        tab(browser, "connections")
        wait(browser, lambda d: all(r[1] != "sensor-7" for r in rows(d, "connections-table")))

        fail_auth(console, "sensor-7")
        tab(browser, "events")
        wait(browser, lambda d: any(r[1] == "revoked" and r[4] == "revoked" for r in rows(d, "events-table")))
        wait(browser, lambda d: row_of(d, "failed-by-ident", "sensor-7") == ["sensor-7", "1"])
        browser.save_screenshot(str(screenshots / "events.png"))


def test_viewer_sees_but_cannot_change(browser: Any, console: Console) -> None:
    login(browser, console, console.viewer_token)
    assert by_id(browser, "who").text == "grafana (viewer)"
    tab(browser, "keys")
    wait(browser, lambda d: row_of(d, "keys-table", "existing-sensor"))
    for form in ("key-create-form", "key-channels-form", "watch-form", "tab-watch"):
        assert browser.find_elements(By.ID, form) == [], form
    assert browser.find_elements(By.CSS_SELECTOR, "#keys-table button, nav button[data-tab=watch]") == []
    tab(browser, "connections")
    with sensor(console, "existing-sensor", "s3cret"):  # a connection an admin could close
        wait(browser, lambda d: any(r[1] == "existing-sensor" for r in rows(d, "connections-table")))
        assert browser.find_elements(By.CSS_SELECTOR, "#connections-table button") == []
    # The page's own session cannot change anything either: the API says 403.
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/api/v1/session").then(r => r.json()).then(s =>
          fetch("/api/v1/keys/remove", {method: "POST", headers: {"Content-Type": "application/json",
            "X-CSRF-Token": s.csrf}, body: JSON.stringify({ident: "existing-sensor"})}))
          .then(r => done(r.status));
        """
    )
    assert status == 403
    assert console.client(console.viewer_token).get("/api/v1/keys").body["keys"][0]["ident"] == "existing-sensor"


def test_hostile_ident_channel_and_payload_render_inert(browser: Any, console: Console) -> None:
    api = console.client(console.admin_token)
    secret = api.post("/api/v1/keys", {"ident": XSS_IDENT, "owner": XSS_PAYLOAD, "pubchans": [XSS_CHANNEL]}).body[
        "secret"
    ]
    fail_auth(console, XSS_IDENT)
    login(browser, console, console.admin_token)
    with sensor(console, XSS_IDENT, secret) as client:
        publish(client, XSS_CHANNEL, XSS_PAYLOAD)
        tab(browser, "sensors")
        view(browser, "all")
        wait(browser, lambda d: row_of(d, "sensors-table", XSS_IDENT))
        tab(browser, "connections")
        wait(browser, lambda d: any(r[1] == XSS_IDENT and XSS_CHANNEL in r[6] for r in rows(d, "connections-table")))
        tab(browser, "keys")
        wait(browser, lambda d: (r := row_of(d, "keys-table", XSS_IDENT)) and r[1] == XSS_PAYLOAD)
        tab(browser, "events")
        wait(browser, lambda d: any(r[3] == XSS_IDENT for r in rows(d, "events-table")))
        tab(browser, "channels")
        wait(browser, lambda d: row_of(d, "channels-table", XSS_CHANNEL))
        tab(browser, "watch")
        fill(browser, "watch-channel", XSS_CHANNEL)
        browser.find_element(By.CSS_SELECTOR, "#watch-form button[type=submit]").click()

        def watched() -> bool:
            return any(
                c["watched"] for c in api.get("/api/v1/channels").body["channels"] if c["channel"] == XSS_CHANNEL
            )

        wait(browser, lambda d: watched())
        publish(client, XSS_CHANNEL, XSS_PAYLOAD)
        wait(browser, lambda d: any(r[3] == XSS_PAYLOAD and r[1] == XSS_IDENT for r in rows(d, "watch-table")))
    # Shown as text everywhere; nothing ran, no element was made from it.
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, "main script, td script") == []
    # The only images are the broker's own charts.
    charts = console.base + "/api/v1/chart?"
    images = browser.find_elements(By.CSS_SELECTOR, "main img, td img")
    assert all(i.get_attribute("class") == "spark" and i.get_attribute("src").startswith(charts) for i in images)
    assert "&lt;script&gt;" in browser.page_source
