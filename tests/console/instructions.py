"""What an open console costs a handshake, in instructions: figures a loaded machine does not change.

Not a test: run it by hand (needs valgrind)::

    python -m tests.console.instructions [--handshakes 4000] [--rate 8500]

The broker runs under ``valgrind --tool=callgrind``, counting only while the
load runs (``callgrind_control -i on/off``), three times at once:

- without the console: ``--handshakes`` handshakes as connect-50 makes them
  (50 at a time, one message each), after 500 uncounted;
- with it, the same, its poll held off (the first poll runs, as after the
  start): what a handshake itself costs with the console open;
- with it, no handshake counted (the same 500 first, so the tables hold
  something) but its poll every 2 s and a page reading the Sensors view every
  2 s, as tests/console/cost.py does, for 20 s: what an open console costs per
  2 s whatever the load.

Under valgrind the broker runs some 60 times slower, so a poll every 2 s would
land on 60 times fewer handshakes than it does natively: the two are measured
apart, and the poll's share of a handshake is its cost per 2 s over the
handshakes of 2 s at ``--rate`` (connect-50's rate on the machine the figure is
for; without the console on a quiet machine it made about 8,500 a second).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpfeeds3.bench.cli import CONNECT_CONCURRENCY
from hpfeeds3.bench.handshake import run_connect
from hpfeeds3.bench.wire import Target
from tests.support.broker import BIN, BrokerProcess, free_port, wait_for_port

from .conftest import Http
from .cost import broker_args, workspace

# The broker with its console's poll interval (tracker.POLL_S) as the first argument.
BROKER = (
    "import sys\n"
    "from hpfeeds3.broker.admin import tracker\n"
    "tracker.POLL_S = float(sys.argv.pop(1))\n"
    "from hpfeeds3.broker.cli import main\n"
    "sys.argv[0] = 'hpfeeds-broker'\n"
    "sys.exit(main())\n"
)
WARM = 500
IDLE_S = 20.0


def handshakes(port: int, n: int) -> int:
    """About ``n`` handshakes as connect-50 makes them; returns how many were made."""
    made = 0
    while made < n:
        # run_connect goes on for a duration: short ones until ``n``, at valgrind's pace.
        made += run_connect(Target(port=port), concurrency=CONNECT_CONCURRENCY, duration=2.0)["handshakes"]
    return made


def read_sensors(base: str, token: str, stop: threading.Event, reads: list[int]) -> None:
    """The Sensors view every 2 s, as an open page reads it (on the tick: a read under
    valgrind takes a good part of a second)."""
    client = Http(base, token)
    start = time.monotonic()
    while not stop.is_set():
        assert client.get("/api/v1/sensors").status == 200
        reads[0] += 1
        stop.wait(max(0.0, start + 2.0 * reads[0] - time.monotonic()))


def counted(pid: int, on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)


def run(workdir: Path, name: str, console: bool, poll_s: float, n: int) -> tuple[int, int, int]:
    """(instructions counted, handshakes counted, page reads counted) of one broker under callgrind."""
    port, admin_port = free_port(), free_port()
    out = workdir / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    command = [*valgrind, str(BIN / "python"), "-c", BROKER, str(poll_s)]
    broker = BrokerProcess(
        broker_args(workdir, port, admin_port if console else None), cwd=workdir, port=port, command=command
    )
    stop, reads = threading.Event(), [0]
    try:
        broker.wait_ready(timeout=600)
        handshakes(port, WARM)
        time.sleep(1)
        if n:
            counted(broker.pid, True)
            made = handshakes(port, n)
            time.sleep(1)  # the last closes handled
            counted(broker.pid, False)
        else:
            made = 0
            wait_for_port(admin_port, timeout=60, proc=broker.proc)
            token = (workdir / "admin-token").read_text()
            reader = threading.Thread(target=read_sensors, args=(f"http://127.0.0.1:{admin_port}", token, stop, reads))
            counted(broker.pid, True)
            reader.start()
            time.sleep(IDLE_S)
            stop.set()
            reader.join(60)
            counted(broker.pid, False)
    finally:
        stop.set()
        broker.stop(timeout=120)
    totals = re.search(r"^totals: (\d+)", out.read_text(), re.M)
    assert totals, f"no totals in {out}"
    return int(totals.group(1)), made, reads[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--handshakes", type=int, default=4000)
    p.add_argument("--rate", type=float, default=8500.0, help="connect-50 handshakes/s natively (default %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workspace(Path(tmp))
        with ThreadPoolExecutor(3) as pool:
            off = pool.submit(run, workdir, "without", False, 2.0, args.handshakes)
            on = pool.submit(run, workdir, "with", True, 1e9, args.handshakes)
            idle = pool.submit(run, workdir, "idle", True, 2.0, 0)
            (ir_off, n_off, _), (ir_on, n_on, _), (ir_idle, _, reads) = off.result(), on.result(), idle.result()
    per_off, per_on = ir_off / n_off, ir_on / n_on
    per_2s = ir_idle / (IDLE_S / 2)
    poll_share = per_2s / (2 * args.rate)
    print(f"without the console: {per_off:,.0f} instructions per handshake ({n_off:,} handshakes)")
    print(f"with it, poll held off: {per_on:,.0f} per handshake ({n_on:,}): {per_on / per_off - 1:+.1%}")
    print(f"its poll and a page's read every 2 s: {per_2s:,.0f} per 2 s ({reads} reads in {IDLE_S:g} s)")
    print(
        f"at {args.rate:,.0f} handshakes/s: {poll_share:,.0f} per handshake;"
        f" the console in all: {(per_on - per_off + poll_share) / per_off:+.1%}"
    )


if __name__ == "__main__":
    main()
