"""The schema three ways agree: SQLAlchemy tables, Alembic migrations, and the DDL in sql/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from recarchive.export.schema import RECORDINGS_SCHEMA
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import HEAD_REVISION, create_engine_for, upgrade_database
from recarchive.store.tables import metadata
from tests.fixtures.postgres import fresh_postgres_database
from tests.test_normalize import make_payload

FETCHED = datetime(2025, 7, 11, tzinfo=UTC)
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def dialect_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def apply_sql_file(engine: Engine, path: Path) -> None:
    apply_sql_text(engine, path.read_text())


def apply_sql_text(engine: Engine, text: str) -> None:
    statements = [
        statement.strip()
        for statement in "\n".join(
            line for line in text.splitlines() if not line.lstrip().startswith("--")
        ).split(";")
        if statement.strip()
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)


def describe(engine: Engine) -> dict[str, Any]:
    """Tables, columns (name, generic type, nullability), keys and indexes, as reflected."""
    inspector = inspect(engine)
    schema: dict[str, Any] = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        schema[table] = {
            "columns": [
                (column["name"], type(column["type"]).__name__, column["nullable"])
                for column in inspector.get_columns(table)
            ],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted(
                (index["name"], tuple(index["column_names"]), bool(index["unique"]))
                for index in inspector.get_indexes(table)
            ),
            "foreign_keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    (fk.get("options") or {}).get("ondelete"),
                )
                for fk in inspector.get_foreign_keys(table)
            ),
        }
    return schema


@pytest.fixture
def second_database_url(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    if dialect_of(database_url) == "sqlite":
        yield f"sqlite:///{tmp_path / 'ddl' / 'ddl.db'}"
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def test_alembic_head_matches_the_tables(database_url: str) -> None:
    engine = create_engine_for(database_url)
    try:
        upgrade_database(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_ddl_files_match_the_migrated_schema(database_url: str, second_database_url: str) -> None:
    migrated = create_engine_for(database_url)
    from_ddl = create_engine_for(second_database_url)
    try:
        upgrade_database(migrated)
        apply_sql_file(from_ddl, SQL_DIR / dialect_of(database_url) / "schema.sql")
        expected = describe(migrated)
        assert set(expected) == {t.name for t in metadata.sorted_tables}
        assert describe(from_ddl) == expected
        # The DDL-built database is adopted by the migrations and works with the store.
        upgrade_database(from_ddl)
        upgrade_database(from_ddl)
        with from_ddl.connect() as connection:
            version = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert version.scalar() == HEAD_REVISION
        assert describe(from_ddl) == expected
        store = ArchiveStore(from_ddl)
        record = normalize_recording(make_payload(0), workspace_id="ws", fetched_at=FETCHED)
        store.save_metadata([record])
        store.register([record.id])
        assert store.get_entries([record.id])[record.id].state == "pending"
    finally:
        migrated.dispose()
        from_ddl.dispose()


def ddl_of_0001(text: str) -> str:
    """The first DDL: today's without what revisions 0002, 0003, 0005 and 0006 added."""
    text = text.replace("    owner VARCHAR(255),\n", "")
    text = text.replace("    erased INTEGER DEFAULT 0 NOT NULL,\n", "")  # revision 0006
    text = re.sub(r"    (heartbeat_at|registered_run) [A-Z ]+,\n", "", text)
    text = re.sub(r"    (lock_mode|retain_until|legal_hold|legal_hold_at) [^,\n]+,\n", "", text)
    text = text.replace("CREATE INDEX ix_runs_owner ON runs (owner);\n", "")
    head, marker, _ = text.partition("\n-- List windows")
    assert marker, "the listed_windows table is the DDL's last"
    return head + "\n"


def test_ddl_of_revision_0001_is_adopted_and_upgraded(
    database_url: str, second_database_url: str
) -> None:
    """A database created by hand from the first DDL (no ``runs.owner``) keeps its rows."""
    migrated = create_engine_for(database_url)
    old_ddl = create_engine_for(second_database_url)
    try:
        upgrade_database(migrated)
        text = (SQL_DIR / dialect_of(database_url) / "schema.sql").read_text()
        assert "    owner VARCHAR(255),\n" in text
        apply_sql_text(old_ddl, ddl_of_0001(text))
        with old_ddl.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO runs (kind, status, started_at, params) "
                "VALUES ('archive', 'running', '2025-07-11 00:00:00', '{}')"
            )
        upgrade_database(old_ddl)
        assert describe(old_ddl) == describe(migrated)
        (run,) = ArchiveStore(old_ddl).last_runs(limit=5)
        assert run["kind"] == "archive" and run["status"] == "running"
    finally:
        migrated.dispose()
        old_ddl.dispose()


