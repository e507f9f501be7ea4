"""The Prometheus textfile of ``RECARCHIVE_METRICS_FILE``, written at the end of every run.

node_exporter's textfile collector reads ``*.prom`` files from one folder and serves them with
its own metrics; Prometheus then alerts on them (docs/monitoring.md). The file holds the last
run of each run kind (label ``kind``: ``archive``, ``nightly``, ``retry-failed``, ...), so one
file may serve several schedules, and ``recarchive_last_success_timestamp_seconds``, which a
run that did not succeed carries over from the previous file (read back first): the alert "no
success in 26 hours" needs the time of the last success, not of the last run.

Written by :func:`prometheus_client.write_to_textfile` from a registry of its own (never the
process-wide one, which holds whatever a library registered): it writes a temp file beside the
target and renames it over, so the collector never reads half a file. A failed write is a
warning: monitoring must never fail the run it reports on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from recarchive.model import RUN_COUNT_COLUMNS, TRANSCRIPTION_OUTCOMES
from recarchive.redaction import describe
from recarchive.run.outcome import Outcome, run_outcome

if TYPE_CHECKING:
    from recarchive.run.runs import RunReport

logger = logging.getLogger(__name__)

#: The outcomes a recording can reach in a run (every counter of ``RunCounts`` but the total
#: and the bytes): the label values of ``recarchive_last_run_recordings``.
RECORDING_OUTCOMES: Final = tuple(
    name for name in RUN_COUNT_COLUMNS if name not in {"requested", "bytes_uploaded"}
)

#: Every metric of the file: name -> (help, extra label beside ``kind``, or ``None``).
METRICS: Final[dict[str, tuple[str, str | None]]] = {
    "recarchive_last_run_recordings": (
        "Recordings of the last run of this kind, per outcome.",
        "outcome",
    ),
    "recarchive_last_run_transcriptions": (
        "Transcriptions of the last run of this kind, per outcome.",
        "outcome",
    ),
    "recarchive_last_run_requested_recordings": (
        "Distinct recording IDs the last run of this kind was asked for.",
        None,
    ),
    "recarchive_last_run_uploaded_bytes": (
        "Media bytes the last run of this kind wrote to S3.",
        None,
    ),
    "recarchive_last_run_duration_seconds": ("Wall time of the last run of this kind.", None),
    "recarchive_last_run_timestamp_seconds": (
        "When the last run of this kind ended, in seconds since the Unix epoch.",
        None,
    ),
    "recarchive_last_run_success": (
        "1 when the last run of this kind succeeded (no failed recording, export done), else 0.",
        None,
    ),
    "recarchive_last_run_state": (
        "1 for the outcome of the last run of this kind (succeeded, partial, failed), else 0.",
        "state",
    ),
    "recarchive_last_run_id": ("The runs-table id of the last run of this kind.", None),
    "recarchive_last_success_timestamp_seconds": (
        "When the last successful run of this kind ended, in seconds since the Unix epoch.",
        None,
    ),
}

#: Samples of a previous file: (metric name, labels as sorted pairs) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _label_names(name: str) -> set[str]:
    extra = METRICS[name][1]
    return {"kind"} if extra is None else {"kind", extra}


def read_previous(path: str) -> Samples:
    """Our samples from the file a previous run wrote; empty when there is none or it is bad.

    An unreadable file is not an error: the next write replaces it. Only the metrics of
    :data:`METRICS` are kept, so a renamed metric does not linger.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("could not read the previous metrics file %s: %s", path, describe(exc))
        return {}
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in METRICS and set(sample.labels) == _label_names(sample.name):
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    except ValueError as exc:
        logger.warning("ignored the unparseable metrics file %s: %s", path, describe(exc))
        return {}
    return samples


def run_samples(
    report: RunReport, *, stopped: bool, finished_at: float, previous: Samples
) -> Samples:
    """The samples of one run: its kind's series, replacing that kind's previous ones.

    Args:
        report: The run's report (for a stopped run: its counts so far).
        stopped: The run raised (its outcome is ``failed`` whatever its counts say).
        finished_at: When it ended (Unix seconds).
        previous: The previous file's samples (:func:`read_previous`).
    """
    outcome = Outcome.FAILED if stopped else run_outcome(report)
    kind = report.kind
    counts = report.counts
    # Other kinds' series stay as the previous file has them.
    samples: Samples = {
        key: value for key, value in previous.items() if ("kind", kind) not in key[1]
    }

    def put(name: str, value: float, **labels: str) -> None:
        samples[(name, tuple(sorted({"kind": kind, **labels}.items())))] = float(value)

    for name in RECORDING_OUTCOMES:
        put("recarchive_last_run_recordings", getattr(counts, name), outcome=name)
    for name in TRANSCRIPTION_OUTCOMES:
        put("recarchive_last_run_transcriptions", getattr(report.transcripts, name), outcome=name)
    put("recarchive_last_run_requested_recordings", counts.requested)
    put("recarchive_last_run_uploaded_bytes", counts.bytes_uploaded)
    put("recarchive_last_run_duration_seconds", report.seconds)
    put("recarchive_last_run_timestamp_seconds", finished_at)
    put("recarchive_last_run_success", 1 if outcome is Outcome.SUCCEEDED else 0)
    for state in Outcome:
        put("recarchive_last_run_state", 1 if state is outcome else 0, state=state.value)
    put("recarchive_last_run_id", report.run_id)
    success_key = ("recarchive_last_success_timestamp_seconds", (("kind", kind),))
    if outcome is Outcome.SUCCEEDED:
        samples[success_key] = finished_at
    elif success_key in previous:
        samples[success_key] = previous[success_key]
    return samples


def registry_of(samples: Samples) -> CollectorRegistry:
    """A registry of its own holding ``samples`` as gauges (with their HELP lines)."""
    registry = CollectorRegistry(auto_describe=True)
    gauges: dict[str, Gauge] = {}
    for name, (help_text, _) in METRICS.items():
        gauges[name] = Gauge(name, help_text, sorted(_label_names(name)), registry=registry)
    for (name, labels), value in sorted(samples.items()):
        gauges[name].labels(**dict(labels)).set(value)
    return registry


def write_run_metrics(
    path: str, report: RunReport, *, stopped: bool = False, finished_at: float | None = None
) -> bool:
    """Write the run's metrics into ``path``, keeping other kinds' series and the last success.

    Args:
        path: The textfile (``*.prom`` for node_exporter's collector).
        report: The run's report.
        stopped: The run raised.
        finished_at: When it ended (Unix seconds); now by default.

    Returns:
        True when the file was written; False (after a warning) when it could not be.
    """
    ended = time.time() if finished_at is None else finished_at
    try:
        previous = read_previous(path)
        samples = run_samples(report, stopped=stopped, finished_at=ended, previous=previous)
        write_to_textfile(path, registry_of(samples))
    except Exception as exc:  # never fail a run for its monitoring
        logger.warning("could not write the metrics file %s: %s", path, describe(exc))
        return False
    return True
