"""The S3 media store: conditional, checksummed uploads of MP3 files over an injected boto3 client.

Every write is *create-only* (``IfNoneMatch="*"``), carries the SHA-256 of the bytes twice —
as ``ChecksumSHA256`` (so real S3 rejects corrupted bodies) and as the ``sha256`` user
metadata (so a HEAD can later tell what the object should hold) — and is read back with a
HEAD before it counts as stored. The HEAD proves the object exists with the size and metadata
we sent; it cannot prove the bytes: S3 itself refuses a body that does not match its
``ChecksumSHA256`` (SeaweedFS does too, tests/test_s3_integrity.py), but moto accepts wrong
checksums silently (DESIGN §5), and there only a full read (``verify --deep``, or the
recovery path's re-hash) sees a corrupted body.

Retries of single S3 requests (5xx, ``SlowDown``, dropped connections) belong to botocore's
``standard`` retry mode configured in :func:`build_s3_client`; this module never retries a
request itself. It translates what is left into the recarchive error tree.

The client is synchronous: the asyncio pipeline calls these methods via ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError

from recarchive.errors import (
    MediaConflictError,
    MediaIntegrityError,
    RecarchiveError,
    RetryableError,
    ServerError,
    StorageUnavailableError,
    TransportError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MEDIA_CONTENT_TYPE = "audio/mpeg"
#: Read size when hashing a part or an object: large enough for throughput, small for memory.
READ_BLOCK = 1 * MiB
#: Total attempts of one S3 request in botocore's standard retry mode (first try included).
S3_MAX_ATTEMPTS = 6

UploadOutcome = Literal["uploaded", "already_present"]
#: User metadata naming what confirmed the downloaded body's end (see bird.integrity).
CONFIRMED_BY = "confirmed-by"
ChecksumMode = Literal["when_supported", "when_required"]
_CHECKSUM_MODES = frozenset({"when_supported", "when_required"})

# S3 error codes that mean "transient, try again"; botocore retried them already.
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# The body did not match its checksum: corrupted in transit, a fresh attempt may succeed.
_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def build_s3_client(
    *,
    endpoint_url: str | None,
    request_checksum_calculation: str,
    max_pool_connections: int = 10,
) -> S3Client:
    """Build the boto3 S3 client of a run.

    botocore's ``standard`` retry mode is the one retry layer of S3 requests: it retries 5xx,
    ``SlowDown``/throttling and dropped connections with jittered backoff. The classic
    (non-CRT) client is used because the CRT transfer client ignores ``endpoint_url``
    (boto/boto3#4839).

    Args:
        endpoint_url: An S3-compatible endpoint (MinIO, moto), or ``None`` for AWS.
        request_checksum_calculation: ``"when_supported"`` (boto3's default) or
            ``"when_required"`` for servers that reject the default CRC32 checksums; also
            used for ``response_checksum_validation``.
        max_pool_connections: HTTP connections kept by the client; at least the number of
            threads that use it at once.

    Returns:
        The client. Credentials and region come from boto3's usual chain.
    """
    if request_checksum_calculation not in _CHECKSUM_MODES:
        raise ValueError(f"request_checksum_calculation must be one of {sorted(_CHECKSUM_MODES)}")
    mode = cast(ChecksumMode, request_checksum_calculation)
    config = Config(
        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
        request_checksum_calculation=mode,
        response_checksum_validation=mode,
        s3={
            # Every write of ours carries its x-amz-checksum-sha256 header (signed, and checked
            # by the server against the body), so botocore's extra SHA-256 of the payload for
            # the signature — done over plain-http endpoints only — is pure CPU cost.
            "payload_signing_enabled": False,
            # Path-style works with every S3-compatible endpoint (no wildcard DNS needed).
            **({"addressing_style": "path"} if endpoint_url else {}),
        },
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, config=config)


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells about a stored object.

    Attributes:
        size: Content length in bytes.
        sha256: Hex SHA-256 from the ``sha256`` user metadata, ``None`` if absent.
        confirmed_by: The ``confirmed-by`` user metadata: what confirmed the download's end
            (``content-length``, ``chunked``, a checksum); ``None`` for objects stored before
            recarchive recorded it.
    """

    size: int
    sha256: str | None
    confirmed_by: str | None = None


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def translate_error(exc: Exception, action: str) -> RecarchiveError:
    """Map a botocore exception to the recarchive error tree.

    The message holds the action, the S3 error code and the HTTP status only: never a URL
    (presigned query strings are credentials) nor request headers.

    Args:
        exc: What botocore raised (after its own retries).
        action: What was attempted, e.g. ``"put s3://bucket/key"``.

    Returns:
        The error to raise ``from exc``.
    """
    if isinstance(exc, ClientError):
        code, status = _error_code(exc), _status(exc)
        message = f"{action}: S3 answered {code or 'error'} (HTTP {status})"
        if code in _DIGEST_CODES:
            return MediaIntegrityError(message)
        if code in _RETRYABLE_CODES or status >= 500:
            return ServerError(message)
        # Access denied, missing bucket, bad SSE/KMS arguments, bad credentials: every further
        # item would fail the same way, so the run stops instead of failing items one by one.
        return StorageUnavailableError(message)
    if isinstance(exc, BotoConnectionError | HTTPClientError | ResponseStreamingError):
        return TransportError(f"{action}: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        # e.g. NoCredentialsError, ParamValidationError: configuration, not transient.
        return StorageUnavailableError(f"{action}: {type(exc).__name__}")
    return RetryableError(f"{action}: {type(exc).__name__}")


def _metadata(sha256_hex: str, confirmed_by: str | None) -> dict[str, str]:
    metadata = {"sha256": sha256_hex}
    if confirmed_by:
        metadata[CONFIRMED_BY] = confirmed_by
    return metadata


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[start, start + length)`` of an open file.

    botocore streams a part body from it and seeks back to the start to retry, so a part is
    never held in memory whole.
    """

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._start = start
        self._length = length
        self._pos = 0
        self._file.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        self._file.seek(self._start + self._pos)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        data = self._file.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _part_sha256(path: Path, start: int, length: int) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining:
            block = handle.read(min(READ_BLOCK, remaining))
            if not block:
                raise MediaIntegrityError(f"temp file shorter than expected at offset {start}")
            digest.update(block)
            remaining -= len(block)
    return digest.digest()


class MediaStore:
    """MP3 objects and their sidecars in one bucket.

    Args:
        s3: A boto3 S3 client (see :func:`build_s3_client`); shared by threads.
        bucket: The media bucket.
        sse: ``"AES256"``, ``"aws:kms"`` or ``None`` for the bucket default.
        kms_key_id: KMS key for ``aws:kms`` (``None``: the account's default key).
        multipart_threshold: Files of at least this size go up as a multipart upload.
        multipart_chunk_size: Part size of multipart uploads (S3's minimum is 5 MiB).
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
    ) -> None:
        if multipart_chunk_size <= 0 or multipart_threshold <= 0:
            raise ValueError("multipart sizes must be positive")
        self.s3 = s3
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size

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
        )

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _sse_args(self) -> dict[str, Any]:
        if not self.sse:
            return {}
        args: dict[str, Any] = {"ServerSideEncryption": self.sse}
        if self.sse == "aws:kms" and self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
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
            if _error_code(exc) in _NOT_FOUND_CODES or _status(exc) == 404:
                return None
            raise translate_error(exc, f"head {self._uri(key)}") from exc
        except BotoCoreError as exc:
            raise translate_error(exc, f"head {self._uri(key)}") from exc
        metadata = response.get("Metadata") or {}
        return ObjectInfo(
            size=int(response["ContentLength"]),
            sha256=metadata.get("sha256"),
            confirmed_by=metadata.get(CONFIRMED_BY),
        )

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
            if _error_code(exc) in _NOT_FOUND_CODES or _status(exc) == 404:
                raise MediaIntegrityError(f"{action}: object does not exist") from exc
            raise translate_error(exc, action) from exc
        except BotoCoreError as exc:
            raise translate_error(exc, action) from exc
        return size, digest.hexdigest(), md5_digest.hexdigest() if md5_digest else ""

    def list_open_multipart_uploads(self) -> list[str]:
        """Return the keys of multipart uploads started but neither completed nor aborted."""
        keys: list[str] = []
        try:
            paginator = self.s3.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket):
                keys.extend(upload["Key"] for upload in page.get("Uploads", []))
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"list uploads s3://{self.bucket}") from exc
        return keys

    # --- writes ----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        """Write a small object (the metadata sidecar); an existing one is overwritten.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                **self._sse_args(),
            )
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
        self, key: str, path: Path, *, size: int, sha256_hex: str, confirmed_by: str | None = None
    ) -> UploadOutcome:
        """Write ``path`` to ``key`` unless the key exists; no read-back (see :meth:`upload_file`).

        Below ``multipart_threshold`` one ``put_object``, else a multipart upload whose parts
        are streamed from the file one at a time (memory does not grow with the file). Both
        send the SHA-256 checksum and write only if the key does not exist
        (``IfNoneMatch="*"``). Before a multipart upload, open uploads of exactly this key are
        aborted: the caller holds the ledger lease of the recording, so they are leftovers of a
        run that was killed mid-upload (they would otherwise stay, and be billed, forever).

        An ``"uploaded"`` object counts as stored only after :meth:`verify_stored`; an
        ``"already_present"`` one was checked by its HEAD (size and ``sha256`` metadata).

        Raises:
            MediaConflictError: The key holds different bytes; nothing was overwritten.
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        try:
            if size >= self.multipart_threshold:
                self.abort_open_uploads(key)
                self._multipart_upload(
                    key, path, size=size, metadata=_metadata(sha256_hex, confirmed_by)
                )
            else:
                self._single_put(key, path, metadata=_metadata(sha256_hex, confirmed_by))
        except ClientError as exc:
            if _error_code(exc) != "PreconditionFailed" and _status(exc) != 412:
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
        stale: list[str] = []
        try:
            paginator = self.s3.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                # Prefix also matches longer keys (``x.mp3`` and ``x.mp3.bak``): exact only.
                stale.extend(
                    upload["UploadId"] for upload in page.get("Uploads", []) if upload["Key"] == key
                )
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, f"list uploads {self._uri(key)}") from exc
        for upload_id in stale:
            logger.warning(
                "aborting a multipart upload of %s left open by an earlier run", self._uri(key)
            )
            self._abort(key, upload_id)
        return len(stale)

    def _single_put(self, key: str, path: Path, *, metadata: dict[str, str]) -> None:
        checksum = base64.b64encode(bytes.fromhex(metadata["sha256"])).decode()
        # A file object, not bytes: botocore streams it and seeks back to retry.
        with path.open("rb") as body:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=MEDIA_CONTENT_TYPE,
                ChecksumSHA256=checksum,
                IfNoneMatch="*",
                Metadata=metadata,
                **self._sse_args(),
            )

    def _multipart_upload(
        self, key: str, path: Path, *, size: int, metadata: dict[str, str]
    ) -> None:
        sha256_hex = metadata["sha256"]
        created = self.s3.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ContentType=MEDIA_CONTENT_TYPE,
            ChecksumAlgorithm="SHA256",
            Metadata=metadata,
            **self._sse_args(),
        )
        upload_id = created["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, size, self.multipart_chunk_size), 1):
                length = min(self.multipart_chunk_size, size - start)
                checksum = base64.b64encode(_part_sha256(path, start, length)).decode()
                with _FileSlice(path, start, length) as body:
                    answer = self.s3.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=cast(IO[bytes], body),
                        ContentLength=length,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )
                parts.append(
                    {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}
                )
            self._complete(key, upload_id, parts, size=size, sha256_hex=sha256_hex)
        except BaseException:
            self._abort(key, upload_id)
            raise
        finally:
            # A retried CreateMultipartUpload may have created an upload whose answer was
            # lost: nobody knows its id, so it would stay open. Ours is completed or aborted
            # by now; any upload of this key still open is such an orphan.
            if created.get("ResponseMetadata", {}).get("RetryAttempts", 0):
                self._abort_orphans(key)

    def _abort_orphans(self, key: str) -> None:
        try:
            self.abort_open_uploads(key)
        except RecarchiveError as exc:
            # Never hide the upload's own outcome; the bucket's lifecycle rule is the backstop.
            logger.warning("could not list open uploads of %s: %s", self._uri(key), exc)

    def _complete(
        self,
        key: str,
        upload_id: str,
        parts: list[CompletedPartTypeDef],
        *,
        size: int,
        sha256_hex: str,
    ) -> None:
        try:
            self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except ClientError as exc:
            # A completion whose answer was lost and then retried finds the upload gone
            # (NoSuchUpload): if the object holds our bytes, that first attempt succeeded.
            if _error_code(exc) == "NoSuchUpload":
                info = self.head(key)
                if info is not None and info.size == size and info.sha256 == sha256_hex:
                    return
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if _error_code(exc) != "NoSuchUpload":
                # The bucket's lifecycle rule for incomplete uploads is the backstop.
                logger.warning(
                    "could not abort multipart upload of %s: %s", self._uri(key), _error_code(exc)
                )
        except BotoCoreError as exc:
            logger.warning(
                "could not abort multipart upload of %s: %s", self._uri(key), type(exc).__name__
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

    def verify_stored(self, key: str, *, size: int, sha256_hex: str) -> None:
        """HEAD ``key`` and check its size and ``sha256`` metadata against the upload.

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
