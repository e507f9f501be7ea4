"""Every stored version of a set of objects: listed, checked for locks, deleted for good.

An erasure (``recarchive erase``) removes a recording's objects for good, which on a
versioned bucket means every version and every delete marker, not the current object only: a
plain ``DeleteObject`` there only hides the bytes behind a marker. On an unversioned bucket
S3 lists each object once with version ``null``, and deleting it removes it.

Before anything is deleted, every version is checked for what S3 would refuse
(:meth:`ObjectVersions.lock_of`): a ``COMPLIANCE`` retention not yet over (nobody may delete
it), a ``GOVERNANCE`` one (only with ``BypassGovernanceRetention``), a legal hold (nobody,
until it is cleared). The caller checks all versions first and deletes only when none
refuses, so a refused recording keeps all its objects.

The boto3 client is synchronous and shared with :class:`~recarchive.media.s3.MediaStore`;
retries of single requests are botocore's, errors are translated by
:func:`~recarchive.media.s3client.translate_error`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from recarchive.media.s3client import error_code, is_not_found, translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["ObjectVersions", "StoredVersion", "VersionLock"]

#: What S3 answers for the retention or legal hold of an object that has none (or of a
#: bucket without Object Lock): no lock, nothing to refuse.
_NO_LOCK_CODES = frozenset(
    {
        "NoSuchObjectLockConfiguration",
        "ObjectLockConfigurationNotFoundError",
        "InvalidRequest",
    }
)


@dataclass(frozen=True)
class StoredVersion:
    """One version (or delete marker) of one key.

    Attributes:
        key: The object key.
        version_id: Its version; ``None`` on a bucket that never had versioning (``null``).
        delete_marker: A delete marker (no bytes, no lock; deleting it is still needed).
        latest: The current version of the key.
    """

    key: str
    version_id: str | None
    delete_marker: bool
    latest: bool

    def describe(self, bucket: str) -> str:
        """``s3://bucket/key`` and the version, for messages (no personal data in keys)."""
        version = f" (version {self.version_id})" if self.version_id else ""
        return f"s3://{bucket}/{self.key}{version}"


@dataclass(frozen=True)
class VersionLock:
    """What protects one version from deletion.

    Attributes:
        mode: ``GOVERNANCE``, ``COMPLIANCE`` or ``None`` (no retention).
        retain_until: End of the retention, if any.
        legal_hold: A legal hold is on.
    """

    mode: str | None = None
    retain_until: datetime | None = None
    legal_hold: bool = False

    def refusal(self, now: datetime, *, bypass_governance: bool) -> str | None:
        """Why S3 would refuse to delete the version now, or ``None`` when it would not.

        Args:
            now: The current time (aware).
            bypass_governance: ``BypassGovernanceRetention`` will be sent.
        """
        if self.legal_hold:
            return "a legal hold is on (clear it first: recarchive hold ID --off)"
        if self.mode is None or self.retain_until is None or self.retain_until <= now:
            return None
        until = self.retain_until.isoformat()
        if self.mode == "COMPLIANCE":
            return f"COMPLIANCE retention until {until}: nobody can delete it before then"
        if not bypass_governance:
            return f"GOVERNANCE retention until {until}: needs --bypass-governance"
        return None


class ObjectVersions:
    """The versions of objects in one bucket, over an injected boto3 client.

    Args:
        s3: A boto3 S3 client (see :func:`~recarchive.media.s3client.build_s3_client`).
        bucket: The bucket.
    """

    def __init__(self, s3: S3Client, *, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self._locking: bool | None = None

    def all_versions(self, prefix: str) -> list[StoredVersion]:
        """Every version and delete marker of every key that starts with ``prefix``.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        return list(self._iter(prefix))

    def _iter(self, prefix: str) -> Iterator[StoredVersion]:
        action = f"list versions of s3://{self.bucket}/{prefix}*"
        try:
            pages = self.s3.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item, marker in (
                    *((item, False) for item in page.get("Versions", [])),
                    *((item, True) for item in page.get("DeleteMarkers", [])),
                ):
                    version = item.get("VersionId")
                    yield StoredVersion(
                        key=item["Key"],
                        version_id=None if version in (None, "null") else version,
                        delete_marker=marker,
                        latest=bool(item.get("IsLatest")),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, action) from exc

    def bucket_locks(self) -> bool:
        """Whether the bucket has Object Lock enabled (asked once): else nothing is locked."""
        if self._locking is None:
            try:
                answer = self.s3.get_object_lock_configuration(Bucket=self.bucket)
                config = answer.get("ObjectLockConfiguration", {})
                self._locking = config.get("ObjectLockEnabled") == "Enabled"
            except ClientError as exc:
                if error_code(exc) not in _NO_LOCK_CODES:
                    raise translate_error(exc, f"object lock of s3://{self.bucket}") from exc
                self._locking = False
            except BotoCoreError as exc:
                raise translate_error(exc, f"object lock of s3://{self.bucket}") from exc
        return self._locking

    def lock_of(self, version: StoredVersion) -> VersionLock:
        """The retention and legal hold of one version (none for a delete marker).

        The retention comes from a HEAD of the version (``x-amz-object-lock-mode`` and
        ``-retain-until-date``), the legal hold from ``GetObjectLegalHold``, which fails
        (access denied) rather than stay silent when the caller may not read it. Not
        ``GetObjectRetention``: moto's server answers it with a 500 whatever the object.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        if version.delete_marker or not self.bucket_locks():
            return VersionLock()
        args = self._version_args(version)
        head = self._ask("head_object", args, version)
        hold = self._ask("get_object_legal_hold", args, version).get("LegalHold", {})
        return VersionLock(
            mode=head.get("ObjectLockMode"),
            retain_until=head.get("ObjectLockRetainUntilDate"),
            legal_hold="ON" in (hold.get("Status"), head.get("ObjectLockLegalHoldStatus")),
        )

    def _ask(self, operation: str, args: dict[str, Any], version: StoredVersion) -> Any:
        try:
            return getattr(self.s3, operation)(**args)
        except ClientError as exc:
            if error_code(exc) in _NO_LOCK_CODES or is_not_found(exc):
                return {}
            raise translate_error(exc, f"{operation} {version.describe(self.bucket)}") from exc
        except BotoCoreError as exc:
            raise translate_error(exc, f"{operation} {version.describe(self.bucket)}") from exc

    def delete(self, version: StoredVersion, *, bypass_governance: bool = False) -> None:
        """Delete one version (or delete marker) for good.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Refused (a lock, access denied), no such bucket.
        """
        args = self._version_args(version)
        if bypass_governance:
            args["BypassGovernanceRetention"] = True
        try:
            self.s3.delete_object(**args)
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"delete {version.describe(self.bucket)}") from exc

    def _version_args(self, version: StoredVersion) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": version.key}
        if version.version_id is not None:
            args["VersionId"] = version.version_id
        return args
