"""SQL store: engine setup, schema upgrades, recording upserts, the archive ledger and runs.

SQLAlchemy 2 Core on SQLite (embedded default) and PostgreSQL (psycopg 3). SQL is the source
of truth; the Parquet dataset is exported from it (:mod:`recarchive.export.parquet`).

Ledger rows are claimed with leases so that two runs never work on the same recording: on
PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite, where every write
transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time), with a single conditional
``UPDATE``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from recarchive.errors import LedgerStateError, StorageUnavailableError
from recarchive.model import (
    LEDGER_STATES,
    RUN_COUNT_COLUMNS,
    LedgerEntry,
    LedgerState,
    NormalizedRecording,
    RunStatus,
)
from recarchive.store.tables import (
    UTCDateTime,
    archive_ledger,
    export_partitions,
    metadata,
    recording_parties,
    recordings,
    runs,
)

__all__ = [
    "ArchiveStore",
    "create_engine_for",
    "mark_partitions",
    "metadata",
    "upgrade_database",
]

#: IDs per statement: well below SQLite's bound-parameter limit and PostgreSQL's comfort zone.
BATCH = 500
#: Longest error text kept in the ledger and the runs table.
MAX_ERROR_CHARS = 2000
#: The Alembic revision that the DDL files in ``sql/`` describe.
DDL_REVISION = "0003"
#: For each revision after 0001, newest first, a column it added: a database created by hand
#: from the DDL of some revision is adopted at the newest revision whose column it has. A test
#: keeps the first entry equal to :data:`DDL_REVISION`.
REVISION_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("0003", "runs", "heartbeat_at"),
    ("0002", "runs", "owner"),
)
#: Key of the PostgreSQL advisory lock that serializes concurrent schema upgrades.
_MIGRATION_LOCK_KEY = 0x7265636172636869
_VERSION_QUERY = "SELECT version_num FROM alembic_version"

_LEDGER_COLUMNS = (
    archive_ledger.c.recording_id,
    archive_ledger.c.state,
    archive_ledger.c.attempts,
    archive_ledger.c.last_error,
    archive_ledger.c.next_attempt_at,
    archive_ledger.c.s3_bucket,
    archive_ledger.c.s3_key,
    archive_ledger.c.size_bytes,
    archive_ledger.c.sha256,
    archive_ledger.c.archived_at,
    archive_ledger.c.lease_owner,
    archive_ledger.c.lease_expires_at,
)


def _now() -> datetime:
    return datetime.now(UTC)


def db_now(connection: Connection) -> datetime:
    """The database's clock: every lease and heartbeat time is read and compared on it.

    Hosts sharing a PostgreSQL ledger may disagree about the time; the database is the one
    clock they share. SQLite is embedded, so its clock is this host's.
    """
    if connection.dialect.name == "postgresql":
        moment = connection.execute(select(func.now())).scalar_one()
        assert isinstance(moment, datetime)
        return moment.astimezone(UTC)
    return _now()


def _no_jit(connection: Connection) -> None:
    """PostgreSQL: no JIT for this transaction's ledger queries.

    Their correlated ``EXISTS`` on ``runs`` push the planner's cost estimate past
    ``jit_above_cost``; compiling then costs ~0.5 s a query against ~20 ms to run it.
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL jit = off")


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


#: IDs per insert batch when a run registers its whole input (one transaction).
REGISTER_BATCH = 5000


def _chunks(items: Sequence[str], size: int = BATCH) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _clip(message: str | None) -> str | None:
    return None if message is None else message[:MAX_ERROR_CHARS]


# --- engine and schema ---------------------------------------------------------------------


