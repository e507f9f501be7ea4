"""``recarchive verify``: every archived ledger row against S3, and optional source deletion."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Iterator

from rich.console import Console

from recarchive.config import Settings
from recarchive.errors import NotFoundError
from recarchive.model import LedgerEntry
from recarchive.runtime import build_bird_client, build_bird_http, build_media_store, open_store
from recarchive.verify import VerifyReport, verify_archive

logger = logging.getLogger(__name__)

#: Ledger rows checked per batch: memory stays bounded however large the archive is.
BATCH_SIZE = 500


def _batches(entries: Iterable[LedgerEntry], size: int) -> Iterator[list[LedgerEntry]]:
    iterator = iter(entries)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


async def run_verify(
    settings: Settings, *, deep: bool, delete_source: bool, console: Console
) -> VerifyReport:
    """Verify every archived recording; with ``delete_source``, delete verified media at Bird.

    A recording's media is deleted at Bird only after *its own* deep verification succeeded
    in this run (``delete_source`` implies ``deep``); each deletion is logged.

    Args:
        settings: Settings (database, bucket, and the Bird API when deleting).
        deep: Download and hash every object instead of trusting its metadata.
        delete_source: Delete verified recordings at Bird (irreversible).
        console: Where progress lines go.

    Returns:
        The merged report of all batches.
    """
    deep = deep or delete_source
    if delete_source:
        settings.require_bird()
    engine, store = open_store(settings)
    media = build_media_store(settings)
    total = VerifyReport(checked=0, ok=0, problems=[])
    http = build_bird_http(settings) if delete_source else None
    try:
        bird = build_bird_client(settings, http) if http is not None else None
        for batch in _batches(store.iter_archived(batch_size=BATCH_SIZE), BATCH_SIZE):
            report = await asyncio.to_thread(
                verify_archive, batch, media, deep=deep, concurrency=settings.concurrency
            )
            total.checked += report.checked
            total.ok += report.ok
            total.problems.extend(report.problems)
            console.print(
                f"verified {total.checked} ({len(total.problems)} problems)", highlight=False
            )
            if bird is not None:
                bad = {problem.recording_id for problem in report.problems}
                for entry in batch:
                    if entry.recording_id in bad:
                        continue
                    try:
                        await bird.delete_recording(entry.recording_id)
                    except NotFoundError:
                        logger.info("source of %s was already deleted", entry.recording_id)
                        continue
                    logger.warning(
                        "deleted source media at Bird for %s (verified s3://%s/%s sha256 %s)",
                        entry.recording_id,
                        entry.s3_bucket,
                        entry.s3_key,
                        entry.sha256,
                    )
    finally:
        if http is not None:
            await http.aclose()
        engine.dispose()
    return total
