"""``recarchive erase``: a recording removed everywhere, on request, with an audit record.

Per recording, in this order:

1. **Check.** Its ledger row is leased (no run works on it meanwhile), then every version of
   every object under its key's stem (MP3, sidecar, transcriptions) is listed and checked
   for what S3 would refuse: a ``COMPLIANCE`` retention not yet over, a legal hold, a
   ``GOVERNANCE`` retention without ``--bypass-governance``. Any refusal and nothing of the
   recording is deleted: the lease is released and the refusal recorded.
2. **SQL, one transaction** (:meth:`~recarchive.store.erasures.Erasures.begin_erasure`): the
   ledger row becomes the tombstone (``erased``), the ``recordings`` and
   ``recording_parties`` rows go, the Parquet partition is marked changed, and an
   ``erasures`` row says ``erasing``. From here on no run touches the recording again.
3. **S3**: the tombstone ``{id}.erased.json`` is written where the sidecar was, then every
   listed version and delete marker is deleted for good.
4. **Bird** (``--at-source`` only): ``DELETE`` of its media (a 404 means gone already).
5. **Parquet**, once for all recordings of the command: the changed partitions are
   rewritten from SQL (without the rows), and where the dataset is on S3 the older versions
   of those partitions' files — which still hold the rows — are deleted.
6. The ``erasures`` row becomes ``erased``, with what was deleted.

A command killed anywhere after step 2 leaves an ``erasing`` row behind a tombstone; the
same command run again resumes it from step 3 (every step is idempotent). Before step 2
nothing was deleted, and running it again starts over.
"""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from recarchive.config import Settings
from recarchive.errors import AuthError, NotFoundError, RecarchiveError
from recarchive.export.parquet import ExportReport
from recarchive.export.schema import TABLE_SCHEMAS
from recarchive.leases import active_owner, release_dead_leases, run_owner
from recarchive.media.keys import media_key, object_prefix, tombstone_key
from recarchive.media.versions import ObjectVersions, StoredVersion
from recarchive.model import CLAIMABLE_STATES, LedgerEntry, LedgerState
from recarchive.redaction import describe, redact
from recarchive.run.clients import (
    build_bird_client,
    build_bird_http,
    build_media_store,
    shared_permits,
)
from recarchive.run.database import open_store
from recarchive.run.parquet import export_parquet
from recarchive.store.erasures import ErasureOutcome, ErasureRecord, ErasureRequest

if TYPE_CHECKING:
    from recarchive.bird.client import BirdClient
    from recarchive.media.s3 import MediaStore
    from recarchive.store.archive import ArchiveStore

logger = logging.getLogger(__name__)

__all__ = ["EraseReport", "ErasureResult", "erase_recordings", "requesting_user"]

Result = Literal["erased", "already_erased", "refused", "unknown", "busy", "failed"]


@dataclass
class ErasureResult:
    """What became of one recording of the command.

    Attributes:
        recording_id: The recording.
        result: ``erased``; ``already_erased`` (by an earlier command); ``refused`` (a lock
            or hold: nothing deleted); ``unknown`` (not in the ledger: nothing to erase);
            ``busy`` (a running run holds it); ``failed`` (started, not finished: run the
            command again to resume).
        message: One line for the operator.
        record: Its ``erasures`` row, where there is one.
    """

    recording_id: str
    result: Result
    message: str
    record: ErasureRecord | None = None

    @property
    def ok(self) -> bool:
        """Whether the recording is erased now (by this command or an earlier one)."""
        return self.result in ("erased", "already_erased")


@dataclass
class EraseReport:
    """The results of one ``erase`` command, in the order the IDs were given."""

    results: list[ErasureResult] = field(default_factory=list)
    export: ExportReport | None = None

    @property
    def all_ok(self) -> bool:
        """Every requested recording is erased (exit 0); else exit 1."""
        return all(result.ok for result in self.results)


