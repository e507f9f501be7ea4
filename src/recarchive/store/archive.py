"""The archive's SQL store, one object for the pipeline: recordings, the ledger and runs.

Each table job is its own class over the shared ``engine`` (:mod:`~recarchive.store.recordings`,
:mod:`~recarchive.store.ledger`, :mod:`~recarchive.store.claims`,
:mod:`~recarchive.store.outcomes`, :mod:`~recarchive.store.locks`,
:mod:`~recarchive.store.runs`, :mod:`~recarchive.store.erasures`,
:mod:`~recarchive.store.transcriptions`); this class only puts them
together, so callers hold one store and never mind which module answers a call.
"""

from __future__ import annotations

from sqlalchemy import Engine

from recarchive.store.claims import LedgerClaims
from recarchive.store.erasures import Erasures
from recarchive.store.ledger import Ledger
from recarchive.store.locks import LedgerLocks
from recarchive.store.outcomes import LedgerOutcomes
from recarchive.store.recordings import RecordingWrites
from recarchive.store.runs import RunsTable
from recarchive.store.transcriptions import TranscriptionLedger

__all__ = ["ArchiveStore"]


class ArchiveStore(
    RecordingWrites,
    Ledger,
    LedgerClaims,
    LedgerOutcomes,
    LedgerLocks,
    RunsTable,
    Erasures,
    TranscriptionLedger,
):
    """Recordings, ledger, runs, erasures and transcriptions in one SQL database.

    Args:
        engine: Engine from :func:`~recarchive.store.engine.create_engine_for`, schema
            upgraded by :func:`~recarchive.store.engine.upgrade_database`. The caller owns
            and disposes it.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
