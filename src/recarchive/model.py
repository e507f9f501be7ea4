"""Typed shapes of normalized recordings and ledger rows.

These are the values that flow between :mod:`recarchive.normalize` (pure), the SQL store and
the pipeline. Row dicts use the SQL column names of :mod:`recarchive.store.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final


class LedgerState(StrEnum):
    """The state of one recording in ``archive_ledger`` (its machine: ARCHITECTURE.md).

    Members are strings, so they compare equal to the column's values and serialize as them;
    the order of the members is the order reports list them.
    """

    PENDING = "pending"
    METADATA_ONLY = "metadata_only"
    ARCHIVED = "archived"
    MISSING = "missing"
    FAILED = "failed"
    #: A tombstone: erased on request (``recarchive erase``), never fetched again.
    ERASED = "erased"


#: Every ledger state, in the order reports list them.
LEDGER_STATES: Final[tuple[LedgerState, ...]] = tuple(LedgerState)
#: States a run works on: not done yet, or worth another attempt.
WORK_STATES: Final = frozenset({LedgerState.PENDING, LedgerState.METADATA_ONLY, LedgerState.FAILED})
#: States a lease may be taken on: every state but ``erased``, whose row no run touches again.
CLAIMABLE_STATES: Final = frozenset(LEDGER_STATES) - {LedgerState.ERASED}


def skip_counter(state: str, *, refresh: bool) -> str | None:
    """The :class:`RunCounts` counter of a recording a run skips without any request.

    ``archived`` and ``missing`` rows are skipped unless ``--refresh``; an ``erased`` row is
    skipped always (a tombstone is never fetched again, whatever the flags).

    Args:
        state: The recording's ledger state.
        refresh: The run re-fetches metadata of every given ID.

    Returns:
        The counter's name, or ``None`` when the run works on the recording.
    """
    if state == LedgerState.ERASED:
        return "erased"
    if refresh:
        return None
    return _SKIPPED_UNLESS_REFRESH.get(state)


_SKIPPED_UNLESS_REFRESH: Final[dict[str, str]] = {
    LedgerState.ARCHIVED: "already_archived",
    LedgerState.MISSING: "missing",
}


class RunStatus(StrEnum):
    """The ``status`` of one ``runs`` row."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


#: Party roles: one ``recording_parties`` row per present role.
PARTY_ROLES: Final[tuple[str, ...]] = ("originator", "receiver")

#: ``recordings`` columns filled from the payload (besides the bookkeeping columns).
RECORDING_FIELDS: Final[tuple[str, ...]] = (
    "id",
    "workspace_id",
    "source",
    "source_id",
    "channel_id",
    "status",
    "direction",
    "origin",
    "duration",
    "stereo",
    "format",
    "transcription",
    "conference_id",
    "url",
    "room_info_url",
    "created_at",
    "updated_at",
    "ended_at",
    "started_at",
)

#: ``recording_parties`` columns besides ``recording_id`` and ``role``.
PARTY_FIELDS: Final[tuple[str, ...]] = (
    "contact_id",
    "contact_identifier_key",
    "contact_identifier_value",
    "number_type",
    "number",
    "number_anonymous",
    "number_caller_id_name",
    "number_identity",
    "number_country_iso_code",
)


@dataclass(frozen=True)
class NormalizedRecording:
    """One recording's payload as rows, ready to store.

    Attributes:
        id: Canonical lowercase UUID of the recording.
        workspace_id: Bird workspace the recording belongs to.
        status: Bird status as sent (unknown values kept as they are).
        created_at: ``createdAt`` in UTC.
        updated_at: ``updatedAt`` in UTC.
        recording: The ``recordings`` row (column name to value).
        parties: The ``recording_parties`` rows, one per present originator/receiver.
        redacted_payload: The payload without credentials (``url`` and ``roomInfoUrl`` without
            query string or fragment); stored as ``raw_json`` and as the S3 sidecar.
    """

    id: str
    workspace_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    recording: dict[str, Any]
    parties: list[dict[str, Any]]
    redacted_payload: dict[str, Any]


@dataclass(frozen=True)
class LedgerEntry:
    """One ``archive_ledger`` row.

    Attributes:
        recording_id: Canonical lowercase UUID.
        state: One of :data:`LEDGER_STATES`.
        attempts: Failed attempts so far (across runs).
        last_error: Why the last attempt failed or why media is pending.
        next_attempt_at: When a failed recording is due again; ``None`` for a terminal failure.
        s3_bucket: Bucket of the archived media.
        s3_key: Key of the archived media.
        size_bytes: Size of the archived media.
        sha256: Hex SHA-256 of the archived media.
        archived_at: When the media was archived.
        lease_owner: Run that holds the lease, if any.
        lease_expires_at: When that lease ends.
    """

    recording_id: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    s3_bucket: str | None
    s3_key: str | None
    size_bytes: int | None
    sha256: str | None
    archived_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None


