"""Request permits shared by every process on one ledger database: one API rate limit in all.

Ten child runs on two workers, each pacing itself at R requests per second, send 10 R. This
table gives them one limit instead. It is the "virtual scheduling" form of a token bucket
(GCRA): a limit's row holds the time its next permit is free. Taking ``n`` permits moves that
time ``n / R`` seconds on, from ``max(next_free, now)``; the taker may use its permits from the
old value on. The slots handed out never overlap, so all takers together stay at R, and a
one-second window can hold at most one batch more than R (a batch taken just before it and
used inside it).

Both times are the database's clock (``clock_timestamp()`` on PostgreSQL, ``julianday('now')``
on SQLite), so hosts whose clocks disagree still share one schedule; the taker is told how
long to wait, never a time. One statement per batch: a row lock on PostgreSQL and SQLite's one
writer at a time serialize concurrent takers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, update
from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import StorageUnavailableError
from recarchive.store.bulk import dialect_insert
from recarchive.store.tables import request_permits

#: Julian day of 1970-01-01 00:00 UTC (SQLite's ``julianday`` counts from noon, 4714 BC).
_UNIX_EPOCH_JULIAN_DAY = 2440587.5
_SECONDS_PER_DAY = 86400.0


def _database_seconds(dialect: str) -> Any:
    """The database's clock as seconds since the epoch, read when the statement runs."""
    if dialect == "postgresql":
        # clock_timestamp(), not now(): now() is the start of the transaction.
        return func.extract("epoch", func.clock_timestamp())
    return (func.julianday("now") - _UNIX_EPOCH_JULIAN_DAY) * _SECONDS_PER_DAY


class RequestPermits:
    """One shared rate limit in the ledger database.

    Args:
        engine: The ledger database's engine (schema at revision 0004 or later).
        name: The limit's name: every process that uses the same name shares one rate.
        rate: Permits per second.
    """

    def __init__(self, engine: Engine, name: str, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.engine = engine
        self.name = name
        self.rate = rate

    def take(self, count: int) -> float:
        """Reserve ``count`` permits; return the seconds to wait before the first one.

        The permits are meant to be used at ``rate`` from then on (the taker's own pacer does
        that); a taker that uses fewer only leaves the rest unused.

        Raises:
            ValueError: ``count`` below 1.
            StorageUnavailableError: The database could not be read or written: every request
                of the run would meet it, so the run stops.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        span = count / self.rate
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Every sender of this process waits for this take: a row held by a frozen
                    # transaction must stop the run (StorageUnavailableError), not hang it.
                    # (SQLite's busy timeout bounds the wait there.)
                    connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
                    connection.exec_driver_sql("SET LOCAL statement_timeout = '10s'")
                now = _database_seconds(connection.dialect.name)
                later = func.greatest if connection.dialect.name == "postgresql" else func.max
                connection.execute(
                    dialect_insert(connection, request_permits)
                    .values(name=self.name, next_free=0.0)
                    .on_conflict_do_nothing(index_elements=[request_permits.c.name])
                )
                next_free, clock = connection.execute(
                    update(request_permits)
                    .where(request_permits.c.name == self.name)
                    .values(next_free=later(request_permits.c.next_free, now) + span)
                    .returning(request_permits.c.next_free, now)
                ).one()
        except SQLAlchemyError as exc:
            raise StorageUnavailableError(
                f"could not take request permits: {type(exc).__name__}"
            ) from exc
        return max(0.0, float(next_free) - span - float(clock))
