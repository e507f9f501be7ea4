"""ID input: files, CSV, stdin, validation with line numbers, de-duplication, streaming."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from typer.testing import CliRunner

import recarchive.ids.read as ids_module
from recarchive.cli.app import app
from recarchive.errors import InputError
from recarchive.ids.read import collect_ids, raise_for_problems
from recarchive.ids.spool import canonical_id

A = "123e4567-e89b-12d3-a456-426614174000"
B = "00000000-0000-4000-8000-000000000001"
C = "ffffffff-ffff-4fff-bfff-ffffffffffff"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (A, A),
        (A.upper(), A),
        (f"  {A}\t", A),
        ("{" + A + "}", None),
        (A.replace("-", ""), None),
        (f"urn:uuid:{A}", None),
        ("abc", None),
        ("", None),
        (A[:-1] + "g", None),
    ],
    ids=["plain", "upper", "spaces", "braces", "bare-hex", "urn", "word", "empty", "non-hex"],
)
def test_canonical_id(value: str, expected: str | None) -> None:
    assert canonical_id(value) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"{A}\n{B}\n".encode(), [A, B]),
        (f"{A}\r\n{B}\r\n".encode(), [A, B]),
        (b"\xef\xbb\xbf" + f"{A}\n{B}".encode(), [A, B]),
        (f"# header comment\n\n{A}\n   \n# {C}\n{B}\n".encode(), [A, B]),
        (f"{A}  # first call\n{B}\n".encode(), [A, B]),
        (f"{B}\n{A}\n{B}\n{A.upper()}\n".encode(), [B, A]),
        (f"id,note\n{A},x\n{B},y\n".encode(), [A, B]),
        (f"\ufeffnote,ID\r\nx,{A}\r\n,\r\ny,{B}\r\n".encode(), [A, B]),
        (f'id,note\n{A},"multi\nline"\n{B},z\n'.encode(), [A, B]),
        (f"id\n{A}\n".encode(), [A]),
        (b"", []),
    ],
    ids=[
        "lf",
        "crlf",
        "bom",
        "comments-blanks",
        "inline-comment",
        "dedupe-keeps-first-order",
        "csv",
        "csv-bom-crlf-id-not-first",
        "csv-quoted-newline",
        "single-column-csv",
        "empty",
    ],
)
def test_file_forms(tmp_path: Path, content: bytes, expected: list[str]) -> None:
    with collect_ids(files=[write(tmp_path, "ids.txt", content)]) as ids:
        assert list(ids) == expected
        assert len(ids) == len(expected)
        assert ids.invalid == 0


def test_every_bad_value_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ids.txt", f"{A}\nnot-an-id\n\n# fine\n{B}\n12345\n".encode())
    with collect_ids(files=[path]) as ids:
        assert list(ids) == [A, B]
        assert ids.invalid == 2
        assert [(p.line, p.value) for p in ids.problems] == [(2, "not-an-id"), (6, "12345")]
        with pytest.raises(InputError) as caught:
            raise_for_problems(ids)
    assert caught.value.problems == [
        f"{path}:2: 'not-an-id' is not a UUID",
        f"{path}:6: '12345' is not a UUID",
    ]
    assert "2 invalid IDs" in str(caught.value)


def test_csv_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "ids.csv", f'id,note\n{A},"two\nlines"\nbad,x\n'.encode())
    with collect_ids(files=[path]) as ids:
        assert [(p.line, p.value) for p in ids.problems] == [(4, "bad")]


def test_csv_without_id_column_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "ids.csv", f"recording,note\n{A},x\n".encode())
    with pytest.raises(InputError, match=r"ids.csv:1: CSV header .* has no 'id' column"):
        collect_ids(files=[path])


def test_arguments_then_files_then_stdin(tmp_path: Path) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(f"\ufeff{C}\r\n{A}\r\nzzz\r\n".encode()), newline="")
    path = write(tmp_path, "ids.txt", f"{B}\n{A}\n".encode())
    with collect_ids([A, "oops"], [path, "-"], stdin=stdin) as ids:
        assert list(ids) == [A, B, C]
        assert ids.duplicates == 2
        assert [str(p) for p in ids.problems] == [
            "argument:2: 'oops' is not a UUID",
            "<stdin>:3: 'zzz' is not a UUID",
        ]


def test_chunks_and_reiteration(tmp_path: Path) -> None:
    values = [str(uuid.UUID(int=i)) for i in range(1, 12)]
    path = write(tmp_path, "ids.txt", "\n".join(values).encode())
    with collect_ids(files=[path]) as ids:
        assert [len(c) for c in ids.chunks(5)] == [5, 5, 1]
        assert list(ids) == list(ids) == values


def test_spool_removed_on_close(tmp_path: Path) -> None:
    ids = collect_ids([A], spool_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    ids.close()
    assert list(tmp_path.iterdir()) == []


def _peak_while_collecting(path: Path) -> tuple[int, int]:
    tracemalloc.start()
    with collect_ids(files=[path]) as ids:
        _, peak = tracemalloc.get_traced_memory()
        count = sum(1 for _ in ids)
    tracemalloc.stop()
    return count, peak


def test_file_is_streamed_not_copied(tmp_path: Path) -> None:
    """200k lines with 1,000 distinct IDs: memory follows the distinct IDs, not the file."""
    path = tmp_path / "repeats.txt"
    with path.open("w") as out:
        for i in range(200_000):
            out.write(f"{uuid.UUID(int=i % 1000 + 1)}\n")
    count, peak = _peak_while_collecting(path)
    assert count == 1000
    assert peak < 1024 * 1024, peak  # the file alone is 7.4 MB


def test_memory_per_distinct_id_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with path.open("w") as out:
        for i in range(200_000):
            out.write(f"{uuid.UUID(int=i * 7919 + 1)}\n")
    count, peak = _peak_while_collecting(path)
    assert count == 200_000
    # 16-byte keys in a set: ~100 bytes per distinct ID (a list of the strings alone is ~90).
    assert peak / count < 128, peak / count


def test_undecodable_stdin_is_an_input_error() -> None:
    class Stdin:
        buffer = io.BytesIO(b"\xff\xfe not utf-8\n")

    with pytest.raises(InputError, match=r"^<stdin>: line 1 is not UTF-8 text \(byte 0xff\)$"):
        collect_ids(files=["-"], stdin=Stdin())  # type: ignore[arg-type]


def test_broken_csv_names_file_and_line(tmp_path: Path) -> None:
    # A quoted field over the csv module's 128 KiB limit, in lines short enough to be read: the
    # field's 131st line (file line 132) crosses the limit.
    path = tmp_path / "ids.csv"
    path.write_text('id,note\n"' + ("a" * 1000 + "\n") * 200 + '",x\n')
    with pytest.raises(InputError, match=r"ids\.csv:132: not valid CSV"):
        collect_ids(files=[path])


# --- ID files that cannot be read as text: one-line InputError naming the file (exit 2) -------


def _long_line(tmp_path: Path) -> Path:
    return write(tmp_path, "ids.txt", b"x" * (10 * 1024 * 1024))  # 10 MiB, no line break


def _symlink_loop(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.symlink_to(tmp_path / "loop.txt")
    (tmp_path / "loop.txt").symlink_to(path)
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    os.mkfifo(path)
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.mkdir()
    return path


def _socket(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))  # the socket file stays after the socket is closed
    return path


def _character_device(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.symlink_to("/dev/null")
    return path


def _under_a_file(tmp_path: Path) -> Path:
    return write(tmp_path, "ids.txt", f"{A}\n".encode()) / "more.txt"


def _invalid_utf8(tmp_path: Path) -> Path:
    return write(tmp_path, "ids.txt", b"\xff\xfe\x00garbage\x81")


def _invalid_utf8_later(tmp_path: Path) -> Path:
    return write(tmp_path, "ids.txt", f"{A}\r\n{B}\r\n".encode() + b"caf\xe9\r\n" + C.encode())


BAD_FILES: list[tuple[Callable[[Path], Path], str]] = [
    (_long_line, "line 1 is longer than 65536 characters"),
    (_symlink_loop, f"cannot open ({os.strerror(errno.ELOOP)})"),
    (_fifo, "not a regular file (a FIFO); give - to read standard input"),
    (_directory, "not a regular file (a directory)"),
    (_socket, "not a regular file (a socket)"),
    (_character_device, "not a regular file (a character device)"),
    (lambda tmp_path: tmp_path / "ids.txt", f"cannot open ({os.strerror(errno.ENOENT)})"),
    (_under_a_file, f"cannot open ({os.strerror(errno.ENOTDIR)})"),
    (_invalid_utf8, "line 1 is not UTF-8 text (byte 0xff)"),
    (_invalid_utf8_later, "line 3 is not UTF-8 text (byte 0xe9)"),
]
BAD_FILE_IDS = [
    "10mb-line",
    "symlink-loop",
    "fifo",
    "directory",
    "socket",
    "character-device",
    "nonexistent",
    "under-a-file",
    "invalid-utf8",
    "invalid-utf8-line-3",
]
#: Seconds after which a reader stuck in open() on a FIFO is released by opening the write end.
FIFO_RELEASE = 5.0


@contextmanager
def released_if_fifo(path: Path) -> Iterator[None]:
    """Open the write end of the FIFO ``path`` after a while, should the code block opening it.

    The reader then sees an empty file and the test fails (no error raised) instead of hanging.
    """

    def release() -> None:
        # ENXIO: nobody has the FIFO open for reading, so nothing is blocked.
        with suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(FIFO_RELEASE, release)
    if path.is_fifo():
        timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.mark.parametrize(("make", "reason"), BAD_FILES, ids=BAD_FILE_IDS)
def test_bad_id_file_is_an_input_error_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    started = time.monotonic()
    with released_if_fifo(path), pytest.raises(InputError) as caught:
        collect_ids(files=[path], spool_dir=str(spool))
    assert str(caught.value) == f"{path}: {reason}"
    assert time.monotonic() - started < FIFO_RELEASE
    assert list(spool.iterdir()) == []  # the spool of a refused input is removed


def test_permission_denied_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable file: simulated, since root (CI's user) reads a mode-000 file."""
    path = write(tmp_path, "ids.txt", f"{A}\n".encode())
    real_open = os.open

    def refusing_open(file: object, *args: object, **kwargs: object) -> int:
        if Path(str(file)) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(InputError) as caught:
        collect_ids(files=[path])
    assert str(caught.value) == f"{path}: cannot open ({os.strerror(errno.EACCES)})"


