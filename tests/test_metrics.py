"""The metrics textfile across runs: the last success carried over, kinds kept apart, the
file replaced atomically, a bad or unwritable file never failing a run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recarchive.model import RunCounts, RunStatus
from recarchive.run.metrics import METRICS, write_run_metrics
from recarchive.run.runs import RunReport


def report(kind: str, run_id: int, *, failed: int = 0, archived: int = 3) -> RunReport:
    counts = RunCounts(requested=archived + failed, archived=archived, failed=failed)
    counts.bytes_uploaded = 1000 * archived
    status = RunStatus.PARTIAL if failed else RunStatus.SUCCEEDED
    return RunReport(run_id, kind, status, counts, None, 2.5)


def values(path: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


def success(path: Path, kind: str) -> float | None:
    key = ("recarchive_last_success_timestamp_seconds", frozenset({("kind", kind)}))
    return values(path).get(key)


def test_last_success_is_kept_when_a_run_does_not_succeed(tmp_path: Path) -> None:
    path = tmp_path / "recarchive.prom"
    assert write_run_metrics(str(path), report("nightly", 1), finished_at=1000.0)
    assert success(path, "nightly") == 1000.0
    # A partial run (failed recordings) and a stopped run keep the last success...
    assert write_run_metrics(str(path), report("nightly", 2, failed=1), finished_at=2000.0)
    assert success(path, "nightly") == 1000.0
    last_run = values(path)
    nightly = frozenset({("kind", "nightly")})
    assert last_run[("recarchive_last_run_timestamp_seconds", nightly)] == 2000.0
    assert last_run[("recarchive_last_run_success", nightly)] == 0
    state = frozenset({("kind", "nightly"), ("state", "partial")})
    assert last_run[("recarchive_last_run_state", state)] == 1
    assert write_run_metrics(str(path), report("nightly", 3), stopped=True, finished_at=3000.0)
    assert success(path, "nightly") == 1000.0
    failed = frozenset({("kind", "nightly"), ("state", "failed")})
    assert values(path)[("recarchive_last_run_state", failed)] == 1
    # ...another kind's runs do not touch it...
    assert write_run_metrics(str(path), report("retry-failed", 4), finished_at=4000.0)
    assert success(path, "nightly") == 1000.0 and success(path, "retry-failed") == 4000.0
    # ...and the next success replaces it.
    assert write_run_metrics(str(path), report("nightly", 5), finished_at=5000.0)
    assert success(path, "nightly") == 5000.0 and success(path, "retry-failed") == 4000.0


def test_no_success_yet_means_no_success_sample(tmp_path: Path) -> None:
    path = tmp_path / "recarchive.prom"
    write_run_metrics(str(path), report("archive", 1, failed=2), finished_at=10.0)
    assert success(path, "archive") is None  # absent(): the alert fires, as it should
    names = {family.name for family in text_string_to_metric_families(path.read_text())}
    assert names == set(METRICS)
    assert "# HELP recarchive_last_run_recordings " in path.read_text()


def test_the_file_is_replaced_whole_never_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "recarchive.prom"
    write_run_metrics(str(path), report("archive", 1), finished_at=1.0)
    with path.open() as reader:  # a collector reading while the next run writes
        before = path.stat().st_ino
        write_run_metrics(str(path), report("archive", 2, archived=7), finished_at=2.0)
        old = reader.read()
    assert path.stat().st_ino != before  # a new file renamed over the old one
    assert 'recarchive_last_run_id{kind="archive"} 1.0' in old  # the reader saw all of it
    assert 'recarchive_last_run_id{kind="archive"} 2.0' in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recarchive.prom"]


def test_garbage_in_the_previous_file_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "recarchive.prom"
    path.write_text("this is { not prometheus\n")
    with caplog.at_level(logging.WARNING):
        assert write_run_metrics(str(path), report("archive", 1), finished_at=1.0)
    assert "unparseable metrics file" in caplog.text
    assert success(path, "archive") == 1.0


def test_an_unwritable_file_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        written = write_run_metrics(str(tmp_path / "missing" / "x.prom"), report("archive", 1))
    assert written is False
    assert "could not write the metrics file" in caplog.text
