"""Which creation-time windows were listed completely: the ``listed_windows`` table.

A row says: the list endpoint was read to its last page for ``[window_start, window_end)``
and every ID it gave was handed to an archive run that returned (each ID has its ledger row,
whatever its state). The nightly run lists from the newest ``window_end`` onwards, so a night
that was missed or failed is listed by the next run that works.

That newest end is the end of an unbroken coverage only because the nightly run records a
window just when it starts at or before the newest end so far (or when there is none):
see :func:`recarchive.ids.window.plan_nightly`. Rows written by hand should keep to it.

All datetimes are timezone-aware UTC; :class:`~recarchive.store.tables.UTCDateTime` stores
them (``timestamptz`` on PostgreSQL, canonical naive UTC text on SQLite).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Engine, func, select

from recarchive.model import plain_utc
from recarchive.store.bulk import dialect_insert
from recarchive.store.tables import listed_windows


class TimeWindow(Protocol):
    """A half-open window ``[since, until)``, such as :class:`recarchive.ids.window.Window`.

    A protocol rather than that class, so the store does not import ``ids`` (a higher
    layer; see ARCHITECTURE.md).
    """

    @property
    def since(self) -> datetime:
        """Inclusive start (aware)."""
        ...

    @property
    def until(self) -> datetime:
        """Exclusive end (aware)."""
        ...


@dataclass(frozen=True)
class ListedWindow:
    """One row of ``listed_windows``.

    Attributes:
        since: ``window_start``, inclusive.
        until: ``window_end``, exclusive.
        listed_at: When the listing of the window began.
        run_id: The ``runs`` row of the archive run that took the IDs, if known.
        recordings: IDs the listing gave.
    """

    since: datetime
    until: datetime
    listed_at: datetime
    run_id: int | None
    recordings: int


def record_listed_window(
    engine: Engine,
    window: TimeWindow,
    *,
    run_id: int | None,
    recordings: int,
    listed_at: datetime | None = None,
) -> ListedWindow:
    """Record that ``window`` was listed to its last page and its IDs were archived.

    Call it only after both happened: a window recorded too early would never be listed
    again. Recording the same window again (a re-run of the same night) updates its row.

    Args:
        engine: The ledger database (upgraded to revision 0003 or later).
        window: The window listed.
        run_id: The archive run's ``runs`` row.
        recordings: How many IDs the listing gave.
        listed_at: When the listing began (now by default). It is the listing's start that
            matters: recordings created before it were there to be listed.

    Returns:
        The row as stored.

    Raises:
        ValueError: A naive datetime (local time would be guessed), or an empty window.
    """
    since, until = _utc(window.since, "since"), _utc(window.until, "until")
    if since >= until:
        raise ValueError(f"empty window: {since.isoformat()} is not before {until.isoformat()}")
    row = ListedWindow(
        since, until, _utc(listed_at or datetime.now(UTC), "listed_at"), run_id, recordings
    )
    values = {
        "window_start": row.since,
        "window_end": row.until,
        "listed_at": row.listed_at,
        "run_id": row.run_id,
        "recordings": row.recordings,
    }
    with engine.begin() as connection:
        insert = dialect_insert(connection, listed_windows)
        connection.execute(
            insert.values(**values).on_conflict_do_update(
                index_elements=[listed_windows.c.window_start, listed_windows.c.window_end],
                set_={"listed_at": row.listed_at, "run_id": run_id, "recordings": recordings},
            )
        )
    return row


def last_listed_end(engine: Engine) -> datetime | None:
    """The newest ``window_end`` recorded (aware UTC), or ``None`` when none is.

    The nightly run lists from there (less its overlap).
    """
    with engine.connect() as connection:
        end: datetime | None = connection.execute(
            select(func.max(listed_windows.c.window_end))
        ).scalar()
    return end


def recorded_windows(engine: Engine, *, limit: int | None = None) -> list[ListedWindow]:
    """The recorded windows, oldest start first; with ``limit``, only the newest ones.

    Args:
        engine: The ledger database.
        limit: How many of the windows with the newest ends to return (all by default).
    """
    columns = listed_windows.c
    query = select(
        columns.window_start,
        columns.window_end,
        columns.listed_at,
        columns.run_id,
        columns.recordings,
    ).order_by(columns.window_end.desc(), columns.window_start.desc())
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as connection:
        rows = [ListedWindow(*row) for row in connection.execute(query)]
    return sorted(rows, key=lambda row: (row.since, row.until))


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: {value.isoformat()} has no time zone (give UTC)")
    return plain_utc(value)
