"""The Object Lock columns of the ledger: legal holds as ``recarchive hold`` set them, and counts.

An archived row records the retention its MP3 and sidecar were written with (``lock_mode``,
``retain_until``: :class:`~recarchive.store.outcomes.Outcome`) and whether a legal hold is on
(``legal_hold``, ``legal_hold_at``). The ledger follows S3 here: the hold is recorded after S3
confirmed it, so a row never claims a hold the objects do not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, select, update

from recarchive.model import LedgerState
from recarchive.store.bulk import chunks
from recarchive.store.engine import utc_now
from recarchive.store.ledger import state_in_rows_by_key
from recarchive.store.tables import archive_ledger

__all__ = ["LOCK_COUNTS", "LedgerLocks"]

_ledger = archive_ledger.c

#: The keys of :meth:`LedgerLocks.lock_counts`, in the order ``status`` shows them.
LOCK_COUNTS = ("held", "locked", "lock_expired", "written_without_retention")


class LedgerLocks:
    """The Object Lock part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def record_legal_hold(self, ids: Sequence[str], *, on: bool) -> int:
        """Record that the legal hold of the archived recordings ``ids`` is now on (or off).

        Call it once S3 holds (or released) every object of these recordings.

        Returns:
            The rows changed (archived ones among ``ids``).
        """
        changed = 0
        now = utc_now()
        with self.engine.begin() as connection:
            for chunk in chunks(ids):
                result = connection.execute(
                    update(archive_ledger)
                    .where(
                        _ledger.recording_id.in_(chunk),
                        state_in_rows_by_key([LedgerState.ARCHIVED.value]),
                    )
                    .values(legal_hold=on, legal_hold_at=now, updated_at=now)
                )
                changed += result.rowcount
        return changed

    def legal_holds(self, ids: Sequence[str]) -> set[str]:
        """The recordings among ``ids`` whose legal hold is on (objects written later get it)."""
        held: set[str] = set()
        with self.engine.connect() as connection:
            for chunk in chunks(ids):
                query = select(_ledger.recording_id).where(
                    _ledger.recording_id.in_(chunk), _ledger.legal_hold.is_(True)
                )
                held.update(connection.execute(query).scalars())
        return held

    def lock_counts(self, *, now: datetime | None = None) -> dict[str, int]:
        """Archived recordings by the state of their Object Lock, at ``now`` (default: now).

        Keys (:data:`LOCK_COUNTS`): ``held`` (a legal hold is on), ``locked`` (written with a
        retention that still runs), ``lock_expired`` (written with a retention that has run
        out since), ``written_without_retention`` (a lock mode was set, but createdAt + days
        had passed already when the objects were written).
        """
        moment = now or utc_now()
        archived = _ledger.state == LedgerState.ARCHIVED.value
        locked = _ledger.lock_mode.is_not(None)

        def count(condition: ColumnElement[bool]) -> Any:
            return func.count().filter(and_(archived, condition))

        query = select(
            count(_ledger.legal_hold.is_(True)),
            count(and_(locked, _ledger.retain_until > moment)),
            count(and_(locked, _ledger.retain_until <= moment)),
            count(and_(_ledger.lock_mode.is_(None), _ledger.retain_until.is_not(None))),
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).one()
        return {name: int(value or 0) for name, value in zip(LOCK_COUNTS, row, strict=True)}
