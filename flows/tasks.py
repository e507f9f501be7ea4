"""What every flow shares: the one Prefect task, and the run's logs, artifacts and final state.

The rule of the final state is :mod:`recarchive.run.outcome`; here it becomes a Prefect
state. A flow returns that state: Prefect uses a state a flow returns, made by hand, as the
run's final state (``prefect.states.return_value_to_state``), and its ``data`` is what
calling the flow returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from recarchive.model import RunCounts
from recarchive.redaction import describe
from recarchive.run.chunk import archive_chunk
from recarchive.run.context import ArchiveContext, ChunkOptions
from recarchive.run.failures import should_retry_chunk
from recarchive.run.outcome import (
    PARTIAL_STATE_NAME,
    Outcome,
    artifact_key,
    outcome_message,
    progress_percent,
    run_outcome,
    worst,
)
from recarchive.run.runs import ChunkRunner, RunReport, report_table

#: The logger every recarchive module logs under (``logging.getLogger(__name__)``).
RECARCHIVE_LOGGER = "recarchive"

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def best_effort(what: str, work: Awaitable[T]) -> T | None:
    """Await an artifact write; a failure is logged, never the run's.

    Artifacts report on work that is done: a Prefect API hiccup while writing one must not
    cancel the chunks still running or turn a finished run into a failed one.
    """
    try:
        return await work
    except Exception as exc:
        logger.warning("could not %s: %s", what, describe(exc))
        return None


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    data = getattr(state, "data", None)
    return should_retry_chunk(data if isinstance(data, BaseException) else None)


@task(
    name="archive-chunk",
    task_run_name="chunk-from-{ids[0]}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_retry_condition,
    # The context holds live clients and must not be hashed, stored or cached; results are
    # small counts, never payloads.
    cache_policy=NO_CACHE,
    persist_result=False,
    cache_result_in_memory=False,
)
async def archive_chunk_task(
    ctx: ArchiveContext, ids: list[str], options: ChunkOptions
) -> RunCounts:
    """Archive one chunk; retried by Prefect only for chunk-level failures."""
    return await archive_chunk(ctx, ids, options)


class _RunLogHandler(logging.Handler):
    """Hands records to the handlers of ``prefect.extra``, inside flow and task runs only.

    Outside a run Prefect's API handler has no flow run to file a record under and warns on
    every record (a CLI run in a process that imported the flows); such records are left to
    the other handlers. The handlers are looked up per record, so they are the current ones
    after Prefect configures logging again.
    """

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        for handler in logging.getLogger("prefect.extra").handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def send_logs_to_prefect() -> None:
    """Send recarchive's log records to the Prefect API, as the flow run's logs.

    What ``PREFECT_LOGGING_EXTRA_LOGGERS=recarchive`` would do
    (``prefect/logging/configuration.py``: the handlers of the ``prefect.extra`` logger on
    ``recarchive``, whose records its modules' loggers pass up), without the setting, and
    only inside runs (:class:`_RunLogHandler`). Idempotent. The level becomes INFO unless it
    was set: Prefect's root logger is at WARNING, and a run's INFO lines (leased recordings,
    refused media links) belong in its logs.
    """
    ours = logging.getLogger(RECARCHIVE_LOGGER)
    if not any(isinstance(handler, _RunLogHandler) for handler in ours.handlers):
        ours.addHandler(_RunLogHandler())
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


def final_state(outcome: Outcome, message: str, data: Any = None) -> State[Any]:
    """The Prefect state for ``outcome``: *Completed*, *Partial* (Completed-type) or *Failed*.

    A *Failed* state carries no data: calling a flow that ends *Failed* raises ``FailedRun``
    with ``message``.
    """
    if outcome is Outcome.FAILED:
        return Failed(message=message)
    if outcome is Outcome.PARTIAL:
        return Completed(name=PARTIAL_STATE_NAME, message=message, data=data)
    return Completed(message=message, data=data)


def runs_state(reports: Iterable[RunReport], data: Any) -> State[Any]:
    """The final state of a flow of one or more runs: the worst of their outcomes."""
    reports = list(reports)
    return final_state(
        worst(run_outcome(report) for report in reports),
        "; ".join(f"{report.kind}: {outcome_message(report)}" for report in reports),
        data,
    )


@dataclass
class FlowArtifacts:
    """The artifacts of one flow run, under keys of its deployment (or flow, when ad hoc).

    Keys are per deployment so the Artifacts page shows each deployment's history;
    descriptions name the run (flow run name, ``runs`` row), so one child of a fan-out is
    told from another.

    Attributes:
        base: Key prefix: the deployment's name, or the flow's for a run without one.
        flow_run_name: The flow run's name, for descriptions.
    """

    base: str
    flow_run_name: str

    def key(self, *parts: str) -> str:
        """The key of this flow's artifact ``parts`` (the report when none)."""
        return artifact_key(self.base, *parts)

    async def publish(self, report: RunReport, *parts: str) -> None:
        """The run's counts, first failures and where the full list is, as a table."""
        from prefect.artifacts import acreate_table_artifact

        await best_effort(
            "publish the run's table artifact",
            acreate_table_artifact(
                table=report_table(report),
                key=self.key(*parts),
                description=(
                    f"recarchive {report.kind} run {report.run_id} (flow run"
                    f" {self.flow_run_name}): {report.status}"
                ),
            ),
        )

    async def progress(self, total: int, run_chunk: ChunkRunner, *parts: str) -> ChunkRunner:
        """A progress artifact of ``total`` IDs, and ``run_chunk`` updating it per chunk."""
        tracker = _Progress(self.key(*parts, "progress"), total, f"flow run {self.flow_run_name}")
        await tracker.start()

        async def run(ctx: ArchiveContext, ids: list[str], options: ChunkOptions) -> RunCounts:
            counts = await run_chunk(ctx, ids, options)
            await tracker.advance(len(ids))
            return counts

        return run


@dataclass
class _Progress:
    key: str
    total: int
    run: str
    done: int = 0
    artifact_id: UUID | None = field(default=None, init=False)

    def _description(self) -> str:
        return f"{self.done} of {self.total} IDs through the pipeline ({self.run})"

    async def start(self) -> None:
        from prefect.artifacts import acreate_progress_artifact

        self.artifact_id = await best_effort(
            "create the progress artifact",
            acreate_progress_artifact(
                progress=progress_percent(0, self.total),
                key=self.key,
                description=self._description(),
            ),
        )

    async def advance(self, ids: int) -> None:
        from prefect.artifacts import aupdate_progress_artifact

        self.done += ids
        if self.artifact_id is None:  # its creation failed (logged): nothing to update
            return
        await best_effort(
            "update the progress artifact",
            aupdate_progress_artifact(
                self.artifact_id,
                progress=progress_percent(self.done, self.total),
                description=self._description(),
            ),
        )


def flow_artifacts() -> FlowArtifacts:
    """Call at the start of a flow: logs to Prefect, and the run's artifact keys."""
    from prefect.runtime import deployment, flow_run

    send_logs_to_prefect()
    base = deployment.name or flow_run.flow_name or "recarchive"
    return FlowArtifacts(base, flow_run.name or "local")