def create_engine_for(url: str) -> Engine:
    """Create the engine for a SQLite or PostgreSQL URL.

    SQLite: the parent folder is created; WAL journal, a busy timeout, foreign keys, and
    ``BEGIN IMMEDIATE`` transactions (so a read-then-write never fails on a lock upgrade).
    PostgreSQL: ``postgresql://`` and ``postgres://`` use psycopg 3.

    Args:
        url: SQLAlchemy database URL.

    Returns:
        The engine (nothing is connected yet).

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a URL.
        ValueError: The backend is neither SQLite nor PostgreSQL.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def _sqlite_engine(url: URL) -> Engine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN instead of the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front; long readers (the Parquet export) opt out
        # with the ``recarchive_read_only`` execution option and read a WAL snapshot.
        if connection.get_execution_options().get("recarchive_read_only"):
            connection.exec_driver_sql("BEGIN DEFERRED")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: The newest Alembic revision in ``recarchive/store/migrations/versions``; a test keeps it equal to
#: Alembic's head. A database already there is opened without importing Alembic at all, which
#: saves about half a second of every command's start-up.
HEAD_REVISION = "0003"


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "recarchive.store:migrations")
    return config


def upgrade_database(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision.

    Idempotent and safe on every start; concurrent callers on PostgreSQL are serialized by an
    advisory lock. A database created by hand from ``sql/*/schema.sql`` (no Alembic version
    table yet) is stamped with that DDL's revision first, then upgraded.

    Args:
        engine: Engine from :func:`create_engine_for`.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: The database cannot be reached or upgraded.
        StorageUnavailableError: The database is at a revision newer than this code knows
            (another machine runs a newer recarchive).
    """
    if _at_head(engine):
        return
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config()
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" in tables:
            current = {row[0] for row in connection.execute(text(_VERSION_QUERY))}
            if current - known:
                raise StorageUnavailableError(
                    f"the database schema is at revision {', '.join(sorted(current - known))}, "
                    f"newer than this recarchive (head {HEAD_REVISION}): upgrade recarchive "
                    "on every machine that uses this database"
                )
        elif {"recordings", "archive_ledger", "runs"} <= tables:
            # Created by hand from sql/*/schema.sql: adopt it at the revision of that DDL.
            command.stamp(config, _hand_made_revision(connection))
        command.upgrade(config, "head")


def _hand_made_revision(connection: Connection) -> str:
    """The revision of the ``sql/`` DDL a hand-made database was created from."""
    inspector = inspect(connection)
    for revision, table, column in REVISION_MARKERS:
        if column in {found["name"] for found in inspector.get_columns(table)}:
            return revision
    return "0001"


def _at_head(engine: Engine) -> bool:
    """True when the database is already at :data:`HEAD_REVISION` (a cheap read)."""
    with engine.connect().execution_options(recarchive_read_only=True) as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.execute(text(_VERSION_QUERY)).all()
        return [row[0] for row in versions] == [HEAD_REVISION]


def mark_partitions(connection: Connection, months: Iterable[str]) -> None:
    """Mark ``created_month`` partitions changed (bump their version) in the caller's transaction.

    Args:
        connection: A connection inside a transaction.
        months: ``YYYY-MM`` partitions.
    """
    now = _now()
    rows = [
        {"created_month": month, "version": 1, "exported_version": 0, "changed_at": now}
        for month in sorted(set(months))
    ]
    if not rows:
        return
    insert = _insert(connection, export_partitions)
    connection.execute(
        insert.on_conflict_do_update(
            index_elements=[export_partitions.c.created_month],
            set_={"version": export_partitions.c.version + 1, "changed_at": now},
        ),
        rows,
    )


