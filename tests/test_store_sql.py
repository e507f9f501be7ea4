"""SQL store on SQLite and PostgreSQL: engine, upgrades, upserts, partitions marks, runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import ArgumentError

from recarchive.errors import StorageUnavailableError
from recarchive.model import NormalizedRecording, RunStatus
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import HEAD_REVISION, create_engine_for, upgrade_database
from recarchive.store.tables import export_partitions, recording_parties, recordings
from tests.test_normalize import make_payload

T0 = datetime(2025, 7, 10, 2, 10, 43, tzinfo=UTC)


def records(
    count: int, *, start: int = 0, fetched: datetime = T0, **kwargs: Any
) -> list[NormalizedRecording]:
    return [
        normalize_recording(make_payload(index, **kwargs), workspace_id="ws-1", fetched_at=fetched)
        for index in range(start, start + count)
    ]


def rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(table))]


def versions(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                select(export_partitions.c.created_month, export_partitions.c.version)
            ).all()
        )


# --- engine and schema ------------------------------------------------------------------------


def test_sqlite_engine_creates_folder_and_pragmas(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}")
    try:
        upgrade_database(engine)
        assert (tmp_path / "a" / "b" / "x.db").exists()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000
    finally:
        engine.dispose()


def test_postgresql_urls_use_psycopg() -> None:
    for url in (
        "postgresql://u:p@localhost/db",
        "postgres://u:p@localhost/db",
        "postgresql+psycopg://u:p@localhost/db",
    ):
        engine = create_engine_for(url)
        assert engine.dialect.driver == "psycopg"
        engine.dispose()


@pytest.mark.parametrize("url", ["not a url", "://", ""])
def test_bad_url_raises_argument_error(url: str) -> None:
    with pytest.raises((ArgumentError, ValueError)):
        create_engine_for(url)


def test_a_schema_newer_than_the_code_is_a_clear_error(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StorageUnavailableError, match="revision 9999, newer than this"):
        upgrade_database(engine)


def test_unsupported_backend_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unsupported database backend"):
        create_engine_for("mysql://u:p@localhost/db")


def later_version(index: int, later: datetime) -> NormalizedRecording:
    """Recording ``index`` updated at ``later``: completed, and without its receiver."""
    return normalize_recording(
        make_payload(index, updated=later, status="completed", receiver=None),
        workspace_id="ws-1",
        fetched_at=later,
    )


def test_upgrade_is_idempotent_and_keeps_data(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata(records(3))
    upgrade_database(engine)
    upgrade_database(engine)
    assert len(rows(engine, recordings)) == 3
    with engine.connect() as connection:
        assert (
            connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            == HEAD_REVISION
        )


# --- upserts ----------------------------------------------------------------------------------


def test_insert_rows_and_parties(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata(records(5))
    stored = {row["id"]: row for row in rows(engine, recordings)}
    assert len(stored) == 5
    row = stored["00000000-0000-0000-0000-000000000001"]
    assert row["created_at"] == datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC)
    assert row["created_at"].tzinfo is not None
    assert row["url"].endswith(".mp3") and "?" not in row["url"]
    assert row["stereo"] is True and row["duration"] == 30.0
    assert len(rows(engine, recording_parties)) == 10
    assert versions(engine) == {"2025-07": 1}


def test_identical_payload_changes_nothing(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata(records(4, fetched=T0))
    before = rows(engine, recordings)
    parties_before = rows(engine, recording_parties)
    store.save_metadata(records(4, fetched=T0 + timedelta(hours=5)))
    assert rows(engine, recordings) == before, "not even fetched_at may change"
    assert rows(engine, recording_parties) == parties_before
    assert versions(engine) == {"2025-07": 1}


def test_updated_at_change_updates_row_parties_and_mark(
    engine: Engine, store: ArchiveStore
) -> None:
    store.save_metadata(records(3))
    later = T0 + timedelta(days=1)
    changed = later_version(1, later)
    store.save_metadata([changed])
    stored = {row["id"]: row for row in rows(engine, recordings)}
    row = stored[changed.id]
    assert row["updated_at"] == later and row["status"] == "completed"
    assert row["fetched_at"] == later
    parties = [p for p in rows(engine, recording_parties) if p["recording_id"] == changed.id]
    assert [p["role"] for p in parties] == ["originator"]
    assert versions(engine) == {"2025-07": 2}
    # The untouched ones kept their fetch time.
    assert stored["00000000-0000-0000-0000-000000000001"]["fetched_at"] == T0


def test_same_updated_at_but_other_content_updates(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata(records(1))
    store.save_metadata(records(1, status="completed"))
    (row,) = rows(engine, recordings)
    assert row["status"] == "completed"


def test_an_older_payload_never_replaces_a_newer_one(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata([later_version(0, T0 + timedelta(days=1))])
    before, parties_before = rows(engine, recordings), rows(engine, recording_parties)
    # A run that fetched the older version earlier and stalled writes it late.
    store.save_metadata(records(1, status="available"))
    assert rows(engine, recordings) == before
    assert rows(engine, recording_parties) == parties_before
    assert versions(engine) == {"2025-07": 1}


def test_same_updated_at_keeps_the_later_fetch(engine: Engine, store: ArchiveStore) -> None:
    # Bird changed a field without touching updatedAt; a stalled run writes the content it
    # fetched before that change, late.
    store.save_metadata(records(1, status="completed", fetched=T0 + timedelta(hours=2)))
    before = rows(engine, recordings)
    store.save_metadata(records(1, status="available", fetched=T0 + timedelta(hours=1)))
    assert rows(engine, recordings) == before
    store.save_metadata(records(1, status="paused", fetched=T0 + timedelta(hours=3)))
    (row,) = rows(engine, recordings)
    assert row["status"] == "paused" and row["fetched_at"] == T0 + timedelta(hours=3)


def test_created_month_move_marks_both_months(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata(records(1))
    moved = records(1, created=datetime(2025, 8, 2, tzinfo=UTC))
    store.save_metadata(moved)
    (row,) = rows(engine, recordings)
    assert row["created_month"] == "2025-08"
    assert versions(engine) == {"2025-07": 2, "2025-08": 1}


def test_three_stores_keep_each_recording_once_with_latest_values(
    engine: Engine, store: ArchiveStore
) -> None:
    first = records(600)
    store.save_metadata(first)
    store.save_metadata(records(600))
    later = T0 + timedelta(days=2)
    third = [
        normalize_recording(
            make_payload(i, updated=later, status="completed") if i % 7 == 0 else make_payload(i),
            workspace_id="ws-1",
            fetched_at=later,
        )
        for i in range(600)
    ]
    store.save_metadata(third)
    stored = rows(engine, recordings)
    assert len(stored) == 600 and len({row["id"] for row in stored}) == 600
    for row in stored:
        index = int(row["id"].replace("-", ""), 16) - 1
        expected = "completed" if index % 7 == 0 else "available"
        assert row["status"] == expected
        assert row["updated_at"] == (
            later if index % 7 == 0 else datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC)
        )
    assert len(rows(engine, recording_parties)) == 1200


def test_repeated_id_in_one_call_last_wins(engine: Engine, store: ArchiveStore) -> None:
    old, new = records(1)[0], records(1, status="completed")[0]
    store.save_metadata([old, new])
    (row,) = rows(engine, recordings)
    assert row["status"] == "completed"


def test_empty_save_is_a_no_op(engine: Engine, store: ArchiveStore) -> None:
    store.save_metadata([])
    assert rows(engine, recordings) == []


# --- runs -------------------------------------------------------------------------------------


def test_runs_rows(store: ArchiveStore) -> None:
    first = store.start_run("archive", {"skip_media": False, "ids": 3})
    second = store.start_run("backfill", {"since": "2025-07-01"})
    assert second > first
    store.finish_run(
        first,
        status=RunStatus.PARTIAL,
        counts={
            "requested": 3,
            "archived": 1,
            "failed": 1,
            "missing": 1,
            "bytes_uploaded": 5_000_000_000,
        },
    )
    store.finish_run(second, status=RunStatus.FAILED, counts={}, error="AuthError: refused")
    newest, oldest = store.last_runs(limit=10)
    assert newest["id"] == second and newest["status"] == "failed"
    assert newest["error"] == "AuthError: refused" and newest["requested"] == 0
    assert oldest["kind"] == "archive" and oldest["status"] == "partial"
    assert oldest["archived"] == 1 and oldest["failed"] == 1 and oldest["missing"] == 1
    assert oldest["bytes_uploaded"] == 5_000_000_000
    assert oldest["started_at"] <= oldest["finished_at"]
    assert oldest["started_at"].tzinfo is not None
    assert {
        "id",
        "kind",
        "status",
        "started_at",
        "finished_at",
        "requested",
        "archived",
        "already_archived",
        "metadata_only",
        "missing",
        "failed",
        "busy",
        "bytes_uploaded",
    } <= set(oldest)
    assert len(store.last_runs(limit=1)) == 1


def test_running_run_has_no_finish(store: ArchiveStore) -> None:
    run_id = store.start_run("archive", {})
    (run,) = store.last_runs(limit=5)
    assert run["id"] == run_id and run["status"] == "running" and run["finished_at"] is None


def test_rows_of_dead_runs_are_finished_as_interrupted(store: ArchiveStore) -> None:
    dead = store.start_run("archive", {}, owner="host-a:111:aaaa")
    alive = store.start_run("archive", {}, owner="host-a:222:bbbb")
    legacy = store.start_run("archive", {})  # written before runs.owner existed
    finished = store.start_run("archive", {}, owner="host-a:111:cccc")
    store.finish_run(finished, status=RunStatus.SUCCEEDED, counts={"archived": 2})
    judged: list[str] = []

    def owner_is_dead(owner: str) -> bool:
        judged.append(owner)
        return owner.startswith("host-a:111:")

    assert store.interrupt_dead_runs(owner_is_dead) == [dead]
    runs = {run["id"]: run for run in store.last_runs(limit=10)}
    assert runs[dead]["status"] == "interrupted" and runs[dead]["finished_at"] is not None
    assert "killed" in runs[dead]["error"]
    assert runs[alive]["status"] == "running" and runs[legacy]["status"] == "running"
    assert runs[finished]["status"] == "succeeded" and runs[finished]["archived"] == 2
    assert sorted(judged) == ["host-a:111:aaaa", "host-a:222:bbbb"]  # running rows only
    assert store.interrupt_dead_runs(owner_is_dead) == []


def test_concurrent_saves_of_overlapping_recordings(database_url: str) -> None:
    """Four writers store overlapping, partly newer versions at once: no error, no duplicate."""
    import threading

    setup = create_engine_for(database_url)
    upgrade_database(setup)
    setup.dispose()
    later = T0 + timedelta(days=1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def writer(number: int) -> None:
        engine = create_engine_for(database_url)
        try:
            store = ArchiveStore(engine)
            batch = [
                normalize_recording(
                    # The later version also lost its receiver: its parties differ.
                    make_payload(i, updated=later, status="completed", receiver=None)
                    if number % 2
                    else make_payload(i),
                    workspace_id="ws-1",
                    fetched_at=T0,
                )
                for i in range(number * 50, number * 50 + 300)
            ]
            barrier.wait()
            for start in range(0, len(batch), 60):
                store.save_metadata(
                    batch[start : start + 60][::-1] if number == 3 else batch[start : start + 60]
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    check = create_engine_for(database_url)
    try:
        stored = rows(check, recordings)
        assert len(stored) == 450 and len({row["id"] for row in stored}) == 450
        parties = rows(check, recording_parties)
        roles: dict[str, list[str]] = {}
        for party in parties:
            roles.setdefault(party["recording_id"], []).append(party["role"])
        # Newer wins whatever the order: every ID a "later" writer (1: 50-349, 3: 150-449)
        # stored ends with that version, and its parties are that version's.
        for row in stored:
            index = int(row["id"].replace("-", ""), 16) - 1
            newest = index >= 50
            assert row["status"] == ("completed" if newest else "available"), index
            assert (row["updated_at"] == later) is newest, index
            assert sorted(roles[row["id"]]) == (
                ["originator"] if newest else ["originator", "receiver"]
            ), index
        assert len(parties) == 400 + 2 * 50
    finally:
        check.dispose()


def test_deadlock_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    from recarchive.store import bulk

    class Deadlock(Exception):
        sqlstate = "40P01"

    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE ...", {}, Deadlock())

    monkeypatch.setattr("recarchive.store.bulk.time.sleep", lambda _: None)
    bulk.retry_conflicts(flaky)
    assert len(calls) == 3

    def other() -> None:
        raise OperationalError("SELECT ...", {}, Exception("database is locked"))

    with pytest.raises(OperationalError):
        bulk.retry_conflicts(other)


def test_a_sqlite_process_never_loads_postgresqls_dialect(tmp_path: Path) -> None:
    """Statements are built per dialect when first used: PostgreSQL's costs ~30 ms to load.

    A database at the head revision (migrations load alembic, which loads every dialect).
    """
    import subprocess
    import sys

    upgrade_database(create_engine_for(f"sqlite:///{tmp_path / 'a.db'}"))

    code = (
        "import sys\n"
        "from datetime import UTC, datetime\n"
        "import recarchive.cli.app, recarchive.run.runs, recarchive.export.parquet\n"
        "from recarchive.normalize import normalize_recording\n"
        "from recarchive.store.archive import ArchiveStore\n"
        "from recarchive.store.engine import create_engine_for, upgrade_database\n"
        "from tests.test_normalize import make_payload\n"
        f"engine = create_engine_for('sqlite:///{tmp_path / 'a.db'}')\n"
        "upgrade_database(engine)\n"
        "store = ArchiveStore(engine)\n"
        "record = normalize_recording(make_payload(1), workspace_id='ws',"
        " fetched_at=datetime.now(UTC))\n"
        "store.register([record.id])\n"
        "store.save_metadata([record])\n"
        "assert list(store.get_entries([record.id])) == [record.id]\n"
        "print(sorted(m for m in sys.modules if 'postgresql' in m or 'psycopg' in m))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.decode().strip() == "[]"
