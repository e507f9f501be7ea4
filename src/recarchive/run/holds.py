"""``recarchive hold``: set or clear the S3 legal hold of archived recordings, and record it.

A legal hold keeps an object version from being deleted or overwritten whatever its
retention, until the hold is cleared. Each recording's MP3, sidecar and archived
transcription objects are held — every version of each — and only once S3 confirmed all of
them is the hold recorded in the ledger
(:meth:`~recarchive.store.locks.LedgerLocks.record_legal_hold`), so the ledger never claims a
hold the objects do not have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recarchive.config import Settings
from recarchive.errors import FatalError, RecarchiveError
from recarchive.media.keys import sidecar_key
from recarchive.model import LedgerState, TranscriptionState
from recarchive.redaction import describe
from recarchive.run.clients import build_media_store
from recarchive.run.database import open_store

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

logger = logging.getLogger(__name__)


@dataclass
class HoldReport:
    """What ``recarchive hold`` did.

    Attributes:
        on: Whether holds were set (``True``) or cleared.
        done: Recordings whose every object version now has the hold on (or off).
        versions: Object versions changed.
        unknown: IDs the ledger does not know.
        not_archived: IDs in the ledger but not ``archived``, with their state.
        failed: IDs whose objects S3 could not (all) change, with the reason.
    """

    on: bool
    done: list[str] = field(default_factory=list)
    versions: int = 0
    unknown: list[str] = field(default_factory=list)
    not_archived: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every given recording got the hold (or lost it)."""
        return not (self.unknown or self.not_archived or self.failed)


def set_holds(settings: Settings, ids: Sequence[str], *, on: bool) -> HoldReport:
    """Set (``on``) or clear the legal hold of the archived recordings ``ids``.

    Args:
        settings: Database and S3 settings; a recording's bucket is the one its ledger row
            names, so ``RECARCHIVE_S3_BUCKET`` is not needed.
        ids: Canonical recording IDs, no duplicates.
        on: Set the hold, or clear it.

    Returns:
        The report; unknown, not archived and failed recordings are listed, not raised.

    Raises:
        ConfigError: A recording's bucket has no Object Lock (no legal hold is possible).
        FatalError: S3 refused access, or the database is unreachable.
    """
    from recarchive.media.locks import check_object_lock

    report = HoldReport(on=on)
    engine, store = open_store(settings)
    try:
        entries = store.get_entries(ids)
        archived = []
        for recording_id in ids:
            entry = entries.get(recording_id)
            if entry is None:
                report.unknown.append(recording_id)
            elif entry.state != LedgerState.ARCHIVED or not entry.s3_bucket or not entry.s3_key:
                report.not_archived[recording_id] = str(entry.state)
            else:
                archived.append(entry)
        if not archived:
            return report
        # One client for every bucket the rows name (each row keeps the bucket it was put in).
        s3 = build_media_store(settings, bucket=archived[0].s3_bucket).s3
        for bucket in sorted({entry.s3_bucket or "" for entry in archived}):
            check_object_lock(s3, bucket)  # exit 2 before any hold changes
        transcriptions = store.transcription_rows([entry.recording_id for entry in archived])
        try:
            for entry in archived:
                assert entry.s3_bucket and entry.s3_key  # archived rows name both
                extra = [
                    stored.key
                    for row in transcriptions.get(entry.recording_id, [])
                    if row.state == TranscriptionState.ARCHIVED
                    for stored in row.formats.values()
                ]
                _hold_one(s3, entry.recording_id, entry.s3_bucket, entry.s3_key, report, extra)
        finally:
            # What S3 confirmed is recorded, also when a fatal error stopped the rest.
            store.record_legal_hold(report.done, on=on)
    finally:
        engine.dispose()
    return report


def _hold_one(
    s3: S3Client,
    recording_id: str,
    bucket: str,
    key: str,
    report: HoldReport,
    transcriptions: Sequence[str] = (),
) -> None:
    """Set or clear the hold of one recording's objects; note the outcome in ``report``.

    The MP3, the sidecar and the ``transcriptions`` keys (its archived transcriptions').
    """
    from recarchive.media.locks import object_versions, set_legal_hold

    keys = (key, sidecar_key(key), *transcriptions)
    try:
        # Every object must exist before any is changed: no half-held recording.
        missing = [each for each in keys if not object_versions(s3, bucket, each)]
        if missing:
            report.failed[recording_id] = f"no object at s3://{bucket}/{missing[0]}"
            return
        report.versions += sum(set_legal_hold(s3, bucket, each, on=report.on) for each in keys)
    except FatalError:
        raise
    except RecarchiveError as exc:  # one recording's failure; the others go on
        report.failed[recording_id] = describe(exc)
        return
    report.done.append(recording_id)
    logger.info("legal hold %s for %s", "on" if report.on else "off", recording_id)
