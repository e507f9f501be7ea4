"""How a run ended, as the flows report it: one rule for every flow, pure.

A run ends in one of three outcomes, which the flows in ``flows/`` turn into Prefect states:

- ``succeeded`` (Prefect *Completed*): every recording reached an outcome other than
  ``failed``. ``missing`` recordings (404 at Bird) do not count against a run: nothing more
  can be done for them; they are reported, and listed by ``recarchive status --failed``.
- ``partial`` (a *Completed*-type state named ``Partial``): the run finished what it could,
  and some recordings ended ``failed``. Their reasons and next attempts are in the ledger,
  and ``retry-failed`` takes them. Not a *Failed*-type state on purpose: that would start
  Prefect's flow retries (redoing a whole run for what the ledger already retries per
  recording) and would look like a crash, while an automation can match the name.
- ``failed`` (Prefect *Failed*): the run stopped (an exception, which Prefect turns into
  *Failed* by itself), its Parquet export failed, or, for a fan-out parent, a child run did
  not complete.

A fan-out parent ends no better than its worst child (:func:`worst`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Final

from recarchive.model import RunCounts
from recarchive.run.runs import FULL_FAILURE_LIST, RunReport

#: The name of the Completed-type state of a run with failed recordings.
PARTIAL_STATE_NAME: Final = "Partial"


class Outcome(StrEnum):
    """How a run ended; members are in order of severity, best first."""

    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"


_SEVERITY: Final = {outcome: rank for rank, outcome in enumerate(Outcome)}


def run_outcome(report: RunReport) -> Outcome:
    """The outcome of one run that returned (a run that raised is ``failed`` by Prefect)."""
    if report.export_error:
        return Outcome.FAILED
    failed = report.counts.failed or report.transcripts.failed
    return Outcome.PARTIAL if failed else Outcome.SUCCEEDED


def child_outcome(state_type: str | None, state_name: str | None) -> Outcome:
    """The outcome of a child flow run from its final Prefect state's type and name.

    Args:
        state_type: The state type's value (``COMPLETED``, ``FAILED``, ``CRASHED``, ...), or
            ``None`` when the run has no state.
        state_name: The state's name (``Completed``, ``Partial``, ...).

    Returns:
        ``failed`` for anything but a Completed-type state: failed, crashed, cancelled, or a
        run that never got a final state.
    """
    if state_type != "COMPLETED":
        return Outcome.FAILED
    return Outcome.PARTIAL if state_name == PARTIAL_STATE_NAME else Outcome.SUCCEEDED


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """The most severe of ``outcomes`` (``succeeded`` when there are none)."""
    return max(outcomes, key=_SEVERITY.__getitem__, default=Outcome.SUCCEEDED)


def counts_message(counts: RunCounts) -> str:
    """A one-line summary of counts, for a state's message (read back by a fan-out parent)."""
    shown = ", ".join(
        f"{name} {value}"
        for name, value in counts.as_dict().items()
        if name not in {"requested", "bytes_uploaded"}
    )
    return f"{counts.requested} requested: {shown}"


def outcome_message(report: RunReport) -> str:
    """The message of a run's final state: its counts, why it failed, where the failures are."""
    message = counts_message(report.counts)
    if report.export_error:
        message += f"; {report.export_error}: the recordings are archived, `recarchive export`"
        message += " redoes it"
    if report.counts.failed or report.counts.missing:
        message += f"; every failed and missing recording: `{FULL_FAILURE_LIST}`"
    return message


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts``: lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key or "recarchive"


def progress_percent(done: int, total: int) -> float:
    """Progress of ``done`` of ``total`` items, 0 to 100 (100 for an empty run)."""
    if total <= 0:
        return 100.0
    return min(100.0, 100.0 * done / total)
