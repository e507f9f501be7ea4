"""What ``recarchive status`` prints: ledger counts, erasures, recent runs, failed, missing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from recarchive.cli.output import out
from recarchive.model import LEDGER_STATES, LedgerEntry

#: How ``status`` names the Object Lock counts (the JSON keys are the keys of ``locks``).
LOCK_LABELS = {
    "held": "legal hold on",
    "locked": "under retention",
    "lock_expired": "retention run out",
    "written_without_retention": "written without retention (createdAt + days had passed)",
}

#: The columns of the recent-runs table, in the order shown.
RUN_COLUMNS = ("id", "kind", "status", "started_at", "archived", "failed", "missing")


def print_status(
    counts: dict[str, int],
    runs: Sequence[dict[str, Any]],
    failures: Sequence[LedgerEntry] | None,
    missing: Sequence[LedgerEntry],
    *,
    as_json: bool,
    erasures: dict[str, int] | None = None,
    locks: dict[str, int] | None = None,
) -> None:
    """Print the status, as tables or (``as_json``) as one JSON document.

    Args:
        counts: Recordings per ledger state.
        runs: The newest ``runs`` rows.
        failures: The ``failed`` rows, or ``None`` when ``--failed`` was not asked for.
        missing: The ``missing`` rows (shown with ``--failed`` only).
        as_json: One JSON document instead of tables.
        erasures: ``erasures`` rows per outcome (``erasing`` ones are unfinished: running the
            same ``erase`` again resumes them); the ``erased`` ledger state is in ``counts``.
        locks: Archived recordings by Object Lock state
            (:meth:`~recarchive.store.locks.LedgerLocks.lock_counts`).
    """
    if as_json:
        doc: dict[str, Any] = {"states": counts, "runs": runs}
        if erasures is not None:
            doc["erasures"] = erasures
        if locks is not None:
            doc["object_lock"] = locks
        if failures is not None:
            doc["failed"] = [
                {
                    "id": e.recording_id,
                    "attempts": e.attempts,
                    "last_error": e.last_error,
                    "next_attempt_at": e.next_attempt_at.isoformat() if e.next_attempt_at else None,
                }
                for e in failures
            ]
            # Added beside "failed", whose entries keep their meaning (and shape).
            doc["missing"] = [{"id": e.recording_id, "last_error": e.last_error} for e in missing]
        out.print_json(json.dumps(doc, default=str))
        return
    table = Table(title="Ledger")
    table.add_column("state")
    table.add_column("recordings", justify="right")
    for state in LEDGER_STATES:
        table.add_row(state, str(counts.get(state, 0)))
    out.print(table)
    if erasures and any(erasures.values()):
        erasures_table = Table("outcome", "erasures", title="Erasures (the erasures table)")
        for outcome, number in erasures.items():
            erasures_table.add_row(str(outcome), str(number))
        out.print(erasures_table)
    if locks is not None and any(locks.values()):
        lock_table = Table("object lock", "recordings", title="Object Lock (archived)")
        for name, value in locks.items():
            lock_table.add_row(LOCK_LABELS.get(name, name), str(value))
        out.print(lock_table)
    if runs:
        runs_table = Table(*RUN_COLUMNS, title="Recent runs")
        for run in runs:
            runs_table.add_row(*(str(run.get(column, "")) for column in RUN_COLUMNS))
        out.print(runs_table)
    if failures is None:
        return
    failed_table = Table("id", "attempts", "next attempt", "last error", title="Failed recordings")
    for entry in failures:
        failed_table.add_row(
            entry.recording_id,
            str(entry.attempts),
            str(entry.next_attempt_at or "never (terminal; archive the ID to retry)"),
            entry.last_error or "",
        )
    out.print(failed_table)
    missing_table = Table(
        "id", "last error", title="Missing recordings (404 at Bird; nothing more to do)"
    )
    for entry in missing:
        missing_table.add_row(entry.recording_id, entry.last_error or "")
    out.print(missing_table)
