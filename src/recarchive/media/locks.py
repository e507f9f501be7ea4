"""S3 Object Lock for the media bucket: retention of new objects, the bucket check, legal holds.

A recording's MP3 and sidecar are written with a retention of the configured mode until
``createdAt`` + days (:class:`RetentionPolicy`), so a backfill of old calls is not kept longer
than the rule requires; when that date has passed already the objects are written without
one. The mode needs a bucket created with Object Lock (:func:`check_object_lock`: one request,
at the start of a run). Legal holds (``recarchive hold``) are set and cleared on every version
of a recording's objects (:func:`set_legal_hold`). Restores of objects in an archive storage
class are asked for here too (:func:`request_restore`).

Every function takes the boto3 client and bucket of a :class:`~recarchive.media.s3.MediaStore`
and translates botocore's errors with :func:`~recarchive.media.s3client.translate_error`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from recarchive.errors import ConfigError
from recarchive.media.s3client import error_code, translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from recarchive.media.objects import ObjectInfo

logger = logging.getLogger(__name__)

#: Storage classes whose objects must be restored before a GET (S3 answers
#: ``InvalidObjectState``); GLACIER_IR is read at once.
RESTORE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
#: Days a restored copy stays readable, and the retrieval tier: ``Standard`` takes hours
#: (3-5 h from GLACIER, up to 12 h from DEEP_ARCHIVE) at a fraction of ``Expedited``'s price,
#: and a week is time enough to run ``verify --deep`` again or copy the objects out.
RESTORE_DAYS = 7
RESTORE_TIER: Literal["Standard"] = "Standard"

LockMode = Literal["GOVERNANCE", "COMPLIANCE"]


@dataclass(frozen=True)
class Retention:
    """The retention one recording's objects are written with.

    Attributes:
        mode: ``GOVERNANCE`` or ``COMPLIANCE``; ``None`` when the objects carry none (no mode
            configured, or ``retain_until`` had passed when they were written).
        retain_until: ``createdAt`` + the retention days (UTC), whether or not it had passed;
            ``None`` without a mode configured.
    """

    mode: LockMode | None = None
    retain_until: datetime | None = None

    def put_args(self) -> dict[str, Any]:
        """The ``PutObject``/``CreateMultipartUpload`` arguments of this retention."""
        if self.mode is None or self.retain_until is None:
            return {}
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": self.retain_until}


#: No retention at all (no lock mode configured).
NO_RETENTION = Retention()


@dataclass(frozen=True)
class RetentionPolicy:
    """``RECARCHIVE_S3_OBJECT_LOCK_MODE`` and ``RECARCHIVE_S3_RETENTION_DAYS``.

    Attributes:
        mode: The lock mode, ``None`` for no retention.
        days: Retention in days from a recording's ``createdAt`` (with a mode only).
    """

    mode: LockMode | None = None
    days: int | None = None

    def __post_init__(self) -> None:
        if (self.mode is None) != (self.days is None):
            raise ValueError("a lock mode needs retention days, and days need a mode")

    def for_created(self, created_at: datetime, *, now: datetime | None = None) -> Retention:
        """The retention of a recording created at ``created_at``.

        ``mode`` is left out when ``createdAt`` + days is not after ``now``: S3 refuses a
        retain-until date in the past, and the rule no longer asks to keep the recording.
        """
        if self.mode is None or self.days is None:
            return NO_RETENTION
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        until = created_at.astimezone(UTC) + timedelta(days=self.days)
        if until.microsecond:
            # Whole seconds, rounded up (never shorter than the rule): what S3 shows back.
            until = until.replace(microsecond=0) + timedelta(seconds=1)
        if until <= (now or datetime.now(UTC)):
            return Retention(mode=None, retain_until=until)
        return Retention(mode=self.mode, retain_until=until)


#: No lock mode: nothing is retained.
NO_LOCK = RetentionPolicy()


def _uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{key}"


def check_object_lock(s3: S3Client, bucket: str) -> None:
    """Fail unless ``bucket`` has Object Lock enabled: one ``GetObjectLockConfiguration``.

    Raises:
        ConfigError: The bucket has no Object Lock (enabled when a bucket is created, or
            later on a versioned one): nothing could be written with a retention or held.
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, bad credentials.
    """
    try:
        answer = s3.get_object_lock_configuration(Bucket=bucket)
        enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
    except ClientError as exc:
        if error_code(exc) != "ObjectLockConfigurationNotFoundError":
            raise translate_error(exc, f"get object lock {_uri(bucket)}") from exc
        enabled = None
    except BotoCoreError as exc:
        raise translate_error(exc, f"get object lock {_uri(bucket)}") from exc
    if enabled != "Enabled":
        raise ConfigError(
            f"bucket {bucket} does not have S3 Object Lock enabled, which "
            "RECARCHIVE_S3_OBJECT_LOCK_MODE and recarchive hold need: use a bucket created "
            "with Object Lock (docs/compliance.md), or unset the lock mode"
        )


def ensure_retention(
    s3: S3Client, bucket: str, key: str, retention: Retention, *, shown: ObjectInfo
) -> None:
    """Give the object ``key`` ``retention`` unless its HEAD (``shown``) has it already.

    Raises:
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, or S3 refused the retention.
    """
    if retention.mode is None or retention.retain_until is None:
        return
    if (shown.lock_mode, shown.retain_until) == (retention.mode, retention.retain_until):
        return
    logger.warning(
        "%s was stored without its retention (%s until %s); setting it now",
        _uri(bucket, key),
        retention.mode,
        retention.retain_until.isoformat(),
    )
    try:
        s3.put_object_retention(
            Bucket=bucket,
            Key=key,
            Retention={"Mode": retention.mode, "RetainUntilDate": retention.retain_until},
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate_error(exc, f"put retention {_uri(bucket, key)}") from exc


def object_versions(s3: S3Client, bucket: str, key: str) -> list[str]:
    """The version IDs of exactly ``key`` (delete markers left out), newest first.

    Raises:
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, bad credentials.
    """
    versions: list[str] = []
    try:
        paginator = s3.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            # Prefix also matches longer keys (``x.json`` and ``x.json.bak``): exact only.
            versions.extend(
                str(version["VersionId"])
                for version in page.get("Versions", [])
                if version["Key"] == key
            )
    except (ClientError, BotoCoreError) as exc:
        raise translate_error(exc, f"list versions {_uri(bucket, key)}") from exc
    return versions


def set_legal_hold(s3: S3Client, bucket: str, key: str, *, on: bool) -> int:
    """Set (``on``) or clear the legal hold of every version of ``key``; return how many.

    Every version, not only the current one: a sidecar written twice has two, and a hold
    must keep the older one as well.

    Raises:
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, no Object Lock on it.
    """
    status: Literal["ON", "OFF"] = "ON" if on else "OFF"
    versions = object_versions(s3, bucket, key)
    for version in versions:
        try:
            s3.put_object_legal_hold(
                Bucket=bucket, Key=key, VersionId=version, LegalHold={"Status": status}
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"legal hold {status} {_uri(bucket, key)}") from exc
    return len(versions)


def request_restore(s3: S3Client, bucket: str, key: str) -> bool:
    """Ask S3 to restore ``key`` from its archive class for :data:`RESTORE_DAYS` days.

    Returns:
        True when the restore was requested now, False when one is in progress already.

    Raises:
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, not in an archive class.
    """
    try:
        s3.restore_object(
            Bucket=bucket,
            Key=key,
            RestoreRequest={"Days": RESTORE_DAYS, "GlacierJobParameters": {"Tier": RESTORE_TIER}},
        )
    except ClientError as exc:
        if error_code(exc) == "RestoreAlreadyInProgress":
            return False
        raise translate_error(exc, f"restore {_uri(bucket, key)}") from exc
    except BotoCoreError as exc:
        raise translate_error(exc, f"restore {_uri(bucket, key)}") from exc
    return True


def restore_state(storage_class: str | None, restore: str | None) -> str | None:
    """What an object's HEAD says about reading it: ``None`` when it can be read now.

    Args:
        storage_class: The HEAD's ``StorageClass`` (absent for STANDARD).
        restore: The HEAD's ``Restore`` header (``ongoing-request="true"`` while a restore
            runs; ``ongoing-request="false", expiry-date=...`` once a copy is readable).

    Returns:
        ``"needs restore"``, ``"restore in progress"``, or ``None``.
    """
    if storage_class not in RESTORE_CLASSES:
        return None
    if not restore:
        return "needs restore"
    if 'ongoing-request="true"' in restore:
        return "restore in progress"
    return None
