"""ID input: files, CSV, stdin, validation with line numbers, de-duplication, streaming."""

from __future__ import annotations

import io
import tracemalloc
import uuid
from pathlib import Path

import pytest

from recarchive.errors import InputError
from recarchive.ids import canonical_id, collect_ids, raise_for_problems

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


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"ID file not found: .*nope\.txt"):
        collect_ids(files=[tmp_path / "nope.txt"])


def test_binary_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not UTF-8"):
        collect_ids(files=[write(tmp_path, "ids.bin", b"\xff\xfe\x00garbage\x81")])


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

    with pytest.raises(InputError, match="standard input is not UTF-8"):
        collect_ids(files=["-"], stdin=Stdin())  # type: ignore[arg-type]


def test_broken_csv_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    path.write_text('id,note\n"' + "a" * 200_000 + '",x\n')
    with pytest.raises(InputError, match=r"ids\.csv:2: not valid CSV"):
        collect_ids(files=[path])
