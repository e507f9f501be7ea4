"""The archive as S3 holds it: every recording's objects under a workspace's prefix, read only.

What ``rebuild`` reads when the database is gone. Keys follow :mod:`recarchive.media.keys`:
``{prefix}/{workspaceId}/{YYYY}/{MM}/{DD}/{recordingId}.mp3`` with the sidecar
``{recordingId}.json`` beside it (and, for an erased recording, only
``{recordingId}.erased.json``). Listing is one ``ListObjectsV2`` page after another, so a
million recordings cost one page of memory at a time; nothing here writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from recarchive.errors import PayloadError
from recarchive.media.locks import restore_state
from recarchive.media.objects import object_info
from recarchive.media.s3client import is_not_found, translate_error

if TYPE_CHECKING:
    from recarchive.media.s3 import MediaStore

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: The object names of one recording, by what they are.
_NAME = re.compile(rf"^(?P<id>{_UUID})(?P<kind>\.mp3|\.json|\.erased\.json|\.transcription\..+)$")
#: Largest sidecar read back: the API's metadata limit is far below this.
SIDECAR_MAX_BYTES = 16 * 1024 * 1024


@dataclass
class StoredRecording:
    """One recording's objects in the archive, by kind.

    Attributes:
        recording_id: The recording.
        folder: The key prefix they share (``.../YYYY/MM/DD/``).
        media: Key of the MP3, if there is one.
        media_size: Its size from the listing.
        sidecar: Key of the metadata sidecar, if there is one.
        tombstone: Key of the ``.erased.json`` marker, if the recording was erased.
        others: Keys of anything else of it (transcriptions).
    """

    recording_id: str
    folder: str
    media: str | None = None
    media_size: int = 0
    sidecar: str | None = None
    tombstone: str | None = None
    others: list[str] = field(default_factory=list)


def iter_recordings(media: MediaStore, prefix: str) -> Iterator[StoredRecording]:
    """Yield the recordings stored under ``prefix``, each once with all of its objects.

    The objects of one recording share a folder and a name stem, and a listing is in key
    order, so a recording is complete once the listing passes its folder; only the current
    folder's recordings are held.

    Raises:
        RetryableError: S3 failed transiently after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, bad credentials.
    """
    folder_items: dict[str, StoredRecording] = {}
    current_folder = None
    for key, size in _list(media, prefix):
        folder, _, name = key.rpartition("/")
        match = _NAME.match(name)
        if match is None:
            continue  # not one of ours (a manifest, a stray upload)
        if folder != current_folder:
            yield from folder_items.values()
            folder_items, current_folder = {}, folder
        recording_id = match["id"]
        item = folder_items.setdefault(recording_id, StoredRecording(recording_id, folder + "/"))
        kind = match["kind"]
        if kind == ".mp3":
            item.media, item.media_size = key, size
        elif kind == ".json":
            item.sidecar = key
        elif kind == ".erased.json":
            item.tombstone = key
        else:
            item.others.append(key)
    yield from folder_items.values()


def _list(media: MediaStore, prefix: str) -> Iterator[tuple[str, int]]:
    action = f"list s3://{media.bucket}/{prefix}"
    try:
        pages = media.s3.get_paginator("list_objects_v2").paginate(
            Bucket=media.bucket, Prefix=prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"], int(item["Size"])
    except (ClientError, BotoCoreError) as exc:
        raise translate_error(exc, action) from exc


def read_json(media: MediaStore, key: str) -> dict[str, Any]:
    """A JSON object stored at ``key`` (a sidecar or a tombstone).

    Raises:
        PayloadError: It is not a JSON object, or larger than :data:`SIDECAR_MAX_BYTES`.
        RetryableError, StorageUnavailableError: As :meth:`MediaStore.head`.
    """
    action = f"get s3://{media.bucket}/{key}"
    try:
        response = media.s3.get_object(Bucket=media.bucket, Key=key)
        body = response["Body"]
        try:
            data = body.read(SIDECAR_MAX_BYTES + 1)
        finally:
            body.close()
    except (ClientError, BotoCoreError) as exc:
        raise translate_error(exc, action) from exc
    if len(data) > SIDECAR_MAX_BYTES:
        raise PayloadError(f"{key}: larger than {SIDECAR_MAX_BYTES} bytes", field="<sidecar>")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"{key}: not JSON ({type(exc).__name__})", field="<sidecar>") from exc
    if not isinstance(value, dict):
        raise PayloadError(f"{key}: not a JSON object", field="<sidecar>")
    return value


@dataclass(frozen=True)
class MediaFacts:
    """What the MP3 object itself says: its size, its ``sha256`` and when it was stored.

    Attributes:
        size: Content length.
        sha256: The ``sha256`` user metadata (``None`` on an object recarchive did not write).
        archived_at: The ``archived-at`` user metadata, else the object's ``LastModified``.
        lock_mode: ``ObjectLockMode`` (``None``: no retention).
        retain_until: ``ObjectLockRetainUntilDate``.
        legal_hold: ``ObjectLockLegalHoldStatus`` is ``ON``.
        unreadable: Why its bytes cannot be read now (``"needs restore"``, ``"restore in
            progress"``: an archive storage class), ``None`` when they can.
    """

    size: int
    sha256: str | None
    archived_at: datetime
    lock_mode: str | None = None
    retain_until: datetime | None = None
    legal_hold: bool = False
    unreadable: str | None = None


def media_facts(media: MediaStore, key: str) -> MediaFacts | None:
    """HEAD ``key``: its :class:`MediaFacts`, ``None`` when it is gone.

    Raises:
        RetryableError, StorageUnavailableError: As :meth:`MediaStore.head`.
    """
    try:
        response = media.s3.head_object(Bucket=media.bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise translate_error(exc, f"head s3://{media.bucket}/{key}") from exc
    except BotoCoreError as exc:
        raise translate_error(exc, f"head s3://{media.bucket}/{key}") from exc
    info = object_info(response)  # the fields every HEAD of an MP3 is read for
    return MediaFacts(
        info.size,
        info.sha256,
        # Absent or unparseable: not ours to trust, so LastModified stands.
        info.archived_at or response["LastModified"].astimezone(UTC),
        lock_mode=info.lock_mode,
        retain_until=info.retain_until,
        legal_hold=response.get("ObjectLockLegalHoldStatus") == "ON",
        unreadable=restore_state(info.storage_class, info.restore),
    )
