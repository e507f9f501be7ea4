"""Progress of a long run: a live bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from recarchive.model import RunCounts


def human_bytes(count: float) -> str:
    """Return ``count`` bytes as a short human string (``1.5 MB``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover - loop always returns


class ProgressReporter:
    """Shows recordings/s, bytes and ETA while a run goes.

    On a terminal it draws a rich progress bar; when output is not a terminal (cron, CI,
    Prefect workers) it prints one plain line every ``interval`` seconds instead, so logs stay
    readable.

    Args:
        console: Where to draw (stderr, so stdout keeps the summary).
        total: Number of recordings expected, when known.
        interval: Seconds between plain lines.
    """

    def __init__(self, console: Console, total: int | None, *, interval: float = 10.0) -> None:
        self.console = console
        self.total = total
        self.interval = interval
        self.counts = RunCounts()
        self._started = time.monotonic()
        self._last_line = self._started
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressReporter:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]archiving"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rec/s"),
                TextColumn("{task.fields[bytes]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "archive", total=self.total, rate="0.0", bytes="0 B"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.counts.done:
            self._print_line()

    def update(self, delta: RunCounts) -> None:
        """Add one item's outcome (a :class:`RunCounts` delta)."""
        self.counts.add(delta)
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=self.counts.done,
                rate=f"{self.rate:.1f}",
                bytes=human_bytes(self.counts.bytes_uploaded),
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print_line()

    @property
    def rate(self) -> float:
        """Recordings finished per second so far."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return self.counts.done / elapsed

    def _print_line(self) -> None:
        done = self.counts.done
        parts = [f"progress: {done}"]
        if self.total:
            parts[0] += f"/{self.total} ({done * 100 // max(self.total, 1)}%)"
        parts.append(f"{self.rate:.1f} rec/s")
        parts.append(human_bytes(self.counts.bytes_uploaded))
        if self.total and self.rate > 0 and done < self.total:
            parts.append(f"ETA {(self.total - done) / self.rate:.0f}s")
        self.console.print(", ".join(parts), highlight=False, soft_wrap=True)


def summary_table(counts: RunCounts, title: str = "Summary") -> Table:
    """Return the run summary as a rich table."""
    table = Table(title=title, show_header=True, header_style="bold")
    cells = {
        "requested": str(counts.requested),
        "archived": str(counts.archived),
        "already archived": str(counts.already_archived),
        "media pending": str(counts.metadata_only),
        "missing": str(counts.missing),
        "failed": str(counts.failed),
        "bytes": human_bytes(counts.bytes_uploaded),
    }
    if counts.erased:
        # Shown only when there are some: erased recordings are skipped, never fetched again.
        cells["erased"] = str(counts.erased)
    for column in cells:
        table.add_column(column, justify="right")
    table.add_row(*cells.values())
    return table


def result_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Return query results as a rich table (NULL shown as an empty cell)."""
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    return table