def test_the_name_is_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as caught:
        collect_ids(files=["./nope/"])
    assert str(caught.value) == f"./nope/: cannot open ({os.strerror(errno.ENOENT)})"


def test_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").symlink_to(write(tmp_path, "real.txt", f"{A}\n".encode()))
    with collect_ids(files=[tmp_path / "ids.txt"]) as ids:
        assert list(ids) == [A]


def test_line_length_limit_is_exact(tmp_path: Path) -> None:
    limit = ids_module.MAX_LINE_LENGTH
    at_limit = write(tmp_path, "at.txt", f"{A}\r\n{'x' * limit}\r\n{B}\r\n".encode())
    with collect_ids(files=[at_limit]) as ids:
        assert list(ids) == [A, B]
        assert [(p.line, len(p.value)) for p in ids.problems] == [(2, limit)]
    over = write(tmp_path, "over.txt", f"{A}\r\n{'x' * (limit + 1)}\r\n{B}\r\n".encode())
    with pytest.raises(InputError) as caught:
        collect_ids(files=[over])
    assert str(caught.value) == f"{over}: line 2 is longer than {limit} characters"


def test_long_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = _long_line(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="line 1 is longer than"):
            collect_ids(files=[path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak  # the line alone is 10 MiB


def test_long_line_on_stdin_is_refused() -> None:
    class Stdin:
        buffer = io.BytesIO(f"{A}\n".encode() + b"x" * 200_000)

    with pytest.raises(InputError, match=r"^<stdin>: line 2 is longer than 65536 characters$"):
        collect_ids(files=["-"], stdin=Stdin())  # type: ignore[arg-type]


def test_closed_stdin_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when started with fd 0 closed
    with pytest.raises(InputError, match=r"^<stdin>: standard input is closed$"):
        collect_ids(files=["-"])


def test_stdin_is_left_open(tmp_path: Path) -> None:
    """The re-decoding wrapper is detached, so ``-`` twice (or a later read) still works."""
    stdin = io.TextIOWrapper(io.BytesIO(f"{A}\n".encode()), newline="")
    with collect_ids(files=["-", "-"], stdin=stdin) as ids:
        assert list(ids) == [A]
    assert not stdin.closed


def test_stdin_pipe_is_read(tmp_path: Path) -> None:
    """Standard input may be a FIFO (a pipe): only a FIFO named by a path is refused."""
    read_end, write_end = os.pipe()
    with open(write_end, "wb") as writer:
        writer.write(f"\ufeff{A}\r\n{B}\n".encode())
    with open(read_end, encoding="utf-8", newline="") as stdin:
        assert stdin.seekable() is False
        with collect_ids(files=["-"], stdin=stdin) as ids:
            assert list(ids) == [A, B]


# --- the same through the command line ---------------------------------------------------------

RECARCHIVE = str(Path(sys.executable).with_name("recarchive"))


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The settings ``archive`` needs before it reads IDs, every store and server in tmp_path or
    on a closed loopback port: a run that got past the ID file reaches nothing real."""
    for name in list(os.environ):
        if name.startswith("RECARCHIVE_"):
            monkeypatch.delenv(name)
    (tmp_path / "temp").mkdir()
    env = {
        "RECARCHIVE_BIRD_ACCESS_KEY": "x",
        "RECARCHIVE_WORKSPACE_ID": "w",
        "RECARCHIVE_S3_BUCKET": "b",
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_TEMP_DIR": str(tmp_path / "temp"),
        "RECARCHIVE_BIRD_API_URL": "http://127.0.0.1:9",
        "RECARCHIVE_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.parametrize(("make", "reason"), BAD_FILES, ids=BAD_FILE_IDS)
def test_cli_bad_id_file_exits_2_with_one_line(
    tmp_path: Path, cli_env: dict[str, str], make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path)
    with released_if_fifo(path):
        result = CliRunner().invoke(app, ["archive", "--ids-file", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {path}: {reason}\n"
    assert not (tmp_path / "archive.db").exists()
    assert list((tmp_path / "temp").iterdir()) == []  # no spool file left


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_fifo, "not a regular file (a FIFO); give - to read standard input"),
        (_symlink_loop, f"cannot open ({os.strerror(errno.ELOOP)})"),
        (_long_line, "line 1 is longer than 65536 characters"),
    ],
    ids=["fifo", "symlink-loop", "10mb-line"],
)
def test_cli_process_bad_id_file_exits_2_without_traceback(
    tmp_path: Path, cli_env: dict[str, str], make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path)
    result = subprocess.run(
        [RECARCHIVE, "archive", "--ids-file", str(path)],
        env={**os.environ, **cli_env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,  # a FIFO opened for reading would block here for good
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == f"error: {path}: {reason}\n"


def test_cli_process_reads_ids_from_a_stdin_pipe(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``--ids-file -`` with a pipe on stdin is read (here: its bad ID stops the run, exit 2)."""
    result = subprocess.run(
        [RECARCHIVE, "archive", "--ids-file", "-"],
        env={**os.environ, **cli_env},
        input=f"{A}\nnot-an-id\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "<stdin>:2: 'not-an-id' is not a UUID" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_path_with_a_nul_byte_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a valid path"):
        collect_ids(files=["ids\x00.txt"])
