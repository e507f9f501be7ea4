"""What the command line prints, and the exit codes of the contract.

Exit codes: 0 all requested work done; 1 some items ended ``failed`` or ``missing`` (or a store
failed mid-run); 2 bad usage, input or configuration, nothing processed (see the README).
Every message passes :func:`recarchive.redaction.redact`, and an error is one line, never a
traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import typer
from rich.console import Console

from recarchive.cli.progress import summary_table
from recarchive.errors import AuthError, FatalError, InputError, RecarchiveError, UsageError
from recarchive.model import RunCounts
from recarchive.redaction import redact

if TYPE_CHECKING:
    from recarchive.run.runs import RunReport

P = ParamSpec("P")
R = TypeVar("R")

out = Console()
# Messages are never wrapped: a user greps them, and an ID or a path must stay on one line.
err = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE = 0, 1, 2


def configure_logging(verbose: bool) -> None:
    """Log to stderr (INFO with ``--verbose``), keeping URL-logging libraries at WARNING."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # The root's level decides: a flow in this process sets recarchive's logger to INFO to
    # forward its records (flows/tasks.py), which would otherwise print INFO lines here.
    logging.getLogger("recarchive").setLevel(logging.NOTSET)
    # httpx logs full request URLs at INFO: a presigned media URL's query is a credential.
    for noisy in (
        "httpx",
        "httpcore",
        "botocore",
        "boto3",
        "s3transfer",
        "urllib3",
        "aiohttp",
        "werkzeug",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn recarchive errors into a one-line message and the contract's exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except InputError as exc:
            err.print(f"error: {redact(str(exc))}", highlight=False, markup=False)
            for line in exc.problems:
                err.print(f"  {redact(line)}", highlight=False, markup=False)
            raise typer.Exit(EXIT_USAGE) from exc
        except (UsageError, AuthError) as exc:
            err.print(f"error: {redact(str(exc))}", highlight=False, markup=False)
            raise typer.Exit(EXIT_USAGE) from exc
        except (FatalError, RecarchiveError) as exc:
            err.print(f"error: run stopped: {redact(str(exc))}", highlight=False, markup=False)
            raise typer.Exit(EXIT_ITEMS_FAILED) from exc
        except KeyboardInterrupt as exc:
            err.print("interrupted; leases are released, the next run resumes", markup=False)
            raise typer.Exit(130) from exc

    return wrapper


def print_run(report: RunReport) -> None:
    """Print the summary table and the first failures of a run.

    Raises:
        StorageUnavailableError: The run's Parquet export failed (after the summary).
    """
    from recarchive.run.runs import raise_for_export

    counts = report.counts
    out.print(summary_table(counts))
    if counts.busy:
        out.print(f"{counts.busy} recordings were leased by another run and left to it.")
    if report.export is not None:
        out.print(
            f"Parquet: {len(report.export.partitions)} partitions rewritten. "
            f"Took {report.seconds:.1f}s."
        )
    for recording_id, error in counts.failures[:20]:
        out.print(f"  failed {recording_id}: {error}", highlight=False, markup=False)
    if counts.failed > 20:
        out.print(f"  ... and {counts.failed - 20} more (recarchive status --failed)")
    shown = {
        name: n for name, n in report.transcripts.as_dict().items() if n and name != "recordings"
    }
    if shown:
        words = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in shown.items())
        out.print(f"Transcriptions: {words}.", highlight=False, markup=False)
    for recording_id, error in report.transcripts.failures[:20]:
        out.print(f"  failed {recording_id}: {error}", highlight=False, markup=False)
    raise_for_export(report)


def exit_code(counts: RunCounts) -> int:
    """Exit code of a finished run."""
    return EXIT_OK if counts.all_ok else EXIT_ITEMS_FAILED
