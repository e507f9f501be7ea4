"""Erasure on request in SQL: the ledger's tombstone, the rows deleted, the ``erasures`` table.

An erasure starts with one transaction (:meth:`Erasures.begin_erasure`), taken only by the
holder of the recording's lease: the ledger row becomes the tombstone (state ``erased``,
with when and why, its size and hash cleared), the recording's ``recordings`` and
``recording_parties`` rows are deleted, its Parquet partition is marked changed, and an
``erasures`` row records the intent (outcome ``erasing``). From that commit on no run
touches the recording again (an ``erased`` row is never leased, see
:meth:`~recarchive.store.claims.LedgerClaims.claim`); what is left — S3 versions, the
Parquet files, Bird's copy — is done after it and recorded by :meth:`Erasures.finish_erasure`.
An erasure killed in between is found again by :meth:`Erasures.open_erasure` (outcome still
``erasing``) and resumed by running ``erase`` again.

The tombstone keeps its pinned ``s3_bucket`` and ``s3_key``: they hold no personal data (a
workspace, a day and the recording's ID), a resumed erasure needs them to find the objects
left, and a pinned key never moves. The ``erasures`` rows hold IDs, times, counts and the
operator's reason; never a number, a name or a payload.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from recarchive.model import LedgerState
from recarchive.store.bulk import clip_error
from recarchive.store.engine import utc_now
from recarchive.store.partitions import mark_partitions_of
from recarchive.store.tables import (
    archive_ledger,
    erasures,
    recording_parties,
    recordings,
    transcription_ledger,
)

__all__ = ["ErasureOutcome", "ErasureRecord", "ErasureRequest", "Erasures"]


class ErasureOutcome(StrEnum):
    """The ``outcome`` of an ``erasures`` row."""

    #: Started: the ledger is a tombstone and the SQL rows are gone; S3, Parquet or Bird's
    #: copy may not be done yet (``erase`` again resumes it).
    ERASING = "erasing"
    ERASED = "erased"
    #: Nothing was deleted: a retention lock, a legal hold, or a run held the recording.
    REFUSED = "refused"


@dataclass(frozen=True)
class ErasureRequest:
    """Who asks to erase which recording, and why.

    Attributes:
        recording_id: The recording.
        reason: Why (the operator's words; no personal data belongs here).
        requested_by: The OS user who asked.
        owner: The erasing process's lease owner name (``host:pid:random``).
        at_source: Bird's copy is to be deleted too.
    """

    recording_id: str
    reason: str
    requested_by: str
    owner: str
    at_source: bool


@dataclass(frozen=True)
class ErasureRecord:
    """One ``erasures`` row (see :data:`recarchive.store.tables.erasures`)."""

    id: int
    recording_id: str
    outcome: str
    reason: str
    detail: str | None
    requested_by: str
    owner: str
    requested_at: datetime
    finished_at: datetime | None
    created_month: str | None
    s3_versions_deleted: int
    sql_rows_deleted: int
    parquet_partitions_rewritten: int
    parquet_versions_deleted: int
    at_source: bool


_COLUMNS = tuple(erasures.c[item.name] for item in fields(ErasureRecord))
_ledger = archive_ledger.c


def _record(row: Any) -> ErasureRecord:
    return ErasureRecord(**row._mapping)


class _LeaseLost(Exception):
    """Raised inside a transaction to roll it back: the lease went before its last write."""


def tombstone_reason(reason: str) -> str:
    """The ledger's ``last_error`` of an erased recording: why it was erased."""
    return f"erased on request: {reason}"


class Erasures:
    """The erasure part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def begin_erasure(
        self, request: ErasureRequest, *, key_if_none: tuple[str, str] | None = None
    ) -> ErasureRecord | None:
        """Make the ledger row a tombstone and delete the SQL rows, in one transaction.

        Args:
            request: The erasure; ``request.owner`` holds the recording's lease.
            key_if_none: ``(bucket, key)`` pinned on a row without an S3 key (a recording
                erased before its media was archived), so its tombstone has a place in S3 too
                and a ``rebuild`` finds it.

        Returns:
            The new ``erasing`` row, or ``None`` (nothing changed) when ``owner`` does not
            hold the lease or the row is erased already.
        """
        recording_id, owner = request.recording_id, request.owner
        try:
            with self.engine.begin() as connection:
                row = connection.execute(
                    select(_ledger.state, _ledger.lease_owner).where(
                        _ledger.recording_id == recording_id
                    )
                ).first()
                if row is None or row.state == LedgerState.ERASED or row.lease_owner != owner:
                    return None
                month = connection.execute(
                    select(recordings.c.created_month).where(recordings.c.id == recording_id)
                ).scalar()
                # Before the rows go: the mark looks the month up from the recordings row.
                mark_partitions_of(connection, [recording_id])
                deleted = connection.execute(
                    delete(recording_parties).where(
                        recording_parties.c.recording_id == recording_id
                    )
                ).rowcount
                deleted += connection.execute(
                    delete(recordings).where(recordings.c.id == recording_id)
                ).rowcount
                # Its transcriptions' rows too (not counted: sql_rows_deleted counts the
                # recording's own rows, as before transcriptions were archived).
                connection.execute(
                    delete(transcription_ledger).where(
                        transcription_ledger.c.recording_id == recording_id
                    )
                )
                now = utc_now()
                pinned = {}
                if key_if_none is not None:
                    pinned = {
                        "s3_bucket": func.coalesce(_ledger.s3_bucket, key_if_none[0]),
                        "s3_key": func.coalesce(_ledger.s3_key, key_if_none[1]),
                    }
                updated = connection.execute(
                    update(archive_ledger)
                    .where(_ledger.recording_id == recording_id, _ledger.lease_owner == owner)
                    .values(
                        **pinned,
                        state=LedgerState.ERASED,
                        last_error=clip_error(tombstone_reason(request.reason)),
                        next_attempt_at=None,
                        # What the media was like is the recording's, not the tombstone's.
                        size_bytes=None,
                        sha256=None,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )
                if updated.rowcount != 1:
                    # The lease went between the read and the update: undo the deletes above.
                    raise _LeaseLost
                return self._insert(
                    connection,
                    request,
                    ErasureOutcome.ERASING,
                    requested_at=now,
                    created_month=month,
                    sql_rows_deleted=deleted,
                )
        except _LeaseLost:
            return None

    def reopen_erasure(self, request: ErasureRequest) -> ErasureRecord:
        """An ``erasing`` row for a tombstone that has none (a ledger erased by hand)."""
        with self.engine.begin() as connection:
            return self._insert(connection, request, ErasureOutcome.ERASING, requested_at=utc_now())

    def record_refusal(self, request: ErasureRequest, *, detail: str) -> ErasureRecord:
        """Record an erasure that was refused; nothing of the recording was deleted."""
        now = utc_now()
        with self.engine.begin() as connection:
            return self._insert(
                connection,
                request,
                ErasureOutcome.REFUSED,
                detail=clip_error(detail),
                requested_at=now,
                finished_at=now,
            )

    def finish_erasure(
        self,
        erasure_id: int,
        *,
        outcome: ErasureOutcome,
        detail: str | None = None,
        s3_versions_deleted: int = 0,
        parquet_partitions_rewritten: int = 0,
        parquet_versions_deleted: int = 0,
        at_source: bool = False,
    ) -> None:
        """Record what an erasure (or this attempt at resuming it) did; counts add up.

        Args:
            erasure_id: The ``erasing`` row.
            outcome: ``erased`` when everything is done; ``erasing`` keeps it open (``detail``
                says what is left).
            detail: What is left to do, or ``None``.
            s3_versions_deleted: Object versions (and delete markers) deleted by this attempt.
            parquet_partitions_rewritten: Partitions rewritten without the recording.
            parquet_versions_deleted: Older versions of those partitions' files deleted.
            at_source: Bird's copy was deleted (or was gone) in this attempt.
        """
        column = erasures.c
        values: dict[str, Any] = {
            "outcome": outcome,
            "detail": clip_error(detail),
            "finished_at": utc_now() if outcome == ErasureOutcome.ERASED else None,
            "s3_versions_deleted": column.s3_versions_deleted + s3_versions_deleted,
            "parquet_partitions_rewritten": column.parquet_partitions_rewritten
            + parquet_partitions_rewritten,
            "parquet_versions_deleted": column.parquet_versions_deleted + parquet_versions_deleted,
        }
        if at_source:
            values["at_source"] = True
        with self.engine.begin() as connection:
            connection.execute(update(erasures).where(column.id == erasure_id).values(**values))

    def open_erasure(self, recording_id: str) -> ErasureRecord | None:
        """The recording's newest ``erasing`` or ``erased`` row (refusals left out), if any."""
        query = (
            select(*_COLUMNS)
            .where(
                erasures.c.recording_id == recording_id,
                erasures.c.outcome != ErasureOutcome.REFUSED,
            )
            .order_by(erasures.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _record(row)

    def erasure_log(self, recording_id: str | None = None) -> list[ErasureRecord]:
        """Every ``erasures`` row (or one recording's), oldest first: the audit trail."""
        query = select(*_COLUMNS).order_by(erasures.c.id)
        if recording_id is not None:
            query = query.where(erasures.c.recording_id == recording_id)
        with self.engine.connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    def erasure_counts(self) -> dict[str, int]:
        """``erasures`` rows per outcome (every outcome listed, zero included)."""
        query = select(erasures.c.outcome, func.count()).group_by(erasures.c.outcome)
        with self.engine.connect() as connection:
            found = {outcome: int(count) for outcome, count in connection.execute(query).all()}
        return {**dict.fromkeys(ErasureOutcome, 0), **found}

    @staticmethod
    def _insert(
        connection: Connection, request: ErasureRequest, outcome: ErasureOutcome, **values: Any
    ) -> ErasureRecord:
        erasure_id = connection.execute(
            insert(erasures)
            .values(
                recording_id=request.recording_id,
                outcome=outcome,
                reason=request.reason,
                requested_by=request.requested_by,
                owner=request.owner,
                at_source=request.at_source,
                **values,
            )
            .returning(erasures.c.id)
        ).scalar_one()
        row = connection.execute(select(*_COLUMNS).where(erasures.c.id == erasure_id)).one()
        return _record(row)
