"""What a run would do, read from the ledger alone: ``--dry-run`` of a run.

A dry run sends no request (except the list pages of a ``--since/--until`` window, which it
needs to know the IDs) and writes nothing anywhere: the database is opened read only
(:func:`~recarchive.store.engine.open_read_only`), never created or migrated — a missing
database means every ID is new — and no S3 client is built. Each ID is put in the category the
real run would give it, by the same rules: :func:`~recarchive.run.chunk.archive_chunk`'s for
``archive`` (which states it fetches, which it skips, whose lease another live run holds) and
:meth:`~recarchive.store.ledger.Ledger.due_retries` for ``retry-failed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recarchive.config import Settings
from recarchive.errors import ConfigError, StorageUnavailableError
from recarchive.leases import dead_local_owners, local_owner_dead, run_owner
from recarchive.model import LedgerEntry, LedgerState, skip_counter
from recarchive.run.context import ChunkOptions
from recarchive.run.database import safe_database_url
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import HEAD_REVISION, open_read_only, schema_revision
from recarchive.store.ledger import DEFAULT_STALE_AFTER

#: Categories in the order they are shown, with what the real run does with each.
#: Those in :data:`FETCHED` cost requests; the others are skipped without any.
CATEGORIES: dict[str, str] = {
    "new": "not in the ledger: metadata fetched, then the media when available",
    "pending": "registered, never finished (a run stopped first): processed",
    "media_recheck": "metadata only so far: fetched again, media archived if ready now",
    "failed_retry": "failed before: tried again",
    "refresh": "archived or missing, --refresh: metadata fetched again, media never twice",
    "busy": "leased by a live run: left to it",
    "already_archived": "archived: skipped without a request",
    "missing": "404 before: skipped without a request",
    "erased": "erased on request: a tombstone, never fetched again",
    "not_due": "failed or metadata only, not due yet, out of attempts or leased: not taken",
}
FETCHED = frozenset({"new", "pending", "media_recheck", "failed_retry", "refresh"})
_BY_STATE = {
    LedgerState.PENDING: "pending",
    LedgerState.METADATA_ONLY: "media_recheck",
    LedgerState.FAILED: "failed_retry",
}


@dataclass
class DryRunPlan:
    """What a run would do, per category of :data:`CATEGORIES`.

    Attributes:
        command: ``archive`` or ``retry-failed``.
        counts: IDs per category (every category present, zero included).
        invalid: Listed IDs that are not recording IDs (a window's listing only).
        database: ``"missing"`` (no database yet: every ID new) or the schema revision read.
        samples: Up to a few IDs per category, for a person checking the plan.
        transcriptions: ``retry-failed``: archived recordings with a due ``pending`` or
            ``failed`` transcription, whose transcriptions its own pass lists again.
    """

    command: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    invalid: int = 0
    database: str = "missing"
    samples: dict[str, list[str]] = field(default_factory=dict)
    transcriptions: int = 0

    @property
    def requested(self) -> int:
        """IDs considered (the invalid ones of a listing not included)."""
        return sum(self.counts.values())

    @property
    def to_fetch(self) -> int:
        """IDs whose metadata the real run would request."""
        return sum(count for name, count in self.counts.items() if name in FETCHED)

    def add(self, category: str, recording_id: str) -> None:
        """Count ``recording_id`` in ``category`` (kept as a sample while there are few)."""
        self.counts[category] += 1
        sample = self.samples.setdefault(category, [])
        if len(sample) < 3:
            sample.append(recording_id)

    def as_json(self) -> dict[str, Any]:
        """The plan as the ``--json`` object (stable keys, documented in the README)."""
        return {
            "dry_run": True,
            "command": self.command,
            "database": self.database,
            "requested": self.requested,
            "to_fetch": self.to_fetch,
            "skipped": self.requested - self.to_fetch,
            "invalid": self.invalid,
            "counts": dict(self.counts),
            "samples": {name: ids for name, ids in self.samples.items() if ids},
            "transcriptions_due": self.transcriptions,
        }


def _read_only_store(settings: Settings) -> tuple[Engine | None, str]:
    """The ledger opened read only and its revision; ``(None, "missing")`` without one.

    Raises:
        ConfigError: The URL is unusable, or the schema is not one a dry run reads as it is.
        StorageUnavailableError: The database cannot be reached.
    """
    url = safe_database_url(settings.database_url)
    try:
        engine = open_read_only(settings.database_url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"RECARCHIVE_DATABASE_URL: not a usable database URL ({url})") from exc
    if engine is None:
        return None, "missing"
    try:
        with engine.connect() as connection:
            revision = schema_revision(connection)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StorageUnavailableError(
            f"cannot read the database {url}: {type(exc).__name__}"
        ) from exc
    if revision is None:
        engine.dispose()
        return None, "missing"
    if revision != HEAD_REVISION:
        engine.dispose()
        newer = revision > HEAD_REVISION
        raise ConfigError(
            f"the database {url} is at schema revision {revision}, "
            + (
                f"newer than this recarchive's {HEAD_REVISION}: upgrade recarchive"
                if newer
                else f"older than this recarchive's {HEAD_REVISION}; a dry run never upgrades "
                "it: run any command without --dry-run (e.g. `recarchive status`) first"
            )
        )
    return engine, revision


def plan_archive(
    settings: Settings, ids: Iterable[list[str]], options: ChunkOptions = ChunkOptions()
) -> DryRunPlan:
    """What ``archive`` would do with the chunks ``ids``, from the ledger alone.

    Raises:
        ConfigError: As :func:`_read_only_store`.
        StorageUnavailableError: The database cannot be read.
    """
    plan = DryRunPlan("archive")
    engine, plan.database = _read_only_store(settings)
    store = ArchiveStore(engine) if engine is not None else None
    owner = run_owner()
    try:
        for chunk in ids:
            entries, held = _read_chunk(store, chunk, owner) if store else ({}, set())
            for recording_id in chunk:
                plan.add(_archive_category(entries.get(recording_id), held, options), recording_id)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError(f"cannot read the ledger: {type(exc).__name__}") from exc
    finally:
        if engine is not None:
            engine.dispose()
    return plan


def _read_chunk(
    store: ArchiveStore, chunk: list[str], owner: str
) -> tuple[dict[str, LedgerEntry], set[str]]:
    entries = store.get_entries(chunk)
    held = store.held_by_live_runs(list(entries))
    # A real run first takes over the leases of dead processes of this host.
    for ids in dead_local_owners(entries.values(), own_owner=owner).values():
        held.difference_update(ids)
    return entries, held


def _archive_category(entry: LedgerEntry | None, held: set[str], options: ChunkOptions) -> str:
    if entry is None:
        return "new"
    skipped = skip_counter(entry.state, refresh=options.refresh)  # the real run's own rule
    if skipped is not None:
        return skipped
    if entry.recording_id in held:
        return "busy"
    return _BY_STATE.get(LedgerState(entry.state), "refresh")


def plan_retry(settings: Settings, *, skip_media: bool = False) -> DryRunPlan:
    """What ``retry-failed`` would take now, from the ledger alone.

    Raises:
        ConfigError: As :func:`_read_only_store`.
        StorageUnavailableError: The database cannot be read.
    """
    plan = DryRunPlan("retry-failed")
    engine, plan.database = _read_only_store(settings)
    if engine is None:
        return plan
    store = ArchiveStore(engine)
    try:
        # The real run first finishes the runs of this host's dead processes as interrupted
        # (their leases and pending rows then count as free): seen the same way here.
        dead = store.dead_run_owners(local_owner_dead)
        due = store.due_retries(
            limit=2**62,
            max_attempts=settings.item_max_attempts,
            stale_after=DEFAULT_STALE_AFTER,
            dead_owners=dead,
        )
        seen = {LedgerState.FAILED: 0, LedgerState.METADATA_ONLY: 0}
        for start in range(0, len(due), 5000):
            for recording_id, entry in store.get_entries(due[start : start + 5000]).items():
                state = LedgerState(entry.state)
                category = _BY_STATE.get(state)
                if category is None:
                    continue  # finished by another run since the query: not taken
                plan.add(category, recording_id)
                if state in seen:
                    seen[state] += 1
        totals = store.counts()
        plan.counts["not_due"] = sum(totals.get(state, 0) - taken for state, taken in seen.items())
        if not skip_media:  # the real run's transcription pass needs the media store
            due_transcriptions = store.due_transcriptions(
                limit=2**62, max_attempts=settings.item_max_attempts
            )
            plan.transcriptions = len(due_transcriptions)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError(f"cannot read the ledger: {type(exc).__name__}") from exc
    finally:
        engine.dispose()
    return plan
