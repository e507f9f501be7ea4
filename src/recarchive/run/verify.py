"""``recarchive verify``: every archived ledger row against S3, and optional source deletion."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console

from recarchive.config import Settings
from recarchive.errors import FatalError, NotFoundError
from recarchive.media.verify import (
    VerifiedObject,
    VerifyReport,
    verify_archive,
    verify_transcriptions,
)
from recarchive.model import LedgerEntry, LedgerState, TranscriptionState
from recarchive.redaction import describe
from recarchive.run.clients import (
    build_bird_client,
    build_bird_http,
    build_media_store,
    shared_permits,
)
from recarchive.run.database import open_store

if TYPE_CHECKING:
    from recarchive.bird.client import BirdClient
    from recarchive.media.s3 import MediaStore
    from recarchive.store.archive import ArchiveStore

logger = logging.getLogger(__name__)

#: Ledger rows checked per batch: memory stays bounded however large the archive is.
BATCH_SIZE = 500


def _batches(entries: Iterable[LedgerEntry], size: int) -> Iterator[list[LedgerEntry]]:
    iterator = iter(entries)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


#: What may have confirmed the download of an object whose source may be deleted: only an
#: independent length. ``None`` is an object stored before recarchive recorded it; its
#: length is then confirmed by the source's ``Content-Range`` alone.
DELETABLE_CONFIRMATIONS = frozenset({"content-length", None})


async def delete_source_if_same(
    bird: BirdClient, entry: LedgerEntry, verified: VerifiedObject
) -> bool:
    """Delete a recording at Bird when the source still matches the deep-verified archive.

    Conditions, all of them: the archived download's end was confirmed by an independent
    length (``Content-Length``, recorded on the object), the source — through a fresh
    redirect and a ``Range: bytes=0-0`` GET — reports the ledger's size in
    ``Content-Range``, and, when its ETag is a plain MD5, the MD5 of the archived bytes.
    Anything else keeps the source and logs why.

    Returns:
        True when the source was deleted (or was gone already).
    """
    recording_id = entry.recording_id
    if verified.confirmed_by not in DELETABLE_CONFIRMATIONS:
        logger.warning(
            "kept the source of %s: its download had no independent length (confirmed by %s)",
            recording_id,
            verified.confirmed_by,
        )
        return False
    try:
        source = await bird.source_size(recording_id)
    except NotFoundError:
        logger.info("source of %s was already deleted", recording_id)
        return True
    except FatalError:
        raise
    except Exception as exc:  # whatever the source answered, it proved nothing: keep it
        logger.warning(
            "kept the source of %s: could not ask its size (%s)", recording_id, describe(exc)
        )
        return False
    if source.total_bytes != entry.size_bytes:
        logger.warning(
            "kept the source of %s: it has %d bytes, the archive %s",
            recording_id,
            source.total_bytes,
            entry.size_bytes,
        )
        return False
    if source.md5 is not None and source.md5 != verified.md5:
        logger.warning(
            "kept the source of %s: its ETag MD5 %s differs from the archive's %s",
            recording_id,
            source.md5,
            verified.md5,
        )
        return False
    try:
        await bird.delete_recording(recording_id)
    except NotFoundError:
        logger.info("source of %s was already deleted", recording_id)
        return True
    except FatalError:
        raise
    except Exception as exc:  # one deletion failed; the others go on, this source stays
        logger.warning("could not delete the source of %s: %s", recording_id, describe(exc))
        return False
    logger.warning(
        "deleted source media at Bird for %s (verified s3://%s/%s sha256 %s, %d bytes)",
        recording_id,
        entry.s3_bucket,
        entry.s3_key,
        entry.sha256,
        source.total_bytes,
    )
    return True


async def _check_transcriptions(
    store: ArchiveStore,
    media: MediaStore,
    batch: list[LedgerEntry],
    report: VerifyReport,
    deep: bool,
    concurrency: int,
) -> None:
    """Add the problems of the batch's archived transcriptions to ``report``.

    A recording with a transcription problem no longer counts ``ok``.
    """
    archived = [e.recording_id for e in batch if e.state == LedgerState.ARCHIVED]
    rows = await asyncio.to_thread(store.transcription_rows, archived)
    stored = [
        row
        for found in rows.values()
        for row in found
        if row.state == TranscriptionState.ARCHIVED and row.formats
    ]
    if not stored:
        return
    problems = await asyncio.to_thread(
        verify_transcriptions, stored, media, deep=deep, concurrency=concurrency
    )
    not_ok = {p.recording_id for p in [*report.problems, *report.restores]}
    report.ok -= len({p.recording_id for p in problems} - not_ok)
    report.problems.extend(problems)


async def run_verify(
    settings: Settings,
    *,
    deep: bool,
    delete_source: bool,
    console: Console,
    restore: bool = False,
) -> VerifyReport:
    """Verify every archived recording; with ``delete_source``, delete verified media at Bird.

    A recording's media is deleted at Bird only after *its own* deep verification succeeded
    in this run (``delete_source`` implies ``deep``) and the source, asked again, reports the
    same size and content (:func:`delete_source_if_same`); each deletion is logged.

    Args:
        settings: Settings (database, bucket, and the Bird API when deleting).
        deep: Download and hash every object instead of trusting its metadata.
        delete_source: Delete verified recordings at Bird (irreversible).
        console: Where progress lines go.
        restore: Ask S3 to restore objects whose storage class needs it (implies ``deep``);
            they are reported, not counted as problems, either way.

    Returns:
        The merged report of all batches.
    """
    deep = deep or delete_source or restore
    if delete_source:
        settings.require_bird()
    engine, store = open_store(settings)
    media = build_media_store(settings)
    total = VerifyReport(checked=0, ok=0, problems=[])
    http = build_bird_http(settings) if delete_source else None
    try:
        bird = (
            build_bird_client(settings, http, shared=shared_permits(settings, engine))
            if http is not None
            else None
        )
        for batch in _batches(store.iter_archived(batch_size=BATCH_SIZE), BATCH_SIZE):
            report = await asyncio.to_thread(
                verify_archive,
                batch,
                media,
                deep=deep,
                concurrency=settings.concurrency,
                want_md5=delete_source,
                restore=restore,
            )
            await _check_transcriptions(store, media, batch, report, deep, settings.concurrency)
            total.checked += report.checked
            total.ok += report.ok
            total.problems.extend(report.problems)
            total.restores.extend(report.restores)
            console.print(
                f"verified {total.checked} ({len(total.problems)} problems)", highlight=False
            )
            if bird is not None:
                for entry in batch:
                    verified = report.verified.get(entry.recording_id)
                    if verified is not None:
                        await delete_source_if_same(bird, entry, verified)
    finally:
        if http is not None:
            await http.aclose()
        engine.dispose()
    return total
