"""The S3 media store: conditional, checksummed uploads of MP3 files over an injected boto3 client.

Every write is *create-only* (``IfNoneMatch="*"``), carries the SHA-256 of the bytes twice —
as ``ChecksumSHA256`` (so real S3 rejects corrupted bodies) and as the ``sha256`` user
metadata (so a HEAD can later tell what the object should hold) — and is read back with a
HEAD before it counts as stored. The HEAD proves the object exists with the size and metadata
we sent; it cannot prove the bytes: S3 itself refuses a body that does not match its
``ChecksumSHA256`` (SeaweedFS too, tests/test_s3_integrity.py); moto accepts wrong checksums,
and there only a full read (``verify --deep``, recovery's re-hash) sees a corrupted body.

Retries of single S3 requests (5xx, ``SlowDown``, dropped connections) belong to botocore's
``standard`` retry mode configured in :func:`~recarchive.media.s3client.build_s3_client`; this
module never retries a request itself. What is left is translated into the recarchive error
tree by :func:`~recarchive.media.s3client.translate_error`. Multipart uploads are
:mod:`recarchive.media.multipart`'s.

The client is synchronous: the asyncio pipeline calls these methods in threads
(:func:`recarchive.media.spool.in_thread`).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

from botocore.exceptions import BotoCoreError, ClientError

from recarchive.errors import MediaConflictError, MediaIntegrityError, ServerError
from recarchive.media import locks
from recarchive.media.multipart import MultipartUploads
from recarchive.media.objects import ObjectInfo, lock_args, object_info, object_metadata
from recarchive.media.s3client import (
    READ_BLOCK,
    MiB,
    error_code,
    http_status,
    is_not_found,
    translate_error,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["MEDIA_CONTENT_TYPE", "MediaStore", "ObjectInfo", "UploadOutcome"]

MEDIA_CONTENT_TYPE = "audio/mpeg"

UploadOutcome = Literal["uploaded", "already_present"]


class MediaStore:
    """MP3 objects and their sidecars (and transcriptions: :mod:`~.transcripts`) in one bucket.

    Args:
        s3: A boto3 S3 client (see :func:`~recarchive.media.s3client.build_s3_client`); shared
            by threads.
        bucket: The media bucket.
        sse: ``"AES256"``, ``"aws:kms"`` or ``None`` for the bucket default.
        kms_key_id: KMS key for ``aws:kms`` (``None``: the account's default key).
        multipart_threshold: Files of at least this size go up as a multipart upload.
        multipart_chunk_size: Part size of multipart uploads (S3's minimum is 5 MiB).
        storage_class: Storage class of MP3s (``None``: the bucket's default); other objects
            stay in the default class.
        retention: The lock mode and days of MP3s and sidecars (see :mod:`~.locks`).
    """

    def __init__(
        self,
        s3: S3Client,
        *,
        bucket: str,
        sse: str | None = None,
        kms_key_id: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunk_size: int = 16 * MiB,
        storage_class: str | None = None,
        retention: locks.RetentionPolicy = locks.NO_LOCK,
    ) -> None:
        if multipart_chunk_size <= 0 or multipart_threshold <= 0:
            raise ValueError("multipart sizes must be positive")
        self.s3 = s3
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.storage_class = storage_class
        self.retention = retention
        self._multipart = MultipartUploads(
            s3,
            bucket=bucket,
            part_size=multipart_chunk_size,
            sse_args=self.sse_args(),
            head=self.head,
        )

    def for_bucket(self, bucket: str) -> MediaStore:
        """This store's client and settings on another bucket (``self`` for the same one).

        A recording pinned to a bucket before the bucket setting changed keeps its bucket.
        """
        if bucket == self.bucket:
            return self
        return MediaStore(
            self.s3,
            bucket=bucket,
            sse=self.sse,
            kms_key_id=self.kms_key_id,
            multipart_threshold=self.multipart_threshold,
            multipart_chunk_size=self.multipart_chunk_size,
            storage_class=self.storage_class,
            retention=self.retention,
        )

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def sse_args(self) -> dict[str, Any]:
        """The server-side encryption arguments of every write to this store."""
        if not self.sse:
            return {}
        kms = {"SSEKMSKeyId": self.kms_key_id} if self.sse == "aws:kms" and self.kms_key_id else {}
        return {"ServerSideEncryption": self.sse, **kms}

    def _media_args(self, retention: locks.Retention) -> dict[str, Any]:
        """An MP3's storage class and retention arguments (sidecars: :meth:`put_bytes`)."""
        args = lock_args(retention)
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        return args

    # --- reads -----------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """Return size and ``sha256`` metadata of ``key``, or ``None`` when it does not exist.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        try:
            response = self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise translate_error(exc, f"head {self._uri(key)}") from exc
        except BotoCoreError as exc:
            raise translate_error(exc, f"head {self._uri(key)}") from exc
        return object_info(response)

    def hash_object(self, key: str) -> tuple[int, str]:
        """Download ``key`` as a stream and return ``(size, hex SHA-256)`` of its bytes.

        Raises:
            MediaIntegrityError: The object does not exist (any more).
            RetryableError: The download failed midway or S3 failed transiently.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        size, sha256, _md5 = self.digest_object(key, md5=False)
        return size, sha256

    def digest_object(self, key: str, *, md5: bool = True) -> tuple[int, str, str]:
        """Like :meth:`hash_object`, with the hex MD5 too: ``(size, sha256, md5)``.

        The MD5 is what a single-part object's ETag at the source holds, so a deletion at
        Bird can compare it (see :mod:`recarchive.run.verify`). With ``md5=False`` it is
        not computed (``""``): it costs about three times SHA-256's CPU.
        """
        action = f"get {self._uri(key)}"
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key)
            digest = hashlib.sha256()
            md5_digest = hashlib.md5(usedforsecurity=False) if md5 else None
            size = 0
            body = response["Body"]
            try:
                for block in body.iter_chunks(READ_BLOCK):
                    digest.update(block)
                    if md5_digest is not None:
                        md5_digest.update(block)
                    size += len(block)
            finally:
                body.close()
        except ClientError as exc:
            if is_not_found(exc):
                raise MediaIntegrityError(f"{action}: object does not exist") from exc
            raise translate_error(exc, action) from exc
        except BotoCoreError as exc:
            raise translate_error(exc, action) from exc
        return size, digest.hexdigest(), md5_digest.hexdigest() if md5_digest else ""

    def list_open_multipart_uploads(self) -> list[str]:
        """Return the keys of multipart uploads started but neither completed nor aborted."""
        return self._multipart.open_keys()

    # --- manifests -------------------------------------------------------------------------

    def put_manifest(self, key: str, body: bytes) -> None:
        """Write a manifest (the IDs of one child run); an existing one is overwritten.

        Encrypted with the store's SSE settings, and with nothing else: never a retention lock
        or storage class media may be given, because a child run must be able to read its
        manifest at once, and the manifests of a finished run must stay deletable.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad SSE/KMS arguments.
        """
        self._put(key, body)

    def download_manifest(self, key: str, target: Path) -> None:
        """Download the manifest at ``key`` into the file ``target``.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: No such key or bucket, access denied, bad credentials.
        """
        try:
            self.s3.download_file(self.bucket, key, str(target))
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"get {self._uri(key)}") from exc

    # --- writes ----------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/json",
        *,
        retention: locks.Retention = locks.NO_RETENTION,
    ) -> None:
        """Write a small object (the metadata sidecar); an existing one is overwritten.

        With ``retention`` it is locked too; never given the MP3s' class (``rebuild`` reads it).

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        self._put(
            key,
            data,
            ContentType=content_type,
            ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
            **lock_args(retention),
        )

    def _put(self, key: str, data: bytes, **args: Any) -> None:
        """One overwriting ``put_object`` of ``data`` with the SSE arguments and ``args``."""
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **args, **self.sse_args())
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"put {self._uri(key)}") from exc

    def upload_file(
        self, key: str, path: Path, *, size: int, sha256_hex: str, confirmed_by: str | None = None
    ) -> UploadOutcome:
        """Store the file ``path`` at ``key`` unless the key exists; verify it afterwards.

        :meth:`store_file` then, for a fresh upload, :meth:`verify_stored`.

        Args:
            key: Destination key.
            path: The verified temp file.
            size: Its size in bytes.
            sha256_hex: Hex SHA-256 of its bytes (computed while downloading).
            confirmed_by: What confirmed the download's end; stored as user metadata.

        Returns:
            ``"uploaded"``, or ``"already_present"`` when the key already held these bytes.

        Raises:
            MediaConflictError: The key holds different bytes; nothing was overwritten.
            MediaIntegrityError: The stored object does not show the expected size and hash.
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        outcome = self.store_file(
            key, path, size=size, sha256_hex=sha256_hex, confirmed_by=confirmed_by
        )
        if outcome == "uploaded":
            self.verify_stored(key, size=size, sha256_hex=sha256_hex)
        return outcome

    def store_file(
        self,
        key: str,
        path: Path,
        *,
        size: int,
        sha256_hex: str,
        confirmed_by: str | None = None,
        retention: locks.Retention = locks.NO_RETENTION,
        archived_at: datetime | None = None,
    ) -> UploadOutcome:
        """Write ``path`` to ``key`` unless the key exists; no read-back (see :meth:`upload_file`).

        Below ``multipart_threshold`` one ``put_object``, else a multipart upload streamed
        from the file part by part. Both send the SHA-256 checksum and write only if the key
        does not exist (``IfNoneMatch="*"``). Open uploads of exactly this key are aborted
        first: the caller holds the recording's lease, so they are a killed run's leftovers.

        An ``"uploaded"`` object counts as stored only after :meth:`verify_stored`; an
        ``"already_present"`` one was checked by its HEAD (size and ``sha256`` metadata).

        Raises:
            MediaConflictError: The key holds different bytes; nothing was overwritten.
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        metadata = object_metadata(sha256_hex, confirmed_by, archived_at)
        args = self._media_args(retention)
        if size < self.multipart_threshold:
            # A file object, not bytes: botocore streams it and seeks back to retry.
            with path.open("rb") as body:
                return self.store_once(
                    key, size, sha256_hex, lambda: self._single_put(key, body, metadata, args)
                )

        def multipart() -> None:
            self.abort_open_uploads(key)
            self._multipart.upload(
                key, path, size=size, content_type=MEDIA_CONTENT_TYPE, metadata=metadata, args=args
            )

        return self.store_once(key, size, sha256_hex, multipart)

    def store_bytes(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        sha256_hex: str,
        confirmed_by: str | None = None,
        retention: locks.Retention = locks.NO_RETENTION,
        archived_at: datetime | None = None,
    ) -> UploadOutcome:
        """Like :meth:`store_file` for a body held in memory: always one ``put_object``.

        For bodies below ``multipart_threshold`` (the caller keeps only small ones in memory).

        Raises:
            MediaConflictError: The key holds different bytes; nothing was overwritten.
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        metadata = object_metadata(sha256_hex, confirmed_by, archived_at)
        args = self._media_args(retention)
        return self.store_once(
            key, len(data), sha256_hex, lambda: self._single_put(key, data, metadata, args)
        )

    def store_once(
        self, key: str, size: int, sha256_hex: str, write: Callable[[], None]
    ) -> UploadOutcome:
        """Run the create-only ``write``; a refused one (412) is resolved by :meth:`_existing`."""
        try:
            write()
        except ClientError as exc:
            if error_code(exc) != "PreconditionFailed" and http_status(exc) != 412:
                raise translate_error(exc, f"upload {self._uri(key)}") from exc
            # The key exists. A retried request whose first attempt landed also ends here.
            return self._existing(key, size=size, sha256_hex=sha256_hex, cause=exc)
        except BotoCoreError as exc:
            raise translate_error(exc, f"upload {self._uri(key)}") from exc
        return "uploaded"

    def abort_open_uploads(self, key: str) -> int:
        """Abort every open multipart upload of exactly ``key``; return how many there were.

        Only call this while holding the recording's ledger lease: an upload of a live run
        would be aborted too (that run's completion then fails and is retried, so nothing is
        lost, but the work is wasted).

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        return self._multipart.abort_open(key)

    def _single_put(
        self,
        key: str,
        body: IO[bytes] | bytes | bytearray,
        metadata: dict[str, str],
        args: dict[str, Any],
    ) -> None:
        checksum = base64.b64encode(bytes.fromhex(metadata["sha256"])).decode()
        self.s3.put_object(
            Bucket=self.bucket,
            Key=key,
            # botocore sends a bytearray as it is (its blob type takes one); no copy to bytes.
            Body=cast(IO[bytes] | bytes, body),
            ContentType=MEDIA_CONTENT_TYPE,
            ChecksumSHA256=checksum,
            IfNoneMatch="*",
            Metadata=metadata,
            **args,
            **self.sse_args(),
        )

    def _existing(self, key: str, *, size: int, sha256_hex: str, cause: Exception) -> UploadOutcome:
        info = self.head(key)
        if info is None:
            # Deleted between the 412 and the HEAD: a later attempt writes it again.
            raise ServerError(f"upload {self._uri(key)}: key vanished after 412") from cause
        if info.sha256 == sha256_hex and info.size == size:
            return "already_present"
        raise MediaConflictError(
            f"{self._uri(key)} already holds different media: stored sha256 "
            f"{info.sha256 or 'unknown'} ({info.size} bytes), new sha256 {sha256_hex} "
            f"({size} bytes); not overwritten"
        ) from cause

    def verify_stored(
        self,
        key: str,
        *,
        size: int,
        sha256_hex: str,
        retention: locks.Retention = locks.NO_RETENTION,
    ) -> None:
        """HEAD ``key`` and check its size and ``sha256`` metadata against the upload.

        With ``retention``, an object without it (a server that ignored a multipart upload's
        lock, as moto does) gets it now.

        Raises:
            MediaIntegrityError: Missing, or another size or hash than expected.
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        info = self.head(key)
        if info is None:
            raise MediaIntegrityError(f"{self._uri(key)}: object missing after upload")
        if info.size != size:
            raise MediaIntegrityError(
                f"{self._uri(key)}: stored size {info.size} != uploaded {size}"
            )
        if info.sha256 != sha256_hex:
            raise MediaIntegrityError(
                f"{self._uri(key)}: stored sha256 metadata {info.sha256} != {sha256_hex}"
            )
        locks.ensure_retention(self.s3, self.bucket, key, retention, shown=info)
