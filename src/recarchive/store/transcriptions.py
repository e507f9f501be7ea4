"""The ``transcription_ledger``: how far each transcription of an archived recording got.

One row per (recording, transcription): ``pending`` (not ready at Bird; looked at again),
``archived`` (its ``.json`` and, where Bird offers it, ``.txt`` are in S3: final), ``failed``
(retried while it has a next attempt), ``unavailable`` (Bird gave up: final). A recording whose
listing at Bird failed, or came back empty although its payload says ``transcription: true``,
has one row with the transcription ID :data:`LISTING`, looked at again like a failed one and
deleted once a listing names its transcriptions.

``archived`` is never undone by a later outcome (an upsert that skips archived rows), so two
runs that meet on one transcription cannot turn a stored one back into ``pending``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select

from recarchive.model import LedgerState, TranscriptionState
from recarchive.redaction import redact
from recarchive.store.bulk import chunks, clip_error, dialect_insert, retry_conflicts
from recarchive.store.engine import utc_now
from recarchive.store.ledger import state_in_rows_by_key
from recarchive.store.tables import archive_ledger, recordings, transcription_ledger

__all__ = [
    "FORMATS",
    "LISTING",
    "StoredFormat",
    "TranscriptionLedger",
    "TranscriptionOutcome",
    "TranscriptionRow",
]

#: The transcription ID of a recording's row that stands for its listing (see the module).
LISTING = "*"
#: The formats whose key, size and SHA-256 a row records.
FORMATS = ("json", "txt")
_t = transcription_ledger.c
_LOOKED_AGAIN = (TranscriptionState.PENDING.value, TranscriptionState.FAILED.value)


@dataclass(frozen=True)
class StoredFormat:
    """One stored format of a transcription: its S3 key, size and SHA-256 (hex)."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TranscriptionRow:
    """One ``transcription_ledger`` row.

    Attributes:
        recording_id: The recording.
        transcription_id: The transcription (or :data:`LISTING`).
        state: A :class:`~recarchive.model.TranscriptionState` value.
        bird_status: Bird's status when last looked at.
        locale: Its locale.
        attempts: Looks that failed (a ``pending`` look does not count).
        last_error: Why (redacted).
        next_attempt_at: When ``retry-failed`` looks again (``None``: never).
        s3_bucket: The bucket of its objects.
        formats: The stored formats, by format name.
        archived_at: When it was archived.
    """

    recording_id: str
    transcription_id: str
    state: str
    bird_status: str | None
    locale: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    s3_bucket: str | None
    formats: dict[str, StoredFormat]
    archived_at: datetime | None


@dataclass(frozen=True)
class TranscriptionOutcome:
    """What one look at a transcription found, to record.

    Attributes:
        recording_id: The recording.
        transcription_id: The transcription (or :data:`LISTING`).
        state: Its new state.
        bird_status: Bird's status.
        locale: Its locale.
        error: Why it is not archived (redacted again here).
        retry_at: When to look again (``pending`` and retryable ``failed``).
        bucket: The bucket of its objects (``archived``).
        formats: The stored formats (``archived``; a ``failed`` one keeps what it stored).
        archived_at: When it was archived.
    """

    recording_id: str
    transcription_id: str
    state: TranscriptionState
    bird_status: str | None = None
    locale: str | None = None
    error: str | None = None
    retry_at: datetime | None = None
    bucket: str | None = None
    formats: dict[str, StoredFormat] = field(default_factory=dict)
    archived_at: datetime | None = None


