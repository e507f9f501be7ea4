"""Keeping pyarrow from importing pandas in recarchive's own command-line processes.

``pa.array`` of a Python sequence asks, once per process, whether pandas is importable, and
imports it if it is: 93 MB of RSS and 0.3 s of CPU (docs/benchmarks.md) that the export never
uses, wherever pandas is installed (the dev environment has it, for the reader tests). A failed
lookup is remembered for the rest of the process, and then pyarrow no longer recognises pandas
objects: a ``Series`` converts as a plain sequence (``NaN`` stays a value, ``pd.NA`` is refused),
and pandas' timestamps and durations lose their nanoseconds. So the lookup is made to fail only
in a process that has declared it never hands pandas objects to pyarrow:
:func:`skip_in_this_process`, called by the ``recarchive`` command's entry point. A library
user's process, a Prefect flow's, or the test suite's keep pyarrow's pandas support whole.

Kept free of heavy imports: the command's entry point imports it before it knows the command.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any

__all__ = ["arrow_without_pandas", "skip_in_this_process"]

_lock = threading.Lock()
_declared = False
_done = False


class _RefusePandas(importlib.abc.MetaPathFinder):
    """Makes ``import pandas`` fail, for pyarrow's lookup only (installed around it)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ImportError("not imported by recarchive's export")


def skip_in_this_process() -> None:
    """Declare that nothing in this process hands pandas objects to pyarrow (the CLI)."""
    global _declared  # a property of the whole process, set once by its entry point
    _declared = True


def arrow_without_pandas() -> None:
    """Before the first Arrow conversion: make pyarrow's pandas lookup fail, if declared.

    Does nothing unless :func:`skip_in_this_process` was called, or when pandas is imported
    already (it then costs nothing more). The refusing finder is on ``sys.meta_path`` only
    for the one conversion below; a thread of this process importing pandas at that moment
    would be refused too, which the command line's threads never do.
    """
    global _done  # pyarrow's lookup happens once per process, and so does this
    with _lock:
        if _done or not _declared or "pandas" in sys.modules:
            return
        import pyarrow as pa

        finder = _RefusePandas()
        sys.meta_path.insert(0, finder)
        try:
            # pyarrow's lookups, once each per process: the Python side's (any sequence) and
            # the C++ converter's (when it first converts a value).
            pa.array(["", None])
        finally:
            sys.meta_path.remove(finder)
            _done = True
