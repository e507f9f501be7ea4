"""Statements that find ledger rows by ID walk the primary key, whatever their state.

SQLite plans without statistics: given ``recording_id IN (...) AND state IN (...)``, it chose
``ix_archive_ledger_state_next_attempt`` and read every row of those states, so each chunk of a
1,000,000-ID backfill read the whole ledger, and each page of ``verify``'s key-order walk
(``recording_id > ?``) sorted every archived row after it (docs/benchmarks.md). Each case runs
the real store call, captures its statements and asks SQLite for their plans; the control
shows that the bare column would still be planned through the state index by this SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, update

from recarchive.model import LedgerState
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.store.tables import archive_ledger

IDS = [str(uuid.UUID(int=index + 1, version=4)) for index in range(40)]
STATE_INDEX = "ix_archive_ledger_state_next_attempt"
PRIMARY_KEY = "sqlite_autoindex_archive_ledger_1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArchiveStore]:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade_database(engine)
    archive = ArchiveStore(engine)
    archive.register(IDS)
    yield archive
    engine.dispose()


def _plans(engine: Engine, call: Callable[[], Any]) -> list[str]:
    """The query plans of the statements ``call`` runs that find ledger rows by ID."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if any(f"archive_ledger.recording_id {how}" in statement for how in ("IN", ">")):
            statements.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert statements, "the call ran no statement naming ledger rows by ID"
    plans = []
    with engine.connect() as connection:
        raw = connection.connection.driver_connection
        assert raw is not None
        for statement, params in statements:
            rows = raw.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
            plans.append(" | ".join(str(row[-1]) for row in rows))
    return plans


CASES: dict[str, Callable[[ArchiveStore], Any]] = {
    "claim": lambda store: store.claim(
        IDS, owner="run-1", lease_seconds=60, states={"pending", "failed", "metadata_only"}
    ),
    "legal-hold": lambda store: store.record_legal_hold(IDS, on=True),
    "transcription-targets": lambda store: store.transcription_targets(IDS),
    "verify-walk": lambda store: list(store.iter_archived(batch_size=10)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rows_named_by_id_are_read_by_primary_key(store: ArchiveStore, name: str) -> None:
    plans = _plans(store.engine, lambda: CASES[name](store))
    for plan in plans:
        assert STATE_INDEX not in plan, plan
        assert PRIMARY_KEY in plan, plan


def test_control_the_bare_state_column_is_planned_through_the_state_index(
    store: ArchiveStore,
) -> None:
    def bare() -> None:
        with store.engine.begin() as connection:
            connection.execute(
                update(archive_ledger)
                .where(
                    archive_ledger.c.recording_id.in_(IDS),
                    archive_ledger.c.state.in_([LedgerState.PENDING.value, "failed"]),
                )
                .values(lease_owner="run-1")
            )

    (plan,) = _plans(store.engine, bare)
    assert STATE_INDEX in plan, plan