def test_analyst_views_apply_and_match_the_parquet_columns(database_url: str) -> None:
    engine = create_engine_for(database_url)
    try:
        upgrade_database(engine)
        store = ArchiveStore(engine)
        record = normalize_recording(make_payload(0), workspace_id="ws", fetched_at=FETCHED)
        store.save_metadata([record])
        store.register([record.id])
        store.claim([record.id], owner="a", lease_seconds=60, states={"pending"})
        store.mark_archived(
            record.id, owner="a", bucket="b", key="k.mp3", size_bytes=9, sha256="ef" * 32
        )
        apply_sql_file(engine, SQL_DIR / "views.sql")
        apply_sql_file(engine, SQL_DIR / "views.sql")  # re-applying replaces the views
        with engine.connect() as connection:
            flat = connection.exec_driver_sql("SELECT * FROM recordings_flat")
            columns = list(flat.keys())
            (row,) = flat.all()
            counts: dict[str, int] = dict(
                connection.exec_driver_sql(
                    "SELECT state, recordings FROM ledger_state_counts"
                ).all()
            )
            per_month = connection.exec_driver_sql(
                "SELECT created_month, recordings, archived, archived_bytes "
                "FROM recordings_per_month"
            ).all()
        assert set(columns) == {*RECORDINGS_SCHEMA.names, "created_month"}
        values = dict(zip(columns, row, strict=True))
        assert values["media_s3_uri"] == "s3://b/k.mp3" and values["ledger_state"] == "archived"
        assert values["originator_number"] == record.parties[0]["number"]
        assert counts == {"archived": 1}
        assert [tuple(r) for r in per_month] == [("2025-07", 1, 1, 9)]
    finally:
        engine.dispose()


def test_head_revision_constant_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from recarchive.store.engine import _alembic_config

    assert ScriptDirectory.from_config(_alembic_config()).get_current_head() == HEAD_REVISION


def test_a_database_migrated_to_0001_is_upgraded_with_its_rows(tmp_path: Path) -> None:
    from alembic import command

    from recarchive.store.engine import _alembic_config

    engine = create_engine_for(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        config = _alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
            connection.exec_driver_sql(
                "INSERT INTO runs (kind, status, started_at, params) "
                "VALUES ('archive', 'succeeded', '2025-07-11 00:00:00.000000', '{}')"
            )
        upgrade_database(engine)
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert version.scalar() == HEAD_REVISION
        (run,) = ArchiveStore(engine).last_runs(limit=5)
        assert run["status"] == "succeeded"
        assert "owner" in {column["name"] for column in inspect(engine).get_columns("runs")}
    finally:
        engine.dispose()


def test_the_newest_revision_marker_is_the_head_revision() -> None:
    # A hand-made database is adopted at the newest revision whose marker column it has: a
    # new DDL revision needs its marker, or such databases would be stamped wrongly. The DDL
    # in sql/ describes HEAD_REVISION, which test_head_revision_constant_is_alembics_head
    # keeps equal to Alembic's head.
    from recarchive.store.engine import REVISION_MARKERS

    assert REVISION_MARKERS[0][0] == HEAD_REVISION
    for _revision, table, column in REVISION_MARKERS:
        assert column in metadata.tables[table].c


def test_opening_an_upgraded_database_skips_alembic(tmp_path: Path) -> None:
    import sys

    from recarchive.store.engine import _at_head

    engine = create_engine_for(f"sqlite:///{tmp_path / 'fast.db'}")
    assert not _at_head(engine)
    upgrade_database(engine)
    assert _at_head(engine)
    sys.modules.pop("alembic.command", None)
    upgrade_database(engine)  # at head: returns before importing Alembic's commands
    assert "alembic.command" not in sys.modules
    engine.dispose()


def test_every_run_counter_has_a_runs_column(tmp_path: Path) -> None:
    # The count columns are derived from RunCounts; the migrated table must carry every one of
    # them, so a counter added to RunCounts without a migration fails here (and in the Alembic
    # comparison above) instead of being dropped when the run finishes.
    from dataclasses import fields

    from recarchive.model import RunCounts

    counters = {item.name for item in fields(RunCounts)} - {"failures"}
    engine = create_engine_for(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        upgrade_database(engine)
        columns = {column["name"] for column in inspect(engine).get_columns("runs")}
    finally:
        engine.dispose()
    assert counters <= columns
    assert counters == set(metadata.tables["runs"].c.keys()) & counters


def test_finish_run_refuses_a_counter_without_a_column(tmp_path: Path) -> None:
    from recarchive.model import RunCounts, RunStatus

    engine = create_engine_for(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        upgrade_database(engine)
        store = ArchiveStore(engine)
        run_id = store.start_run("archive", {})
        with pytest.raises(ValueError, match="no runs column for counters skipped"):
            store.finish_run(run_id, status=RunStatus.SUCCEEDED, counts={"skipped": 1})
        store.finish_run(run_id, status=RunStatus.SUCCEEDED, counts=RunCounts(archived=2).as_dict())
        (row,) = store.last_runs(1)
        assert row["archived"] == 2 and row["status"] == "succeeded"
    finally:
        engine.dispose()
