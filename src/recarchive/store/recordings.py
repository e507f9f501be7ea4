"""Storing recordings' metadata: upserts of ``recordings`` and ``recording_parties``.

Newer wins, whatever order the writes come in: a stalled run writing late, or a repeated
fetch of unchanged content, changes nothing (not even a timestamp). Every change marks the
recording's Parquet partition for the next export in the same transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, and_, func, or_, select

from recarchive.model import NormalizedRecording
from recarchive.store.bulk import (
    among_ids,
    chunks,
    executemany,
    insert_for,
    insert_returning,
    retry_conflicts,
)
from recarchive.store.partitions import mark_partitions
from recarchive.store.tables import recording_parties, recordings

__all__ = ["RecordingWrites"]


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


@functools.cache
def _upsert(dialect_name: str) -> Any:
    """The upsert of ``recordings`` of a dialect, built once, at first use.

    Not at import: PostgreSQL's dialect costs a SQLite process ~30 ms to load. The bulk path
    compiles a statement object once and reuses its SQL text.
    """
    insert = insert_for(dialect_name, recordings)
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


_PARTY_INSERT = recording_parties.insert()


# ID lists as one parameter: the statements are built and compiled once, not their 500
# values coerced into a new expression per batch.
@functools.cache
def _delete_parties(dialect_name: str) -> Any:
    return recording_parties.delete().where(
        among_ids(dialect_name, recording_parties.c.recording_id)
    )


@functools.cache
def _stored_versions(dialect_name: str) -> Any:
    return select(recordings.c.id, *(recordings.c[f] for f in _StoredVersion._fields)).where(
        among_ids(dialect_name, recordings.c.id)
    )


class RecordingWrites:
    """The recordings part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def created_at_of(self, recording_id: str) -> datetime | None:
        """The ``createdAt`` of a recording whose metadata is stored, else ``None``."""
        with self.engine.connect() as connection:
            query = select(recordings.c.created_at).where(recordings.c.id == recording_id)
            value = connection.execute(query).scalar()
        return value if isinstance(value, datetime) else None

    def recording_count(self) -> int:
        """How many ``recordings`` rows there are."""
        with self.engine.connect() as connection:
            query = select(func.count()).select_from(recordings)
            return int(connection.execute(query).scalar_one())

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
        retry_conflicts(lambda: self._save(latest))

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
            for chunk in chunks(changed):
                connection.execute(_delete_parties(connection.dialect.name), {"ids": chunk})
            if parties:
                executemany(connection, _PARTY_INSERT, recording_parties, parties)
            mark_partitions(connection, months)

    def _upsert_changed(
        self, connection: Connection, latest: dict[str, NormalizedRecording]
    ) -> tuple[list[str], dict[str, str]]:
        """Compare with the stored rows, then write only the new and changed ones.

        Returns the changed IDs and the stored ``created_month`` of the existing ones.
        On SQLite nothing can change in between (transactions begin with ``BEGIN
        IMMEDIATE``). On PostgreSQL a concurrent writer may: the upsert's own condition still
        decides, and the upsert locks each row it meets (even when it changes nothing), so
        the party rows replaced afterwards are those of a row this transaction holds: the
        upsert returns the IDs it wrote (see :meth:`_written_by_us` for SQLite). The
        comparison is deliberately not ``FOR UPDATE``: locking existing rows first and new
        ones later deadlocked concurrent writers; one upsert over sorted IDs takes every
        row lock in the same order.
        """
        ids = sorted(latest)
        stored: dict[str, _StoredVersion] = {}
        for chunk in chunks(ids):
            for row in connection.execute(
                _stored_versions(connection.dialect.name), {"ids": chunk}
            ):
                stored[row.id] = _StoredVersion(*row[1:])
        changed = [
            recording_id
            for recording_id in ids
            if _is_newer(latest[recording_id], stored.get(recording_id))
        ]
        if changed:
            rows = [latest[recording_id].recording for recording_id in changed]
            statement = _upsert(connection.dialect.name)
            if connection.dialect.name == "postgresql":
                # The rows the upsert wrote are exactly those whose row now holds our version
                # (it locked each one, so that stays so until the commit).
                changed = sorted(insert_returning(connection, statement, recordings, rows, "id"))
            else:
                executemany(connection, statement, recordings, rows)
                # A row that was not there before is ours for sure: nothing else can write
                # between the comparison and the insert (BEGIN IMMEDIATE holds the lock).
                existing = [recording_id for recording_id in changed if recording_id in stored]
                if existing:
                    written = set(self._written_by_us(connection, existing, latest))
                    changed = [
                        recording_id
                        for recording_id in changed
                        if recording_id not in stored or recording_id in written
                    ]
        return changed, {
            recording_id: version.created_month for recording_id, version in stored.items()
        }

    @staticmethod
    def _written_by_us(
        connection: Connection, candidates: list[str], latest: dict[str, NormalizedRecording]
    ) -> list[str]:
        """SQLite: the candidates whose row now holds our version.

        The upsert's ``WHERE`` has the last word: a row written by other tools may hold
        timestamps in another text form than ours, so that the upsert left it alone; its
        party rows must not be replaced by ours. (On PostgreSQL, where a concurrent writer may
        also have stored a newer version in between, the upsert's ``RETURNING`` tells.)
        """
        ours: list[str] = []
        for chunk in chunks(candidates):
            query = select(recordings.c.id, recordings.c.updated_at, recordings.c.raw_json).where(
                recordings.c.id.in_(chunk)
            )
            for row in connection.execute(query):
                mine = latest[row.id].recording
                if row.updated_at == mine["updated_at"] and row.raw_json == mine["raw_json"]:
                    ours.append(row.id)
        return sorted(ours)
