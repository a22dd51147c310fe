"""After a kick (the console's Disconnect) and after a channel is refused on a
reconnect, the clients go on: against a real broker with its sqlite key store."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpfeeds3.client import AccessDenied, Backoff, BlockingClient, BrokerError, Client, Kicked, Message
from hpfeeds3.client.errors import classify
from tests.client.brokers import BrokerPool
from tests.client.test_reconnect import Gate
from tests.console.conftest import Console, console_broker, wait_until
from tests.support.broker import BROKER_BIN, BrokerProcess, free_port, sqlite_add_key
from tests.support.reference import HOST, reference_broker

TIMEOUT_S = 20.0
FAST = Backoff(initial_s=0.05, max_s=0.2)
A, B = "collector.a", "collector.b"
SENSOR_KEY = {"secret": "s", "pubchans": [A, B], "subchans": []}


def _connection_ids(console: Console, ident: str) -> list[str]:
    rows = console.admin().get("/api/v1/connections").body["connections"]
    return [row["id"] for row in rows if row.get("ident") == ident]


def _kick(console: Console, ident: str) -> None:
    http = console.admin()
    (conn_id,) = wait_until(lambda: _connection_ids(console, ident), what=f"{ident} listed")
    assert http.post("/api/v1/connections/close", {"id": conn_id}).status == 200


@pytest.fixture
def kick_console(tmp_path: Path) -> Iterator[Console]:
    with console_broker(tmp_path) as console:
        sqlite_add_key(console.db, "collector", "collector-secret", [], ["honeypot.events"])
        yield console


def test_a_kicked_asyncio_client_reconnects_and_says_so_once(
    kick_console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    console = kick_console
    caplog.set_level(logging.INFO, "hpfeeds3.client")
    errors: list[BrokerError] = []

    async def scenario() -> None:
        client = Client("127.0.0.1", console.port, "collector", "collector-secret", backoff=FAST)
        sensor = Client("127.0.0.1", console.port, "existing-sensor", "s3cret", backoff=FAST)
        try:
            await client.subscribe("honeypot.events")
            await client.connect()
            await client.wait_ready(0.2)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _kick, console, "collector")
            async with asyncio.timeout(TIMEOUT_S):
                while client.connection_count < 2 or not client.connected:
                    await asyncio.sleep(0.01)
            client.on_error = errors.append  # later ERRORs to the callback, as `hpfeeds subscribe` does
            await sensor.connect()
            assert (await _crossed(sensor, client, "honeypot.events", b"after the kick")).payload == b"after the kick"
        finally:
            await client.close()
            await sensor.close()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "operator" in r.getMessage()]
    assert len(said) == 1, said
    assert "kicked" in said[0] and "reconnecting" in said[0]
    assert errors == []


def test_a_kicked_blocking_client_reconnects(kick_console: Console) -> None:
    console = kick_console
    with BlockingClient("127.0.0.1", console.port, "collector", "collector-secret", backoff=FAST) as client:
        client.subscribe("honeypot.events")
        client.wait_ready(0.2)
        _kick(console, "collector")
        wait_until(lambda: client.client.connection_count >= 2 and client.connected, TIMEOUT_S, "reconnected")
        with BlockingClient("127.0.0.1", console.port, "existing-sensor", "s3cret") as sensor:

            def crossed() -> bool:
                sensor.publish("honeypot.events", "after the kick")
                return client.get(timeout_s=0.2) is not None

            wait_until(crossed, TIMEOUT_S, "a message after the kick")


def test_a_kick_without_reconnect_is_the_fatal_error(kick_console: Console) -> None:
    console = kick_console
    client = BlockingClient("127.0.0.1", console.port, "collector", "collector-secret", reconnect=False)
    try:
        client.connect(timeout_s=5)
        client.subscribe("honeypot.events")
        _kick(console, "collector")
        with pytest.raises(Kicked, match=r"^kicked:"):
            wait_until(lambda: client.get(timeout_s=0.2), TIMEOUT_S, "the kick raised")
    finally:
        client.close()


# --- a channel refused after a reconnect -------------------------------------------------


class SqliteBroker:
    """Our broker on the sqlite key store, restartable on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "keys.db"
        self.port = free_port()
        sqlite_add_key(self.db, "collector", "collector-secret", [], [A, B])
        sqlite_add_key(self.db, "sensor", "sensor-secret", [A, B], [])
        self.proc: BrokerProcess | None = None

    def start(self) -> None:
        args = ["--bind", f"127.0.0.1:{self.port}", "--auth", f"sqlite:{self.db}"]
        self.proc = BrokerProcess(args, cwd=self.dir, port=self.port).wait_ready()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def revoke_subscription(self, ident: str, channel: str) -> None:
        cmd = [BROKER_BIN, "keys", "--auth", f"sqlite:{self.db}", "revoke", ident, "--sub", channel]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Iterator[SqliteBroker]:
    broker = SqliteBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def _crossed(sensor: Client, client: Client, channel: str, payload: bytes) -> Message:
    """Publish ``payload`` until ``client`` receives it (bounded); the message received."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            await sensor.publish(channel, payload)
            try:
                async with asyncio.timeout(0.2):
                    return await client.__anext__()
            except TimeoutError:
                continue


def test_a_channel_refused_after_a_restart_keeps_the_others(
    sqlite_broker: SqliteBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker = sqlite_broker
    caplog.set_level(logging.INFO, "hpfeeds3.client")

    async def scenario() -> None:
        client = Client("127.0.0.1", broker.port, "collector", "collector-secret", backoff=FAST)
        sensor = Client("127.0.0.1", broker.port, "sensor", "sensor-secret", backoff=FAST)
        try:
            await client.subscribe(A, B)
            await client.connect()
            await client.wait_ready(0.2)
            await sensor.connect()
            assert (await _crossed(sensor, client, B, b"b before")).channel == B

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, broker.revoke_subscription, "collector", B)
            await loop.run_in_executor(None, broker.stop)
            await loop.run_in_executor(None, broker.start)
            async with asyncio.timeout(TIMEOUT_S):
                while client.connection_count < 2 or not client.connected:
                    await asyncio.sleep(0.01)
            # The refusal of B is not raised by the iteration: A goes on flowing.
            message = await _crossed(sensor, client, A, b"a after")
            assert (message.channel, message.payload) == (A, b"a after")
            assert client.refused_channels == {B: client.refused_channels[B]}
            assert isinstance(client.refused_channels[B], AccessDenied)
            await client.wait_ready(0.2)  # nothing left to raise
        finally:
            await client.close()
            await sensor.close()

    asyncio.run(scenario())
    said = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(said) == 1 and repr(B) in said[0].getMessage(), [r.getMessage() for r in said]


def test_a_refused_channel_after_a_reconnect_goes_to_on_error(sqlite_broker: SqliteBroker) -> None:
    broker = sqlite_broker
    reported: list[BrokerError] = []
    seen = threading.Event()

    def on_error(err: BrokerError) -> None:
        reported.append(err)
        seen.set()

    client = BlockingClient("127.0.0.1", broker.port, "collector", "collector-secret", backoff=FAST, on_error=on_error)
    try:
        client.subscribe(A, B)
        client.wait_ready(0.2)
        broker.revoke_subscription("collector", B)
        broker.stop()
        broker.start()
        assert seen.wait(TIMEOUT_S)
        (err,) = reported
        assert isinstance(err, AccessDenied) and (err.action, err.channel) == ("subscribe", B)
        with BlockingClient("127.0.0.1", broker.port, "sensor", "sensor-secret") as sensor:

            def crossed() -> bool:
                sensor.publish(A, "a after")
                got = client.get(timeout_s=0.2)
                return got is not None and got.channel == A

            wait_until(crossed, TIMEOUT_S, "A flows after B was refused")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("text", "action", "channel"),
    [
        ("accessfail: collector may not subscribe to channel 'a b'", "subscribe", "a b"),
        ("accessfail: sensor may not publish to channel 'x'", "publish", "x"),
        ("Authkey not allowed to sub here. ident=collector, chan=cowrie.sessions", "subscribe", "cowrie.sessions"),
        ("Authkey not allowed to pub here. ident=s, chan=c", "publish", "c"),
        ("accessfail: something else", None, None),
    ],
)
def test_a_denial_names_its_channel_in_either_brokers_wording(text: str, action: str, channel: str) -> None:
    err = classify(text)
    assert isinstance(err, AccessDenied)
    assert (err.action, err.channel) == (action, channel)


def test_kicked_is_neither_an_authentication_failure_nor_a_denial() -> None:
    err = classify("kicked: disconnected by an operator")
    assert type(err) is Kicked
    assert not isinstance(classify("authfail: access key for x was removed"), Kicked)


def test_the_reference_broker_closing_after_a_refused_channel_keeps_the_others(
    broker_pool: BrokerPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference broker closes after a denial: the client drops that channel and reconnects with the others."""
    caplog.set_level(logging.INFO, "hpfeeds3.client")
    both = {"collector": {"secret": "c", "pubchans": [], "subchans": [A, B]}, "sensor": SENSOR_KEY}
    only_a = {"collector": {"secret": "c", "pubchans": [], "subchans": [A]}, "sensor": SENSOR_KEY}
    before = reference_broker(broker_pool.workdir / "refused-before", both).start()
    after = reference_broker(broker_pool.workdir / "refused-after", only_a).start()

    async def scenario() -> None:
        gate = Gate(before.port)
        await gate.start()
        client = Client(HOST, gate.port, "collector", "c", backoff=FAST)
        try:
            await client.subscribe(A, B)
            await client.connect()
            await client.wait_ready(0.2)
            gate.target_port = after.port  # the key lost B while the client was away
            gate.drop()
            async with asyncio.timeout(TIMEOUT_S):
                while client.subscriptions != [A] or not client.connected:
                    await asyncio.sleep(0.01)
            sensor = Client(HOST, after.port, "sensor", "s", reconnect=False)
            try:
                await sensor.connect()
                message = await _crossed(sensor, client, A, b"a after")
            finally:
                await sensor.close()
            assert (message.channel, message.payload) == (A, b"a after")
        finally:
            await client.close()
            await gate.close()

    try:
        asyncio.run(scenario())
    finally:
        before.stop()
        after.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and repr(B) in r.getMessage()]
    assert any("reconnecting without it" in text for text in said), said