def _insert(connection: Connection, table: Table) -> Any:
    """A dialect INSERT that knows ``ON CONFLICT``."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _executemany(
    connection: Connection,
    statement: Any,
    table: Table,
    rows: list[dict[str, Any]],
) -> None:
    """Execute an INSERT for many row dicts (all with the same keys), fast on both backends.

    SQLite: the driver's ``executemany`` with values converted by the columns' own bind
    processors (SQLAlchemy's per-row parameter handling costs more than SQLite's insert).
    PostgreSQL: one ``INSERT ... SELECT * FROM unnest(array, ...)`` with one array per
    column: a single round trip and a short statement, where row-wise executemany costs a
    pipelined statement per row and multi-row VALUES a huge statement psycopg parses in
    Python. There, ``statement``'s own ``ON CONFLICT`` clause, compiled by SQLAlchemy, ends
    the statement: one definition of an upsert serves both backends.
    """
    if not rows:
        return
    if connection.dialect.name == "postgresql":
        _unnest_insert(connection, statement, table, rows)
        return
    compiled = statement.compile(dialect=connection.dialect, column_keys=list(rows[0]))
    names = list(compiled.positiontup or ())
    # Column-wise: one list per column, converted with map() only where the column's type
    # needs it (timestamps); sqlite3 binds str, float, int, bool and None natively.
    columns: list[list[Any]] = []
    for name in names:
        values = [row[name] for row in rows]
        column_type = table.c[name].type
        if not isinstance(column_type, Boolean):
            process = column_type.bind_processor(connection.dialect)
            if process is not None:
                values = list(map(process, values))
        columns.append(values)
    connection.exec_driver_sql(str(compiled), list(zip(*columns, strict=True)))


_PG_ARRAY_TYPES: dict[type, str] = {
    Text: "text",
    String: "text",
    Float: "float8",
    Boolean: "bool",
    BigInteger: "int8",
    Integer: "int4",
    UTCDateTime: "timestamptz",
}


def _pg_array_type(column: Any) -> str:
    for kind, name in _PG_ARRAY_TYPES.items():
        if isinstance(column.type, kind):
            return name
    raise TypeError(f"no array type for column {column.name} ({column.type!r})")


def _unnest_insert(
    connection: Connection, statement: Any, table: Table, rows: list[dict[str, Any]]
) -> None:
    quote = connection.dialect.identifier_preparer.quote
    names = list(rows[0])
    target = ", ".join(quote(name) for name in names)
    arrays = ", ".join(
        f"%(p{index})b::{_pg_array_type(table.c[name])}[]" for index, name in enumerate(names)
    )
    sql = f"INSERT INTO {quote(table.name)} ({target}) SELECT * FROM unnest({arrays})"  # noqa: S608
    # The VALUES part of the compiled statement is replaced by the arrays; its ON CONFLICT
    # clause (column names and EXCLUDED references only, no bound values) is kept as it is.
    compiled = str(statement.compile(dialect=connection.dialect))
    conflict = compiled.find(" ON CONFLICT ")
    if conflict >= 0:
        sql += compiled[conflict:]
    # Identifiers come from our own tables; every value travels as a bound array.
    params = {f"p{index}": [row[name] for row in rows] for index, name in enumerate(names)}
    connection.exec_driver_sql(sql, params)


class _StoredVersion(NamedTuple):
    """What the comparison with a new payload needs of a stored ``recordings`` row."""

    updated_at: datetime
    raw_json: str
    fetched_at: datetime
    created_month: str


def _is_newer(record: NormalizedRecording, stored: _StoredVersion | None) -> bool:
    """Whether ``record`` should replace the ``stored`` version of its row.

    New, a later ``updatedAt``, or the same ``updatedAt`` with other content fetched no
    earlier (Bird changed a field without touching the timestamp, or the redaction changed).
    An older payload never replaces a newer one, including the content of an earlier fetch of
    the same ``updatedAt``. The upsert's ``WHERE`` says the same in SQL.
    """
    if stored is None:
        return True
    new = record.recording
    if new["updated_at"] != stored.updated_at:
        return bool(new["updated_at"] > stored.updated_at)
    return bool(new["raw_json"] != stored.raw_json and new["fetched_at"] >= stored.fetched_at)


def _retry_conflicts(work: Callable[[], None], attempts: int = 4) -> None:
    """Run a whole transaction again when PostgreSQL aborted it for a deadlock.

    The transactions retried here are idempotent (upserts), so a second attempt is safe.
    """
    for attempt in range(1, attempts + 1):
        try:
            work()
            return
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or (
                attempt == attempts
            ):
                raise
            time.sleep(0.05 * attempt)


#: deadlock_detected, serialization_failure.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(
        recording_id=row.recording_id,
        state=row.state,
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        s3_bucket=row.s3_bucket,
        s3_key=row.s3_key,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        archived_at=row.archived_at,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
    )


# --- the store -----------------------------------------------------------------------------


#: How often a running run renews ``runs.heartbeat_at``, whatever its lease length.
HEARTBEAT_SECONDS = 60.0
#: How old a running run's heartbeat may be before the run counts as dead (its leases free):
#: five missed beats. Fixed, not derived from ``RECARCHIVE_LEASE_SECONDS``, so hosts with other
#: lease settings still agree on who is alive.
DEFAULT_STALE_AFTER = timedelta(seconds=5 * HEARTBEAT_SECONDS)


def _live_run(now: datetime, stale_after: timedelta) -> ColumnElement[bool]:
    """``runs`` rows of runs alive now: running, with a heartbeat newer than ``stale_after``."""
    return and_(runs.c.status == RunStatus.RUNNING, runs.c.heartbeat_at > now - stale_after)


def _lease_unheld(now: datetime, stale_after: timedelta) -> ColumnElement[bool]:
    """No live run holds the row's lease: none, expired, or its owner's run is over or dead.

    An owner without a ``runs`` row (a bare chunk, a test) is trusted until its lease
    expires: only a run that is known to have ended, or that stopped beating, gives up its
    leases early.
    """
    owner_run_gone = (
        select(runs.c.id)
        .where(runs.c.owner == archive_ledger.c.lease_owner, ~_live_run(now, stale_after))
        .exists()
    )
    return or_(
        archive_ledger.c.lease_owner.is_(None),
        archive_ledger.c.lease_expires_at <= now,
        owner_run_gone,
    )


class ArchiveStore:
    """Recordings, ledger and runs in one SQL database.

    Args:
        engine: Engine from :func:`create_engine_for`, schema upgraded by
            :func:`upgrade_database`. The caller owns and disposes it.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- recordings --------------------------------------------------------------------

    def save_metadata(self, records: Sequence[NormalizedRecording]) -> None:
        """Upsert recordings and their parties in one transaction; mark changed partitions.

        A recording whose stored ``updated_at`` and ``raw_json`` equal the new ones is left
        untouched (not even a timestamp changes), and so is one whose stored ``updated_at``
        is later than the new one's, or equal with content fetched later: newer wins, whatever
        order the writes come in (see :func:`_is_newer`). A changed
        or new recording gets its party rows replaced and its ``created_month`` partition (and
        a previous month, if ``createdAt`` moved) marked for the next export, in the same
        transaction.

        Args:
            records: Normalized recordings; for a repeated ID the last one wins.
        """
        latest = {record.id: record for record in records}
        if not latest:
            return
        _retry_conflicts(lambda: self._save(latest))

    def _save(self, latest: dict[str, NormalizedRecording]) -> None:
        with self.engine.begin() as connection:
            changed, previous_month = self._upsert_changed(connection, latest)
            if not changed:
                return
            months: set[str] = set()
            parties: list[dict[str, Any]] = []
            for recording_id in changed:
                record = latest[recording_id]
                months.add(record.recording["created_month"])
                if recording_id in previous_month:
                    months.add(previous_month[recording_id])
                parties.extend(record.parties)
            for chunk in _chunks(changed):
                connection.execute(
                    recording_parties.delete().where(recording_parties.c.recording_id.in_(chunk))
                )
            if parties:
                _executemany(connection, recording_parties.insert(), recording_parties, parties)
            mark_partitions(connection, months)

    @staticmethod
    def _upsert_statement(connection: Connection) -> Any:
        insert = _insert(connection, recordings)
        columns = [column.name for column in recordings.columns if column.name != "id"]
        return insert.on_conflict_do_update(
            index_elements=[recordings.c.id],
            set_={name: insert.excluded[name] for name in columns},
            # Newer wins: an older payload (a stalled run writing late) changes nothing, and
            # neither does an identical one (same updatedAt, same content).
            where=or_(
                recordings.c.updated_at < insert.excluded.updated_at,
                and_(
                    recordings.c.updated_at == insert.excluded.updated_at,
                    recordings.c.raw_json.is_distinct_from(insert.excluded.raw_json),
                    recordings.c.fetched_at <= insert.excluded.fetched_at,
                ),
            ),
        )

    def _upsert_changed(
        self, connection: Connection, latest: dict[str, NormalizedRecording]
    ) -> tuple[list[str], dict[str, str]]:
        """Compare with the stored rows, then write only the new and changed ones.

        Returns the changed IDs and the stored ``created_month`` of the existing ones.
        On SQLite nothing can change in between (transactions begin with ``BEGIN
        IMMEDIATE``). On PostgreSQL a concurrent writer may: the upsert's own condition still
        decides, and the upsert locks each row it meets (even when it changes nothing), so
        the party rows replaced afterwards are those of a row this transaction holds. The
        comparison is deliberately not ``FOR UPDATE``: locking existing rows first and new
        ones later deadlocked concurrent writers; one upsert over sorted IDs takes every
        row lock in the same order.
        """
        ids = sorted(latest)
        stored: dict[str, _StoredVersion] = {}
        for chunk in _chunks(ids):
            query = select(recordings.c.id, *(recordings.c[f] for f in _StoredVersion._fields))
            for row in connection.execute(query.where(recordings.c.id.in_(chunk))):
                stored[row.id] = _StoredVersion(*row[1:])
        changed = [
            recording_id
            for recording_id in ids
            if _is_newer(latest[recording_id], stored.get(recording_id))
        ]
        if changed:
            _executemany(
                connection,
                self._upsert_statement(connection),
                recordings,
                [latest[recording_id].recording for recording_id in changed],
            )
            changed = self._written_by_us(connection, changed, latest)
        return changed, {
            recording_id: version.created_month for recording_id, version in stored.items()
        }

    @staticmethod
    def _written_by_us(
        connection: Connection, candidates: list[str], latest: dict[str, NormalizedRecording]
    ) -> list[str]:
        """The candidates whose row now holds our version.

        The upsert's ``WHERE`` has the last word: on PostgreSQL a concurrent writer may have
        stored a newer version between the comparison and the upsert, which then changed
        nothing (the upsert locked every row it met, so what this reads stays until the
        commit); on SQLite a row written by other tools may hold timestamps in another text
        form than ours. Either way its party rows must not be replaced by ours.
        """
        ours: list[str] = []
        for chunk in _chunks(candidates):
            query = select(recordings.c.id, recordings.c.updated_at, recordings.c.raw_json).where(
                recordings.c.id.in_(chunk)
            )
            for row in connection.execute(query):
                mine = latest[row.id].recording
                if row.updated_at == mine["updated_at"] and row.raw_json == mine["raw_json"]:
                    ours.append(row.id)
        return sorted(ours)

    # --- ledger: registration and reads ------------------------------------------------

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

        _retry_conflicts(work)
        return seen[0]

    def _register(self, ids: Iterable[str], run_id: int | None) -> int:
        seen = 0
        now = _now()
        with self.engine.begin() as connection:
            insert = _insert(connection, archive_ledger)
            if run_id is None:
                statement = insert.on_conflict_do_nothing(
                    index_elements=[archive_ledger.c.recording_id]
                )
            else:
                # No bound parameters in the conflict clause (the bulk paths bind row values
                # only): the state as a literal, the time as the database's own clock.
                statement = insert.on_conflict_do_update(
                    index_elements=[archive_ledger.c.recording_id],
                    set_={"registered_run": insert.excluded.registered_run},
                    where=and_(
                        archive_ledger.c.state == literal_column(f"'{LedgerState.PENDING}'"),
                        archive_ledger.c.registered_run.is_distinct_from(
                            insert.excluded.registered_run
                        ),
                        or_(
                            archive_ledger.c.lease_owner.is_(None),
                            archive_ledger.c.lease_expires_at <= func.current_timestamp(),
                        ),
                    ),
                )
            for batch in _batches(ids, REGISTER_BATCH):
                seen += len(batch)
                # Sorted: overlapping registrations lock rows in one order (fewer deadlocks).
                batch.sort()
                _executemany(
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
            for chunk in _chunks(ids):
                query = select(*_LEDGER_COLUMNS).where(archive_ledger.c.recording_id.in_(chunk))
                for row in connection.execute(query):
                    entries[row.recording_id] = _entry(row)
        return entries

    # --- ledger: leases ----------------------------------------------------------------

    def claim(
        self, ids: Sequence[str], *, owner: str, lease_seconds: int, states: Collection[str]
    ) -> list[str]:
        """Lease the rows of ``ids`` whose state is in ``states`` and whose lease is free.

        A lease is free when nobody holds it, it expired, ``owner`` holds it already, or the
        run that holds it has ended or stopped beating (a run killed on any host).

        Args:
            ids: Canonical recording IDs (registered).
            owner: This run's lease owner name.
            lease_seconds: Lease length.
            states: States worth claiming.

        Returns:
            The IDs now leased to ``owner``.
        """
        if not ids or not states:
            return []
        claimed: list[str] = []
        with self.engine.begin() as connection:
            _no_jit(connection)
            now = db_now(connection)
            values = {
                "lease_owner": owner,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
            }
            postgres = connection.dialect.name == "postgresql"
            for chunk in _chunks(ids):
                where = (
                    archive_ledger.c.recording_id.in_(chunk),
                    archive_ledger.c.state.in_(list(states)),
                    self._lease_free(owner, now),
                )
                if postgres:
                    # Rows another transaction is claiming right now are skipped, not waited
                    # for: that run will hold them.
                    locked = list(
                        connection.execute(
                            select(archive_ledger.c.recording_id)
                            .where(*where)
                            .with_for_update(skip_locked=True)
                        ).scalars()
                    )
                    if locked:
                        connection.execute(
                            update(archive_ledger)
                            .where(archive_ledger.c.recording_id.in_(locked))
                            .values(**values)
                        )
                    claimed.extend(locked)
                else:
                    result = connection.execute(
                        update(archive_ledger)
                        .where(*where)
                        .values(**values)
                        .returning(archive_ledger.c.recording_id)
                    )
                    claimed.extend(result.scalars())
        order = {recording_id: index for index, recording_id in enumerate(ids)}
        return sorted(claimed, key=order.__getitem__)

    @staticmethod
    def _lease_free(
        owner: str, now: datetime, stale_after: timedelta = DEFAULT_STALE_AFTER
    ) -> ColumnElement[bool]:
        return or_(
            archive_ledger.c.lease_owner == owner,
            _lease_unheld(now, stale_after),
        )

    def release(self, ids: Sequence[str], *, owner: str) -> None:
        """Clear the leases of ``ids`` that ``owner`` holds (others' leases stay)."""
        if not ids:
            return
        with self.engine.begin() as connection:
            for chunk in _chunks(ids):
                connection.execute(
                    update(archive_ledger)
                    .where(
                        archive_ledger.c.recording_id.in_(chunk),
                        archive_ledger.c.lease_owner == owner,
                    )
                    .values(lease_owner=None, lease_expires_at=None)
                )

    def renew(self, ids: Sequence[str], *, owner: str, lease_seconds: int) -> int:
        """Extend the leases ``owner`` still holds on ``ids``; return how many it holds.

        A long chunk (slow media, a rate limit) renews its leases while it works, so they
        do not expire under it and let another run transfer the same recordings.
        """
        if not ids:
            return 0
        renewed = 0
        with self.engine.begin() as connection:
            expires = db_now(connection) + timedelta(seconds=lease_seconds)
            for chunk in _chunks(ids):
                result = connection.execute(
                    update(archive_ledger)
                    .where(
                        archive_ledger.c.recording_id.in_(chunk),
                        archive_ledger.c.lease_owner == owner,
                    )
                    .values(lease_expires_at=expires)
                )
                renewed += result.rowcount
        return renewed

    def pin_key(self, recording_id: str, *, owner: str, bucket: str, key: str) -> tuple[str, str]:
        """Pin the S3 location of a recording before its first upload; return the pinned one.

        The first pin wins and never moves: a retry, a ``--refresh`` or a recovery that sees
        another ``createdAt`` day still uploads to the key pinned first, so a recording is
        never stored twice under two dates.

        Args:
            recording_id: The recording (this run holds its lease).
            owner: Lease holder.
            bucket: Bucket to pin if none is pinned yet.
            key: Key to pin if none is pinned yet.

        Returns:
            ``(bucket, key)`` as pinned (an earlier pin, or these).

        Raises:
            LedgerStateError: ``owner`` holds no lease on the recording.
        """
        with self.engine.begin() as connection:
            connection.execute(
                update(archive_ledger)
                .where(
                    archive_ledger.c.recording_id == recording_id,
                    archive_ledger.c.lease_owner == owner,
                    archive_ledger.c.s3_key.is_(None),
                )
                .values(s3_bucket=bucket, s3_key=key)
            )
            row = connection.execute(
                select(
                    archive_ledger.c.s3_bucket,
                    archive_ledger.c.s3_key,
                    archive_ledger.c.lease_owner,
                ).where(archive_ledger.c.recording_id == recording_id)
            ).first()
        if row is None or row.lease_owner != owner or row.s3_key is None:
            raise LedgerStateError(f"cannot pin the key of {recording_id}: not leased by this run")
        return str(row.s3_bucket or bucket), str(row.s3_key)

    # --- ledger: transitions -----------------------------------------------------------

    def mark_metadata_only(
        self, recording_id: str, *, owner: str, reason: str, retry_at: datetime | None = None
    ) -> None:
        """Metadata stored, media not (yet): not available, or ``--skip-media``.

        Args:
            recording_id: The recording.
            owner: Lease holder.
            reason: Why there is no media yet (``status completed``, ``skip-media``).
            retry_at: When ``retry-failed`` should look again whether the media is ready;
                ``None`` (``--skip-media``) means only when the ID is archived again.

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._transition(
            recording_id,
            owner,
            LedgerState.METADATA_ONLY,
            {"last_error": _clip(reason), "next_attempt_at": retry_at},
        )

    def mark_missing(self, recording_id: str, *, owner: str, error: str) -> None:
        """The recording does not exist at Bird (404).

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._transition(
            recording_id,
            owner,
            LedgerState.MISSING,
            {"last_error": _clip(error), "next_attempt_at": None},
        )

    def mark_failed(
        self, recording_id: str, *, owner: str, error: str, retry_at: datetime | None
    ) -> None:
        """An attempt failed: count it and schedule the next one.

        Args:
            recording_id: The recording.
            owner: Lease owner.
            error: Why (type and message, no secrets).
            retry_at: When it is due again; ``None`` for a terminal failure, which
                :meth:`due_retries` never returns (only an explicit request archives it again).

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._transition(
            recording_id,
            owner,
            LedgerState.FAILED,
            {
                "last_error": _clip(error),
                "next_attempt_at": retry_at,
                "attempts": archive_ledger.c.attempts + 1,
            },
        )

    def mark_archived(
        self,
        recording_id: str,
        *,
        owner: str,
        bucket: str,
        key: str,
        size_bytes: int,
        sha256: str,
    ) -> None:
        """The media is in S3 and verified.

        Raises:
            LedgerStateError: Unknown, ``owner`` holds no lease, or another key is pinned.
        """
        self._transition(
            recording_id,
            owner,
            LedgerState.ARCHIVED,
            {
                "s3_bucket": bucket,
                "s3_key": key,
                "size_bytes": size_bytes,
                "sha256": sha256,
                "archived_at": _now(),
                "last_error": None,
                "next_attempt_at": None,
            },
        )

    def _transition(
        self, recording_id: str, owner: str, target: LedgerState, values: dict[str, Any]
    ) -> None:
        conditions = [
            archive_ledger.c.recording_id == recording_id,
            archive_ledger.c.lease_owner == owner,
        ]
        if target != LedgerState.ARCHIVED:
            # Archived media is final: no later outcome may hide it.
            conditions.append(archive_ledger.c.state != LedgerState.ARCHIVED)
        elif "s3_key" in values:
            # The key pinned before the upload is the only one an archived row may name.
            conditions.append(
                or_(archive_ledger.c.s3_key.is_(None), archive_ledger.c.s3_key == values["s3_key"])
            )
        with self.engine.begin() as connection:
            result = connection.execute(
                update(archive_ledger)
                .where(*conditions)
                .values(
                    state=target,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=_now(),
                    **values,
                )
            )
            if result.rowcount != 1:
                row = connection.execute(
                    select(archive_ledger.c.state, archive_ledger.c.lease_owner).where(
                        archive_ledger.c.recording_id == recording_id
                    )
                ).first()
                if row is None:
                    reason = "it is not in the ledger"
                elif row.state == LedgerState.ARCHIVED and target != LedgerState.ARCHIVED:
                    reason = "it is archived already"
                elif row.lease_owner == owner:
                    reason = "another S3 key is pinned for it"
                else:
                    reason = "this run does not hold its lease"
                raise LedgerStateError(f"cannot mark {recording_id} {target}: {reason}")
            # The Parquet rows carry ledger_state and the media columns: re-export the month.
            self._mark_partition_of(connection, recording_id)

    @staticmethod
    def _mark_partition_of(connection: Connection, recording_id: str) -> None:
        month = connection.execute(
            select(recordings.c.created_month).where(recordings.c.id == recording_id)
        ).scalar()
        if month is not None:
            mark_partitions(connection, [month])

    # --- ledger: queries ---------------------------------------------------------------

    def due_retries(
        self, *, limit: int, max_attempts: int, stale_after: timedelta = DEFAULT_STALE_AFTER
    ) -> list[str]:
        """Recordings ``retry-failed`` should take now, oldest due first.

        These are ``failed`` recordings due for a retry, ``metadata_only`` recordings due for
        a look whether their media became available (without this, a recording whose media
        was not ready during its nightly window would never be fetched again), and
        ``pending`` recordings that no live run holds: the run that registered them has
        ended, or it stopped beating (a heartbeat older than ``stale_after``: killed on some
        host), or it is unknown — a killed run's rows, including those of chunks it never
        reached. A live run's pending rows are never taken, even those it has not reached.
        A lease counts only while its owner's run is alive (see :func:`_lease_unheld`).

        Args:
            limit: Most IDs to return.
            max_attempts: Failed recordings with this many attempts are not retried.
            stale_after: How old a running run's heartbeat may be before it counts as dead.

        Returns:
            IDs without a live lease (database clock), due as described.
        """
        with self.engine.connect().execution_options(recarchive_read_only=True) as connection:
            _no_jit(connection)
            now = db_now(connection)
            registered_run_alive = (
                select(runs.c.id)
                .where(runs.c.id == archive_ledger.c.registered_run, _live_run(now, stale_after))
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
                    _lease_unheld(now, stale_after),
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

    def failed_entries(self, limit: int) -> list[LedgerEntry]:
        """The ``failed`` rows, most recently updated first."""
        query = (
            select(*_LEDGER_COLUMNS)
            .where(archive_ledger.c.state == LedgerState.FAILED)
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
                    archive_ledger.c.state == LedgerState.ARCHIVED,
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

    # --- runs --------------------------------------------------------------------------

    def start_run(self, kind: str, params: dict[str, Any], *, owner: str | None = None) -> int:
        """Insert a ``running`` runs row and return its id.

        Args:
            kind: Run kind (``archive``, ``retry``, ...).
            params: Run parameters (never secrets).
            owner: ``host:pid:random`` of this process (see :meth:`interrupt_dead_runs`).
        """
        with self.engine.begin() as connection:
            result = connection.execute(
                runs.insert()
                .values(
                    kind=kind,
                    status=RunStatus.RUNNING,
                    started_at=_now(),
                    params=json.dumps(params, sort_keys=True, default=str),
                    owner=owner,
                    heartbeat_at=db_now(connection),
                )
                .returning(runs.c.id)
            )
            return int(result.scalar_one())

    def beat(self, run_id: int) -> None:
        """Record that run ``run_id`` is alive now (database clock); see :meth:`due_retries`."""
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == RunStatus.RUNNING)
                .values(heartbeat_at=db_now(connection))
            )

    def finish_run(
        self, run_id: int, *, status: RunStatus, counts: dict[str, int], error: str | None = None
    ) -> None:
        """Record a run's end: status, counts and error.

        Raises:
            ValueError: A counter with no ``runs`` column: it would be lost silently.
        """
        unknown = sorted(set(counts) - set(RUN_COUNT_COLUMNS))
        if unknown:
            raise ValueError(f"no runs column for counters {', '.join(unknown)}")
        values: dict[str, Any] = {name: int(counts.get(name, 0)) for name in RUN_COUNT_COLUMNS}
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status, finished_at=_now(), error=_clip(error), **values)
            )

    def interrupt_dead_runs(self, owner_is_dead: Callable[[str], bool]) -> list[int]:
        """Finish the ``running`` rows of processes that are gone as ``interrupted``.

        A run killed without unwinding (SIGKILL, OOM killer) cannot finish its own row; without
        this it would say ``running`` forever. Rows without an owner (written before revision
        0002) and owners ``owner_is_dead`` cannot judge (another host) are left alone.

        Args:
            owner_is_dead: Whether the process named by an owner is known to be gone
                (:func:`recarchive.leases.local_owner_dead`).

        Returns:
            The ids of the rows finished.
        """
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(runs.c.id, runs.c.owner).where(
                    runs.c.status == RunStatus.RUNNING, runs.c.owner.is_not(None)
                )
            ).all()
            dead = [row.id for row in rows if owner_is_dead(row.owner)]
            if dead:
                connection.execute(
                    update(runs)
                    .where(runs.c.id.in_(dead), runs.c.status == RunStatus.RUNNING)
                    .values(
                        status=RunStatus.INTERRUPTED,
                        finished_at=_now(),
                        error="its process ended before the run finished (killed?); "
                        "its counts were never written",
                    )
                )
        return dead

    def last_runs(self, limit: int) -> list[dict[str, Any]]:
        """The newest runs as dicts: id, kind, status, started_at, finished_at, counts, error."""
        columns = [
            runs.c.id,
            runs.c.kind,
            runs.c.status,
            runs.c.started_at,
            runs.c.finished_at,
            *(runs.c[name] for name in RUN_COUNT_COLUMNS),
            runs.c.error,
        ]
        query = select(*columns).order_by(runs.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]
