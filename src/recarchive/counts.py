"""What a chunk or a run did, as counters that add up."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: Failures kept per chunk for reports; every failure is counted and stays in the ledger.
MAX_REPORTED_FAILURES = 50


@dataclass
class RunCounts:
    """Outcome counters of one chunk or one whole run.

    Attributes:
        requested: Distinct IDs asked for.
        archived: Recordings whose media this run stored (or found already stored by a
            crashed earlier run) and verified.
        already_archived: Recordings that were ``archived`` before this run.
        metadata_only: Media not available yet, or ``--skip-media`` ("media pending").
        missing: 404 at Bird.
        failed: Retries exhausted or terminal error.
        busy: Held by another run's lease; left to that run.
        bytes_uploaded: Media bytes written to S3 by this run.
        failures: ``(recording_id, error)`` of the first failures, for the report.
    """

    requested: int = 0
    archived: int = 0
    already_archived: int = 0
    metadata_only: int = 0
    missing: int = 0
    failed: int = 0
    busy: int = 0
    bytes_uploaded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: RunCounts) -> None:
        """Add ``other``'s counters to these, in place."""
        for item in fields(self):
            if item.name == "failures":
                room = MAX_REPORTED_FAILURES - len(self.failures)
                self.failures.extend(other.failures[: max(room, 0)])
            else:
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def record_failure(self, recording_id: str, error: str) -> None:
        """Count one failure and keep its message if there is room."""
        self.failed += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append((recording_id, error))

    @property
    def done(self) -> int:
        """IDs that reached an outcome in this run."""
        return (
            self.archived
            + self.already_archived
            + self.metadata_only
            + self.missing
            + self.failed
            + self.busy
        )

    @property
    def all_ok(self) -> bool:
        """True when no requested item ended ``failed`` or ``missing``."""
        return self.failed == 0 and self.missing == 0

    def as_dict(self) -> dict[str, Any]:
        """Counters as a plain dict (for JSON, the ``runs`` row and Prefect artifacts)."""
        return {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "failures"
        }
