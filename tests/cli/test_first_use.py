"""The ``hpfeeds`` command's first-use traps: versions, help, TLS on the wrong
port, names that do not resolve, a refused login with ``--wait 0``, a
certificate for a host name reached by IP, a revoked key."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
import trustme

from hpfeeds3 import __version__, cli
from hpfeeds3.client import AuthenticationFailed, Client
from tests.client.brokers import TESTER, USERS, cli_args
from tests.support.reference import Broker, our_broker

from .test_cli import Subscriber, _env, _main, hpfeeds

BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize("command", ["hpfeeds", "hpfeeds-broker", "hpfeeds-bench"])
def test_version_exits_0(command: str) -> None:
    result = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command} {__version__}"


def test_subcommand_help_points_to_the_main_help_instead_of_repeating_it(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("publish", "subscribe", "sendfile"):
        with pytest.raises(SystemExit) as exited:
            cli.main([action, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert "exit status:\n" not in out and "subscribe output:" not in out, out
        assert out.rstrip().endswith("hpfeeds --help"), out
        assert "(default 10 s)" in out, "durations carry their unit"


def test_unresolvable_host_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(capsys, "publish", "--host", "no-such-host.invalid", "-i", "a", "-s", "b", "-c", "c", "x")
    assert code == cli.EXIT_CONNECT
    assert len(err) == 1 and "cannot resolve 'no-such-host.invalid'" in err[0], err
    assert "Unknown error" not in err[0]


def test_failed_login_with_wait_0_exits_4(
    plain_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = cli_args(plain_broker, (TESTER[0], "wrong"))
    code, err = _main(capsys, "publish", *bad, "-c", channel, "--wait", "0", "x")
    assert code == cli.EXIT_AUTH, err
    assert len(err) == 1 and err[0].startswith("hpfeeds: authentication failed: "), err


def test_publish_with_wait_0_still_succeeds(
    plain_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(capsys, "publish", *cli_args(plain_broker), "-c", channel, "--wait", "0", "x") == (0, [])


def test_plain_client_on_a_tls_port_gets_a_one_line_hint(
    tls_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for a in cli_args(tls_broker) if a not in ("--tlscert", str(tls_broker.tls_ca))]
    code, err = _main(capsys, "publish", *args, "--timeout", "2", "-c", channel, "x")
    assert code == cli.EXIT_CONNECT
    assert len(err) == 1 and err[0].endswith("is this a TLS port? try --tls"), err


def test_tls_client_on_a_plain_port_gets_a_one_line_hint(
    plain_broker: Broker, tls_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*cli_args(plain_broker), "--tlscert", str(tls_broker.tls_ca)]
    code, err = _main(capsys, "publish", *args, "-c", channel, "x")
    assert code == cli.EXIT_CONNECT
    assert len(err) == 1 and "TLS" in err[0] and err[0].endswith("try without --tls"), err


@pytest.fixture(scope="module")
def named_tls_broker(tmp_path_factory: pytest.TempPathFactory):
    """Our broker with a certificate for a host name only (no IP in it), reached on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("named-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("hpfeeds.example.org")
    files = (folder / "chain.pem", folder / "key.pem", folder / "ca.pem")
    files[0].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(files[1])
    ca.cert_pem.write_to_path(files[2])
    broker = our_broker(folder / "broker", USERS, files).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_tls_server_name_checks_the_certificate_against_that_name(
    named_tls_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*cli_args(named_tls_broker), "-c", "chan0", "--wait", "0.1"]
    code, err = _main(capsys, "publish", *args, "x")
    assert code == cli.EXIT_CONNECT and len(err) == 1 and "TLS" in err[0], err  # 127.0.0.1 is not in it
    assert _main(capsys, "publish", *args, "--tls-server-name", "hpfeeds.example.org", "x") == (0, [])
    code, err = _main(capsys, "publish", *args, "--tls-server-name", "other.example.org", "x")
    assert code == cli.EXIT_CONNECT and "other.example.org" in err[0], err


def test_revoked_subscriber_prints_one_error_line(tmp_path: pathlib.Path) -> None:
    key = ("revokable", "revokable-secret")
    users = {**USERS, key[0]: {"secret": key[1], "pubchans": [], "subchans": ["chan0"]}}
    broker = our_broker(tmp_path / "broker", users).start()
    try:
        subscriber = Subscriber([*cli_args(broker, key), "-c", "chan0"], env=_env())
        store = tmp_path / "broker" / "hpfeeds3-users.json"
        store.write_text(json.dumps({k: v for k, v in json.loads(store.read_text()).items() if k != key[0]}))
        code, _, err = subscriber.output()
    finally:
        broker.stop()
    lines = [line for line in err.decode().splitlines() if not line.startswith("hpfeeds: subscribed to")]
    assert code == cli.EXIT_AUTH, err
    assert len(lines) == 1 and "revokable" in lines[0], lines


def test_python_client_raises_the_broker_error_without_also_logging_it(
    plain_broker: Broker, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    async def scenario() -> None:
        client = Client(plain_broker.host, plain_broker.port, TESTER[0], "wrong", reconnect=False)
        try:
            await client.connect()
            with pytest.raises(AuthenticationFailed):
                await client.wait_ready(2.0)
        finally:
            await client.close()

    with caplog.at_level(logging.INFO, logger="hpfeeds3.client"):
        asyncio.run(scenario())
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def test_publish_help_names_its_units() -> None:
    out = " ".join(hpfeeds("publish", "--help").stdout.decode().split())
    assert "--wait SECONDS" in out and "(default 0.5 s)" in out and "--timeout SECONDS" in out


@pytest.mark.parametrize("action", ["publish", "subscribe"])
def test_empty_secret_is_a_usage_error_naming_the_shell(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `-s "$SENSOR_SECRET"` in a shell where the variable was never set: say so,
    # rather than send the empty secret and report "authentication failed".
    # No broker is needed: nothing may be sent.
    payload = ["x"] if action == "publish" else []
    with pytest.raises(SystemExit) as exited:
        cli.main([action, "-p", "1", "-i", "sensor1", "-s", "", "-c", "c", *payload])
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "secret is empty" in err and "this shell" in err, err


def test_subscriber_without_v_says_once_that_it_reconnects(tmp_path: pathlib.Path) -> None:
    import select
    import signal
    import time

    broker = our_broker(tmp_path / "broker", USERS).start()
    proc = subprocess.Popen(
        [str(BIN / "hpfeeds"), "subscribe", *cli_args(broker), "-c", "chan1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        # Subscribed once a message published now comes through (nothing is said without -v).
        deadline = time.monotonic() + 30
        assert proc.stdout is not None and proc.stderr is not None
        while not select.select([proc.stdout], [], [], 0.2)[0]:
            assert time.monotonic() < deadline and proc.poll() is None, os.read(proc.stderr.fileno(), 65536)
            hpfeeds("publish", *cli_args(broker), "-c", "chan1", "--wait", "0", "ping")
        broker.stop()
        said = b""
        while b"reconnecting" not in said:
            assert time.monotonic() < deadline + 30 and proc.poll() is None, said
            if select.select([proc.stderr], [], [], 0.5)[0]:
                said += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        broker.stop()
    lines = (said + rest).decode().splitlines()
    assert proc.returncode == 0, lines
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"hpfeeds: connection to {broker.host}:{broker.port} lost \(.*\); reconnecting", lines[0])


def test_a_lost_connection_names_the_address_once() -> None:
    from hpfeeds3.client import ConnectionLost

    opts = cli.Options("127.0.0.1", 10000, "i", "s", ("c",), False, None, None, 1.0, False)
    lost = cli._failure(ConnectionLost("connection to 127.0.0.1:10000 lost: reset by peer"), opts)
    assert (lost.code, str(lost)) == (cli.EXIT_CONNECT, "connection to 127.0.0.1:10000 lost: reset by peer")
    other = cli._failure(ConnectionLost("the broker closed the connection"), opts)
    assert str(other) == "127.0.0.1:10000: the broker closed the connection"
