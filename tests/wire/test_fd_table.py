"""The descriptor table is sized for the connection cap before the broker serves.

The kernel grows a process's descriptor table by doubling as descriptors are
opened, and in a process with several threads (the broker's log writer, the
durable log) each growth waits for an RCU grace period inside ``accept()``:
in a reconnect storm of 10,000 sensors the loop stood still in
``synchronize_rcu`` (``expand_files``, from ``accept4``) for about 5 % of the
storm. The table never shrinks, so the broker grows it once, at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import launch_broker

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")


def fd_table_size(pid: int | str) -> int:
    """Descriptors the process's table holds now (``FDSize`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError("no FDSize in /proc/PID/status")


def run_python(code: str) -> str:
    """``code`` in a new interpreter (its descriptor table as small as a new process's); its output."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_serving_broker_holds_a_table_for_every_connection_it_may_accept(tmp_path: Path) -> None:
    broker = launch_broker(tmp_path, "--auth", "env", "--max-connections", "5000")
    try:
        assert fd_table_size(broker.pid) >= 5000
        open_now = len(os.listdir(f"/proc/{broker.pid}/fd"))
        assert open_now < 100  # grown, not filled: the descriptor used to grow it is closed
    finally:
        broker.stop()


def test_presize_grows_the_table_and_leaves_no_descriptor_open() -> None:
    code = (
        "import os\n"
        "from hpfeeds3.broker.fdtable import presize_fd_table\n"
        "from tests.wire.test_fd_table import fd_table_size\n"
        "before = sorted(os.listdir('/proc/self/fd'))\n"
        "small = fd_table_size('self')\n"
        "presize_fd_table(20_000)\n"
        "after = sorted(os.listdir('/proc/self/fd'))\n"
        "print(small, fd_table_size('self'), before == after)\n"
    )
    small, grown, same = run_python(code).split()
    assert int(small) < 20_000 <= int(grown)
    assert same == "True"


def test_presize_stops_at_the_open_files_limit() -> None:
    """Asked for more than the limit allows, it grows as far as it may and does not fail."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (3000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from hpfeeds3.broker.fdtable import presize_fd_table\n"
        "from tests.wire.test_fd_table import fd_table_size\n"
        "presize_fd_table(1_000_000)\n"
        "print(fd_table_size('self'))\n"
    )
    assert 3000 <= int(run_python(code)) < 1_000_000
