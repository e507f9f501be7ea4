"""The ID spool: valid, de-duplicated recording IDs on disk, in first-seen order.

IDs are UUIDs, compared and stored in canonical lower-case form; duplicates count once and the
first order is kept. The valid IDs go to a temporary file as they arrive, so a million IDs cost
memory for the set of seen IDs (16 bytes each plus set overhead), never for the list itself;
bad values are counted, and the first :data:`MAX_REPORTED_PROBLEMS` kept with their place.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from recarchive.tempfiles import IDS_SUFFIX, temp_prefix

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
#: How many problems are kept for the report; all of them are counted.
MAX_REPORTED_PROBLEMS = 1000


def canonical_id(value: str) -> str | None:
    """Return ``value`` as a canonical lower-case UUID string, or ``None`` if it is not one.

    Only the hyphenated 8-4-4-4-12 form is accepted: braces, URNs and bare hex are rejected,
    because an ID file holding them is more likely wrong than deliberate.
    """
    candidate = value.strip()
    if not _UUID_RE.match(candidate):
        return None
    return candidate.lower()


@dataclass(frozen=True, slots=True)
class IdProblem:
    """One bad value in the input and where it was found."""

    source: str
    line: int
    value: str
    reason: str

    def __str__(self) -> str:
        shown = self.value if len(self.value) <= 80 else self.value[:77] + "..."
        return f"{self.source}:{self.line}: {shown!r} {self.reason}"


@dataclass
class IdList:
    """The valid, de-duplicated IDs of one input, spooled to disk, in first-seen order.

    Iterate it (any number of times) to stream the IDs back. Call :meth:`close` (or use it as
    a context manager) to remove the spool file.
    """

    count: int = 0
    duplicates: int = 0
    invalid: int = 0
    problems: list[IdProblem] = field(default_factory=list)
    _spool: IO[str] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        if self._spool is None:
            return iter(())
        self._spool.flush()
        return _read_spool(self._spool.name)

    def __len__(self) -> int:
        return self.count

    def chunks(self, size: int) -> Iterator[list[str]]:
        """Yield the IDs in lists of at most ``size``, holding one list at a time."""
        chunk: list[str] = []
        for recording_id in self:
            chunk.append(recording_id)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def close(self) -> None:
        """Remove the spool file."""
        if self._spool is not None:
            name = self._spool.name
            self._spool.close()
            Path(name).unlink(missing_ok=True)
            self._spool = None

    def __enter__(self) -> IdList:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_spool(path: str) -> Iterator[str]:
    with open(path, encoding="ascii") as spool:
        for line in spool:
            yield line.rstrip("\n")


class IdCollector:
    """Validates, de-duplicates and spools IDs as they arrive (e.g. from a paged listing).

    Args:
        spool_dir: Folder of the spool file (system temp folder when ``None``).
    """

    def __init__(self, spool_dir: str | None = None) -> None:
        self.result = IdList()
        # Seen IDs as 16-byte keys: about a third of the memory of the 36-character strings.
        self._seen: set[bytes] = set()
        self._spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - owned by IdList
            "w",
            encoding="ascii",
            # Named after this process, so the next run can sweep it if this one is killed.
            prefix=temp_prefix(),
            suffix=IDS_SUFFIX,
            dir=spool_dir,
            delete=False,
        )
        self.result._spool = self._spool

    def add(self, value: str, source: str, line: int) -> None:
        """Validate ``value`` found at ``source:line`` and keep it if new."""
        recording_id = canonical_id(value)
        if recording_id is None:
            self.problem(source, line, value, "is not a UUID")
            return
        key = uuid.UUID(recording_id).bytes
        if key in self._seen:
            self.result.duplicates += 1
            return
        self._seen.add(key)
        self._spool.write(recording_id + "\n")
        self.result.count += 1

    def finish(self) -> IdList:
        """Flush the spool and return the collected IDs."""
        self._spool.flush()
        return self.result

    def discard(self) -> None:
        """Remove the spool (after a failure)."""
        self.result.close()

    def problem(self, source: str, line: int, value: str, reason: str) -> None:
        """Record a bad value with its place."""
        self.result.invalid += 1
        if len(self.result.problems) < MAX_REPORTED_PROBLEMS:
            self.result.problems.append(IdProblem(source, line, value, reason))


def spool_ids(values: Iterable[str], *, source: str, spool_dir: str | None = None) -> IdList:
    """Validate, de-duplicate and spool IDs from any iterable (e.g. discovered by listing).

    Args:
        values: ID strings in order.
        source: Name used in problem reports (e.g. ``"list endpoint"``).
        spool_dir: Folder of the spool file.

    Returns:
        The IDs as an :class:`IdList`; problems are recorded, not raised.
    """
    collector = IdCollector(spool_dir)
    try:
        for position, value in enumerate(values, start=1):
            collector.add(value, source, position)
    except BaseException:
        collector.discard()
        raise
    return collector.finish()
