"""Ledger marks of a chunk, batched: finished items' outcomes go to the database together.

A chunk used to pay one transaction per finished recording, on the event loop. A
:class:`MarkBatch` queues each outcome instead and applies the queue with one
:meth:`~recarchive.store.outcomes.LedgerOutcomes.apply_outcomes` call in a worker thread: when
:data:`MAX_PENDING` outcomes wait, when the oldest has waited :data:`MAX_WAIT` seconds, and at
the chunk's end (:meth:`MarkBatch.close`, also after a fatal error or a cancellation, before
the chunk releases its leases). An item counts (its ``on_applied`` callback runs) only once
the database confirmed its outcome; a refused one goes to ``on_refused``.

Crash safety: an outcome waits in memory at most :data:`MAX_WAIT` seconds (or
:data:`MAX_PENDING` outcomes). A run killed meanwhile loses those marks, not the work behind
them: the rows stay leased to the dead run with their S3 keys pinned (pins are committed
before any transfer starts), so the next run takes them over, finds each object at its pinned
key and adopts it after hashing its bytes against its ``sha256`` metadata; no second transfer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from recarchive.redaction import describe
from recarchive.run.failures import ledger_errors
from recarchive.store.archive import ArchiveStore
from recarchive.store.outcomes import Outcome

logger = logging.getLogger(__name__)

#: Outcomes that make a batch go at once.
MAX_PENDING = 64
#: Seconds the oldest waiting outcome waits at most before its batch goes.
MAX_WAIT = 0.5


@dataclass(frozen=True)
class _Queued:
    outcome: Outcome
    on_applied: Callable[[], None]


class MarkBatch:
    """The outcomes of one chunk on their way to the ledger.

    Args:
        store: The ledger.
        owner: This run's lease owner name.
        on_refused: Called for each outcome the ledger refused (another run took the lease
            over, or the row is archived already); the refusal is logged here.
        max_pending: Outcomes that make a batch go at once (:data:`MAX_PENDING` when
            ``None``, read when the batch is made).
        max_wait: Seconds the oldest outcome waits at most (:data:`MAX_WAIT` when ``None``).
    """

    def __init__(
        self,
        store: ArchiveStore,
        owner: str,
        on_refused: Callable[[], None],
        *,
        max_pending: int | None = None,
        max_wait: float | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.on_refused = on_refused
        self.max_pending = MAX_PENDING if max_pending is None else max_pending
        self.max_wait = MAX_WAIT if max_wait is None else max_wait
        #: Batches applied, and outcomes confirmed by them (benchmarks and tests read these).
        self.flushes = 0
        self.applied = 0
        self._pending: list[_Queued] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._failure: Exception | None = None

    async def add(self, outcome: Outcome, on_applied: Callable[[], None]) -> None:
        """Queue ``outcome``; ``on_applied`` runs once the ledger confirmed it.

        Returns at once unless the queue is full: then this call applies the batch.

        Raises:
            StorageUnavailableError: An earlier batch, or this one, could not be applied.
        """
        self._raise_failure()
        if any(queued.outcome.recording_id == outcome.recording_id for queued in self._pending):
            # Refusals come back by recording ID: one recording's outcomes go in separate
            # batches, in the order given (the first one applied ends its lease).
            await self.flush()
        self._pending.append(_Queued(outcome, on_applied))
        if len(self._pending) >= self.max_pending:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later())

    async def flush(self) -> None:
        """Apply every queued outcome now (after a batch already on its way).

        The batch runs in a task of its own, shielded: a caller cancelled meanwhile (a
        sibling's fatal error) never leaves it half counted.

        Raises:
            StorageUnavailableError: The ledger could not be reached; the batch's outcomes
                are not applied (their rows stay leased, the next run redoes them).
        """
        await asyncio.shield(asyncio.ensure_future(self._flush()))
        self._raise_failure()

    async def close(self) -> None:
        """Apply what is queued and stop the timer; idempotent.

        Raises:
            StorageUnavailableError: A batch could not be applied.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.flush()

    async def __aenter__(self) -> MarkBatch:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """:meth:`close`, also when the block failed or was cancelled.

        After a failure, the error that stopped the block stays the one raised: a batch that
        cannot be applied then is logged only.
        """
        if error is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception as exc:
            logger.warning("%s; those items are redone by the next run", describe(exc))

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.max_wait)
        self._timer = None
        # A failure is kept for the next add() or close(): a timer has no caller to raise to.
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            if self._timer is not None and self._timer is not asyncio.current_task():
                self._timer.cancel()
                self._timer = None
            batch, self._pending = self._pending, []
            if not batch or self._failure is not None:
                return
            try:
                with ledger_errors("could not update the ledger"):
                    refused = await asyncio.to_thread(
                        self.store.apply_outcomes,
                        [queued.outcome for queued in batch],
                        owner=self.owner,
                    )
            except Exception as exc:  # the database down (translated above), or a bug
                self._failure = exc
                return
            self.flushes += 1
            for queued in batch:
                reason = refused.get(queued.outcome.recording_id)
                if reason is None:
                    self.applied += 1
                    queued.on_applied()
                else:
                    outcome = queued.outcome
                    logger.warning(
                        "ledger refused %s for %s: %s", outcome.state, outcome.recording_id, reason
                    )
                    self.on_refused()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
