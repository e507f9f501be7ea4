"""Flow runs' final states, logs and artifacts, read back from the Prefect test API.

One rule for every flow (``recarchive.run.outcome``): *Partial* (a Completed-type state) when
recordings failed, *Completed* when only ``missing`` ones did not make it, *Failed* when the
export failed or, for a fan-out parent, a child did not complete.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prefect.deployments
import pytest
from flows.archive import archive_recordings
from flows.backfill import backfill

from tests.fixtures.prefect import artifact, flow_run_logs, ledger, use_simulator
from tests.fixtures.simulator import SimulatorFactory


async def read_artifacts(flow_run_id: uuid.UUID) -> dict[str, Any]:
    """The flow run's artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {item.key: item for item in found if item.key}


async def test_failed_recordings_end_partial_with_logs_and_artifacts_in_the_api(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=30, seed=89, faults="500", available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    monkeypatch.setenv("RECARCHIVE_HTTP_MAX_ATTEMPTS", "1")  # 5xx are final: some fail
    state: Any = await archive_recordings(ids=sim.dataset.ids, chunk_size=10, return_state=True)
    assert state.type.value == "COMPLETED" and state.name == "Partial", state
    counts = await state.result()  # a Completed-type state: the counts, not an exception
    failed = {rid for rid, value in ledger(flow_env).items() if value == "failed"}
    assert counts["failed"] == len(failed) > 0
    assert "recarchive status --failed" in (state.message or "")
    flow_run_id = state.state_details.flow_run_id

    from prefect.client.orchestration import get_client

    async with get_client() as client:  # what an automation sees: the API's state
        stored = (await client.read_flow_run(flow_run_id)).state
    assert stored is not None and (stored.type.value, stored.name) == ("COMPLETED", "Partial")

    # recarchive's own warnings are in the flow run's logs, with no PREFECT_LOGGING_* setting.
    one = sorted(failed)[0]
    logs = await flow_run_logs(flow_run_id, containing=f"recording {one} failed")
    assert any(f"recording {one} failed" in log.message for log in logs), [
        log.message for log in logs
    ]

    artifacts = await read_artifacts(flow_run_id)
    assert set(artifacts) == {"archive-recordings", "archive-recordings-progress"}
    report = artifacts["archive-recordings"]
    assert "recarchive status --failed" in str(report.data)
    assert "flow run" in (report.description or "") and "partial" in (report.description or "")
    progress = artifacts["archive-recordings-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "30 of 30 IDs" in (progress.description or "")


async def test_missing_recordings_alone_end_completed(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=40, seed=97, faults="404", available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    state: Any = await archive_recordings(ids=sim.dataset.ids, return_state=True)
    counts = await state.result()
    assert counts["missing"] > 0 and counts["failed"] == 0
    assert state.type.value == "COMPLETED" and state.name == "Completed", state
    assert "recarchive status --failed" in (state.message or "")  # reported all the same
    table = await artifact("archive-recordings")
    assert "recarchive status --failed" in str(table.data)


async def test_failed_export_ends_failed(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(recordings=6, seed=101, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the Parquet root should be")
    monkeypatch.setenv("RECARCHIVE_PARQUET_ROOT", str(blocked))
    state: Any = await archive_recordings(ids=sim.dataset.ids, skip_media=True, return_state=True)
    assert state.is_failed(), state
    assert "Parquet export failed" in (state.message or "")
    assert "recarchive export" in (state.message or "")
    assert set(ledger(flow_env).values()) == {"metadata_only"}  # the items are done regardless
    table = await artifact("archive-recordings")  # published before the run ends Failed
    assert "Parquet export failed" in str(table.data)


def serve_children(monkeypatch: pytest.MonkeyPatch, states: list[Any]) -> list[dict[str, Any]]:
    """Stand in for ``arun_deployment``: the n-th child ends in ``states[n]``."""
    calls: list[dict[str, Any]] = []

    async def run_child(name: str, parameters: dict[str, Any], **_: Any) -> Any:
        calls.append(parameters)
        return SimpleNamespace(id=uuid.uuid4(), state=states[len(calls) - 1])

    monkeypatch.setattr(prefect.deployments, "arun_deployment", run_child)
    return calls


@pytest.mark.parametrize(
    ("children", "expected"),
    [
        (["Completed", "Completed", "Completed"], ("COMPLETED", "Completed")),
        (["Completed", "Partial", "Completed"], ("COMPLETED", "Partial")),
        (["Partial", "Failed", "Completed"], ("FAILED", "Failed")),
        (["Completed", "Completed", "Crashed"], ("FAILED", "Failed")),
        (["Cancelled", "Completed", "Partial"], ("FAILED", "Failed")),
    ],
)
async def test_fan_out_parent_ends_no_better_than_its_worst_child(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    children: list[str],
    expected: tuple[str, str],
) -> None:
    from prefect.states import Cancelled, Completed, Crashed, Failed

    make: dict[str, Callable[[], Any]] = {
        "Completed": lambda: Completed(message="20 requested: archived 20"),
        "Partial": lambda: Completed(name="Partial", message="20 requested: failed 3"),
        "Failed": lambda: Failed(message="stopped"),
        "Crashed": lambda: Crashed(message="worker died"),
        "Cancelled": lambda: Cancelled(),
    }
    sim = simulator_factory(recordings=50, seed=103, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    ids_file = tmp_path / "backfill.txt"
    ids_file.write_text("\n".join(sim.dataset.ids) + "\n")
    calls = serve_children(monkeypatch, [make[name]() for name in children])
    state: Any = await backfill(
        ids_file=str(ids_file), chunk_size=10, fan_out=True, chunks_per_child=2, return_state=True
    )
    assert len(calls) == 3
    assert (state.type.value, state.name) == expected, state
    table = (await read_artifacts(state.state_details.flow_run_id))["backfill-children"]
    assert [row["state"] for row in table_rows(table)] == children
    assert "20 requested" in str(table.data)  # each child's counts, from its state message
    if expected[0] != "FAILED":
        result = await state.result()
        assert [child["state"] for child in result["children"]] == children


def table_rows(table: Any) -> list[dict[str, Any]]:
    import json

    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    return list(data)


def test_the_example_automation_is_what_prefect_automation_create_takes() -> None:
    # `prefect automation create --from-file` reads the "automations" list of a YAML file and
    # validates each item as an AutomationCore (prefect/cli/automation.py); the same here.
    import yaml  # type: ignore[import-untyped]  # PyYAML comes with Prefect, without stubs
    from prefect.events.schemas.automations import AutomationCore, EventTrigger
    from prefect.events.schemas.events import ResourceSpecification

    path = Path(__file__).parents[1] / "deploy" / "automation-partial-failed.yaml"
    [automation] = [
        AutomationCore.model_validate(item)
        for item in yaml.safe_load(path.read_text())["automations"]
    ]
    assert isinstance(automation.trigger, EventTrigger)
    assert {"prefect.flow-run.Partial", "prefect.flow-run.Failed"} <= automation.trigger.expect
    flows = automation.trigger.match_related
    assert isinstance(flows, ResourceSpecification)
    assert set(flows.root["prefect.resource.name"]) == {
        "archive-recordings",
        "backfill",
        "nightly-archive",
        "retry-failed",
    }
