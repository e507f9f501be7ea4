"""Typed shapes of normalized recordings and ledger rows.

These are the values that flow between :mod:`recarchive.normalize` (pure), the SQL store and
the pipeline. Row dicts use the SQL column names of :mod:`recarchive.store.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

#: Ledger states (DESIGN §2).
PENDING: Final = "pending"
METADATA_ONLY: Final = "metadata_only"
ARCHIVED: Final = "archived"
MISSING: Final = "missing"
FAILED: Final = "failed"

#: Every ledger state, in the order reports list them.
LEDGER_STATES: Final[tuple[str, ...]] = (PENDING, METADATA_ONLY, ARCHIVED, MISSING, FAILED)

#: Party roles: one ``recording_parties`` row per present role.
PARTY_ROLES: Final[tuple[str, ...]] = ("originator", "receiver")

#: ``recordings`` columns filled from the payload (besides the bookkeeping columns).
RECORDING_FIELDS: Final[tuple[str, ...]] = (
    "id",
    "workspace_id",
    "source",
    "source_id",
    "channel_id",
    "status",
    "direction",
    "origin",
    "duration",
    "stereo",
    "format",
    "transcription",
    "conference_id",
    "url",
    "room_info_url",
    "created_at",
    "updated_at",
    "ended_at",
    "started_at",
)

#: ``recording_parties`` columns besides ``recording_id`` and ``role``.
PARTY_FIELDS: Final[tuple[str, ...]] = (
    "contact_id",
    "contact_identifier_key",
    "contact_identifier_value",
    "number_type",
    "number",
    "number_anonymous",
    "number_caller_id_name",
    "number_identity",
    "number_country_iso_code",
)


@dataclass(frozen=True)
class NormalizedRecording:
    """One recording's payload as rows, ready to store.

    Attributes:
        id: Canonical lowercase UUID of the recording.
        workspace_id: Bird workspace the recording belongs to.
        status: Bird status as sent (unknown values kept as they are).
        created_at: ``createdAt`` in UTC.
        updated_at: ``updatedAt`` in UTC.
        recording: The ``recordings`` row (column name to value).
        parties: The ``recording_parties`` rows, one per present originator/receiver.
        redacted_payload: The payload without credentials (``url`` and ``roomInfoUrl`` without
            query string or fragment); stored as ``raw_json`` and as the S3 sidecar.
    """

    id: str
    workspace_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    recording: dict[str, Any]
    parties: list[dict[str, Any]]
    redacted_payload: dict[str, Any]


@dataclass(frozen=True)
class LedgerEntry:
    """One ``archive_ledger`` row.

    Attributes:
        recording_id: Canonical lowercase UUID.
        state: One of :data:`LEDGER_STATES`.
        attempts: Failed attempts so far (across runs).
        last_error: Why the last attempt failed or why media is pending.
        next_attempt_at: When a failed recording is due again; ``None`` for a terminal failure.
        s3_bucket: Bucket of the archived media.
        s3_key: Key of the archived media.
        size_bytes: Size of the archived media.
        sha256: Hex SHA-256 of the archived media.
        archived_at: When the media was archived.
        lease_owner: Run that holds the lease, if any.
        lease_expires_at: When that lease ends.
    """

    recording_id: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    s3_bucket: str | None
    s3_key: str | None
    size_bytes: int | None
    sha256: str | None
    archived_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
