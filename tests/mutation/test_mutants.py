"""The mutation check's list stays true to the code (the check itself runs apart: tests/mutation/run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutation.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_still_applies_and_names_tests_that_exist(m: Mutant) -> None:
    text = (ROOT / m.path).read_text()
    for original, replacement in m.edits:
        assert original != replacement
        assert text.count(original) == 1, f"{original!r} is no longer in {m.path} exactly once: update the mutant"
        text = text.replace(original, replacement)
    for test in m.tests:
        file, _, name = test.partition("::")
        assert (ROOT / file).is_file(), test
        assert not name or f"def {name}(" in (ROOT / file).read_text(), f"no test {name} in {file}"


def test_mutant_names_are_unique() -> None:
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
