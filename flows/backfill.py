"""Flow ``backfill`` (deployment ``backfill``): many IDs, optionally fanned out to workers."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run

from flows.tasks import (
    FlowArtifacts,
    archive_chunk_task,
    best_effort,
    final_state,
    flow_artifacts,
    runs_state,
)
from recarchive.config import load_settings
from recarchive.errors import InputError
from recarchive.ids.spool import IdList
from recarchive.ids.window import Window, parse_when
from recarchive.run.context import ChunkOptions
from recarchive.run.inputs import (
    check_fan_out,
    discover_window,
    ids_per_child,
    open_manifest,
    write_manifests,
)
from recarchive.run.outcome import Outcome, child_outcome, worst
from recarchive.run.runs import archive_ids, registered_input

ARCHIVE_IDS_DEPLOYMENT = "archive-recordings/archive-ids"


@flow(name="backfill", log_prints=False)
async def backfill(
    ids_file: str | None = None,
    since: str | None = None,
    until: str | None = None,
    chunk_size: int | None = None,
    fan_out: bool = False,
    children: int | None = None,
    chunks_per_child: int | None = None,
    skip_media: bool = False,
    max_parallel_chunks: int = 2,
) -> Any:  # a State: calling the flow returns its data (see Returns)
    """Archive a manifest of IDs or a date window, here or fanned out to child runs.

    With ``fan_out``, the IDs are split into ``children`` manifests (8 by default, fewer when
    there are fewer IDs), or into manifests of ``chunks_per_child`` chunks, and one
    ``archive-ids`` deployment run is started per manifest with ``run_deployment``; the parent
    waits for all. The children run on the pool's ``children`` work queue (``prefect.yaml``),
    so workers serving it with a ``--limit`` share them out. Each child gets the manifest's
    location, never the IDs, and an idempotency key made of this run's id and the manifest
    number, so a retried parent gets the same children back instead of doubling the work.

    A run here ends as every flow does (:mod:`recarchive.run.outcome`); a parent ends no
    better than its worst child: *Failed* if any child ended Failed, Crashed or Cancelled,
    else *Partial* (Completed-type) if any child ended Partial. Its table artifact
    (``backfill-children``) lists every child's state and counts.

    Args:
        ids_file: Manifest of IDs (local path or ``s3://bucket/key``).
        since: Start of a creation window (date or ISO timestamp, UTC, inclusive).
        until: End of the window (exclusive).
        chunk_size: IDs per chunk task.
        fan_out: Start child deployment runs instead of archiving here.
        children: How many child runs (default 8); not with ``chunks_per_child``.
        chunks_per_child: Chunks per child run instead of a number of children.
        skip_media: Metadata only.
        max_parallel_chunks: Chunk tasks in flight at once (here, or in each child).

    Returns:
        The final state; its data is the counts, or the children's final states.
    """
    artifacts = flow_artifacts()
    settings = load_settings(chunk_size=chunk_size)
    if bool(ids_file) == bool(since):
        raise InputError("give exactly one of ids_file or since/until")
    if fan_out:
        check_fan_out(children, chunks_per_child)
    elif children is not None or chunks_per_child is not None:
        raise InputError("children and chunks_per_child split a fan-out: give fan_out=true")
    if ids_file:
        source: contextlib.AbstractContextManager[IdList] = open_manifest(settings, ids_file)
    else:
        assert since is not None
        window = Window(
            parse_when(since, "since"), parse_when(until, "until") if until else datetime.now(UTC)
        )
        source = await discover_window(settings, window)
    with source as id_list:
        if not fan_out:
            report = await archive_ids(
                settings,
                id_list,
                ChunkOptions(skip_media=skip_media),
                kind="backfill",
                params={"ids_file": ids_file, "since": since, "until": until, "ids": len(id_list)},
                run_chunk=await artifacts.progress(len(id_list), archive_chunk_task),
                max_parallel_chunks=max_parallel_chunks,
            )
            await artifacts.publish(report)
            return runs_state([report], report.counts.as_dict())
        run_key = str(flow_run.get_id() or "local")
        # Registered here, before any child starts: a parent killed before its children
        # began leaves pending rows that retry-failed takes, never IDs lost outside the ledger.
        async with registered_input(
            settings,
            id_list,
            kind="backfill-parent",
            params={"ids_file": ids_file, "since": since, "until": until, "ids": len(id_list)},
        ):
            manifests = write_manifests(
                settings,
                id_list,
                ids_per_manifest=ids_per_child(
                    len(id_list),
                    chunk_size=settings.chunk_size,
                    children=children,
                    chunks_per_child=chunks_per_child,
                ),
                run_key=run_key,
            )
            child_runs = await _fan_out(
                manifests, run_key, settings.chunk_size, skip_media, max_parallel_chunks
            )
    return await _children_state(artifacts, child_runs)


async def _children_state(artifacts: FlowArtifacts, children: list[dict[str, str]]) -> State[Any]:
    """Publish the children's table; the parent's state is the worst of theirs."""
    from prefect.artifacts import acreate_table_artifact

    outcomes = [child_outcome(child["state_type"], child["state"]) for child in children]
    summary = f"{len(children)} child runs: " + ", ".join(
        f"{outcomes.count(outcome)} {outcome}" for outcome in Outcome
    )
    await best_effort(
        "publish the children's table artifact",
        acreate_table_artifact(
            table=children,
            key=artifacts.key("children"),
            description=f"backfill fan-out (flow run {artifacts.flow_run_name}): {summary}",
        ),
    )
    return final_state(worst(outcomes), summary, {"children": children})


async def _fan_out(
    manifests: list[str],
    run_key: str,
    chunk_size: int,
    skip_media: bool,
    max_parallel_chunks: int,
) -> list[dict[str, str]]:
    from prefect.deployments import arun_deployment

    runs = await asyncio.gather(
        *(
            arun_deployment(
                ARCHIVE_IDS_DEPLOYMENT,
                parameters={
                    "ids_file": manifest,
                    "chunk_size": chunk_size,
                    "skip_media": skip_media,
                    "max_parallel_chunks": max_parallel_chunks,
                },
                idempotency_key=f"{run_key}-{index:05d}",
                timeout=None,
            )
            for index, manifest in enumerate(manifests)
        )
    )
    # A child's counts are in its state's message (its result is not persisted).
    return [
        {
            "manifest": manifest,
            "flow_run": str(run.id),
            "state": run.state.name if run.state and run.state.name else "unknown",
            "state_type": run.state.type.value if run.state else "unknown",
            "message": (run.state.message or "") if run.state else "",
        }
        for manifest, run in zip(manifests, runs, strict=True)
    ]
