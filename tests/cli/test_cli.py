"""The ``hpfeeds`` command, run as a user runs it, against both brokers."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest
import trustme

from hpfeeds3 import cli
from hpfeeds3.client import Message
from tests.client.brokers import LIMITED, TESTER, cli_args
from tests.support.reference import Broker, free_port, popen_reference_cli, run_reference_cli, stopping

HPFEEDS = str(pathlib.Path(sys.executable).parent / "hpfeeds")
TIMEOUT_S = 30.0
BINARY = bytes(range(256))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPFEEDS_")}
    return {**env, **extra}


def hpfeeds(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [HPFEEDS, *args], input=input, capture_output=True, timeout=TIMEOUT_S, env=env or _env(), check=False
    )


def _wait_stderr(proc: subprocess.Popen[bytes], needle: bytes) -> bytes:
    """Read ``proc``'s stderr until a line holds ``needle`` (bounded)."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + TIMEOUT_S
    while needle not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and proc.poll() is None, f"no {needle!r} on stderr; got {seen!r}"
        ready, _, _ = select.select([proc.stderr], [], [], remaining)
        if ready:
            seen += proc.stderr.readline()
    return seen


class Subscriber:
    """``hpfeeds subscribe -v ...`` in the background, ready once it said so."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        # Unbuffered pipes: the readers select() on the descriptor, then readline(); a
        # buffered pipe's readline() could take two lines from one read and keep the
        # second where select() does not see it (a "refused" line waited out the timeout).
        self.proc = subprocess.Popen(
            [HPFEEDS, "subscribe", "-v", *args],
            bufsize=0,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env or _env(),
        )
        try:
            _wait_stderr(self.proc, b"subscribed to")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> tuple[int, bytes, bytes]:
        """Wait for it to exit (it was given ``-n``); its code, stdout, stderr."""
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, out, err


def test_text_and_binary_round_trip(any_broker: Broker, channel: str, tmp_path: pathlib.Path) -> None:
    sub = Subscriber([*cli_args(any_broker), "-c", channel, "-n", "3"])
    (tmp_path / "binary").write_bytes(BINARY)
    base = [*cli_args(any_broker), "-c", channel, "--wait", "0.1"]
    assert hpfeeds("publish", *base, "hello", "wörld").returncode == 0  # arguments joined by spaces
    assert hpfeeds("publish", *base, "--file", str(tmp_path / "binary")).returncode == 0
    assert hpfeeds("publish", *base, "--file", "-", input=b"line one\nline two").returncode == 0
    code, out, err = sub.output()
    assert code == 0, err
    assert out.decode().splitlines() == [
        f"{channel} tester hello wörld",
        f"{channel} tester base64:{base64.b64encode(BINARY).decode()}",
        f"{channel} tester base64:{base64.b64encode(b'line one' + bytes([10]) + b'line two').decode()}",
    ]


def test_json_output_parses_back(any_broker: Broker, channel: str, tmp_path: pathlib.Path) -> None:
    sub = Subscriber([*cli_args(any_broker), "-c", channel, "-n", "2", "--json"])
    (tmp_path / "binary").write_bytes(BINARY)
    base = [*cli_args(any_broker), "-c", channel, "--wait", "0.1"]
    event = json.dumps({"src_ip": "192.0.2.1", "msg": "héllo\nworld"})
    assert hpfeeds("publish", *base, event).returncode == 0
    assert hpfeeds("sendfile", *base, str(tmp_path / "binary")).returncode == 0  # the reference's action
    code, out, err = sub.output()
    assert code == 0, err
    objs = [json.loads(line) for line in out.decode().splitlines()]
    assert objs == [
        {"channel": channel, "ident": "tester", "payload": event},
        {"channel": channel, "ident": "tester", "payload_b64": base64.b64encode(BINARY).decode()},
    ]
    assert json.loads(objs[0]["payload"])["msg"] == "héllo\nworld"


def test_lines_publishes_ten_thousand_messages_in_order(any_broker: Broker, channel: str) -> None:
    n = 10_000
    sub = Subscriber([*cli_args(any_broker), "-c", channel, "-n", str(n)])
    lines = [f"event {i} {'x' * (i % 50)}" for i in range(n)]
    stdin = ("\r\n".join(lines[:10]) + "\r\n" + "\n".join(lines[10:]) + "\n").encode()  # CRLF too
    result = hpfeeds("publish", *cli_args(any_broker), "-c", channel, "--lines", "--wait", "0.1", input=stdin)
    assert result.returncode == 0, result.stderr
    code, out, err = sub.output()
    assert code == 0, err
    assert out.decode().splitlines() == [f"{channel} tester {line}" for line in lines]


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """``hpfeeds ARGS`` in this process (faster than a subprocess); exit code, stderr lines."""
    code = cli.main(list(args))
    return code, capsys.readouterr().err.splitlines()


def test_wrong_secret_exits_4_with_one_line(
    plain_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = cli_args(plain_broker, (TESTER[0], "wrong"))
    for args in (["publish", *bad, "-c", channel, "x"], ["subscribe", *bad, "-c", channel]):
        code, err = _main(capsys, *args)
        assert code == cli.EXIT_AUTH == 4
        assert len(err) == 1 and err[0].startswith("hpfeeds: authentication failed: ") and "tester" in err[0]


def test_denied_channel_exits_5_with_one_line(
    plain_broker: Broker, channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = cli_args(plain_broker, LIMITED)
    for args in (["publish", *key, "-c", channel, "x"], ["subscribe", *key, "-c", "allowed", "-c", channel]):
        code, err = _main(capsys, *args)
        assert code == cli.EXIT_DENIED == 5
        assert len(err) == 1 and err[0].startswith("hpfeeds: access denied: ") and channel in err[0]
    # A permitted channel is fine.
    assert _main(capsys, "publish", *key, "-c", "allowed", "--wait", "0.1", "x") == (0, [])


def test_connection_refused_exits_3_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = str(free_port())
    code, err = _main(capsys, "publish", "--host", "127.0.0.1", "-p", port, "-i", "a", "-s", "b", "-c", "c", "x")
    assert code == cli.EXIT_CONNECT == 3
    assert err == [f"hpfeeds: cannot connect to 127.0.0.1:{port}: Connection refused"]


def test_untrusted_tls_certificate_exits_3(
    tls_broker: Broker, channel: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other_ca)
    args = [a if a != str(tls_broker.tls_ca) else str(other_ca) for a in cli_args(tls_broker)]
    code, err = _main(capsys, "publish", *args, "-c", channel, "x")
    assert code == 3 and len(err) == 1 and "TLS" in err[0], err


def test_ctrl_c_exits_0_without_traceback(plain_broker: Broker, channel: str) -> None:
    sub = Subscriber([*cli_args(plain_broker), "-c", channel])
    sub.proc.send_signal(signal.SIGINT)
    code, _, err = sub.output()
    assert code == 0 and b"Traceback" not in err, err


def test_credentials_from_environment(plain_broker: Broker, channel: str) -> None:
    env = _env(
        HPFEEDS_HOST=plain_broker.host,
        HPFEEDS_PORT=str(plain_broker.port),
        HPFEEDS_IDENT=TESTER[0],
        HPFEEDS_SECRET=TESTER[1],
    )
    sub = Subscriber(["-c", channel, "-n", "1"], env=env)
    assert hpfeeds("publish", "-c", channel, "--wait", "0.1", "from env", env=env).returncode == 0
    code, out, _ = sub.output()
    assert (code, out) == (0, f"{channel} tester from env\n".encode())
    missing = hpfeeds("publish", "-c", channel, "x", env=_env(HPFEEDS_IDENT="tester"))
    assert missing.returncode == 2 and b"HPFEEDS_SECRET" in missing.stderr


def test_reference_cli_publishes_to_our_subscriber(plain_broker: Broker, channel: str) -> None:
    sub = Subscriber([*cli_args(plain_broker), "-c", channel, "-n", "1"])
    result = run_reference_cli(["publish", *cli_args(plain_broker), "-c", channel, "from", "reference"])
    assert result.returncode == 0, result
    code, out, _ = sub.output()
    assert (code, out) == (0, f"{channel} tester from reference\n".encode())


def test_our_publish_reaches_the_reference_cli_subscriber(plain_broker: Broker, channel: str) -> None:
    ref = popen_reference_cli(["subscribe", *cli_args(plain_broker), "-c", channel])
    with stopping(ref):
        assert ref.stdout is not None
        seen = b""
        deadline = time.monotonic() + TIMEOUT_S
        # Publish until it shows up: the reference prints nothing once subscribed.
        while b"hello reference" not in seen:
            assert time.monotonic() < deadline and ref.poll() is None, seen
            assert (
                hpfeeds("publish", *cli_args(plain_broker), "-c", channel, "--wait", "0", "hello reference").returncode
                == 0
            )
            if select.select([ref.stdout], [], [], 0.2)[0]:
                seen += os.read(ref.stdout.fileno(), 65536)
    assert f"publish to {channel} by tester".encode() in seen


def test_help_documents_exit_codes_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for text in ("exit status", "authentication failed", "access denied", "cannot connect", "HPFEEDS_SECRET"):
        assert text in out


@pytest.mark.parametrize(
    "args",
    [["-c", "c"], ["-c", "c", "--lines", "x"], ["x"]],
    ids=["no-payload", "payload-and-lines", "no-channel"],
)
def test_publish_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["publish", "-i", "a", "-s", "b", *args])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("payload", "line"),
    [
        (b"plain text\twith tab", "c i plain text\twith tab"),
        (b"\xff\xfe", "c i base64://4="),
        (b"bell\x07", "c i base64:YmVsbAc="),
        (b"", "c i "),
        (b"base64:abc", "c i base64:YmFzZTY0OmFiYw=="),
    ],
)
def test_text_format_rule(payload: bytes, line: str) -> None:
    assert cli.format_line(Message("i", "c", payload)) == (line + "\n").encode()


def test_json_format_keeps_non_utf8_names_valid() -> None:
    raw = cli.format_json(Message("i", "c\udcff", b"\xff"))
    assert json.loads(raw) == {"channel": "c\udcff", "ident": "i", "payload_b64": "/w=="}
    raw.decode("utf-8")  # the line itself is valid UTF-8


def test_reader_closing_the_pipe_ends_subscribe_with_0(plain_broker: Broker, channel: str) -> None:
    sub = Subscriber([*cli_args(plain_broker), "-c", channel])  # as in `hpfeeds subscribe ... | head -1`
    assert sub.proc.stdout is not None
    base = [*cli_args(plain_broker), "-c", channel, "--wait", "0"]
    assert hpfeeds("publish", *base, "first").returncode == 0
    assert sub.proc.stdout.readline() == f"{channel} tester first\n".encode()
    sub.proc.stdout.close()
    assert hpfeeds("publish", *base, "second").returncode == 0
    code, _, err = sub.output()
    assert code == 0 and b"Traceback" not in err and b"Exception ignored" not in err, err
