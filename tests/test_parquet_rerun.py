"""The bulk export's rows equal SQLAlchemy's typed rows; a rerun that changed nothing writes
nothing (locally and on S3), and ``--full`` still puts back a deleted or altered file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, delete, select, update

from recarchive.export.parquet import export_changed
from recarchive.export.rows import parties_query, recordings_query
from recarchive.export.schema import PARTIES_SCHEMA, RECORDINGS_SCHEMA
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.tables import export_partitions, recording_parties, recordings
from tests.test_normalize import make_payload

JULY = datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC)
AUGUST = datetime(2025, 8, 3, 23, 59, 59, 999999, tzinfo=UTC)
MONTHS = ("2025-07", "2025-08")


def part(root: Path, table: str, month: str) -> Path:
    return root / table / f"created_month={month}" / "part-0.parquet"


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of every partition file: both change when a file is put there anew."""
    return {
        str(path.relative_to(root)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*.parquet"))
    }


def exported_at(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(export_partitions.c.created_month, export_partitions.c.exported_at)
        )
        return {row.created_month: row.exported_at for row in rows}


def fill(engine: Engine) -> ArchiveStore:
    """Recordings of two months in every ledger state the media columns tell apart."""
    store = ArchiveStore(engine)
    records = [
        normalize_recording(
            make_payload(
                index,
                created=(JULY if index % 2 else AUGUST) + timedelta(microseconds=index),
                duration=0.1 * index + 1 / 3,
                stereo=index % 3 == 0,
            ),
            workspace_id="ws-ünïcode",
            fetched_at=JULY + timedelta(days=40, microseconds=7),
        )
        for index in range(12)
    ]
    store.save_metadata(records)
    store.register([record.id for record in records])
    archived, skipped = records[1], records[2]
    store.claim([archived.id, skipped.id], owner="a", lease_seconds=60, states={"pending"})
    store.mark_archived(
        archived.id, owner="a", bucket="bkt", key="k/é.mp3", size_bytes=2048, sha256="ab" * 32
    )
    store.mark_metadata_only(skipped.id, owner="a", reason="--skip-media")
    return store


def test_rows_equal_sqlalchemys_typed_rows(engine: Engine, tmp_path: Path) -> None:
    """The bulk conversion (driver tuples → Arrow casts) gives what SQLAlchemy's types give."""
    fill(engine)
    export_changed(engine, str(tmp_path))
    for month in MONTHS:
        with engine.connect() as connection:
            typed = [row._asdict() for row in connection.execute(recordings_query(month))]
            parties = [row._asdict() for row in connection.execute(parties_query(month))]
        for row in typed:
            state, bucket, key = row.pop("state"), row.pop("s3_bucket"), row.pop("s3_key")
            sha256, size = row.pop("sha256"), row.pop("size_bytes")
            ok = state == "archived"
            row.update(
                media_s3_uri=f"s3://{bucket}/{key}" if ok else None,
                media_sha256=sha256 if ok else None,
                media_size_bytes=size if ok else None,
                archived_at=row["archived_at"] if ok else None,
                ledger_state=state,
            )
        written = pq.read_table(part(tmp_path, "recordings", month))
        expected = pa.Table.from_pylist(typed, schema=RECORDINGS_SCHEMA)
        assert written.equals(expected), month
        assert pq.read_table(part(tmp_path, "recording_parties", month)).equals(
            pa.Table.from_pylist(parties, schema=PARTIES_SCHEMA)
        )
    everything = pa.concat_tables(
        pq.read_table(part(tmp_path, "recordings", month)) for month in MONTHS
    ).to_pylist()
    states = sorted(row["ledger_state"] for row in everything)
    assert states == ["archived", "metadata_only"] + ["pending"] * 10
    archived = [row for row in everything if row["ledger_state"] == "archived"]
    assert [row["media_s3_uri"] for row in archived] == ["s3://bkt/k/é.mp3"]
    assert archived[0]["archived_at"] is not None and archived[0]["media_size_bytes"] == 2048
    assert all(
        row["media_sha256"] is None and row["archived_at"] is None
        for row in everything
        if row["ledger_state"] != "archived"
    )


@pytest.mark.parametrize(
    ("deleted", "blanked", "victim_rows"),
    [
        pytest.param(("receiver",), None, 3, id="no-receiver"),
        pytest.param(("originator",), None, 3, id="no-originator"),
        pytest.param(("originator", "receiver"), None, 0, id="no-party"),
        pytest.param((), "originator", 6, id="originator-row-all-null"),
    ],
)
def test_party_files_hold_exactly_the_party_rows(
    engine: Engine,
    tmp_path: Path,
    deleted: tuple[str, ...],
    blanked: str | None,
    victim_rows: int,
) -> None:
    """The parties files, taken apart from the recordings query, equal the parties table's rows.

    A missing party row gives no row (not one of NULLs), and a party row whose fields are all
    NULL is still a row: the marker, not the fields, says which rows exist.
    """
    fill(engine)
    victims = sorted(row.id for row in _recording_ids(engine))[3:6]
    fields = {c.name: None for c in recording_parties.c if c.name not in ("recording_id", "role")}
    of_victims = recording_parties.c.recording_id.in_(victims)
    with engine.begin() as connection:
        for role in deleted:
            connection.execute(
                delete(recording_parties).where(of_victims, recording_parties.c.role == role)
            )
        if blanked is not None:
            connection.execute(
                update(recording_parties)
                .where(of_victims, recording_parties.c.role == blanked)
                .values(fields)
            )
    export_changed(engine, str(tmp_path))
    seen = 0
    for month in MONTHS:
        with engine.connect() as connection:
            parties = [row._asdict() for row in connection.execute(parties_query(month))]
        written = pq.read_table(part(tmp_path, "recording_parties", month))
        assert written.equals(pa.Table.from_pylist(parties, schema=PARTIES_SCHEMA)), month
        seen += sum(row["recording_id"] in victims for row in parties)
    assert seen == victim_rows  # the change happened: the comparison above saw it


def _recording_ids(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(recordings.c.id)))


