"""The ``runs`` table: a row per run, its heartbeat while it works, and its outcome."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select, update

from recarchive.model import RUN_COUNT_COLUMNS, RunStatus
from recarchive.store.bulk import clip_error
from recarchive.store.engine import db_now, utc_now
from recarchive.store.tables import runs

__all__ = ["RunsTable"]


class RunsTable:
    """The runs part of :class:`~recarchive.store.archive.ArchiveStore`."""

    #: Set by :class:`~recarchive.store.archive.ArchiveStore`.
    engine: Engine

    def start_run(self, kind: str, params: dict[str, Any], *, owner: str | None = None) -> int:
        """Insert a ``running`` runs row and return its id.

        Args:
            kind: Run kind (``archive``, ``retry``, ...).
            params: Run parameters (never secrets).
            owner: ``host:pid:random`` of this process (see :meth:`interrupt_dead_runs`).
        """
        with self.engine.begin() as connection:
            result = connection.execute(
                runs.insert()
                .values(
                    kind=kind,
                    status=RunStatus.RUNNING,
                    started_at=utc_now(),
                    params=json.dumps(params, sort_keys=True, default=str),
                    owner=owner,
                    heartbeat_at=db_now(connection),
                )
                .returning(runs.c.id)
            )
            return int(result.scalar_one())

    def run_kinds(self) -> set[tuple[str, str]]:
        """The distinct ``(kind, status)`` pairs of the ``runs`` rows (``rebuild`` asks)."""
        with self.engine.connect() as connection:
            found = connection.execute(select(runs.c.kind, runs.c.status).distinct())
            return {(str(kind), str(status)) for kind, status in found}

    def beat(self, run_id: int) -> None:
        """Record that run ``run_id`` is alive now (database clock); see :meth:`due_retries`."""
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == RunStatus.RUNNING)
                .values(heartbeat_at=db_now(connection))
            )

    def finish_run(
        self, run_id: int, *, status: RunStatus, counts: dict[str, int], error: str | None = None
    ) -> None:
        """Record a run's end: status, counts and error.

        Raises:
            ValueError: A counter with no ``runs`` column: it would be lost silently.
        """
        unknown = sorted(set(counts) - set(RUN_COUNT_COLUMNS))
        if unknown:
            raise ValueError(f"no runs column for counters {', '.join(unknown)}")
        values: dict[str, Any] = {name: int(counts.get(name, 0)) for name in RUN_COUNT_COLUMNS}
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status, finished_at=utc_now(), error=clip_error(error), **values)
            )

    def interrupt_dead_runs(self, owner_is_dead: Callable[[str], bool]) -> list[int]:
        """Finish the ``running`` rows of processes that are gone as ``interrupted``.

        A run killed without unwinding (SIGKILL, OOM killer) cannot finish its own row; without
        this it would say ``running`` forever. Rows without an owner (written before revision
        0002) and owners ``owner_is_dead`` cannot judge (another host) are left alone.

        Args:
            owner_is_dead: Whether the process named by an owner is known to be gone
                (:func:`recarchive.leases.local_owner_dead`).

        Returns:
            The ids of the rows finished.
        """
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(runs.c.id, runs.c.owner).where(
                    runs.c.status == RunStatus.RUNNING, runs.c.owner.is_not(None)
                )
            ).all()
            dead = [row.id for row in rows if owner_is_dead(row.owner)]
            if dead:
                connection.execute(
                    update(runs)
                    .where(runs.c.id.in_(dead), runs.c.status == RunStatus.RUNNING)
                    .values(
                        status=RunStatus.INTERRUPTED,
                        finished_at=utc_now(),
                        error="its process ended before the run finished (killed?); "
                        "its counts were never written",
                    )
                )
        return dead

    def dead_run_owners(self, owner_is_dead: Callable[[str], bool]) -> set[str]:
        """Owners of ``running`` rows whose process is gone, read only.

        What :meth:`interrupt_dead_runs` would finish: a dry run sees them as the real run will.
        """
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(runs.c.owner).where(
                    runs.c.status == RunStatus.RUNNING, runs.c.owner.is_not(None)
                )
            ).scalars()
            return {owner for owner in rows if owner_is_dead(owner)}

    def last_runs(self, limit: int) -> list[dict[str, Any]]:
        """The newest runs as dicts: id, kind, status, started_at, finished_at, counts, error."""
        columns = [
            runs.c.id,
            runs.c.kind,
            runs.c.status,
            runs.c.started_at,
            runs.c.finished_at,
            *(runs.c[name] for name in RUN_COUNT_COLUMNS),
            runs.c.error,
        ]
        query = select(*columns).order_by(runs.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]
