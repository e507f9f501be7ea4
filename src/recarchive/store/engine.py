"""The SQL engine: connecting to SQLite or PostgreSQL, the schema's revision, and the clocks.

SQLAlchemy 2 Core on SQLite (embedded default) and PostgreSQL (psycopg 3). SQL is the source
of truth; the Parquet dataset is exported from it (:mod:`recarchive.export.parquet`).

The schema is Alembic's (``recarchive/store/migrations``); a database created by hand from the
DDL in ``sql/`` is adopted at the revision that DDL describes, then upgraded like any other.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from recarchive.errors import StorageUnavailableError

__all__ = [
    "HEAD_REVISION",
    "REVISION_MARKERS",
    "create_engine_for",
    "db_now",
    "no_jit",
    "open_read_only",
    "read_only_sqlite_uri",
    "schema_revision",
    "upgrade_database",
    "utc_now",
]

#: The newest Alembic revision in ``recarchive/store/migrations/versions``, which is also the
#: revision the DDL files in ``sql/`` describe; a test keeps it equal to Alembic's head and to
#: the newest of :data:`REVISION_MARKERS`. A database already there is opened without importing
#: Alembic at all, which saves about half a second of every command's start-up.
HEAD_REVISION = "0007"
#: For each revision after 0001, newest first, a column it added: a database created by hand
#: from the DDL of some revision is adopted at the newest revision whose column it has.
REVISION_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("0007", "transcription_ledger", "json_sha256"),
    ("0006", "erasures", "outcome"),
    ("0005", "archive_ledger", "legal_hold"),
    ("0004", "request_permits", "next_free"),
    ("0003", "runs", "heartbeat_at"),
    ("0002", "runs", "owner"),
)
#: Key of the PostgreSQL advisory lock that serializes concurrent schema upgrades.
_MIGRATION_LOCK_KEY = 0x7265636172636869
_VERSION_QUERY = "SELECT version_num FROM alembic_version"


def utc_now() -> datetime:
    """This host's clock (aware UTC), for the times rows record rather than compare.

    Lease and heartbeat times are compared across hosts, so they use :func:`db_now` instead.
    """
    return datetime.now(UTC)


def db_now(connection: Connection) -> datetime:
    """The database's clock: every lease and heartbeat time is read and compared on it.

    Hosts sharing a PostgreSQL ledger may disagree about the time; the database is the one
    clock they share. SQLite is embedded, so its clock is this host's.

    Args:
        connection: The connection whose database tells the time.

    Returns:
        The database's current time, aware UTC.
    """
    if connection.dialect.name == "postgresql":
        moment = connection.execute(select(func.now())).scalar_one()
        assert isinstance(moment, datetime)
        return moment.astimezone(UTC)
    return utc_now()


def no_jit(connection: Connection) -> None:
    """PostgreSQL: no JIT for this transaction's ledger queries.

    Their correlated ``EXISTS`` on ``runs`` push the planner's cost estimate past
    ``jit_above_cost``; compiling then costs ~0.5 s a query against ~20 ms to run it.

    Args:
        connection: A connection inside the transaction the setting applies to.
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL jit = off")


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


def open_read_only(url: str) -> Engine | None:
    """An engine that can only read ``url``'s database; ``None`` when there is no database yet.

    For a dry run: nothing is created, migrated or written. SQLite opens the file read-only
    (a missing file is ``None``: it is never created); PostgreSQL sessions are
    ``default_transaction_read_only``, so even a bug here could not write.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a URL.
        ValueError: The backend is neither SQLite nor PostgreSQL.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        uri = read_only_sqlite_uri(parsed.database or "")
        if uri is None:
            return None  # no database yet (or one that never persists): every ID is new
        engine = create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=60)
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            dbapi_connection.isolation_level = None  # autocommit reads, no BEGIN IMMEDIATE

        return engine
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        # Added to the URL's own ``options`` (a search_path, say), which connect_args replaces.
        given = parsed.query.get("options", "")
        options = " ".join(
            [*([given] if isinstance(given, str) else given), "-c default_transaction_read_only=on"]
        ).strip()
        return create_engine(
            parsed.difference_update_query(["options"]), connect_args={"options": options}
        )
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def read_only_sqlite_uri(database: str) -> str | None:
    """The read-only ``file:`` URI of a SQLite database path or URI; ``None`` if it has no file.

    ``mode=ro``: the file itself is never written. SQLite may create the -wal and -shm side
    files of a WAL database that has none (they hold no data of ours, and the next writer uses
    and removes them). ``immutable=1`` would avoid them, but reads without locks: a run
    starting meanwhile could make it read wrong rows. A ``file:`` URI is taken as given (its
    path percent-encoded already).
    """
    if database.startswith("file:"):
        path_part, _, query = database.removeprefix("file:").partition("?")
        if not path_part or "mode=memory" in query or not Path(path_part).is_file():
            return None
        return f"{database}{'&' if query else '?'}mode=ro"
    if database in ("", ":memory:"):
        return None
    path = Path(database).expanduser()
    if not path.is_file():
        return None
    # Percent-encoded: in a URI a "?" or "#" of the path would end it, and SQLite would open
    # (or create, read-write) the file named by what comes before.
    return f"file:{quote(path.resolve().as_posix(), safe='/')}?mode=ro"


def schema_revision(connection: Connection) -> str | None:
    """The schema revision of a database, read only: Alembic's, else that of hand-made DDL.

    Returns:
        The revision, or ``None`` when the database has no recarchive tables yet.
    """
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" in tables:
        versions = [row[0] for row in connection.execute(text(_VERSION_QUERY))]
        return max(versions) if versions else None
    if {"recordings", "archive_ledger", "runs"} <= tables:
        return _hand_made_revision(connection)
    return None


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
        if not inspector.has_table(table):
            continue
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