def _row(row: Any) -> TranscriptionRow:
    formats = {
        fmt: StoredFormat(row[f"{fmt}_key"], row[f"{fmt}_size"], row[f"{fmt}_sha256"])
        for fmt in FORMATS
        if row[f"{fmt}_key"] is not None
    }
    return TranscriptionRow(
        recording_id=row["recording_id"],
        transcription_id=row["transcription_id"],
        state=row["state"],
        bird_status=row["bird_status"],
        locale=row["locale"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        next_attempt_at=row["next_attempt_at"],
        s3_bucket=row["s3_bucket"],
        formats=formats,
        archived_at=row["archived_at"],
    )


class TranscriptionLedger:
    """The transcription part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def transcription_rows(self, recording_ids: Sequence[str]) -> dict[str, list[TranscriptionRow]]:
        """The rows of ``recording_ids``, by recording (those without rows left out)."""
        found: dict[str, list[TranscriptionRow]] = {}
        with self.engine.connect() as connection:
            for chunk in chunks(recording_ids):
                query = (
                    select(transcription_ledger)
                    .where(_t.recording_id.in_(chunk))
                    .order_by(_t.recording_id, _t.transcription_id)
                )
                for row in connection.execute(query).mappings():
                    found.setdefault(row["recording_id"], []).append(_row(row))
        return found

    def record_transcriptions(
        self, outcomes: Sequence[TranscriptionOutcome], *, listed: Sequence[str] = ()
    ) -> None:
        """Record outcomes in one transaction; an ``archived`` row is never changed.

        Outcomes that name a transcription, and the recordings ``listed``, delete their
        recording's :data:`LISTING` row (the listing worked), unless this call records that
        row itself (``rebuild`` asks for a listing beside the rows it restores).
        """
        if not outcomes and not listed:
            return

        def work() -> None:
            now = utc_now()
            with self.engine.begin() as connection:
                for outcome in outcomes:
                    connection.execute(_upsert(connection, outcome, now))
                asked = {o.recording_id for o in outcomes if o.transcription_id == LISTING}
                named = {o.recording_id for o in outcomes if o.transcription_id != LISTING}
                named -= asked
                for chunk in chunks(sorted(named.union(listed))):
                    connection.execute(
                        delete(transcription_ledger).where(
                            _t.recording_id.in_(chunk),
                            _t.transcription_id == LISTING,
                            _t.state != TranscriptionState.ARCHIVED.value,
                        )
                    )

        retry_conflicts(work)

    def due_transcriptions(
        self, *, limit: int, max_attempts: int, now: datetime | None = None
    ) -> list[str]:
        """Recordings with a ``pending`` or ``failed`` transcription row due now.

        Only recordings still ``archived`` count (an erased one is never looked at again),
        and only rows with a next attempt: ``pending`` ones always, ``failed`` ones while they
        have failed fewer than ``max_attempts`` times.
        """
        moment = now or utc_now()
        query = (
            select(_t.recording_id)
            .join(archive_ledger, archive_ledger.c.recording_id == _t.recording_id)
            .where(
                _t.state.in_(_LOOKED_AGAIN),
                _t.next_attempt_at.is_not(None),
                _t.next_attempt_at <= moment,
                or_(_t.state == TranscriptionState.PENDING.value, _t.attempts < max_attempts),
                archive_ledger.c.state == LedgerState.ARCHIVED.value,
            )
            .group_by(_t.recording_id)
            .order_by(_t.recording_id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def transcription_targets(
        self, recording_ids: Sequence[str]
    ) -> dict[str, tuple[str, str, datetime]]:
        """``(bucket, media key, createdAt)`` of the archived recordings among ``recording_ids``."""
        found: dict[str, tuple[str, str, datetime]] = {}
        ledger = archive_ledger.c
        with self.engine.connect() as connection:
            for chunk in chunks(recording_ids):
                query = (
                    select(
                        ledger.recording_id,
                        ledger.s3_bucket,
                        ledger.s3_key,
                        recordings.c.created_at,
                    )
                    .join(recordings, recordings.c.id == ledger.recording_id)
                    .where(
                        ledger.recording_id.in_(chunk),
                        state_in_rows_by_key([LedgerState.ARCHIVED.value]),
                        ledger.s3_key.is_not(None),
                    )
                )
                for rid, bucket, key, created in connection.execute(query):
                    found[rid] = (bucket, key, created)
        return found

    def transcription_counts(self) -> dict[str, int]:
        """Rows per state (the :data:`LISTING` rows included)."""
        query = select(_t.state, func.count()).group_by(_t.state)
        with self.engine.connect() as connection:
            return {state: count for state, count in connection.execute(query)}


def _upsert(connection: Any, outcome: TranscriptionOutcome, now: datetime) -> Any:
    """INSERT the outcome's row, or UPDATE the existing one unless it is ``archived``."""
    state = outcome.state
    # Only failures count toward the attempt limit. A transcription still processing at Bird
    # is looked at again without a cap, like media not ready yet: a limit on looks would drop
    # a slow one for good, silently (tests/test_review_i15.py).
    looks = 1 if state == TranscriptionState.FAILED else 0
    values: dict[str, Any] = {
        "recording_id": outcome.recording_id,
        "transcription_id": outcome.transcription_id,
        "state": state.value,
        "bird_status": outcome.bird_status,
        "locale": outcome.locale,
        "attempts": looks,
        "last_error": clip_error(redact(outcome.error) if outcome.error else None),
        "next_attempt_at": outcome.retry_at,
        "s3_bucket": outcome.bucket,
        "archived_at": outcome.archived_at,
        "created_at": now,
        "updated_at": now,
    }
    for fmt in FORMATS:
        stored = outcome.formats.get(fmt)
        values[f"{fmt}_key"] = stored.key if stored else None
        values[f"{fmt}_size"] = stored.size if stored else None
        values[f"{fmt}_sha256"] = stored.sha256 if stored else None
    statement = dialect_insert(connection, transcription_ledger).values(**values)
    changed = {
        name: statement.excluded[name]
        for name in values
        if name not in ("recording_id", "transcription_id", "created_at", "attempts")
    }
    changed["attempts"] = _t.attempts + looks
    return statement.on_conflict_do_update(
        index_elements=[_t.recording_id, _t.transcription_id],
        set_=changed,
        where=and_(_t.state != TranscriptionState.ARCHIVED.value),
    )
