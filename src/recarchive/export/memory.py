"""The allocator of the export's Arrow buffers: the C library's, chosen before pyarrow loads.

pyarrow's default pool (mimalloc in the wheels) keeps the pages an export freed for reuse, so
a process's RSS stays at the export's high-water mark, and that mark is higher: ``export
--full`` of 1,000,000 recordings in one process peaked at +177 MB with mimalloc against +145
MB with the system allocator (``RECARCHIVE_PARQUET_PII=hash``: +220 against +196 MB), in the
same time (7.7 against 7.2 s; docs/benchmarks.md, 2026-12-03). With the system pool, the
``release_unused`` after each partition (``malloc_trim``) also hands the freed heap back, which
matters in a flow's or a worker's process that lives on after its export.

Arrow reads ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow is imported, and
``pyarrow.set_memory_pool`` later moves only pyarrow's Python-side allocations (the C++ side,
the Parquet writer and the IPC reader, keeps mimalloc: both pools then hold memory, measured
worse than either). So the two doors, ``recarchive.cli`` and ``flows``, call
:func:`prefer_system_allocator` when they are imported, before anything imports pyarrow.
This module imports nothing but :mod:`os` for that reason.
"""

from __future__ import annotations

import os

__all__ = ["POOL_VARIABLE", "prefer_system_allocator"]

#: Arrow's own setting (``system``, ``jemalloc``, ``mimalloc``); a user's choice is kept.
POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def prefer_system_allocator() -> None:
    """Set ``ARROW_DEFAULT_MEMORY_POOL=system`` unless it is set already (to a non-empty value).

    Effective only before pyarrow's first import in the process; child processes (the export's
    SQLite reader) inherit it.
    """
    if not os.environ.get(POOL_VARIABLE):  # templates often export an unset variable as ""
        os.environ[POOL_VARIABLE] = "system"