def requesting_user() -> str:
    """The OS user who runs the command (recorded with each erasure)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container): still say who
        return "unknown"


@dataclass
class _Started:
    """An erasure past its SQL step, waiting for the Parquet step."""

    result: ErasureResult
    record: ErasureRecord


class _Eraser:
    """State of one ``erase`` command."""

    def __init__(
        self,
        settings: Settings,
        store: ArchiveStore,
        bird: BirdClient | None,
        *,
        reason: str,
        bypass_governance: bool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bird = bird
        self.reason = reason
        self.bypass = bypass_governance
        self.owner = run_owner()
        self.user = requesting_user()
        self._media: dict[str, MediaStore] = {}
        self._versions: dict[str, ObjectVersions] = {}

    def media(self, bucket: str) -> MediaStore:
        if bucket not in self._media:
            self._media[bucket] = build_media_store(self.settings, bucket=bucket)
        return self._media[bucket]

    def versions(self, bucket: str) -> ObjectVersions:
        if bucket not in self._versions:
            self._versions[bucket] = ObjectVersions(self.media(bucket).s3, bucket=bucket)
        return self._versions[bucket]

    # --- one recording ---------------------------------------------------------------------

    async def erase(self, recording_id: str) -> ErasureResult | _Started:
        store = self.store
        entry = store.get_entries([recording_id]).get(recording_id)
        if entry is None:
            return ErasureResult(
                recording_id, "unknown", "not in the ledger: nothing erased (check the ID)"
            )
        record = store.open_erasure(recording_id)
        resuming = entry.state == LedgerState.ERASED
        if resuming and record is not None and record.outcome == ErasureOutcome.ERASED:
            when = record.finished_at.isoformat() if record.finished_at else "earlier"
            return ErasureResult(
                recording_id, "already_erased", f"already erased at {when}", record
            )
        if not resuming:
            release_dead_leases([entry], store.release, own_owner=self.owner)
            claimed = store.claim(
                [recording_id],
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                states=CLAIMABLE_STATES,
            )
            if not claimed:
                return ErasureResult(
                    recording_id,
                    "busy",
                    "a running run holds it: nothing erased; erase it again when the run ends",
                )
        try:
            return await self._erase_claimed(entry, record, resuming)
        finally:
            # Freed by the tombstone's transaction already, unless refused or failed before it.
            store.release([recording_id], owner=self.owner)

    async def _erase_claimed(
        self, entry: LedgerEntry, record: ErasureRecord | None, resuming: bool
    ) -> ErasureResult | _Started:
        recording_id, store = entry.recording_id, self.store
        request = ErasureRequest(
            recording_id, self.reason, self.user, self.owner, at_source=self.bird is not None
        )
        try:
            found = self._objects(entry)
            refusals = self._refusals(entry, found)
        except RecarchiveError as exc:
            return self._failed(entry, record, f"could not check its S3 objects: {describe(exc)}")
        if refusals:
            message = f"refused, nothing deleted: {refusals[0]}"
            if len(refusals) > 1:
                message += f" (and {len(refusals) - 1} more)"
            if resuming and record is not None:
                store.finish_erasure(record.id, outcome=ErasureOutcome.ERASING, detail=message)
            else:
                record = store.record_refusal(request, detail=message)
            return ErasureResult(recording_id, "refused", message, record)
        if not resuming:
            record = store.begin_erasure(request, key_if_none=self._key_if_none(entry))
            if record is None:
                return ErasureResult(recording_id, "busy", "lost its lease: nothing erased")
            entry = store.get_entries([recording_id])[recording_id]  # with the key pinned now
        elif record is None:
            record = store.reopen_erasure(request)
        deleted = 0
        try:
            if entry.s3_key is not None and entry.s3_bucket is not None:
                self._put_tombstone(entry, record)
                # Parts of an upload a killed run left open hold audio too.
                self.media(entry.s3_bucket).abort_open_uploads(entry.s3_key)
                versions = self.versions(entry.s3_bucket)
                for version in found:
                    versions.delete(version, bypass_governance=self.bypass)
                    deleted += 1
            at_source = await self._delete_at_source(recording_id)
        except AuthError:
            store.finish_erasure(record.id, outcome=ErasureOutcome.ERASING, detail="stopped")
            raise
        except RecarchiveError as exc:
            return self._failed(entry, record, describe(exc), deleted)
        store.finish_erasure(
            record.id,
            outcome=ErasureOutcome.ERASING,
            detail="Parquet not rewritten yet",
            s3_versions_deleted=deleted,
            at_source=at_source,
        )
        message = f"erased: {deleted} S3 object versions, {record.sql_rows_deleted} SQL rows"
        if at_source:
            message += ", media deleted at Bird"
        return _Started(ErasureResult(recording_id, "erased", message, record), record)

    def _key_if_none(self, entry: LedgerEntry) -> tuple[str, str] | None:
        """The key a recording without one would have had, for its tombstone.

        ``createdAt`` gives it; ``None`` when the metadata was never fetched or no bucket is set.
        """
        if entry.s3_key is not None or not self.settings.s3_bucket:
            return None
        created_at = self.store.created_at_of(entry.recording_id)
        if created_at is None or not self.settings.workspace_id:
            return None
        key = media_key(
            self.settings.s3_prefix, self.settings.workspace_id, entry.recording_id, created_at
        )
        return self.settings.s3_bucket, key

    def _objects(self, entry: LedgerEntry) -> list[StoredVersion]:
        """Every version of the recording's objects but its tombstone (none without a key)."""
        if entry.s3_key is None or entry.s3_bucket is None:
            # Every upload pins its key first: without one, no object of it was ever written.
            return []
        tombstone = tombstone_key(entry.s3_key)
        listed = self.versions(entry.s3_bucket).all_versions(object_prefix(entry.s3_key))
        return [version for version in listed if version.key != tombstone]

    def _refusals(self, entry: LedgerEntry, found: Iterable[StoredVersion]) -> list[str]:
        if entry.s3_bucket is None:
            return []
        versions, now = self.versions(entry.s3_bucket), datetime.now(UTC)
        refusals = []
        for version in found:
            why = versions.lock_of(version).refusal(now, bypass_governance=self.bypass)
            if why is not None:
                refusals.append(f"{version.describe(entry.s3_bucket)}: {why}")
        return refusals

    def _put_tombstone(self, entry: LedgerEntry, record: ErasureRecord) -> None:
        assert entry.s3_key is not None and entry.s3_bucket is not None
        media, key = self.media(entry.s3_bucket), tombstone_key(entry.s3_key)
        if media.head(key) is not None:
            return  # a resumed erasure wrote it already
        body = {
            "recordingId": entry.recording_id,
            "state": LedgerState.ERASED.value,
            "erasedAt": record.requested_at.isoformat(),
            "reason": record.reason,
            "erasure": record.id,
        }
        media.put_bytes(key, json.dumps(body, sort_keys=True).encode())

    async def _delete_at_source(self, recording_id: str) -> bool:
        if self.bird is None:
            return False
        try:
            await self.bird.delete_recording(recording_id)
        except NotFoundError:
            logger.info("media of %s at Bird was already deleted", recording_id)
        return True

    def _failed(
        self, entry: LedgerEntry, record: ErasureRecord | None, error: str, deleted: int = 0
    ) -> ErasureResult:
        recording_id = entry.recording_id
        if record is None:
            return ErasureResult(recording_id, "failed", f"nothing erased: {error}")
        self.store.finish_erasure(
            record.id, outcome=ErasureOutcome.ERASING, detail=error, s3_versions_deleted=deleted
        )
        return ErasureResult(
            recording_id,
            "failed",
            f"erasure started, not finished ({error}); run the same erase again to resume",
            record,
        )

    # --- the Parquet side, once for the command -----------------------------------------

    def finish(self, started: list[_Started]) -> ExportReport | None:
        if not started:
            return None
        settings = self.settings
        try:
            # With the PII policy of the settings, as every export: without it the raw values
            # would go back into every partition that holds hashes (review finding).
            report = export_parquet(settings, self.store.engine)
            months = {item.record.created_month for item in started if item.record.created_month}
            purged = {month: self._purge_old_versions(month) for month in sorted(months)}
        except RecarchiveError as exc:
            for item in started:
                item.result.result = "failed"
                item.result.message = (
                    f"erased in SQL and S3; the Parquet rewrite failed ({describe(exc)}); run "
                    "the same erase again to finish"
                )
                self.store.finish_erasure(
                    item.record.id, outcome=ErasureOutcome.ERASING, detail=describe(exc)
                )
            return None
        counted: set[str] = set()
        for item in started:
            month = item.record.created_month
            # The older versions of a month are counted once, with its first erasure.
            first = month is not None and month not in counted
            rewritten = int(month in report.partitions)
            self.store.finish_erasure(
                item.record.id,
                outcome=ErasureOutcome.ERASED,
                parquet_partitions_rewritten=rewritten,
                parquet_versions_deleted=purged.get(month, 0) if first and month else 0,
            )
            if month is not None:
                counted.add(month)
            if rewritten:
                item.result.message += f", Parquet partition {month} rewritten"
        return report

    def _purge_old_versions(self, month: str) -> int:
        """Delete the older versions of ``month``'s Parquet files (``s3://`` roots only).

        Each rewrite of a partition on a versioned bucket leaves the file it replaced as a
        noncurrent version, rows of erased recordings included; only the current version of
        a file that exists is kept.
        """
        root = self.settings.parquet_root
        if not root.startswith("s3://"):
            return 0
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        versions = self.versions(bucket)
        deleted = 0
        for table in TABLE_SCHEMAS:
            folder = "/".join(part for part in (prefix.strip("/"), table) if part)
            for version in versions.all_versions(f"{folder}/created_month={month}/"):
                if version.latest and not version.delete_marker:
                    continue
                versions.delete(version, bypass_governance=self.bypass)
                deleted += 1
        return deleted


