"""What every chunk of a run is given: the caller's options and the process's clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from recarchive.model import RunCounts, TranscriptionCounts

if TYPE_CHECKING:
    from recarchive.bird.client import BirdClient
    from recarchive.media.s3 import MediaStore
    from recarchive.store.archive import ArchiveStore

#: Called with a small :class:`RunCounts` delta per finished item.
ProgressCallback = Callable[[RunCounts], None]


@dataclass(frozen=True)
class ChunkOptions:
    """What the caller asked for.

    Attributes:
        skip_media: Fetch and store metadata only; the ledger says ``metadata_only``.
        refresh: Re-fetch metadata even of ``archived`` and ``missing`` recordings (their
            stored media is never transferred again).
    """

    skip_media: bool = False
    refresh: bool = False


@dataclass
class ArchiveContext:
    """The clients and knobs one process uses for every chunk (built by ``run.clients``).

    Attributes:
        bird: Bird API client (owns retries and request pacing).
        store: SQL store and ledger.
        media: S3 media store, or ``None`` when the run skips media.
        workspace_id: Bird workspace of every ID.
        s3_prefix: Key prefix of media objects.
        owner: This run's lease owner name (unique per run).
        concurrency: Items in flight at once within a chunk.
        lease_seconds: Lease length of claimed ledger rows.
        item_max_attempts: Attempts (across runs) after which a failure is no longer retried.
        retry_backoff: Base delay before a failed item's next attempt (doubles per attempt).
        media_recheck: Delay before ``retry-failed`` looks again at a recording whose media
            was not available yet.
        temp_dir: Folder for media temp files (system default when ``None``).
        media_attempts: Whole downloads tried per recording when a body breaks off or
            fails verification.
        media_retry_delay: First delay between those downloads (doubles, capped).
        transcripts: What the run did with transcriptions so far (every chunk of the run
            adds to it; summaries and metrics, not ``runs`` columns).
    """

    bird: BirdClient
    store: ArchiveStore
    media: MediaStore | None
    workspace_id: str
    s3_prefix: str
    owner: str
    concurrency: int = 16
    lease_seconds: int = 900
    item_max_attempts: int = 8
    retry_backoff: timedelta = timedelta(minutes=5)
    media_recheck: timedelta = timedelta(hours=1)
    temp_dir: Path | None = None
    media_attempts: int = 3
    media_retry_delay: float = 0.25
    transcripts: TranscriptionCounts = field(default_factory=TranscriptionCounts)
