"""What a run does with the ledger rows it holds: leases and the pinned S3 key.

A run leases the rows it works on so that two runs never work on the same recording: on
PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite, where every write
transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time), with a single conditional
``UPDATE``. While it holds a lease it renews it, pins the recording's S3 key before the first
upload, and finally marks the outcome (:mod:`~recarchive.store.outcomes`), which frees the
lease. Lease times are the database's (:func:`~recarchive.store.engine.db_now`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Engine, bindparam, or_, select, update

from recarchive.errors import LedgerStateError
from recarchive.model import LedgerState
from recarchive.store.bulk import chunks, retry_conflicts
from recarchive.store.engine import db_now, no_jit
from recarchive.store.ledger import DEFAULT_STALE_AFTER, lease_unheld, state_in_rows_by_key
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
            states: States worth claiming (``erased`` is never claimed).

        Returns:
            The IDs now leased to ``owner``.
        """
        # An erased row (a tombstone) is never leased, whatever a caller asks for: no run
        # fetches it again, and ``erase`` itself leases only rows it has not erased yet.
        states = [state for state in states if state != LedgerState.ERASED]
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
                    state_in_rows_by_key(states),
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

    def pin_keys(
        self, keys: Mapping[str, str], *, owner: str, bucket: str
    ) -> dict[str, tuple[str, str]]:
        """Pin the S3 locations of recordings before their first upload, in one transaction.

        The first pin wins and never moves: a retry, a ``--refresh`` or a recovery that sees
        another ``createdAt`` day still uploads to the key pinned first, so a recording is
        never stored twice under two dates. A chunk pins the keys of all its media items at
        once, before any of their transfers starts.

        Args:
            keys: Recording ID (this run holds its lease) to the key to pin if none is yet.
            owner: Lease holder.
            bucket: Bucket to pin with each new key.

        Returns:
            ``(bucket, key)`` as pinned (an earlier pin, or these), for every recording of
            ``keys`` whose lease ``owner`` holds; the others are left out.
        """
        if not keys:
            return {}
        pinned: dict[str, tuple[str, str]] = {}

        def work() -> None:
            pinned.clear()
            with self.engine.begin() as connection:
                connection.execute(
                    update(archive_ledger)
                    .where(
                        archive_ledger.c.recording_id == bindparam("b_id"),
                        archive_ledger.c.lease_owner == owner,
                        archive_ledger.c.s3_key.is_(None),
                    )
                    .values(s3_bucket=bucket, s3_key=bindparam("b_key")),
                    [{"b_id": recording_id, "b_key": key} for recording_id, key in keys.items()],
                )
                for chunk in chunks(list(keys)):
                    rows = connection.execute(
                        select(
                            archive_ledger.c.recording_id,
                            archive_ledger.c.s3_bucket,
                            archive_ledger.c.s3_key,
                            archive_ledger.c.lease_owner,
                        ).where(archive_ledger.c.recording_id.in_(chunk))
                    )
                    for row in rows:
                        if row.lease_owner == owner and row.s3_key is not None:
                            pinned[row.recording_id] = (str(row.s3_bucket or bucket), row.s3_key)

        # PostgreSQL may abort it for a deadlock with this run's own lease renewal (both
        # lock the chunk's rows); it rolled back whole, and a pin is idempotent.
        retry_conflicts(work)
        return pinned

    def pin_key(self, recording_id: str, *, owner: str, bucket: str, key: str) -> tuple[str, str]:
        """Pin one recording's S3 location (see :meth:`pin_keys`); return the pinned one.

        Raises:
            LedgerStateError: ``owner`` holds no lease on the recording.
        """
        pinned = self.pin_keys({recording_id: key}, owner=owner, bucket=bucket)
        if recording_id not in pinned:
            raise LedgerStateError(f"cannot pin the key of {recording_id}: not leased by this run")
        return pinned[recording_id]
