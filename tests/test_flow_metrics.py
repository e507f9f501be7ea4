"""``RECARCHIVE_METRICS_FILE`` from a Prefect flow: the nightly flow's archive and retry runs
both end in ``run/runs.py``, so both kinds are in the file, with the flow's own counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flows.nightly import nightly_archive
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.prefect import use_simulator
from tests.fixtures.simulator import SimulatorFactory


async def test_nightly_flow_writes_the_metrics_file(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(recordings=120, seed=43, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    metrics = tmp_path / "recarchive.prom"
    monkeypatch.setenv("RECARCHIVE_METRICS_FILE", str(metrics))
    result = await nightly_archive(day="2025-04-10", days=2, overlap_hours=6)
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.read_text())
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    archived = result["archive"]["archived"]
    assert archived > 0
    assert value("recarchive_last_run_recordings", kind="nightly", outcome="archived") == archived
    assert value("recarchive_last_run_success", kind="nightly") == 1
    assert value("recarchive_last_run_success", kind="retry-failed") == 1
    nightly_end = value("recarchive_last_run_timestamp_seconds", kind="nightly")
    assert value("recarchive_last_success_timestamp_seconds", kind="nightly") == nightly_end
