"""Mutation check: put each realistic bug of ``mutants.py`` into a copy of the
tree, run the tests named for it, and report which bugs the suite catches.

    python tests/mutation/run.py                # every mutant
    python tests/mutation/run.py codec- sign-   # the mutants whose name starts so
    python tests/mutation/run.py --list

A mutant is *killed* when its tests fail, *survived* when they pass (a bug the
suite lets through: write the test that catches it), *error* when they could
not run (a test id that no longer exists, a collection error). The tests run
unchanged first (the baseline): a test that fails without a bug kills nothing.
Exit status 0 only when every mutant is killed.

The working tree is never touched: the copy (tracked and untracked files that
git does not ignore) lives in a temporary directory, and the tests import the
package from it (``PYTHONPATH``; a broker started as ``hpfeeds-broker`` by a
test inherits it). Not collected by pytest (the file is not ``test_*.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.mutation.mutants import MUTANTS, Mutant  # noqa: E402

TIMEOUT_S = 900  # one mutant's tests; a hang counts as an error, not a kill


def copy_tree(dest: Path) -> None:
    """The files git knows of (tracked, or untracked and not ignored), as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def apply(tree: Path, m: Mutant) -> str:
    """Write the mutant into ``tree``; returns the file's original text (to restore it)."""
    path = tree / m.path
    original = text = path.read_text()
    for old, new in m.edits:
        if text.count(old) != 1:
            raise ValueError(f"{m.name}: {old!r} occurs {text.count(old)} times in {m.path}")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def pytest(tree: Path, tests: tuple[str, ...] | list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))}
    # -n 0: a mutant's few tests in this one process (two workers would start up for them).
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-n", "0", *tests]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, lines[-1] if lines else ""


def check_imports_from(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    where = subprocess.run(
        [sys.executable, "-c", "import hpfeeds3; print(hpfeeds3.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"the tests would import hpfeeds3 from {where}, not from the copy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("names", nargs="*", help="run the mutants whose name starts with one of these (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip running the tests once without a bug")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(m.name.startswith(n) for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}\n    {m.path}\n    " + "\n    ".join(m.tests))
        return 0
    if not chosen:
        print("no mutant matches", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hpfeeds3-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        check_imports_from(tree)
        if not args.no_baseline:
            every = list(dict.fromkeys(t for m in chosen for t in m.tests))
            code, last = pytest(tree, every)
            if code != 0:
                print(f"baseline: the tests fail without any bug ({last}); fix them first", file=sys.stderr)
                return 2
            print(f"baseline: {last}", flush=True)
        results: dict[str, list[str]] = {"killed": [], "survived": [], "error": []}
        for m in chosen:
            t0 = time.monotonic()
            original = apply(tree, m)
            try:
                code, last = pytest(tree, m.tests)
            finally:
                (tree / m.path).write_text(original)
            outcome = "killed" if code == 1 else "survived" if code == 0 else "error"
            results[outcome].append(m.name)
            print(f"{outcome:8} {m.name:40} {time.monotonic() - t0:6.1f} s  {last}", flush=True)
    killed, total = len(results["killed"]), len(chosen)
    print(f"\n{killed}/{total} killed ({100 * killed / total:.0f} %)")
    for outcome in ("survived", "error"):
        if results[outcome]:
            print(f"{outcome}: {', '.join(results[outcome])}")
    return 0 if killed == total else 1


if __name__ == "__main__":
    sys.exit(main())
