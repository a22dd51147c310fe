"""``hpfeeds publish`` reading a terminal, as a person types at it: Ctrl-C ends
the command at once (exit 130, no traceback), whether or not Ctrl-D came."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.client.brokers import cli_args
from tests.support.reference import Broker
from tests.support.terminal import CTRL_C, Terminal

from .test_cli import HPFEEDS, Subscriber, _env

EXIT_PROMPTLY_S = 10.0  # far above the few milliseconds it takes; only a hang fails it
CONNECT_TIMEOUT_S = 30.0


def wait_connected(pid: int, port: int) -> None:
    """Until ``pid`` holds a connection to ``port``: it is past start-up (its Ctrl-C handling is in place)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    process = psutil.Process(pid)
    while not any(c.raddr and c.raddr.port == port and c.status == "ESTABLISHED" for c in process.net_connections()):
        assert time.monotonic() < deadline, f"publish did not connect to port {port} in {CONNECT_TIMEOUT_S} s"
        time.sleep(0.02)


@pytest.mark.parametrize("how", [["--lines"], ["--lines", "--file", "-"], ["--file", "-"]], ids=" ".join)
def test_ctrl_c_at_a_terminal_ends_publish_promptly_without_a_traceback(
    plain_broker: Broker, channel: str, how: list[str]
) -> None:
    lines = "--lines" in how
    sub = Subscriber([*cli_args(plain_broker), "-c", channel, "-n", "1"]) if lines else None
    argv = [HPFEEDS, "publish", *cli_args(plain_broker), "-c", channel, *how]
    with Terminal(argv, env=_env()) as terminal:
        wait_connected(terminal.proc.pid, plain_broker.port)
        if sub is not None:
            # A line typed is published at once: the command is reading the terminal.
            terminal.type(b"typed at a terminal\n")
            sub_code, out, sub_err = sub.output()
            assert (sub_code, out) == (0, f"{channel} tester typed at a terminal\n".encode()), sub_err
        else:
            terminal.type(b"half a message")
            terminal.read_until(b"half a message")
        terminal.type(CTRL_C)
        code, err = terminal.wait(EXIT_PROMPTLY_S)
        assert code is not None, f"publish {' '.join(how)} ignored Ctrl-C for {EXIT_PROMPTLY_S} s"
        assert code == 130, err
        assert "Traceback" not in err and "Fatal Python error" not in err, err
