"""One recording across attempts: its S3 key never moves, and a media 404 is retried.

Both against the hostile server (tests/fixtures/hostile.py), whose answers a test scripts.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recarchive.bird.limits import AnswerLimits
from recarchive.config import Settings
from recarchive.errors import MediaIntegrityError
from recarchive.media.locks import NO_RETENTION, Retention
from recarchive.media.s3 import MediaStore
from recarchive.run.database import open_store
from tests.fixtures.hostile import HostileServer, Script, good_payload, raw, response, run_chunk

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from recarchive.store.archive import ArchiveStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArchiveStore]:
    engine, store = open_store(Settings(database_url=f"sqlite:///{tmp_path / 'archive.db'}"))
    try:
        yield store
    finally:
        engine.dispose()


class ReadBackFailsOnce(MediaStore):
    """The upload lands, then the read-back HEAD fails: the recording ends ``failed``."""

    failed = False

    def verify_stored(
        self, key: str, *, size: int, sha256_hex: str, retention: Retention = NO_RETENTION
    ) -> None:
        if not ReadBackFailsOnce.failed:
            ReadBackFailsOnce.failed = True
            raise MediaIntegrityError(f"{key}: read-back failed (injected)")
        super().verify_stored(key, size=size, sha256_hex=sha256_hex, retention=retention)


def metadata_created(recording_id: str, created_at: str) -> Any:
    body = json.dumps(good_payload(recording_id, createdAt=created_at)).encode()
    return raw(response(200, [("Content-Type", "application/json")], body))


async def test_a_retry_that_sees_another_created_day_keeps_the_pinned_key(
    hostile: HostileServer, store: ArchiveStore, s3_client: S3Client, s3_bucket: str
) -> None:
    rid = str(uuid.uuid4())
    hostile.scripts[rid] = Script(metadata=metadata_created(rid, "2026-11-02T23:59:59Z"))
    first = ReadBackFailsOnce(s3_client, bucket=s3_bucket)
    counts = await run_chunk(hostile, [rid], store=store, media=first, limits=AnswerLimits())
    assert counts.failed == 1, counts.failures  # the object is in S3, the ledger says failed
    # Bird corrects createdAt across midnight; the retry must not store a second copy.
    hostile.scripts[rid] = Script(metadata=metadata_created(rid, "2026-11-03T00:00:01Z"))
    media = MediaStore(s3_client, bucket=s3_bucket)
    counts = await run_chunk(hostile, [rid], store=store, media=media, limits=AnswerLimits())
    assert counts.archived == 1, counts.failures
    listing = s3_client.list_objects_v2(Bucket=s3_bucket)
    keys = sorted(item["Key"] for item in listing.get("Contents", []) if rid in item["Key"])
    day = "recordings/hostile-ws/2026/11/02"
    assert keys == [f"{day}/{rid}.json", f"{day}/{rid}.mp3"]
    assert store.get_entries([rid])[rid].s3_key == f"{day}/{rid}.mp3"


async def test_a_media_404_of_an_available_recording_is_retried_later(
    hostile: HostileServer, store: ArchiveStore, s3_client: S3Client, s3_bucket: str
) -> None:
    rid = str(uuid.uuid4())
    hostile.scripts[rid] = Script(redirect=raw(response(404)))
    media = MediaStore(s3_client, bucket=s3_bucket)
    counts = await run_chunk(hostile, [rid], store=store, media=media, limits=AnswerLimits())
    entry = store.get_entries([rid])[rid]
    assert counts.failed == 1 and entry.state == "failed"
    assert entry.next_attempt_at is not None, "a 404 for the media is not final"
    assert "NotFoundError" in (entry.last_error or "")
