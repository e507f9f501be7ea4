"""``--json`` summaries of ``archive``, ``retry-failed`` and ``verify``, and the metrics file
(``RECARCHIVE_METRICS_FILE``) of the same runs, read back with ``prometheus_client``'s parser.

End to end: the simulator, moto's S3 server, SQLite, local Parquet, configured only by the
contract's environment variables.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for
from tests.fixtures.cli import contract_env
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

COUNT_KEYS = {
    "requested",
    "archived",
    "already_archived",
    "metadata_only",
    "missing",
    "failed",
    "busy",
    "erased",
}
RUN_KEYS = {
    "schema",
    "command",
    "run_id",
    "kind",
    "status",
    "exit_code",
    "duration_seconds",
    "bytes_uploaded",
    "counts",
    "invalid_ids",
    "failures",
    "export",
    "export_error",
    "transcriptions",
    "transcription_failures",
}


def invoke(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def only_json(result: Result) -> dict[str, Any]:
    """stdout is exactly one JSON object on one line, nothing else."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    document = json.loads(lines[0])
    assert isinstance(document, dict)
    return document


def metric_samples(path: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    families = text_string_to_metric_families(path.read_text())
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in families:
        assert family.type == "gauge" and family.documentation, family.name
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_archive_json_and_metrics_match_the_run(
    simulator_factory: SimulatorFactory,
    tmp_path: Path,
    s3_endpoint: str,
    s3_bucket: str,
    s3_client: S3Client,
) -> None:
    sim = simulator_factory(recordings=40, seed=5, faults="404,notready", available_fraction=1.0)
    metrics = tmp_path / "textfile" / "recarchive.prom"
    metrics.parent.mkdir()
    env = contract_env(tmp_path, sim, s3_bucket, s3_endpoint)
    env["RECARCHIVE_METRICS_FILE"] = str(metrics)
    ids = sim.dataset.ids
    result = invoke(env, "archive", "--json", *ids)
    doc = only_json(result)
    store = ArchiveStore(create_engine_for(env["RECARCHIVE_DATABASE_URL"]))
    ledger = store.counts()
    missing = ledger["missing"]
    assert missing > 0 and ledger["metadata_only"] > 0  # the faults did hit: a mixed run
    # Exit 1 (missing recordings), as without --json, and the document says so.
    assert result.exit_code == 1 and doc["exit_code"] == 1
    assert set(doc) == RUN_KEYS and set(doc["counts"]) == COUNT_KEYS
    assert doc["command"] == "archive" and doc["kind"] == "archive"
    assert doc["counts"]["requested"] == len(ids)
    for state in ("archived", "missing", "metadata_only"):
        assert doc["counts"][state] == ledger[state], state
    with store.engine.connect() as connection:
        run = connection.execute(text("SELECT id, status FROM runs")).one()
        uploaded = connection.execute(
            text("SELECT sum(size_bytes) FROM archive_ledger WHERE state = 'archived'")
        ).scalar_one()
    assert (doc["run_id"], doc["status"]) == (run.id, run.status)
    assert doc["bytes_uploaded"] == uploaded > 0
    assert doc["export"]["rows"] == len(ids) - missing and doc["export_error"] is None

    # The metrics file of the same run.
    samples = metric_samples(metrics)
    kind = {"kind": "archive"}
    for outcome in ("archived", "already_archived", "metadata_only", "missing", "failed", "busy"):
        value = sample(samples, "recarchive_last_run_recordings", outcome=outcome, **kind)
        assert value == doc["counts"][outcome], outcome
    assert sample(samples, "recarchive_last_run_uploaded_bytes", **kind) == uploaded
    assert sample(samples, "recarchive_last_run_requested_recordings", **kind) == len(ids)
    duration = sample(samples, "recarchive_last_run_duration_seconds", **kind)
    assert abs(duration - doc["duration_seconds"]) < 0.01
    assert sample(samples, "recarchive_last_run_id", **kind) == run.id
    # Missing recordings do not fail a run (outcome "succeeded", as the flows say): a success.
    assert sample(samples, "recarchive_last_run_success", **kind) == 1
    assert sample(samples, "recarchive_last_run_state", state="succeeded", **kind) == 1
    ended = sample(samples, "recarchive_last_run_timestamp_seconds", **kind)
    assert sample(samples, "recarchive_last_success_timestamp_seconds", **kind) == ended
    assert list(metrics.parent.iterdir()) == [metrics]  # no temp file left beside it

    # retry-failed --json: nothing due; the not-ready ones are looked at again.
    retried = invoke(env, "retry-failed", "--json")
    retry_doc = only_json(retried)
    assert retry_doc["command"] == "retry-failed" and retry_doc["kind"] == "retry-failed"
    assert retried.exit_code == retry_doc["exit_code"] == 0
    assert retry_doc["run_id"] == run.id + 1
    samples = metric_samples(metrics)
    # Both kinds are in the file now; the archive run's series are kept as they were.
    assert sample(samples, "recarchive_last_run_id", kind="retry-failed") == run.id + 1
    assert sample(samples, "recarchive_last_run_id", **kind) == run.id

    # verify --json: one object damaged behind its metadata is the one problem listed.
    assert invoke(env, "verify", "--json").exit_code == 0
    victim = next(iter(store.iter_archived(batch_size=10)))
    assert victim.s3_key is not None
    s3_client.delete_object(Bucket=s3_bucket, Key=victim.s3_key)
    checked = invoke(env, "verify", "--json")
    verify_doc = only_json(checked)
    assert checked.exit_code == verify_doc["exit_code"] == 1
    assert verify_doc["checked"] == ledger["archived"] and verify_doc["problem_count"] == 1
    assert verify_doc["ok"] == ledger["archived"] - 1
    assert verify_doc["problems"][0]["id"] == victim.recording_id
    assert verify_doc["problems"][0]["key"] == victim.s3_key
    store.engine.dispose()


def test_json_usage_errors_exit_2_with_nothing_on_stdout(tmp_path: Path) -> None:
    env = {"RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    result = invoke(env, "archive", "--json", "not-an-id")
    assert result.exit_code == 2 and result.stdout == ""


def test_unwritable_metrics_file_is_a_warning_not_a_failed_run(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    sim = simulator_factory(recordings=5, seed=3)
    env = contract_env(tmp_path, sim)
    env["RECARCHIVE_METRICS_FILE"] = str(tmp_path / "no-such-folder" / "recarchive.prom")
    result = invoke(env, "archive", "--skip-media", "--json", *sim.dataset.ids)
    assert result.exit_code == 0, result.output
    assert only_json(result)["counts"]["metadata_only"] == 5
    assert "could not write the metrics file" in result.stderr


def test_archive_since_until_json(simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    sim = simulator_factory(recordings=120, seed=43, available_fraction=1.0)
    since, until = datetime(2025, 4, 9, tzinfo=UTC), datetime(2025, 4, 11, tzinfo=UTC)
    expected = sim.dataset.ids_created_between(since, until)
    assert expected
    env = contract_env(tmp_path, sim)
    args = ("archive", "--skip-media", "--json", "--since", "2025-04-09", "--until", "2025-04-11")
    result = invoke(env, *args)
    doc = only_json(result)
    assert result.exit_code == doc["exit_code"] == 0
    assert doc["counts"]["requested"] == doc["counts"]["metadata_only"] == len(expected)
    assert doc["invalid_ids"] == 0 and doc["failures"] == []
    assert "found" in result.stderr  # the listing's messages are on stderr
