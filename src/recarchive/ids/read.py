"""Reading recording IDs from arguments, files and standard input.

Input forms (README, "Using it"): one ID per line, blank lines and ``#`` comments ignored, or a CSV
file with an ``id`` column. A UTF-8 BOM and CRLF line ends are tolerated.

Input is read as a stream, one pass, into the ID spool (:mod:`.spool`: canonical form,
duplicates once, first order kept, on disk), so a file of a million IDs never costs memory for
copies of the file. Lines are read with a bounded length (:data:`MAX_LINE_LENGTH`), so a file
without line breaks is refused, not read whole. The whole input is validated before the caller
sends any request: :func:`collect_ids` returns every problem with its place, and the caller
decides whether to stop.

An ID file must be a regular file (or a symlink to one); a FIFO, socket, device or directory
is refused before it is read: opening a FIFO for reading waits for a writer, maybe forever.
Standard input (``-``) may be anything, a pipe above all. Every way a file cannot be read
(missing, symlink loop, no permission, not UTF-8, a line too long) is one
:class:`~recarchive.errors.InputError` naming the file, never a traceback.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from recarchive.errors import InputError
from recarchive.ids.spool import IdCollector, IdList, canonical_id

#: Longest line accepted, in characters, without its line end. An ID line is 36 characters and a
#: CSV row rarely a few hundred; the bound keeps memory flat on a file without line breaks.
MAX_LINE_LENGTH = 64 * 1024
STDIN_NAME = "-"
#: How standard input is named in messages.
STDIN_SOURCE = "<stdin>"

# A file opened without O_NONBLOCK blocks in open() if it is a FIFO without a writer.
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
# What surrogateescape decodes an undecodable byte to: U+DC80..U+DCFF, one per byte.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


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
        :data:`~.spool.MAX_REPORTED_PROBLEMS` kept, all counted). The caller decides whether
        problems stop the run.

    Raises:
        InputError: A file is not a regular file, cannot be opened or read, is not UTF-8 text,
            has a line longer than :data:`MAX_LINE_LENGTH`, or is a CSV file without an ``id``
            column. The message names the file (as given) and says why, on one line.
    """
    collector = IdCollector(spool_dir)
    try:
        for position, value in enumerate(args, start=1):
            collector.add(value, "argument", position)
        for file in files:
            if str(file) == STDIN_NAME:
                # sys.stdin is None when the process was started with file descriptor 0 closed.
                stream: TextIO | None = stdin if stdin is not None else sys.stdin
                if stream is None:
                    raise InputError(f"{STDIN_SOURCE}: standard input is closed")
                _read_stdin(stream, collector)
            else:
                _read_file(file, collector)
    except BaseException:
        collector.discard()
        raise
    return collector.finish()


def _read_file(file: str | Path, collector: IdCollector) -> None:
    # The name as the user typed it: Path() would turn "./ids/" into "ids".
    name = _shown_name(str(file))
    with _open_regular(file, name) as stream:
        try:
            _read_stream(_bounded_lines(stream, name), name, collector)
        except OSError as exc:  # e.g. EIO from a failing disk or a stale NFS handle
            raise InputError(f"{name}: cannot read ({_reason(exc)})") from exc


def _open_regular(file: str | Path, name: str) -> TextIO:
    """Open ``file`` as text if it is a regular file (or a symlink to one), without blocking.

    Raises:
        InputError: ``file`` is not a regular file or cannot be opened.
    """
    fd = -1
    try:
        # Checked before opening: opening a FIFO waits for a writer (maybe forever), opening a
        # device can have side effects. stat() follows symlinks and reports a loop as ELOOP.
        _require_regular(Path(file).stat().st_mode, name)
        # O_NONBLOCK and the second check close the race of the path being replaced by a FIFO
        # after the stat: open() then returns at once and fstat() refuses it.
        fd = os.open(file, os.O_RDONLY | _O_NONBLOCK)
        _require_regular(os.fstat(fd).st_mode, name)
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        # newline="" lets the csv module see quoted line breaks; utf-8-sig drops a BOM;
        # surrogateescape keeps each undecodable byte in its line, so the line can be named.
        return open(fd, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if isinstance(exc, OSError):
            raise InputError(f"{name}: cannot open ({_reason(exc)})") from exc
        if isinstance(exc, ValueError):  # a NUL byte in the path
            raise InputError(f"{name}: cannot open (not a valid path)") from exc
        raise


def _require_regular(mode: int, name: str) -> None:
    """Raise :class:`InputError` unless ``mode`` is that of a regular file."""
    if stat.S_ISREG(mode):
        return
    kind = next((text for test, text in _FILE_TYPES if test(mode)), "of an unknown type")
    hint = "; give - to read standard input" if stat.S_ISFIFO(mode) else ""
    raise InputError(f"{name}: not a regular file ({kind}){hint}")


def _read_stdin(stream: TextIO, collector: IdCollector) -> None:
    buffer = getattr(stream, "buffer", None)
    # The bytes are decoded again as for a file (BOM dropped, undecodable bytes kept in place).
    wrapper = (
        None
        if buffer is None
        else io.TextIOWrapper(buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    )
    try:
        lines = _bounded_lines(stream if wrapper is None else wrapper, STDIN_SOURCE)
        _read_stream(lines, STDIN_SOURCE, collector)
    except UnicodeDecodeError as exc:  # only a stream without .buffer decodes by itself
        raise InputError(f"{STDIN_SOURCE}: not UTF-8 text (byte {exc.start} of a read)") from exc
    except OSError as exc:
        raise InputError(f"{STDIN_SOURCE}: cannot read ({_reason(exc)})") from exc
    finally:
        if wrapper is not None:
            # Closing (or garbage-collecting) our wrapper would close the caller's stdin too.
            wrapper.detach()


def _bounded_lines(stream: TextIO, source: str) -> Iterator[str]:
    """Yield the lines of ``stream`` (line ends kept), each read with a bounded length.

    Raises:
        InputError: A line is longer than :data:`MAX_LINE_LENGTH` characters, or holds bytes
            that are not UTF-8 (``stream`` decoded with ``errors="surrogateescape"``).
    """
    for number in itertools.count(1):
        # Room for one character too many and a CRLF: enough to tell that a line is too long
        # without reading the rest of it.
        line = stream.readline(MAX_LINE_LENGTH + 2)
        if not line:
            return
        if len(line.rstrip("\r\n")) > MAX_LINE_LENGTH:
            raise InputError(f"{source}: line {number} is longer than {MAX_LINE_LENGTH} characters")
        undecodable = _UNDECODABLE.search(line)
        if undecodable is not None:
            byte = ord(undecodable.group()) - 0xDC00
            raise InputError(f"{source}: line {number} is not UTF-8 text (byte 0x{byte:02x})")
        yield line


def _shown_name(name: str) -> str:
    # A name with a line break or an undecodable byte is shown escaped: the message stays one
    # line and printable.
    return name if name.isprintable() else ascii(name)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


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
