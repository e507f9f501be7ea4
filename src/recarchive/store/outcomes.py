"""How a run's work on a recording ends in the ledger: its outcome, applied in batches.

An :class:`Outcome` is one transition out of a leased row: ``metadata_only``, ``missing``,
``failed`` or ``archived``. :meth:`LedgerOutcomes.apply_outcomes` applies many in one
transaction, under the conditions every transition has: the caller holds the row's lease;
``archived`` is final (no other outcome replaces it); an ``archived`` row names only the S3 key
pinned before its upload. Each applied outcome frees its lease, and the Parquet partitions of
the batch's recordings are marked changed by one statement. A refused outcome changes nothing
and comes back with its reason; the others of its batch are applied all the same.

PostgreSQL applies a batch with one ``UPDATE ... FROM unnest(arrays) ... RETURNING``: one
round trip, whatever the batch's size. SQLite, whose write transactions start with ``BEGIN
IMMEDIATE`` (one writer at a time, so what a read sees stays true until the commit), reads the
rows first to learn which outcomes qualify and why the others do not, then updates those with
one ``executemany``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
    Row,
    Text,
    and_,
    bindparam,
    case,
    column,
    func,
    or_,
    select,
    update,
)

from recarchive.errors import LedgerStateError
from recarchive.model import LedgerState
from recarchive.store import bulk
from recarchive.store.bulk import chunks, clip_error, retry_conflicts
from recarchive.store.engine import utc_now
from recarchive.store.partitions import mark_partitions_of
from recarchive.store.tables import UTCDateTime, archive_ledger

__all__ = ["LedgerOutcomes", "Outcome"]

_ledger = archive_ledger.c


@dataclass(frozen=True)
class Outcome:
    """One recording's transition out of its lease (build it with the class methods).

    Attributes:
        recording_id: The recording.
        state: The state it ends in.
        error: ``last_error``: why it failed, is missing, or has no media yet.
        retry_at: ``next_attempt_at`` (``failed`` and ``metadata_only``; ``None``: never due).
        bucket: ``archived``: the S3 bucket.
        key: ``archived``: the S3 key (it must be the pinned one).
        size_bytes: ``archived``: the object's size.
        sha256: ``archived``: the hex SHA-256 of its bytes.
        lock_mode: ``archived``: the Object Lock mode its objects carry (``None``: none).
        retain_until: ``archived``: ``createdAt`` + the retention days, also when it had
            passed and the objects carry no retention (``None``: no lock mode configured).
        archived_at: ``archived``: when, as the object's ``archived-at`` metadata says
            (``None``: the database's time when the outcome is applied).
    """

    recording_id: str
    state: LedgerState
    error: str | None = None
    retry_at: datetime | None = None
    bucket: str | None = None
    key: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    lock_mode: str | None = None
    retain_until: datetime | None = None
    archived_at: datetime | None = None

    @classmethod
    def metadata_only(
        cls, recording_id: str, *, reason: str, retry_at: datetime | None = None
    ) -> Outcome:
        """Metadata stored, media not (yet): not available, or ``--skip-media``.

        Args:
            recording_id: The recording.
            reason: Why there is no media yet (``status completed``, ``skip-media``).
            retry_at: When ``retry-failed`` should look again whether the media is ready;
                ``None`` (``--skip-media``) means only when the ID is archived again.
        """
        return cls(recording_id, LedgerState.METADATA_ONLY, reason, retry_at)

    @classmethod
    def missing(cls, recording_id: str, *, error: str) -> Outcome:
        """The recording does not exist at Bird (404)."""
        return cls(recording_id, LedgerState.MISSING, error)

    @classmethod
    def failed(cls, recording_id: str, *, error: str, retry_at: datetime | None) -> Outcome:
        """An attempt failed: it is counted, and due again at ``retry_at`` (``None``: final)."""
        return cls(recording_id, LedgerState.FAILED, error, retry_at)

    @classmethod
    def archived(
        cls,
        recording_id: str,
        *,
        bucket: str,
        key: str,
        size_bytes: int,
        sha256: str,
        lock_mode: str | None = None,
        retain_until: datetime | None = None,
        archived_at: datetime | None = None,
    ) -> Outcome:
        """The media is in S3 at its pinned key and verified (with its retention, if any)."""
        return cls(
            recording_id,
            LedgerState.ARCHIVED,
            bucket=bucket,
            key=key,
            size_bytes=size_bytes,
            sha256=sha256,
            lock_mode=lock_mode,
            retain_until=retain_until,
            archived_at=archived_at,
        )


class LedgerOutcomes:
    """The outcomes part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def apply_outcomes(self, outcomes: Sequence[Outcome], *, owner: str) -> dict[str, str]:
        """Apply ``outcomes`` in one transaction; return the refused ones with their reasons.

        An outcome is refused, and changes nothing, when its recording is not in the ledger,
        ``owner`` does not hold its lease, it would replace ``archived``, or it is
        ``archived`` at a key other than the pinned one. Outcomes of one recording given
        twice apply in their order (the second then finds the lease freed by the first).

        Args:
            outcomes: The transitions, any mix of states.
            owner: The lease holder (this run).

        Returns:
            Recording ID to the reason its outcome was refused, for the refused ones only.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: The database failed; nothing of the batch is applied.
        """
        if not outcomes:
            return {}
        refused: dict[str, str] = {}

        def work() -> None:
            refused.clear()
            now = utc_now()
            applied: list[str] = []
            with self.engine.begin() as connection:
                for step in _in_order(outcomes):
                    if connection.dialect.name == "postgresql":
                        done = _update_postgres(connection, step, owner, now)
                    else:
                        done = _update_sqlite(connection, step, owner, now)
                    applied.extend(done)
                    undone = [outcome for outcome in step if outcome.recording_id not in done]
                    refused.update(_refusals(connection, undone, owner))
                # The Parquet rows carry ledger_state and the media columns: re-export them.
                mark_partitions_of(connection, applied)

        # PostgreSQL may abort the transaction for a deadlock with this run's own lease
        # renewal (both lock the chunk's rows); it rolled back whole, so it runs again.
        retry_conflicts(work)
        return refused

    def mark_metadata_only(
        self, recording_id: str, *, owner: str, reason: str, retry_at: datetime | None = None
    ) -> None:
        """Apply :meth:`Outcome.metadata_only` alone.

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._apply_one(
            Outcome.metadata_only(recording_id, reason=reason, retry_at=retry_at), owner
        )

    def mark_missing(self, recording_id: str, *, owner: str, error: str) -> None:
        """Apply :meth:`Outcome.missing` alone.

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._apply_one(Outcome.missing(recording_id, error=error), owner)

    def mark_failed(
        self, recording_id: str, *, owner: str, error: str, retry_at: datetime | None
    ) -> None:
        """Apply :meth:`Outcome.failed` alone (``retry_at=None``: a terminal failure).

        Raises:
            LedgerStateError: Already ``archived``, unknown, or ``owner`` holds no lease.
        """
        self._apply_one(Outcome.failed(recording_id, error=error, retry_at=retry_at), owner)

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
        """Apply :meth:`Outcome.archived` alone.

        Raises:
            LedgerStateError: Unknown, ``owner`` holds no lease, or another key is pinned.
        """
        outcome = Outcome.archived(
            recording_id, bucket=bucket, key=key, size_bytes=size_bytes, sha256=sha256
        )
        self._apply_one(outcome, owner)

    def _apply_one(self, outcome: Outcome, owner: str) -> None:
        refused = self.apply_outcomes([outcome], owner=owner)
        if outcome.recording_id in refused:
            raise LedgerStateError(
                f"cannot mark {outcome.recording_id} {outcome.state}: "
                f"{refused[outcome.recording_id]}"
            )


def _in_order(outcomes: Sequence[Outcome]) -> list[list[Outcome]]:
    """Split ``outcomes`` into steps of distinct recordings, keeping each one's order.

    A set-based update applies one outcome per row; a recording given twice (never by the
    pipeline, which ends each item once) has its second outcome applied in a later step.
    """
    steps: list[list[Outcome]] = []
    seen: Counter[str] = Counter()
    for outcome in outcomes:
        index = seen[outcome.recording_id]
        seen[outcome.recording_id] += 1
        if index == len(steps):
            steps.append([])
        steps[index].append(outcome)
    return steps


def _row_values(outcome: Outcome, now: datetime) -> dict[str, Any]:
    """What an outcome writes; ``None`` media columns leave the row's own value."""
    archived = outcome.state == LedgerState.ARCHIVED
    return {
        "b_id": outcome.recording_id,
        "b_state": str(outcome.state),
        "b_error": clip_error(outcome.error),
        "b_retry": outcome.retry_at,
        "b_add": 1 if outcome.state == LedgerState.FAILED else 0,
        "b_bucket": outcome.bucket,
        "b_key": outcome.key,
        "b_size": outcome.size_bytes,
        "b_sha256": outcome.sha256,
        "b_archived_at": (outcome.archived_at or now) if archived else None,
        "b_lock_mode": outcome.lock_mode,
        "b_retain_until": outcome.retain_until,
    }


def _set_clause(source: Any, now: Any) -> dict[str, Any]:
    """The columns every outcome sets, from ``source`` (bind parameters or unnest columns).

    ``now`` is the time of the transaction, or a bind parameter of it.
    """
    return {
        "state": source["b_state"],
        "last_error": source["b_error"],
        "next_attempt_at": source["b_retry"],
        "attempts": _ledger.attempts + source["b_add"],
        "s3_bucket": func.coalesce(source["b_bucket"], _ledger.s3_bucket),
        "s3_key": func.coalesce(source["b_key"], _ledger.s3_key),
        "size_bytes": func.coalesce(source["b_size"], _ledger.size_bytes),
        "sha256": func.coalesce(source["b_sha256"], _ledger.sha256),
        "archived_at": func.coalesce(source["b_archived_at"], _ledger.archived_at),
        "lock_mode": func.coalesce(source["b_lock_mode"], _ledger.lock_mode),
        "retain_until": func.coalesce(source["b_retain_until"], _ledger.retain_until),
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }


def _allowed(source: Any, owner: Any) -> Any:
    """The conditions of every transition, over ``source``'s state and key.

    ``owner`` is the lease holder, or a bind parameter of it.
    """
    return and_(
        _ledger.lease_owner == owner,
        case(
            # The key pinned before the upload is the only one an archived row may name.
            (
                source["b_state"] == LedgerState.ARCHIVED.value,
                or_(_ledger.s3_key.is_(None), _ledger.s3_key == source["b_key"]),
            ),
            # Archived media is final: no later outcome may hide it.
            else_=_ledger.state != LedgerState.ARCHIVED.value,
        ),
    )


_BIND_TYPES: dict[str, Any] = {
    "b_id": Text(),
    "b_state": Text(),
    "b_error": Text(),
    "b_retry": UTCDateTime(),
    "b_add": Integer(),
    "b_bucket": Text(),
    "b_key": Text(),
    "b_size": BigInteger(),
    "b_sha256": Text(),
    "b_archived_at": UTCDateTime(),
    "b_lock_mode": Text(),
    "b_retain_until": UTCDateTime(),
}


def _update_sqlite(
    connection: Connection, step: list[Outcome], owner: str, now: datetime
) -> set[str]:
    """SQLite: read the rows, then one ``executemany`` over the outcomes that qualify."""
    rows = _current_rows(connection, [outcome.recording_id for outcome in step])
    qualified = [
        outcome
        for outcome in step
        if _refusal_reason(rows.get(outcome.recording_id), outcome, owner) is None
    ]
    if not qualified:
        return set()
    values = [
        {**_row_values(outcome, now), "b_owner": owner, "b_now": now} for outcome in qualified
    ]
    if bulk.executemany_bound(connection, _sqlite_update(), values) != len(qualified):
        # BEGIN IMMEDIATE makes this impossible; should it happen, nothing is committed.
        raise LedgerStateError("ledger rows changed between their read and their update")
    return {outcome.recording_id for outcome in qualified}


@functools.cache
def _sqlite_update() -> Any:
    """The UPDATE of :func:`_update_sqlite`: every value a bind parameter, built once."""
    binds = {
        name: bindparam(name, type_=kind)
        for name, kind in {**_BIND_TYPES, "b_owner": Text(), "b_now": UTCDateTime()}.items()
    }
    return (
        update(archive_ledger)
        # The read above decided; the conditions stay in the statement all the same.
        .where(_ledger.recording_id == binds["b_id"], _allowed(binds, binds["b_owner"]))
        .values(_set_clause(binds, binds["b_now"]))
    )


def _update_postgres(
    connection: Connection, step: list[Outcome], owner: str, now: datetime
) -> set[str]:
    """PostgreSQL: one ``UPDATE ... FROM unnest(...) ... RETURNING`` for the whole step."""
    from sqlalchemy.dialects.postgresql import ARRAY  # not loaded by a SQLite process

    rows = [_row_values(outcome, now) for outcome in step]
    arrays = [
        bindparam(f"{name}s", [row[name] for row in rows], type_=ARRAY(kind))
        for name, kind in _BIND_TYPES.items()
    ]
    source = (
        func.unnest(*arrays)
        .table_valued(*(column(name, kind) for name, kind in _BIND_TYPES.items()))
        .render_derived(name="outcome")
    )
    values = {name: source.c[name] for name in _BIND_TYPES}
    statement = (
        update(archive_ledger)
        .where(_ledger.recording_id == values["b_id"], _allowed(values, owner))
        .values(_set_clause(values, now))
        .returning(_ledger.recording_id)
    )
    return set(connection.execute(statement).scalars())


def _current_rows(connection: Connection, ids: Sequence[str]) -> dict[str, Row[Any, Any, Any, Any]]:
    found: dict[str, Row[Any, Any, Any, Any]] = {}
    for chunk in chunks(ids):
        for row in connection.execute(
            select(_ledger.recording_id, _ledger.state, _ledger.lease_owner, _ledger.s3_key).where(
                _ledger.recording_id.in_(chunk)
            )
        ):
            found[row.recording_id] = row
    return found


def _refusals(connection: Connection, undone: list[Outcome], owner: str) -> dict[str, str]:
    """Why each of ``undone`` was not applied (read in the same transaction)."""
    if not undone:
        return {}
    rows = _current_rows(connection, [outcome.recording_id for outcome in undone])
    return {
        outcome.recording_id: _refusal_reason(rows.get(outcome.recording_id), outcome, owner)
        or "this run does not hold its lease"
        for outcome in undone
    }


def _refusal_reason(
    row: Row[Any, Any, Any, Any] | None, outcome: Outcome, owner: str
) -> str | None:
    """Why ``outcome`` may not be applied to ``row``; ``None`` when it may."""
    if row is None:
        return "it is not in the ledger"
    archiving = outcome.state == LedgerState.ARCHIVED
    if row.state == LedgerState.ARCHIVED and not archiving:
        return "it is archived already"
    if row.lease_owner != owner:
        return "this run does not hold its lease"
    if archiving and row.s3_key is not None and row.s3_key != outcome.key:
        return "another S3 key is pinned for it"
    return None
