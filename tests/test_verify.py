"""verify_archive: ledger rows against objects in moto's S3 server, shallow and deep."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recarchive.media.s3 import MediaStore
from recarchive.media.verify import VerifyProblem, verify_archive
from recarchive.model import LedgerEntry
from recarchive.simulator.mp3 import Mp3Source

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


def entry(recording_id: str, **fields: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "recording_id": recording_id,
        "state": "archived",
        "attempts": 0,
        "last_error": None,
        "next_attempt_at": None,
        "s3_bucket": None,
        "s3_key": f"r/{recording_id}.mp3",
        "size_bytes": None,
        "sha256": None,
        "archived_at": datetime(2024, 1, 1, tzinfo=UTC),
        "lease_owner": None,
        "lease_expires_at": None,
    }
    values.update(fields)
    return LedgerEntry(**values)


class Archive:
    """Objects uploaded the way the pipeline uploads them, and their correct ledger rows."""

    def __init__(self, store: MediaStore, tmp_path: Path) -> None:
        self.store = store
        self.tmp_path = tmp_path

    def add(self, recording_id: str, size: int = 20_000) -> LedgerEntry:
        data = Mp3Source(recording_id, size, with_id3=True).read_all()
        digest = hashlib.sha256(data).hexdigest()
        path = self.tmp_path / f"{recording_id}.mp3"
        path.write_bytes(data)
        key = f"r/{recording_id}.mp3"
        self.store.upload_file(key, path, size=size, sha256_hex=digest)
        return entry(
            recording_id, s3_bucket=self.store.bucket, s3_key=key, size_bytes=size, sha256=digest
        )


@pytest.fixture
def archive(s3_client: S3Client, s3_bucket: str, tmp_path: Path) -> Archive:
    return Archive(MediaStore(s3_client, bucket=s3_bucket), tmp_path)


def problems_of(problems: list[VerifyProblem]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in problems:
        found.setdefault(problem.recording_id, []).append(problem.problem)
    return found


@pytest.mark.parametrize("deep", [False, True])
def test_intact_archive_verifies(archive: Archive, deep: bool) -> None:
    entries = [archive.add(f"rec-{n}", size=5_000 + n * 997) for n in range(12)]
    report = verify_archive(entries, archive.store, deep=deep, concurrency=4)
    assert (report.checked, report.ok, report.problems) == (12, 12, [])


@pytest.mark.parametrize("deep", [False, True])
def test_each_mismatch_kind_is_reported(archive: Archive, deep: bool) -> None:
    good = archive.add("good")
    missing = entry("missing", s3_bucket=archive.store.bucket, size_bytes=10, sha256="ab" * 32)
    sized = archive.add("sized")
    sized = entry("sized", s3_bucket=sized.s3_bucket, size_bytes=123, sha256=sized.sha256)
    hashed = archive.add("hashed")
    hashed = entry(
        "hashed", s3_bucket=hashed.s3_bucket, size_bytes=hashed.size_bytes, sha256="0" * 64
    )
    incomplete = entry("incomplete", s3_bucket=archive.store.bucket)
    entries = [good, missing, sized, hashed, incomplete]

    report = verify_archive(entries, archive.store, deep=deep, concurrency=3)

    assert report.checked == 5 and report.ok == 1
    found = problems_of(report.problems)
    assert set(found) == {"missing", "sized", "hashed", "incomplete"}
    assert found["missing"] == ["missing object"]
    assert found["sized"][0] == "size 20000 != ledger 123"
    assert found["hashed"][0].startswith("sha256 metadata ")
    assert "!= ledger 000000000000…" in found["hashed"][0]
    assert "lacks" in found["incomplete"][0]
    if deep:
        assert any(p.startswith("content hash ") for p in found["hashed"])
    else:
        assert len(found["hashed"]) == 1
    keys = {problem.recording_id: problem.key for problem in report.problems}
    assert keys["sized"] == "r/sized.mp3"


def test_only_deep_catches_replaced_bytes_behind_intact_metadata(
    archive: Archive, s3_client: S3Client
) -> None:
    original = archive.add("swapped", size=8_000)
    # Someone replaced the bytes but copied the metadata: same size, same sha256 metadata.
    s3_client.put_object(
        Bucket=archive.store.bucket,
        Key="r/swapped.mp3",
        Body=b"\x00" * 8_000,
        Metadata={"sha256": str(original.sha256)},
    )
    shallow = verify_archive([original], archive.store, deep=False, concurrency=1)
    assert shallow.ok == 1 and shallow.problems == []
    deep = verify_archive([original], archive.store, deep=True, concurrency=1)
    assert deep.ok == 0
    assert [p.problem for p in deep.problems] == [
        f"content hash {hashlib.sha256(bytes(8_000)).hexdigest()[:12]}… != ledger "
        f"{str(original.sha256)[:12]}…"
    ]


def test_rows_that_are_not_archived_are_ignored(archive: Archive) -> None:
    pending = entry("p", state="pending")
    failed = entry("f", state="failed", last_error="x")
    good = archive.add("g")
    report = verify_archive([pending, failed, good], archive.store, deep=True, concurrency=2)
    assert (report.checked, report.ok, report.problems) == (1, 1, [])


def test_rows_of_another_bucket_are_checked_in_their_bucket(
    archive: Archive, s3_client: S3Client, tmp_path: Path
) -> None:
    s3_client.create_bucket(Bucket="verify-other-bucket")
    other = Archive(MediaStore(s3_client, bucket="verify-other-bucket"), tmp_path)
    elsewhere = other.add("elsewhere")
    here = archive.add("here")
    report = verify_archive([elsewhere, here], archive.store, deep=True, concurrency=2)
    assert (report.checked, report.ok) == (2, 2)


def test_missing_bucket_reports_every_row_missing(s3_client: S3Client) -> None:
    store = MediaStore(s3_client, bucket="verify-no-such-bucket")
    rows = [
        entry(f"x{n}", s3_bucket="verify-no-such-bucket", size_bytes=1, sha256="a" * 64)
        for n in range(3)
    ]
    # HEAD of a missing bucket answers a bare 404, like a missing key: each row is reported.
    report = verify_archive(rows, store, deep=True, concurrency=2)
    assert report.ok == 0
    assert [p.problem for p in report.problems] == ["missing object"] * 3
