"""What a run does with the ledger rows it holds: leases, the pinned S3 key, outcomes.

A run leases the rows it works on so that two runs never work on the same recording: on
PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite, where every write
transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time), with a single conditional
``UPDATE``. While it holds a lease it renews it, pins the recording's S3 key before the first
upload, and finally marks the outcome, which frees the lease. Lease times are the database's
(:func:`~recarchive.store.engine.db_now`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, or_, select, update

from recarchive.errors import LedgerStateError
from recarchive.model import LedgerState
from recarchive.store.bulk import chunks, clip_error
from recarchive.store.engine import db_now, no_jit, utc_now
from recarchive.store.ledger import DEFAULT_STALE_AFTER, lease_unheld
from recarchive.store.partitions import mark_partition_of
from recarchive.store.tables import archive_ledger

__all__ = ["LedgerClaims"]


class LedgerClaims:
    """The lease holder's part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    # --- leases ------------------------------------------------------------------------

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
            no_jit(connection)
            now = db_now(connection)
            values = {
                "lease_owner": owner,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
            }
            postgres = connection.dialect.name == "postgresql"
            for chunk in chunks(ids):
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
            lease_unheld(now, stale_after),
        )

    def release(self, ids: Sequence[str], *, owner: str) -> None:
        """Clear the leases of ``ids`` that ``owner`` holds (others' leases stay)."""
        if not ids:
            return
        with self.engine.begin() as connection:
            for chunk in chunks(ids):
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
            for chunk in chunks(ids):
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

    # --- outcomes ----------------------------------------------------------------------

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
            {"last_error": clip_error(reason), "next_attempt_at": retry_at},
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
            {"last_error": clip_error(error), "next_attempt_at": None},
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
                "last_error": clip_error(error),
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
                "archived_at": utc_now(),
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
                    updated_at=utc_now(),
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
            mark_partition_of(connection, recording_id)
