"""One redaction helper for every DSN and URL the broker shows."""

from __future__ import annotations

import pytest

from hpfeeds3.broker.redact import redact_url, redact_urls, scrub


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db:5432/hpfeeds", "postgresql://u:***@db:5432/hpfeeds"),
        ("postgres://u:p%40ss@db/hpfeeds", "postgres://u:***@db/hpfeeds"),
        ("postgresql://u:a@b@db/x", "postgresql://u:***@db/x"),
        (
            "postgresql://db/x?user=u&password=pw&sslmode=require",
            "postgresql://db/x?user=u&password=***&sslmode=require",
        ),
        ("postgresql://db/x?sslpassword=k&Token=t&host=/tmp", "postgresql://db/x?sslpassword=***&Token=***&host=/tmp"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("nats://user:pw@[::1]:4222", "nats://user:***@[::1]:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://***@nats:4222"),
        ("tls://tok@nats:4222", "tls://***@nats:4222"),
        ("nats://nats:4222", "nats://nats:4222"),
        ("sqlite:keys.db", "sqlite:keys.db"),
        ("postgresql://u:pw@[::1/x", "postgresql://***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_takes_a_comma_separated_list() -> None:
    assert redact_urls("nats://a:1@h1:4222, nats://h2:4222") == "nats://a:***@h1:4222,nats://h2:4222"


def test_scrub_masks_the_url_and_its_credentials_in_any_text() -> None:
    dsn = "postgresql://u:p%40ss@db/x?password=other"
    text = f"cannot connect to {dsn}: password 'p@ss' or 'other' rejected"
    assert (
        scrub(text, dsn) == "cannot connect to postgresql://u:***@db/x?password=***: password '***' or '***' rejected"
    )
