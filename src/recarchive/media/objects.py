"""What a stored media object is: what its HEAD tells, and the arguments it is written with.

Pure helpers of :class:`~recarchive.media.s3.MediaStore`: the ``sha256`` and ``confirmed-by``
user metadata, the retention arguments of a write, and the fields of a HEAD answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recarchive.media.locks import Retention

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

#: User metadata naming what confirmed the downloaded body's end (see bird.integrity).
CONFIRMED_BY = "confirmed-by"
#: User metadata: when the MP3 was archived (ISO 8601, UTC), the ledger's ``archived_at``;
#: ``rebuild`` reads it back (objects written before it was recorded have none).
ARCHIVED_AT = "archived-at"


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells about a stored object.

    Attributes:
        size: Content length in bytes.
        sha256: Hex SHA-256 from the ``sha256`` user metadata, ``None`` if absent.
        confirmed_by: The ``confirmed-by`` user metadata: what confirmed the download's end
            (``content-length``, ``chunked``, a checksum); ``None`` for objects stored before
            recarchive recorded it.
        storage_class: ``StorageClass`` (``None``: STANDARD). restore: the ``Restore`` header.
        lock_mode: ``ObjectLockMode``. retain_until: ``ObjectLockRetainUntilDate``.
        archived_at: The ``archived-at`` user metadata (``None``: absent or unreadable).
    """

    size: int
    sha256: str | None
    confirmed_by: str | None = None
    storage_class: str | None = None
    restore: str | None = None
    lock_mode: str | None = None
    retain_until: datetime | None = None
    archived_at: datetime | None = None


def lock_args(retention: Retention) -> dict[str, Any]:
    """The retention arguments of a write (none without a retention)."""
    args = retention.put_args()
    if args:
        # S3 wants Content-MD5 or x-amz-sdk-checksum-algorithm on a write with a retention;
        # the x-amz-checksum-sha256 we send alone does not count (moto checks this too).
        args["ChecksumAlgorithm"] = "SHA256"
    return args


def object_metadata(
    sha256_hex: str, confirmed_by: str | None, archived_at: datetime | None = None
) -> dict[str, str]:
    """The user metadata of an MP3: its SHA-256, what confirmed its download's end, and when."""
    metadata = {"sha256": sha256_hex}
    if confirmed_by:
        metadata[CONFIRMED_BY] = confirmed_by
    if archived_at is not None:
        metadata[ARCHIVED_AT] = archived_at.astimezone(UTC).isoformat()
    return metadata


def _moment(value: str | None) -> datetime | None:
    """An ISO 8601 time of user metadata, aware UTC; ``None`` when absent or not one."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def object_info(response: HeadObjectOutputTypeDef) -> ObjectInfo:
    """The :class:`ObjectInfo` of a ``HeadObject`` answer."""
    metadata = response.get("Metadata") or {}
    return ObjectInfo(
        size=int(response["ContentLength"]),
        sha256=metadata.get("sha256"),
        confirmed_by=metadata.get(CONFIRMED_BY),
        storage_class=response.get("StorageClass"),
        restore=response.get("Restore"),
        lock_mode=response.get("ObjectLockMode"),
        retain_until=response.get("ObjectLockRetainUntilDate"),
        archived_at=_moment(metadata.get(ARCHIVED_AT)),
    )