async def erase_recordings(
    settings: Settings,
    ids: Iterable[str],
    *,
    reason: str,
    at_source: bool = False,
    bypass_governance: bool = False,
) -> EraseReport:
    """Erase recordings everywhere (see the module docstring for the steps and their order).

    Args:
        settings: Settings (database, bucket, Parquet root; the Bird API with ``at_source``).
        ids: Canonical recording IDs, no duplicates.
        reason: Why, recorded with each erasure (the operator's words: no personal data).
        at_source: Delete each recording's media at Bird too.
        bypass_governance: Delete versions under a ``GOVERNANCE`` retention.

    Returns:
        One result per ID, in order, and the Parquet export that rewrote their partitions.
    """
    reason = redact(reason)
    if at_source:
        settings.require_bird()
    engine, store = open_store(settings)
    http = build_bird_http(settings) if at_source else None
    report = EraseReport()
    try:
        bird = (
            build_bird_client(settings, http, shared=shared_permits(settings, engine))
            if http is not None
            else None
        )
        eraser = _Eraser(settings, store, bird, reason=reason, bypass_governance=bypass_governance)
        started: list[_Started] = []
        with active_owner(eraser.owner):
            for recording_id in ids:
                outcome = await eraser.erase(recording_id)
                if isinstance(outcome, _Started):
                    started.append(outcome)
                    outcome = outcome.result
                report.results.append(outcome)
            report.export = eraser.finish(started)
    finally:
        if http is not None:
            await http.aclose()
        engine.dispose()
    return report
