"""How a finished run or verification ends on the command line: its summary and exit code.

The summary is a table, or with ``--json`` one JSON object on stdout.

The JSON keys are part of the contract (README, "Machine-readable output"): keys are only ever
added. With ``--json`` nothing else goes to stdout: progress and messages are on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from recarchive.cli.output import EXIT_ITEMS_FAILED, EXIT_OK, exit_code, out, print_run

if TYPE_CHECKING:
    from recarchive.media.verify import VerifyReport
    from recarchive.run.runs import RunReport

#: Version of the JSON documents' shape; raised only if a key ever changes meaning.
SCHEMA_VERSION = 1


def emit_json(document: dict[str, Any]) -> None:
    """Write ``document`` as one line of JSON to stdout (plain: no colour, no wrapping)."""
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


def run_document(report: RunReport, command: str, code: int, invalid_ids: int) -> dict[str, Any]:
    """The ``--json`` summary of an ``archive`` or ``retry-failed`` run.

    Args:
        report: The run's report.
        command: ``archive`` or ``retry-failed``.
        code: The exit code the command exits with.
        invalid_ids: Listed IDs that were not recording IDs (counted as failed in the exit code).
    """
    counts = report.counts.as_dict()
    bytes_uploaded = counts.pop("bytes_uploaded")
    export = report.export
    return {
        "schema": SCHEMA_VERSION,
        "command": command,
        "run_id": report.run_id,
        "kind": report.kind,
        "status": str(report.status),
        "exit_code": code,
        "duration_seconds": round(report.seconds, 3),
        "bytes_uploaded": bytes_uploaded,
        "counts": counts,
        "invalid_ids": invalid_ids,
        "failures": [{"id": rid, "error": error} for rid, error in report.counts.failures],
        "export": None
        if export is None
        else {"rows": export.rows, "partitions": list(export.partitions)},
        "export_error": report.export_error,
        # Transcriptions (README, "Transcriptions"): counts, and the first failures.
        "transcriptions": report.transcripts.as_dict(),
        "transcription_failures": [
            {"id": rid, "error": error} for rid, error in report.transcripts.failures
        ],
    }


def finish_run(report: RunReport, command: str, *, as_json: bool, invalid_ids: int = 0) -> int:
    """Print a run's summary (table or JSON) and return its exit code.

    Raises:
        StorageUnavailableError: The run's Parquet export failed (after the summary): exit 1.
    """
    from recarchive.run.runs import raise_for_export

    code = exit_code(report.counts)
    if invalid_ids or report.export_error or report.transcripts.failed:
        code = EXIT_ITEMS_FAILED
    if not as_json:
        print_run(report)
        return code
    emit_json(run_document(report, command, code, invalid_ids))
    raise_for_export(report)
    return code


def finish_verify(report: VerifyReport, *, as_json: bool, deep: bool, seconds: float) -> int:
    """Print a verification's summary (lines or JSON) and return its exit code."""
    code = EXIT_ITEMS_FAILED if report.problems else EXIT_OK
    if as_json:
        emit_json(
            {
                "schema": SCHEMA_VERSION,
                "command": "verify",
                "deep": deep,
                "exit_code": code,
                "duration_seconds": round(seconds, 3),
                "checked": report.checked,
                "ok": report.ok,
                "problem_count": len(report.problems),
                "problems": [
                    {"id": p.recording_id, "key": p.key, "problem": p.problem}
                    for p in report.problems
                ],
                # Objects --deep could not read before a restore (not problems): needs
                # restore, restore in progress, restore requested.
                "restores": [
                    {"id": r.recording_id, "key": r.key, "state": r.problem}
                    for r in report.restores
                ],
            }
        )
        return code
    out.print(
        f"verified {report.checked} archived recordings: {report.ok} ok, "
        f"{len(report.problems)} problems"
        + (f", {len(report.restores)} in an archive class (not read)" if report.restores else "")
    )
    for problem in [*report.problems[:100], *report.restores[:100]]:
        out.print(
            f"  {problem.recording_id} {problem.key}: {problem.problem}",
            highlight=False,
            markup=False,
            soft_wrap=True,  # one line per object, for grep
        )
    return code
