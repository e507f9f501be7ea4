"""The archive ledger: a row per recording ID, registered ``pending``, read back by state.

What a run does with the rows it leases (claims, renewals, outcomes) is
:mod:`recarchive.store.claims`; this module registers IDs, reads rows, and says which rows
are due for ``retry-failed``. A lease counts only while its owner's run is alive: running,
and beating (:meth:`recarchive.store.runs.RunsTable.beat`) within :data:`DEFAULT_STALE_AFTER`,
on the database's clock.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, literal_column, or_, select

from recarchive.model import LEDGER_STATES, LedgerEntry, LedgerState, RunStatus
from recarchive.store.bulk import (
    BATCH,
    among_ids,
    batches,
    chunks,
    executemany,
    insert_for,
    retry_conflicts,
)
from recarchive.store.engine import db_now, no_jit, utc_now
from recarchive.store.tables import archive_ledger, runs

__all__ = [
    "DEFAULT_STALE_AFTER",
    "HEARTBEAT_SECONDS",
    "Ledger",
    "lease_unheld",
    "state_in_rows_by_key",
]

#: IDs per insert batch when a run registers its whole input (one transaction).
REGISTER_BATCH = 5000
#: How often a running run renews ``runs.heartbeat_at``, whatever its lease length.
HEARTBEAT_SECONDS = 60.0
#: How old a running run's heartbeat may be before the run counts as dead (its leases free):
#: five missed beats. Fixed, not derived from ``RECARCHIVE_LEASE_SECONDS``, so hosts with other
#: lease settings still agree on who is alive.
DEFAULT_STALE_AFTER = timedelta(seconds=5 * HEARTBEAT_SECONDS)

#: The columns of a :class:`LedgerEntry`, in its field order.
_LEDGER_COLUMNS = tuple(archive_ledger.c[item.name] for item in fields(LedgerEntry))


# Built once per dialect and variant, at first use (not at import: PostgreSQL's dialect costs
# a SQLite process ~30 ms to load): the bulk path compiles a statement object once.
@functools.cache
def _register_statement(dialect_name: str, with_run: bool) -> Any:
    """The insert of :meth:`Ledger.register`: new IDs only, or re-registering pending ones."""
    insert = insert_for(dialect_name, archive_ledger)
    if not with_run:
        return insert.on_conflict_do_nothing(index_elements=[archive_ledger.c.recording_id])
    # No bound parameters in the conflict clause (the bulk paths bind row values only): the
    # state as a literal, the time as the database's own clock.
    return insert.on_conflict_do_update(
        index_elements=[archive_ledger.c.recording_id],
        set_={"registered_run": insert.excluded.registered_run},
        where=and_(
            archive_ledger.c.state == literal_column(f"'{LedgerState.PENDING}'"),
            archive_ledger.c.registered_run.is_distinct_from(insert.excluded.registered_run),
            or_(
                archive_ledger.c.lease_owner.is_(None),
                archive_ledger.c.lease_expires_at <= func.current_timestamp(),
            ),
        ),
    )


@functools.cache
def _entries_query(dialect_name: str) -> Any:
    """The rows of a list of IDs (bound as ``ids``), built once per dialect."""
    return select(*_LEDGER_COLUMNS).where(among_ids(dialect_name, archive_ledger.c.recording_id))


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(**row._mapping)


def _live_run(
    now: datetime, stale_after: timedelta, dead_owners: Collection[str] = ()
) -> ColumnElement[bool]:
    """``runs`` rows of runs alive now: running, with a heartbeat newer than ``stale_after``.

    ``dead_owners``: owners known dead although their row still says running (a dry run's view
    of what the real run's :meth:`~recarchive.store.runs.RunsTable.interrupt_dead_runs` does).
    """
    alive = and_(runs.c.status == RunStatus.RUNNING, runs.c.heartbeat_at > now - stale_after)
    if not dead_owners:
        return alive
    return and_(alive, or_(runs.c.owner.is_(None), runs.c.owner.not_in(list(dead_owners))))


def lease_unheld(
    now: datetime, stale_after: timedelta, dead_owners: Collection[str] = ()
) -> ColumnElement[bool]:
    """No live run holds the row's lease: none, expired, or its owner's run is over or dead.

    An owner without a ``runs`` row (a bare chunk, a test) is trusted until its lease
    expires: only a run that is known to have ended, or that stopped beating, gives up its
    leases early.

    Args:
        now: The database's time (:func:`~recarchive.store.engine.db_now`).
        stale_after: How old a running run's heartbeat may be before it counts as dead.
        dead_owners: Owners to count as dead whatever their ``runs`` row says.

    Returns:
        A condition on ``archive_ledger`` rows.
    """
    owner_run_gone = (
        select(runs.c.id)
        .where(
            runs.c.owner == archive_ledger.c.lease_owner,
            ~_live_run(now, stale_after, dead_owners),
        )
        .exists()
    )
    return or_(
        archive_ledger.c.lease_owner.is_(None),
        archive_ledger.c.lease_expires_at <= now,
        owner_run_gone,
    )


def state_in_rows_by_key(states: Collection[str]) -> ColumnElement[bool]:
    """``state IN states``, for a statement that finds its rows by ``recording_id``.

    Those name their IDs (``recording_id IN (...)``) or page through them in key order
    (``recording_id > ?``). The state is compared as an expression (``state || ''``), not as
    the column, so the database cannot use ``ix_archive_ledger_state_next_attempt`` for it and
    walks the primary key. Given the bare column, SQLite chose that index and read every row of
    the state: a claim of a chunk of 500 IDs read all 1,000,000 ``pending`` rows of a backfill,
    and each page of ``verify``'s walk sorted every archived row after it (docs/benchmarks.md).
    """
    return archive_ledger.c.state.concat("").in_(list(states))


class Ledger:
    """The ledger part of :class:`~recarchive.store.archive.ArchiveStore`: registering, reading."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    # --- registration and reads ----------------------------------------------------------

    def register(self, ids: Iterable[str], *, run_id: int | None = None) -> int:
        """Insert a ``pending`` ledger row for every ID that has none, in one transaction.

        ``ids`` is consumed as a stream in batches, so a million IDs cost one batch of memory.
        With ``run_id``, new rows and ``pending`` rows that nobody holds a lease on are
        registered to that run: ``retry-failed`` leaves them to it while it is alive
        (:meth:`due_retries`). The re-registration is the insert's own ``ON CONFLICT DO
        UPDATE`` (driven by the primary key: a separate ``UPDATE`` filtered on ``state`` made
        the database scan every pending row per batch). On PostgreSQL a deadlock with another
        run registering overlapping IDs in another order is retried, reading ``ids`` again
        (pass a re-iterable such as an :class:`~recarchive.ids.read.IdList`).

        Args:
            ids: Canonical recording IDs.
            run_id: The registering run's ``runs.id``.

        Returns:
            How many IDs were seen.
        """
        seen = [0]

        def work() -> None:
            seen[0] = self._register(ids, run_id)

        retry_conflicts(work)
        return seen[0]

    def _register(self, ids: Iterable[str], run_id: int | None) -> int:
        seen = 0
        now = utc_now()
        with self.engine.begin() as connection:
            statement = _register_statement(connection.dialect.name, run_id is not None)
            for batch in batches(ids, REGISTER_BATCH):
                seen += len(batch)
                # Sorted: overlapping registrations lock rows in one order (fewer deadlocks).
                batch.sort()
                executemany(
                    connection,
                    statement,
                    archive_ledger,
                    [
                        {
                            "recording_id": recording_id,
                            "state": LedgerState.PENDING,
                            "attempts": 0,
                            "created_at": now,
                            "updated_at": now,
                            "registered_run": run_id,
                        }
                        for recording_id in batch
                    ],
                )
        return seen

    def get_entries(self, ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Return the ledger rows of ``ids`` that exist, by ID."""
        entries: dict[str, LedgerEntry] = {}
        with self.engine.connect() as connection:
            query = _entries_query(connection.dialect.name)
            for chunk in chunks(ids):
                for row in connection.execute(query, {"ids": list(chunk)}):
                    entries[row.recording_id] = _entry(row)
        return entries

    def restore_entries(
        self,
        entries: Sequence[LedgerEntry],
        *,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Insert ledger rows as a rebuild found them in the archive, in one transaction.

        For ``rebuild``: a row whose ID is in the ledger already (an interrupted rebuild that
        is continued, or one ID stored under two keys) is kept as it is, never overwritten.
        ``extra`` gives more columns per ID (the Object Lock columns its objects carry).

        Returns:
            The rows inserted.
        """
        if not entries:
            return 0
        now = utc_now()
        rows = [
            {
                "recording_id": entry.recording_id,
                "state": entry.state,
                "attempts": entry.attempts,
                "last_error": entry.last_error,
                "s3_bucket": entry.s3_bucket,
                "s3_key": entry.s3_key,
                "size_bytes": entry.size_bytes,
                "sha256": entry.sha256,
                "archived_at": entry.archived_at,
                "lock_mode": None,
                "retain_until": None,
                "legal_hold": False,
                "created_at": now,
                "updated_at": now,
                **((extra or {}).get(entry.recording_id) or {}),
            }
            for entry in entries
        ]
        with self.engine.begin() as connection:
            statement = insert_for(connection.dialect.name, archive_ledger)
            statement = statement.on_conflict_do_nothing(
                index_elements=[archive_ledger.c.recording_id]
            ).returning(archive_ledger.c.recording_id)
            return len(connection.execute(statement, rows).all())

    def held_by_live_runs(
        self, ids: Sequence[str], *, stale_after: timedelta = DEFAULT_STALE_AFTER
    ) -> set[str]:
        """Those of ``ids`` whose lease a live run holds now (a claim would skip them).

        Read only: a dry run's view of what another run is working on (see
        :func:`lease_unheld`; owners that are dead processes of this host are the caller's).
        """
        held: set[str] = set()
        with self.engine.connect().execution_options(recarchive_read_only=True) as connection:
            no_jit(connection)
            now = db_now(connection)
            for chunk in chunks(ids):
                query = select(archive_ledger.c.recording_id).where(
                    archive_ledger.c.recording_id.in_(list(chunk)),
                    ~lease_unheld(now, stale_after),
                )
                held.update(connection.execute(query).scalars())
        return held

    # --- queries -------------------------------------------------------------------------

    def due_retries(
        self,
        *,
        limit: int,
        max_attempts: int,
        stale_after: timedelta = DEFAULT_STALE_AFTER,
        dead_owners: Collection[str] = (),
    ) -> list[str]:
        """Recordings ``retry-failed`` should take now, oldest due first.

        These are ``failed`` recordings due for a retry, ``metadata_only`` recordings due for
        a look whether their media became available (without this, a recording whose media
        was not ready during its nightly window would never be fetched again), and
        ``pending`` recordings that no live run holds: the run that registered them has
        ended, or it stopped beating (a heartbeat older than ``stale_after``: killed on some
        host), or it is unknown — a killed run's rows, including those of chunks it never
        reached. A live run's pending rows are never taken, even those it has not reached.
        A lease counts only while its owner's run is alive (see :func:`lease_unheld`).

        Args:
            limit: Most IDs to return.
            max_attempts: Failed recordings with this many attempts are not retried.
            stale_after: How old a running run's heartbeat may be before it counts as dead.
            dead_owners: Owners of runs to count as dead whatever their ``runs`` row says.

        Returns:
            IDs without a live lease (database clock), due as described.
        """
        with self.engine.connect().execution_options(recarchive_read_only=True) as connection:
            no_jit(connection)
            now = db_now(connection)
            registered_run_alive = (
                select(runs.c.id)
                .where(
                    runs.c.id == archive_ledger.c.registered_run,
                    _live_run(now, stale_after, dead_owners),
                )
                .exists()
            )
            query = (
                select(archive_ledger.c.recording_id)
                .where(
                    or_(
                        and_(
                            archive_ledger.c.state == LedgerState.FAILED,
                            archive_ledger.c.attempts < max_attempts,
                            archive_ledger.c.next_attempt_at <= now,
                        ),
                        and_(
                            archive_ledger.c.state == LedgerState.METADATA_ONLY,
                            archive_ledger.c.next_attempt_at <= now,
                        ),
                        and_(archive_ledger.c.state == LedgerState.PENDING, ~registered_run_alive),
                    ),
                    lease_unheld(now, stale_after, dead_owners),
                )
                .order_by(
                    archive_ledger.c.next_attempt_at.is_(None),
                    archive_ledger.c.next_attempt_at,
                    archive_ledger.c.recording_id,
                )
                .limit(limit)
            )
            return list(connection.execute(query).scalars())

    def counts(self) -> dict[str, int]:
        """Ledger rows per state (every state listed, zero included)."""
        query = select(archive_ledger.c.state, func.count()).group_by(archive_ledger.c.state)
        with self.engine.connect() as connection:
            found = {state: int(count) for state, count in connection.execute(query).all()}
        return {**dict.fromkeys(LEDGER_STATES, 0), **found}

    def failed_entries(
        self, limit: int, state: LedgerState = LedgerState.FAILED
    ) -> list[LedgerEntry]:
        """The rows of recordings that did not make it, most recently updated first.

        Args:
            limit: Most rows returned.
            state: ``failed`` (by default), or ``missing`` (404 at Bird).
        """
        query = (
            select(*_LEDGER_COLUMNS)
            .where(archive_ledger.c.state == state)
            .order_by(archive_ledger.c.updated_at.desc(), archive_ledger.c.recording_id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [_entry(row) for row in connection.execute(query)]

    def iter_archived(self, batch_size: int = BATCH) -> Iterator[LedgerEntry]:
        """Yield every ``archived`` row in ID order, one short query per batch.

        Keyset pagination: memory holds one batch, and no connection stays open between
        batches (the caller may take its time with each entry).
        """
        after = ""
        while True:
            query = (
                select(*_LEDGER_COLUMNS)
                .where(
                    state_in_rows_by_key([LedgerState.ARCHIVED.value]),
                    archive_ledger.c.recording_id > after,
                )
                .order_by(archive_ledger.c.recording_id)
                .limit(batch_size)
            )
            with self.engine.connect() as connection:
                batch = [_entry(row) for row in connection.execute(query)]
            if not batch:
                return
            yield from batch
            after = batch[-1].recording_id
