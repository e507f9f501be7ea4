"""The rule of a run's final state (``recarchive.run.outcome``): table-driven, no I/O."""

from __future__ import annotations

import pytest

from recarchive.model import RunCounts, RunStatus
from recarchive.run.outcome import (
    Outcome,
    artifact_key,
    child_outcome,
    outcome_message,
    progress_percent,
    run_outcome,
    worst,
)
from recarchive.run.runs import RunReport, report_table


def report(counts: dict[str, int], export_error: str | None = None) -> RunReport:
    values = RunCounts()
    for name, value in counts.items():
        setattr(values, name, value)
    return RunReport(
        run_id=7,
        kind="archive-flow",
        status=RunStatus.SUCCEEDED,
        counts=values,
        export=None,
        seconds=1.0,
        export_error=export_error,
    )


@pytest.mark.parametrize(
    ("counts", "export_error", "expected"),
    [
        ({"requested": 3, "archived": 3}, None, Outcome.SUCCEEDED),
        ({"requested": 3, "metadata_only": 2, "already_archived": 1}, None, Outcome.SUCCEEDED),
        ({"requested": 3, "archived": 1, "busy": 2}, None, Outcome.SUCCEEDED),
        ({}, None, Outcome.SUCCEEDED),  # nothing to do
        # missing (404 at Bird) is reported, never a state: nothing more can be done.
        ({"requested": 3, "archived": 1, "missing": 2}, None, Outcome.SUCCEEDED),
        ({"requested": 3, "archived": 2, "failed": 1}, None, Outcome.PARTIAL),
        ({"requested": 3, "failed": 2, "missing": 1}, None, Outcome.PARTIAL),
        ({"requested": 3, "failed": 3}, None, Outcome.PARTIAL),  # every one: still retried
        ({"requested": 3, "archived": 3}, "Parquet export failed: OSError", Outcome.FAILED),
        ({"requested": 3, "failed": 1}, "Parquet export failed: OSError", Outcome.FAILED),
    ],
)
def test_run_outcome(counts: dict[str, int], export_error: str | None, expected: Outcome) -> None:
    assert run_outcome(report(counts, export_error)) is expected


@pytest.mark.parametrize(
    ("state_type", "state_name", "expected"),
    [
        ("COMPLETED", "Completed", Outcome.SUCCEEDED),
        ("COMPLETED", "Cached", Outcome.SUCCEEDED),
        ("COMPLETED", "Partial", Outcome.PARTIAL),
        ("FAILED", "Failed", Outcome.FAILED),
        ("FAILED", "Partial", Outcome.FAILED),  # the type decides, the name only refines
        ("CRASHED", "Crashed", Outcome.FAILED),
        ("CANCELLED", "Cancelled", Outcome.FAILED),
        ("RUNNING", "Running", Outcome.FAILED),  # never final: not a success
        ("unknown", "unknown", Outcome.FAILED),
        (None, None, Outcome.FAILED),
    ],
)
def test_child_outcome(state_type: str | None, state_name: str | None, expected: Outcome) -> None:
    assert child_outcome(state_type, state_name) is expected


S, P, F = Outcome.SUCCEEDED, Outcome.PARTIAL, Outcome.FAILED


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([], S),
        ([S], S),
        ([S, S, S], S),
        ([S, P, S], P),
        ([P, P], P),
        ([S, F], F),
        ([P, F, S], F),
        ([F, P], F),
    ],
)
def test_worst(outcomes: list[Outcome], expected: Outcome) -> None:
    assert worst(outcomes) is expected
    assert worst(reversed(outcomes)) is expected


def test_messages_say_where_the_full_failure_list_is() -> None:
    clean = outcome_message(report({"requested": 2, "archived": 2}))
    assert clean.startswith("2 requested: archived 2") and "status --failed" not in clean
    for counts in ({"failed": 1}, {"missing": 1}):
        message = outcome_message(report({"requested": 1, **counts}))
        assert "`recarchive status --failed`" in message
        rows = report_table(report({"requested": 1, **counts}))
        assert {
            "item": "every failed and missing recording",
            "value": "recarchive status --failed",
        } in rows
    failed_export = outcome_message(report({"requested": 1}, "Parquet export failed: OSError: x"))
    assert "Parquet export failed" in failed_export and "recarchive export" in failed_export


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("archive-ids",), "archive-ids"),
        (("archive-ids", "progress"), "archive-ids-progress"),
        (("Nightly Archive", "retry_failed"), "nightly-archive-retry-failed"),
        (("--odd--", "", "Ünïcode!"), "odd-n-code"),
        (("",), "recarchive"),
    ],
)
def test_artifact_key(parts: tuple[str, ...], expected: str) -> None:
    key = artifact_key(*parts)
    assert key == expected
    assert all(c.islower() or c.isdigit() or c == "-" for c in key)


@pytest.mark.parametrize(
    ("done", "total", "expected"),
    [(0, 10, 0.0), (5, 10, 50.0), (10, 10, 100.0), (12, 10, 100.0), (0, 0, 100.0)],
)
def test_progress_percent(done: int, total: int, expected: float) -> None:
    assert progress_percent(done, total) == expected
