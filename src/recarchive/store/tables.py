"""SQLAlchemy Core tables: the schema of ``sql/`` and of the Alembic migrations.

All timestamps are UTC. On PostgreSQL they are ``timestamptz``; SQLite has no time type, so
they are stored as naive UTC text (SQLAlchemy's ``DATETIME`` format), and :class:`UTCDateTime`
gives aware UTC datetimes back on both.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
)

from recarchive.model import RUN_COUNT_COLUMNS


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back timezone-aware (UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; naive values are taken as UTC already."""
        if value is None:
            return None
        if value.tzinfo is not UTC:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite stores text: keep one canonical naive form so comparisons are textual.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, format in C (same text as SQLAlchemy's DATETIME, several times faster)."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is UTC:
                # 'YYYY-MM-DD HH:MM:SS.ffffff+00:00' without its offset (fixed width).
                return value.isoformat(" ", "microseconds")[:26]
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return value.isoformat(" ", "microseconds")

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """On SQLite, parse the stored text in C and attach UTC."""
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            return parsed.astimezone(UTC)

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Attach or convert to UTC."""
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

recordings = Table(
    "recordings",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("workspace_id", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("source_id", Text, nullable=False),
    Column("channel_id", Text),
    Column("status", Text, nullable=False),
    Column("direction", Text),
    Column("origin", Text, nullable=False),
    Column("duration", Float(53)),
    Column("stereo", Boolean, nullable=False),
    Column("format", Text, nullable=False),
    Column("transcription", Boolean, nullable=False),
    Column("conference_id", Text),
    Column("url", Text),
    Column("room_info_url", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("created_month", String(7), nullable=False),
    Column("fetched_at", UTCDateTime, nullable=False),
    Column("raw_json", Text, nullable=False),
    # The export reads one month at a time in id order: this index serves it without a sort.
    Index("ix_recordings_created_month_id", "created_month", "id"),
    Index("ix_recordings_created_at", "created_at"),
)

recording_parties = Table(
    "recording_parties",
    metadata,
    Column(
        "recording_id",
        String(36),
        ForeignKey("recordings.id", ondelete="CASCADE", name="fk_recording_parties_recording"),
        primary_key=True,
    ),
    Column("role", String(16), primary_key=True),
    Column("contact_id", Text),
    Column("contact_identifier_key", Text),
    Column("contact_identifier_value", Text),
    Column("number_type", Text),
    Column("number", Text),
    Column("number_anonymous", Boolean),
    Column("number_caller_id_name", Text),
    Column("number_identity", Text),
    Column("number_country_iso_code", Text),
)

archive_ledger = Table(
    "archive_ledger",
    metadata,
    # No foreign key to recordings: IDs are registered before their metadata is fetched.
    Column("recording_id", String(36), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("next_attempt_at", UTCDateTime),
    Column("s3_bucket", Text),
    Column("s3_key", Text),
    Column("size_bytes", BigInteger),
    Column("sha256", String(64)),
    Column("archived_at", UTCDateTime),
    Column("lease_owner", Text),
    Column("lease_expires_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The run that registered the row last (revision 0003): a ``pending`` row is left to it
    # while that run is alive, and taken by ``retry-failed`` once it is not.
    Column("registered_run", Integer),
    # Object Lock of the recording's MP3 and sidecar (revision 0005): the mode they carry
    # (NULL: none), createdAt + the retention days (also when it had passed at the write, so
    # the objects carry none), and the S3 legal hold `recarchive hold` set, with its time.
    Column("lock_mode", String(16)),
    Column("retain_until", UTCDateTime),
    Column("legal_hold", Boolean, nullable=False, server_default=false()),
    Column("legal_hold_at", UTCDateTime),
    # due_retries and the per-state counts.
    Index("ix_archive_ledger_state_next_attempt", "state", "next_attempt_at"),
)


runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("params", Text, nullable=False),
    *(
        Column(
            name,
            BigInteger if name == "bytes_uploaded" else Integer,
            nullable=False,
            server_default="0",
        )
        for name in RUN_COUNT_COLUMNS
    ),
    Column("error", Text),
    # ``host:pid:random`` of the process that runs it (revision 0002): a later run on the
    # same host finishes the row of a killed one as ``interrupted``.
    Column("owner", String(255)),
    # Database time of the run's last sign of life (revision 0003); a running run whose
    # heartbeat is older than its lease has died somewhere.
    Column("heartbeat_at", UTCDateTime),
    # A lease counts only while its owner's run is alive: looked up per leased row.
    Index("ix_runs_owner", "owner"),
)

export_partitions = Table(
    "export_partitions",
    metadata,
    # One row per created_month. ``version`` grows with every change to the month's rows;
    # the export writes the files, then records the version it wrote only if nothing changed
    # meanwhile. A partition is due while version > exported_version.
    Column("created_month", String(7), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("exported_version", BigInteger, nullable=False, server_default="0"),
    Column("changed_at", UTCDateTime, nullable=False),
    Column("exported_at", UTCDateTime),
)

listed_windows = Table(
    "listed_windows",
    metadata,
    # A half-open window [window_start, window_end) of createdAt that a run listed to the
    # last page (revision 0003): the nightly run lists from the end of the newest one.
    Column("window_start", UTCDateTime, primary_key=True),
    Column("window_end", UTCDateTime, primary_key=True),
    Column("listed_at", UTCDateTime, nullable=False),
    Column("run_id", Integer),
    Column("recordings", Integer, nullable=False, server_default="0"),
)

request_permits = Table(
    "request_permits",
    metadata,
    # One row per shared rate limit (revision 0004): when its next request permit is free, in
    # seconds since the epoch of the database's clock, so every host reads one clock.
    Column("name", String(255), primary_key=True),
    Column("next_free", Float(53), nullable=False),
)

erasures = Table(
    "erasures",
    metadata,
    # One row per erasure asked for (revision 0006): the audit record of ``recarchive erase``.
    # No personal data: the recording's ID, month and counts, never its numbers or names.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recording_id", String(36), nullable=False),
    # ``erasing`` (started: SQL done, S3 or Parquet maybe not yet), ``erased``, ``refused``.
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    # Why it was refused, or what is left to do.
    Column("detail", Text),
    # The OS user who asked, and the ``host:pid:random`` name of the process that did it.
    Column("requested_by", String(255), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    # The Parquet partition the recording was in (its rows are rewritten without it).
    Column("created_month", String(7)),
    Column("s3_versions_deleted", Integer, nullable=False, server_default="0"),
    Column("sql_rows_deleted", Integer, nullable=False, server_default="0"),
    Column("parquet_partitions_rewritten", Integer, nullable=False, server_default="0"),
    Column("parquet_versions_deleted", Integer, nullable=False, server_default="0"),
    Column("at_source", Boolean, nullable=False),
    Index("ix_erasures_recording_id", "recording_id"),
)

transcription_ledger = Table(
    "transcription_ledger",
    metadata,
    # One row per transcription of an archived recording (revision 0007), or per recording
    # whose listing at Bird failed or was empty (transcription_id "*": looked at again).
    Column("recording_id", String(36), primary_key=True),
    Column("transcription_id", String(36), primary_key=True),
    # pending (not ready at Bird), archived, failed (retried while next_attempt_at is set),
    # unavailable (Bird gave up: final).
    Column("state", String(16), nullable=False),
    Column("bird_status", String(64)),
    Column("locale", String(35)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("next_attempt_at", UTCDateTime),
    Column("s3_bucket", Text),
    # Each stored format: its key, size and SHA-256 (the txt ones NULL when Bird has none).
    Column("json_key", Text),
    Column("json_size", BigInteger),
    Column("json_sha256", String(64)),
    Column("txt_key", Text),
    Column("txt_size", BigInteger),
    Column("txt_sha256", String(64)),
    Column("archived_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_transcription_ledger_state_next_attempt", "state", "next_attempt_at"),
)

#: Tables in creation order (children after parents).
TABLES = (
    recordings,
    recording_parties,
    archive_ledger,
    runs,
    export_partitions,
    listed_windows,
    request_permits,
    erasures,
    transcription_ledger,
)
