"""Reading recording IDs from arguments, files and standard input.

Input forms (DESIGN §2): one ID per line, blank lines and ``#`` comments ignored, or a CSV
file with an ``id`` column. A UTF-8 BOM and CRLF line ends are tolerated. IDs are UUIDs,
compared and stored in canonical lower-case form; duplicates count once and the first order
is kept.

Input is read as a stream, one pass, and the valid IDs are spooled to a temporary file, so a
file of a million IDs costs memory for the set of seen IDs (16 bytes each plus set overhead),
never for copies of the file. The whole input is validated before the caller sends any request:
:func:`collect_ids` returns every problem with its place, and the caller decides whether to stop.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from recarchive.errors import InputError
from recarchive.tempfiles import IDS_SUFFIX, temp_prefix

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
#: How many problems are kept for the report; all of them are counted.
MAX_REPORTED_PROBLEMS = 1000
STDIN_NAME = "-"


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


def collect_ids(
    args: Sequence[str] = (),
    files: Sequence[str | Path] = (),
    *,
    stdin: TextIO | None = None,
    spool_dir: str | None = None,
) -> IdList:
    """Read, validate and de-duplicate IDs from arguments and files, in that order.

    Args:
        args: IDs given on the command line (reported as ``argument N``).
        files: Paths of ID files; ``"-"`` reads ``stdin``.
        stdin: The stream read for ``"-"`` (defaults to :data:`sys.stdin`).
        spool_dir: Folder of the spool file (defaults to the system temp folder).

    Returns:
        The valid IDs with counts and every problem found (capped at
        :data:`MAX_REPORTED_PROBLEMS` kept, all counted). The caller decides whether problems
        stop the run.

    Raises:
        InputError: A file cannot be opened or decoded, or a CSV file has no ``id`` column.
    """
    collector = IdCollector(spool_dir)
    try:
        for position, value in enumerate(args, start=1):
            collector.add(value, "argument", position)
        for file in files:
            if str(file) == STDIN_NAME:
                import sys

                stream = stdin if stdin is not None else sys.stdin
                try:
                    _read_stream(_without_bom(stream), "<stdin>", collector)
                except UnicodeDecodeError as exc:
                    raise InputError(
                        f"standard input is not UTF-8 text (byte {exc.start} of a read)"
                    ) from exc
            else:
                _read_file(Path(file), collector)
    except BaseException:
        collector.discard()
        raise
    return collector.finish()


def _read_file(path: Path, collector: IdCollector) -> None:
    try:
        # newline="" lets the csv module see quoted line breaks; utf-8-sig drops a BOM.
        with path.open(encoding="utf-8-sig", newline="") as stream:
            _read_stream(stream, str(path), collector)
    except FileNotFoundError as exc:
        raise InputError(f"ID file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise InputError(f"ID file is a directory: {path}") from exc
    except PermissionError as exc:
        raise InputError(f"ID file is not readable: {path}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"ID file is not UTF-8 text: {path} (byte {exc.start})") from exc


def _without_bom(stream: TextIO) -> TextIO:
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return stream
    return io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="")


def _read_stream(stream: Iterable[str], source: str, collector: IdCollector) -> None:
    lines = iter(stream)
    line_number = 0
    # Skip leading blank and comment lines to find the first meaningful line.
    for raw in lines:
        line_number += 1
        text = raw.lstrip("\ufeff").strip()
        if not text or text.startswith("#"):
            continue
        header = _csv_header(text, source, line_number)
        if header is not None:
            _read_csv(lines, header, source, line_number, collector)
        else:
            _add_plain(text, source, line_number, collector)
            _read_plain(lines, source, line_number, collector)
        return


def _csv_header(text: str, source: str, line: int) -> list[str] | None:
    """Return the column names if ``text`` is a CSV header with an ``id`` column.

    Raises:
        InputError: ``text`` looks like a CSV header (it has commas) without an ``id`` column.
    """
    if canonical_id(text.split("#", 1)[0]) is not None:
        return None
    columns = [name.strip().lower() for name in next(csv.reader([text]))]
    if "id" in columns:
        return columns
    if "," in text:
        raise InputError(f"{source}:{line}: CSV header {text[:60]!r} has no 'id' column")
    return None


def _add_plain(text: str, source: str, line: int, collector: IdCollector) -> None:
    value = text.split("#", 1)[0].strip() if " #" in text or "\t#" in text else text
    collector.add(value, source, line)


def _read_plain(lines: Iterator[str], source: str, line_number: int, c: IdCollector) -> None:
    for raw in lines:
        line_number += 1
        text = raw.strip()
        if text and not text.startswith("#"):
            _add_plain(text, source, line_number, c)


def _read_csv(
    lines: Iterator[str], header: list[str], source: str, header_line: int, c: IdCollector
) -> None:
    id_index = header.index("id")
    reader = csv.reader(lines)
    try:
        _read_csv_rows(reader, id_index, source, header_line, c)
    except csv.Error as exc:
        raise InputError(
            f"{source}:{header_line + reader.line_num}: not valid CSV ({exc})"
        ) from exc


def _read_csv_rows(
    reader: Any, id_index: int, source: str, header_line: int, c: IdCollector
) -> None:
    for row in reader:
        line_number = header_line + reader.line_num
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) <= id_index:
            c.problem(source, line_number, ",".join(row), "has no value in the 'id' column")
            continue
        c.add(row[id_index], source, line_number)


def raise_for_problems(ids: IdList) -> None:
    """Raise :class:`InputError` listing every problem of ``ids``, if there is any.

    Raises:
        InputError: With one line per problem in ``problems``.
    """
    if ids.invalid:
        more = ids.invalid - len(ids.problems)
        lines = [str(problem) for problem in ids.problems]
        if more > 0:
            lines.append(f"... and {more} more")
        noun = "ID" if ids.invalid == 1 else "IDs"
        raise InputError(f"{ids.invalid} invalid {noun} (not a UUID)", lines)


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
