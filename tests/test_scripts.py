"""The repository's scripts outside the package run: benchmarks/compare and the
atheris target in fuzz/ (ruff and mypy check them too, in tests/test_lint.py)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_benchmarks_compare_appends_a_run_and_keeps_the_earlier_ones(tmp_path: Path) -> None:
    loader = importlib.machinery.SourceFileLoader("bench_compare", str(ROOT / "benchmarks" / "compare"))
    spec = importlib.util.spec_from_loader("bench_compare", loader)
    assert spec is not None
    compare = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = compare  # its dataclasses look their module up
    try:
        loader.exec_module(compare)
    finally:
        del sys.modules["bench_compare"]
    results = tmp_path / "RESULTS.md"
    compare.append_section(results, "## first run\n\n| a | 1 |\n")
    compare.append_section(results, "## second run\n\n| a | 2 |\n")
    assert results.read_text() == "# Benchmark results\n\n## first run\n\n| a | 1 |\n\n## second run\n\n| a | 2 |\n"


def test_benchmarks_compare_help() -> None:
    r = run("benchmarks/compare", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: compare ")
    for option in ("--brokers", "--repeats", "--smoke", "--tls"):
        assert option in r.stdout


def test_benchmarks_compare_smoke_run_reports_the_machine_steadiness() -> None:
    # End to end against our broker (seconds): the section has the run's row, and how
    # steady the machine was before and after, for each core.
    r = run(
        "benchmarks/compare", "pubsub-100", "--brokers", "ours", "--repeats", "1", "--smoke", "--duration", "0.5",
        "--no-write", timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "| pubsub-100 | msg/s | " in r.stdout, r.stdout
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("- Machine steadiness ")]
    before, _, after = line.partition("; after ")
    for part in (before, after):
        assert part.count(" spread ") == len(os.sched_getaffinity(0)), line


def test_fuzz_decoder_target_runs_clean() -> None:
    """A short, seeded atheris run: a crash (any exception but ProtocolError, or
    the decoder holding more than a frame and a read) exits non-zero."""
    r = run("fuzz/fuzz_decoder.py", "-atheris_runs=20000", "-max_len=70000", "-seed=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 20000 in " in r.stderr, r.stderr[-3000:]


def test_benchmarks_decoder_instructions_times_a_run() -> None:
    args = ("--no-callgrind", "--feeds", "2", "--frames", "50", "--payloads", "varied")
    r = run("benchmarks/decoder_instructions.py", *args)
    assert r.returncode == 0, r.stderr
    assert "varied payloads, 50 frames a read: " in r.stdout and " ns a frame" in r.stdout


def test_benchmarks_handshake_instructions_serves_every_sensor() -> None:
    # Every variant serves each sensor its message back (the script exits otherwise).
    r = run("benchmarks/handshake_instructions.py", "--connections", "40", "--rounds", "2", "--no-callgrind")
    assert r.returncode == 0, r.stderr[-3000:]
    for variant in ("ours", "ours, no events", "ceiling"):
        line = next(line for line in r.stdout.splitlines() if line.startswith(f"  {variant} "))
        assert " served " in line and " closed " in line and " µs (" in line, line


def test_benchmarks_durable_instructions_delivers_every_message() -> None:
    # The durable subscriber is fed from the log, the plain one by the router: both get
    # every byte published (the script exits otherwise).
    r = run("benchmarks/durable_instructions.py", "--reads", "10", "--frames", "50", "--rounds", "1", "--no-callgrind")
    assert r.returncode == 0, r.stderr[-3000:]
    for variant in ("plain", "durable"):
        line = next(line for line in r.stdout.splitlines() if line.startswith(f"  {variant} "))
        assert line.rstrip().endswith(")") and " ns (" in line, line


def test_benchmarks_storage_floor_stores_and_reports(tmp_path: Path) -> None:
    r = run("benchmarks/storage_floor.py", "--mib", "20", "--repeats", "2", "--settle", "0", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("repeat ") == 2 and "20 MiB in " in r.stdout, r.stdout
    assert "median of 2, 120-byte messages: process CPU " in r.stdout, r.stdout
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_benchmarks_loop_states_samples_a_busy_process() -> None:
    if not Path("/proc/self/wchan").exists():
        pytest.skip("reads /proc (Linux)")
    # Busy for a moment, then asleep: the window is the busy part, running.
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass"])
    try:
        r = run("benchmarks/loop_states.py", str(busy.pid), "--seconds", "1")
    finally:
        busy.wait(10)
    assert r.returncode == 0, r.stderr
    assert "busy from " in r.stdout and " R -" in r.stdout, r.stdout


def test_benchmarks_turn_later_runs_every_variant() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads /proc (Linux)")
    r = run("benchmarks/turn_later.py", "--rounds", "1", "--duration", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import turn_later
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert len(turn_later.VARIANTS) == 10
    for variant in turn_later.VARIANTS:
        assert f"round 1 {variant}: " in r.stdout, r.stdout
    assert "| a turn later | " in r.stdout and "minor faults per 1,000 messages |" in r.stdout, r.stdout
    assert "Machine steadiness before the rounds: " in r.stdout, r.stdout
    # Each run delivered messages, and the loop's CPU is counted apart from the other threads'.
    for line in r.stdout.splitlines():
        if line.startswith("round 1 "):
            rate = int(line.split(": ")[1].split(" msg/s")[0].replace(",", ""))
            assert rate > 0 and " the loop's, " in line and " the other threads')" in line, line


def test_benchmarks_machine_noise_times_each_core() -> None:
    r = run("benchmarks/machine_noise.py", "--repeats", "3", "--iterations", "20000")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("- ")]
    assert lines, r.stdout
    for line in lines:
        # three timings listed, and a spread no lower than 1 (slowest over fastest)
        assert line.count(",") >= 4 and " spread " in line, line
        spread = float(line.split(" spread ")[1].split("x")[0])
        assert spread >= 1.0, line
        assert len(line.split("(")[1].rstrip(")").split(", ")) == 3, line


def test_benchmarks_durable_cost_runs_every_part() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads /proc (Linux)")
    r = run(
        "benchmarks/durable_cost.py", "--rounds", "1", "--duration", "0.3", "--backlog-mib", "8", "--log-mib", "8",
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("Machine steadiness before the rounds: ") == 1, out
    for scenario in ("pubsub-100", "fanout"):
        assert f"{scenario}: bench's subscriber durable against bench's subscriber not durable: median " in out, out
        assert f"{scenario}: one durable subscriber against no durable key: median " in out, out
    # Every durable row stored every message; the backlog was stored whole and replayed.
    durable_rows = [line for line in out.splitlines() if "not stored" in line and not line.startswith(" ")]
    assert durable_rows and all(line.endswith(" 0 not stored") for line in durable_rows), durable_rows
    assert '"not_stored": 0' in out and '"replay_msgs_per_s": ' in out and '"append_ns_per_msg": ' in out, out
