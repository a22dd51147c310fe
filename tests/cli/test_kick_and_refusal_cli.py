"""`hpfeeds subscribe` after a kick and after a channel refused on a reconnect:
it says so on stderr and goes on (a real broker, its console and sqlite keys)."""

from __future__ import annotations

import select
import subprocess
import time

from hpfeeds3.client import BlockingClient
from tests.cli.test_cli import HPFEEDS, TIMEOUT_S, Subscriber, _env, _wait_stderr
from tests.client.test_kick_and_refusal import (
    A,
    B,
    SqliteBroker,
    _connection_ids,
    _kick,
    kick_console,
    sqlite_broker,
)
from tests.console.conftest import Console, wait_until

__all__ = ["kick_console", "sqlite_broker"]  # fixtures


def _publish_until_printed(sub: Subscriber, port: int, key: tuple[str, str], channel: str, text: str) -> bytes:
    """Publish ``text`` on ``channel`` until the subscriber prints it (bounded); its line."""
    assert sub.proc.stdout is not None
    deadline = time.monotonic() + TIMEOUT_S
    with BlockingClient("127.0.0.1", port, *key) as sensor:
        while time.monotonic() < deadline:
            assert sub.proc.poll() is None, f"the subscriber exited: {sub.proc.stderr.read()!r}"  # type: ignore[union-attr]
            sensor.publish(channel, text)
            ready, _, _ = select.select([sub.proc.stdout], [], [], 0.2)
            if ready:
                line = sub.proc.stdout.readline()
                if text.encode() in line:
                    return line
    raise AssertionError(f"{text!r} not printed within {TIMEOUT_S} s")


def test_subscribe_comes_back_after_a_kick(kick_console: Console) -> None:
    console = kick_console
    sub = Subscriber(
        [
            "--host",
            "127.0.0.1",
            "-p",
            str(console.port),
            "-i",
            "collector",
            "-s",
            "collector-secret",
            "-c",
            "honeypot.events",
        ]
    )
    try:
        _kick(console, "collector")
        said = _wait_stderr(sub.proc, b"operator")
        assert b"kicked: disconnected by an operator" in said and b"reconnecting" in said
        line = _publish_until_printed(sub, console.port, ("existing-sensor", "s3cret"), "honeypot.events", "back")
        assert line == b"honeypot.events existing-sensor back\n"
    finally:
        sub.proc.kill()
        sub.proc.wait()


def test_subscribe_keeps_the_other_channels_when_one_is_refused_after_a_restart(sqlite_broker: SqliteBroker) -> None:
    broker = sqlite_broker
    sub = Subscriber(
        ["--host", "127.0.0.1", "-p", str(broker.port), "-i", "collector", "-s", "collector-secret", "-c", A, "-c", B]
    )
    try:
        # Subscribed before the restart: B refused on a first connection is fatal (a
        # mistake to report), only a re-subscription after a reconnect is let go.
        _publish_until_printed(sub, broker.port, ("sensor", "sensor-secret"), A, "before the restart")
        broker.revoke_subscription("collector", B)
        broker.stop()
        broker.start()
        said = _wait_stderr(sub.proc, b"refused")
        assert repr(B).encode() in said and b"the other channels go on" in said
        line = _publish_until_printed(sub, broker.port, ("sensor", "sensor-secret"), A, "still flowing")
        assert line == f"{A} sensor still flowing\n".encode()
    finally:
        sub.proc.kill()
        sub.proc.wait()


def test_publish_kicked_exits_3_saying_so(kick_console: Console) -> None:
    console = kick_console
    args = ["--host", "127.0.0.1", "-p", str(console.port), "-i", "existing-sensor", "-s", "s3cret"]
    proc = subprocess.Popen(
        [HPFEEDS, "publish", *args, "-c", "honeypot.events", "--lines"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"one\n")
        proc.stdin.flush()
        _kick(console, "existing-sensor")
        wait_until(lambda: not _connection_ids(console, "existing-sensor"), TIMEOUT_S, "the kick done")
        _, err = proc.communicate(b"two\n", timeout=TIMEOUT_S)
        assert proc.returncode == 3, err
        assert err.count(b"\n") == 1 and b"disconnected by the broker's operator: kicked:" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
