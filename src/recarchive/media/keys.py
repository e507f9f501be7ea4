"""Where a recording's media and sidecar live in the bucket (README, "Where things go").

Pure functions, kept apart from :mod:`recarchive.media.s3` so that callers that only need a
key (the pipeline, ``--skip-media`` runs) do not pay for importing boto3.
"""

from __future__ import annotations

from datetime import UTC, datetime


def media_key(prefix: str, workspace_id: str, recording_id: str, created_at: datetime) -> str:
    """Return the S3 key of a recording's MP3.

    ``{prefix}/{workspaceId}/{YYYY}/{MM}/{DD}/{recordingId}.mp3``, the date taken from
    ``created_at`` in UTC (a naive datetime is taken as UTC). An empty prefix gives a key
    without a leading slash.
    """
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    day = created_at.astimezone(UTC)
    return f"{workspace_prefix(prefix, workspace_id)}{day:%Y/%m/%d}/{recording_id}.mp3"


def workspace_prefix(prefix: str, workspace_id: str) -> str:
    """The key prefix every object of a workspace starts with: ``{prefix}/{workspaceId}/``.

    An empty prefix gives ``{workspaceId}/`` (no leading slash), as :func:`media_key` does.
    """
    prefix = prefix.strip("/")
    return f"{prefix}/{workspace_id}/" if prefix else f"{workspace_id}/"


def sidecar_key(key: str) -> str:
    """Return the key of the metadata sidecar beside the media object ``key``."""
    return f"{_stem(key)}.json"


def transcription_key(key: str, transcription_id: str, fmt: str) -> str:
    """Return the key of one format of a transcription beside the media object ``key``.

    ``{stem}.transcription.{transcriptionId}.{fmt}`` (README, "Where things go").
    """
    return f"{_stem(key)}.transcription.{transcription_id}.{fmt}"


def _stem(key: str) -> str:
    return key[: -len(".mp3")] if key.endswith(".mp3") else key


def object_prefix(key: str) -> str:
    """The key prefix of every object of the recording whose MP3 is at ``key``.

    ``{stem}.``: the MP3, its sidecar, its transcriptions and its erasure tombstone; no other
    recording's (a recording ID is a fixed-length UUID).
    """
    return f"{_stem(key)}."


def tombstone_key(key: str) -> str:
    """Return the key of the erasure tombstone where the sidecar of ``key`` was."""
    return f"{_stem(key)}.erased.json"
