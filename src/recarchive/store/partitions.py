"""Which Parquet partitions are due: the ``export_partitions`` table.

A row per ``created_month``: its ``version`` grows with every change to a recording of that
month (or to its ledger row, whose state and media columns the Parquet rows carry), and the
export records the version it wrote only if the partition did not change again while it was
writing (:mod:`recarchive.export.parquet`). Every function works in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import BigInteger, Connection, literal, select, union, update

from recarchive.store.bulk import chunks, dialect_insert
from recarchive.store.engine import utc_now
from recarchive.store.tables import UTCDateTime, export_partitions, recordings

__all__ = ["due_partitions", "mark_partitions", "mark_partitions_of", "record_exported"]


def mark_partitions(connection: Connection, months: Iterable[str]) -> None:
    """Mark ``created_month`` partitions changed (bump their version) in the caller's transaction.

    Args:
        connection: A connection inside a transaction.
        months: ``YYYY-MM`` partitions.
    """
    now = utc_now()
    rows = [
        {"created_month": month, "version": 1, "exported_version": 0, "changed_at": now}
        for month in sorted(set(months))
    ]
    if not rows:
        return
    insert = dialect_insert(connection, export_partitions)
    connection.execute(
        insert.on_conflict_do_update(
            index_elements=[export_partitions.c.created_month],
            set_={"version": export_partitions.c.version + 1, "changed_at": now},
        ),
        rows,
    )


def mark_partitions_of(connection: Connection, recording_ids: Sequence[str]) -> None:
    """Mark the partitions of stored recordings changed: one statement per 500 IDs.

    The months are looked up and bumped by one ``INSERT ... SELECT ... ON CONFLICT``, each
    month once, in month order (concurrent writers on PostgreSQL lock the partition rows in
    the same order, so they wait for each other instead of deadlocking). IDs without a stored
    recording mark nothing.

    Args:
        connection: A connection inside a transaction.
        recording_ids: The recordings whose ``created_month`` partitions are marked.
    """
    now = utc_now()
    insert = dialect_insert(connection, export_partitions)
    for chunk in chunks(recording_ids):
        months = (
            select(
                recordings.c.created_month,
                literal(1, BigInteger()),
                literal(0, BigInteger()),
                literal(now, UTCDateTime()),
            )
            .where(recordings.c.id.in_(chunk))
            .distinct()
            .order_by(recordings.c.created_month)
        )
        connection.execute(
            insert.from_select(
                ["created_month", "version", "exported_version", "changed_at"], months
            ).on_conflict_do_update(
                index_elements=[export_partitions.c.created_month],
                set_={"version": export_partitions.c.version + 1, "changed_at": now},
            )
        )


def due_partitions(connection: Connection, full: bool) -> dict[str, int | None]:
    """Partitions to write, with the version each is written at (``None``: never marked).

    Args:
        connection: A connection (a read-only snapshot is enough).
        full: Every partition with recordings or a row, not only the changed ones.

    Returns:
        ``YYYY-MM`` to version, in month order.
    """
    versions = dict(
        connection.execute(
            select(export_partitions.c.created_month, export_partitions.c.version).where(
                export_partitions.c.version > export_partitions.c.exported_version
            )
            if not full
            else select(export_partitions.c.created_month, export_partitions.c.version)
        ).all()
    )
    due: dict[str, int | None] = dict(versions)
    if full:
        months = connection.execute(
            union(
                select(recordings.c.created_month).distinct(),
                select(export_partitions.c.created_month),
            )
        ).scalars()
        for month in months:
            due.setdefault(month, None)
    return dict(sorted(due.items()))


def record_exported(connection: Connection, month: str, version: int) -> bool:
    """Mark ``month`` exported at ``version`` unless it changed again meanwhile.

    Args:
        connection: A connection inside a transaction.
        month: The ``YYYY-MM`` partition written.
        version: The version :func:`due_partitions` gave for it before it was written.

    Returns:
        Whether the mark was recorded (``False``: the partition changed again and stays due).
    """
    result = connection.execute(
        update(export_partitions)
        .where(export_partitions.c.created_month == month, export_partitions.c.version == version)
        .values(exported_version=version, exported_at=utc_now())
    )
    return result.rowcount == 1