def test_a_rerun_that_changed_nothing_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    store = fill(engine)
    first = export_changed(engine, str(tmp_path))
    assert first.partitions == list(MONTHS) and first.unchanged == []
    before, marks = files(tmp_path), exported_at(engine)
    assert export_changed(engine, str(tmp_path)).partitions == []
    full = export_changed(engine, str(tmp_path), full=True)
    # Every partition exported (checked against SQL), none written: same files, same marks.
    assert full.partitions == list(MONTHS) and full.unchanged == list(MONTHS)
    assert full.rows == first.rows == 12
    assert files(tmp_path) == before
    assert exported_at(engine) == marks
    # A real change is written, and only its partition.
    store.save_metadata(
        [
            normalize_recording(
                make_payload(
                    1, created=JULY, status="completed", updated=JULY + timedelta(hours=1)
                ),
                workspace_id="ws-ünïcode",
                fetched_at=JULY + timedelta(days=41),
            )
        ]
    )
    changed = export_changed(engine, str(tmp_path), full=True)
    assert changed.partitions == list(MONTHS) and changed.unchanged == ["2025-08"]
    after = files(tmp_path)
    july = "recordings/created_month=2025-07/part-0.parquet"
    assert after[july] != before[july]
    assert {k: v for k, v in after.items() if "2025-08" in k} == {
        k: v for k, v in before.items() if "2025-08" in k
    }


def test_full_still_puts_back_a_deleted_or_altered_file(engine: Engine, tmp_path: Path) -> None:
    fill(engine)
    export_changed(engine, str(tmp_path))
    good = {month: part(tmp_path, "recordings", month).read_bytes() for month in MONTHS}
    part(tmp_path, "recordings", "2025-07").unlink()
    altered = part(tmp_path, "recordings", "2025-08")
    altered.write_bytes(good["2025-08"][:-9] + b"x" * 9)  # same size, other bytes
    report = export_changed(engine, str(tmp_path), full=True)
    assert report.partitions == list(MONTHS) and report.unchanged == []
    assert {month: part(tmp_path, "recordings", month).read_bytes() for month in MONTHS} == good


def test_a_rerun_on_s3_puts_nothing(
    sqlite_engine: Engine, s3_endpoint: str, s3_bucket: str, s3_client: Any
) -> None:
    fill(sqlite_engine)
    root = f"s3://{s3_bucket}/analytics"
    export_changed(sqlite_engine, root, s3_endpoint_url=s3_endpoint)

    def etags_and_times() -> dict[str, tuple[str, Any]]:
        listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="analytics/")["Contents"]
        return {item["Key"]: (item["ETag"], item["LastModified"]) for item in listed}

    before = etags_and_times()
    assert len(before) == 4
    key = "analytics/recordings/created_month=2025-07/part-0.parquet"
    s3_client.delete_object(Bucket=s3_bucket, Key=key)
    report = export_changed(sqlite_engine, root, s3_endpoint_url=s3_endpoint, full=True)
    assert report.unchanged == ["2025-08"]
    after = etags_and_times()
    assert after.keys() == before.keys() and after[key][0] == before[key][0]
    assert {k: v for k, v in after.items() if k != key} == {
        k: v for k, v in before.items() if k != key
    }