#: Failures kept per chunk for reports; every failure is counted and stays in the ledger.
MAX_REPORTED_FAILURES = 50


class _Counters:
    """What the counters of runs and of transcriptions share: failures kept, plain dicts."""

    failed: int
    failures: list[tuple[str, str]]

    def record_failure(self, recording_id: str, error: str) -> None:
        """Count one failure and keep its message if there is room."""
        self.failed += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append((recording_id, error))

    def as_dict(self) -> dict[str, Any]:
        """Counters as a plain dict (for JSON, the ``runs`` row, artifacts and metrics)."""
        assert is_dataclass(self)
        return {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "failures"
        }


@dataclass
class RunCounts(_Counters):
    """Outcome counters of one chunk or one whole run.

    Attributes:
        requested: Distinct IDs asked for.
        archived: Recordings whose media this run stored (or found already stored by a
            crashed earlier run) and verified.
        already_archived: Recordings that were ``archived`` before this run.
        metadata_only: Media not available yet, or ``--skip-media`` ("media pending").
        missing: 404 at Bird.
        failed: Retries exhausted or terminal error.
        busy: Held by another run's lease; left to that run.
        erased: Erased on request before this run (a tombstone): skipped without a request.
        bytes_uploaded: Media bytes written to S3 by this run.
        failures: ``(recording_id, error)`` of the first failures, for the report.
    """

    requested: int = 0
    archived: int = 0
    already_archived: int = 0
    metadata_only: int = 0
    missing: int = 0
    failed: int = 0
    busy: int = 0
    bytes_uploaded: int = 0
    erased: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: RunCounts) -> None:
        """Add ``other``'s counters to these, in place."""
        for item in fields(self):
            if item.name == "failures":
                room = MAX_REPORTED_FAILURES - len(self.failures)
                self.failures.extend(other.failures[: max(room, 0)])
            else:
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    @property
    def done(self) -> int:
        """IDs that reached an outcome in this run."""
        return (
            self.archived
            + self.already_archived
            + self.metadata_only
            + self.missing
            + self.failed
            + self.busy
            + self.erased
        )

    @property
    def all_ok(self) -> bool:
        """True when no requested item ended ``failed`` or ``missing``."""
        return self.failed == 0 and self.missing == 0


class TranscriptionState(StrEnum):
    """The state of one transcription in ``transcription_ledger`` (README, "Transcriptions").

    ``pending``: not ready at Bird yet; ``archived``: its objects are in S3, final;
    ``failed``: retried by ``retry-failed`` while it has a next attempt; ``unavailable``: Bird
    gave up on it (status ``failed``): nothing to archive, final.
    """

    PENDING = "pending"
    ARCHIVED = "archived"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


#: Transcription outcomes a run counts, in the order summaries show them.
TRANSCRIPTION_OUTCOMES: Final[tuple[str, ...]] = (
    "archived",
    "already_archived",
    "pending",
    "failed",
    "unavailable",
)


@dataclass
class TranscriptionCounts(_Counters):
    """What one run did with transcriptions (the summary and metrics; not ``runs`` columns).

    Attributes:
        recordings: Recordings whose transcriptions were listed at Bird.
        archived: Transcriptions stored by this run (or found stored by a killed one).
        already_archived: Listed, and ``archived`` before: no content requested.
        pending: Not ready at Bird yet (``retry-failed`` looks again); a recording whose
            listing was empty counts one.
        failed: Failed this time (a listing that failed counts one).
        unavailable: Bird gave up on them.
        bytes_uploaded: Transcription bytes written to S3 by this run.
        failures: ``(recording_id, error)`` of the first failures, for the report.
    """

    recordings: int = 0
    archived: int = 0
    already_archived: int = 0
    pending: int = 0
    failed: int = 0
    unavailable: int = 0
    bytes_uploaded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


#: The ``runs`` count columns: every counter of :class:`RunCounts`, so a new counter cannot be
#: left out of the table (a test checks the table has them all).
RUN_COUNT_COLUMNS: Final[tuple[str, ...]] = tuple(
    item.name for item in fields(RunCounts) if item.name != "failures"
)


def plain_utc(moment: datetime) -> datetime:
    """``moment`` (aware) as a plain :class:`datetime` in UTC.

    Not a subclass such as Prefect's, so values compare and store alike whatever type or
    zone came in; built field by field, as a float timestamp could round microseconds.
    """
    moment = moment.astimezone(UTC)
    return datetime(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        tzinfo=UTC,
    )
