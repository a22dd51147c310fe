"""Count the Python lines a call runs inside one module: a work measure that,
unlike a timing, does not depend on the machine's load.

A loop over a table runs its body once per entry, so a call whose count grows
with the table's size does work proportional to it, however fast it looks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any


def lines_run(module: ModuleType, call: Callable[[], Any]) -> int:
    """Line events of ``call()`` in frames whose code lives in ``module``'s file."""
    filename = module.__file__
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != filename:
            return None  # do not trace this frame's lines
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count
