"""Multipart uploads of one bucket: a file sent in checksummed parts, and uploads left open.

A file at or above the store's threshold goes up in parts streamed from the file one at a
time (memory does not grow with the file), each with its SHA-256. A failed upload is
aborted; uploads left open by a run that was killed mid-upload are found and aborted
(:meth:`MultipartUploads.abort_open`), as they would otherwise stay, and be billed, forever.

:meth:`MultipartUploads.upload` raises botocore's exceptions as they are:
:meth:`~recarchive.media.s3.MediaStore.store_file` tells a refused ``IfNoneMatch`` from a
failure, and translates the rest.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from botocore.exceptions import BotoCoreError, ClientError

from recarchive.errors import MediaIntegrityError, RecarchiveError
from recarchive.media.s3client import READ_BLOCK, error_code, translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from recarchive.media.objects import ObjectInfo

logger = logging.getLogger(__name__)


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


class MultipartUploads:
    """The multipart uploads of one bucket, for :class:`~recarchive.media.s3.MediaStore`.

    Args:
        s3: The store's boto3 S3 client.
        bucket: The store's bucket.
        part_size: Size of every part but the last (S3's minimum is 5 MiB).
        sse_args: The store's server-side encryption arguments of a new object.
        head: The store's HEAD of a key (``None`` when it does not exist).
    """

    def __init__(
        self,
        s3: S3Client,
        *,
        bucket: str,
        part_size: int,
        sse_args: dict[str, Any],
        head: Callable[[str], ObjectInfo | None],
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.part_size = part_size
        self._sse_args = sse_args
        self._head = head

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def upload(
        self,
        key: str,
        path: Path,
        *,
        size: int,
        content_type: str,
        metadata: dict[str, str],
        args: dict[str, Any] | None = None,
    ) -> None:
        """Write ``path`` to ``key`` in parts, unless the key exists (``IfNoneMatch="*"``).

        Open uploads of ``key`` are the caller's to abort first (:meth:`abort_open`). ``args``
        go to ``CreateMultipartUpload``: the storage class and the retention (S3 applies them
        to the completed object; moto ignores them there, see ``MediaStore.verify_stored``).

        Raises:
            ClientError: As botocore raised it (``PreconditionFailed`` when the key exists).
            BotoCoreError: As botocore raised it.
            MediaIntegrityError: The file is shorter than ``size``.
        """
        sha256_hex = metadata["sha256"]
        # The retention's own ChecksumAlgorithm (lock_args) is the SHA256 given here anyway.
        extra = {**(args or {}), **self._sse_args, "ChecksumAlgorithm": "SHA256"}
        created = self.s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type, Metadata=metadata, **extra
        )
        upload_id = created["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, size, self.part_size), 1):
                length = min(self.part_size, size - start)
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

    def open_keys(self) -> list[str]:
        """Return the keys of multipart uploads started but neither completed nor aborted.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        return [key for key, _upload_id in self._open_uploads(None)]

    def abort_open(self, key: str) -> int:
        """Abort every open multipart upload of exactly ``key``; return how many there were.

        See :meth:`~recarchive.media.s3.MediaStore.abort_open_uploads`.

        Raises:
            RetryableError: Transient S3 failure after botocore's retries.
            StorageUnavailableError: Access denied, no such bucket, bad credentials.
        """
        stale = [upload_id for _key, upload_id in self._open_uploads(key)]
        for upload_id in stale:
            logger.warning(
                "aborting a multipart upload of %s left open by an earlier run", self._uri(key)
            )
            self._abort(key, upload_id)
        return len(stale)

    def _open_uploads(self, key: str | None) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the open uploads: every one, or exactly ``key``'s."""
        found: list[tuple[str, str]] = []
        try:
            paginator = self.s3.get_paginator("list_multipart_uploads")
            pages = (
                paginator.paginate(Bucket=self.bucket)
                if key is None
                else paginator.paginate(Bucket=self.bucket, Prefix=key)
            )
            for page in pages:
                # Prefix also matches longer keys (``x.mp3`` and ``x.mp3.bak``): exact only.
                found.extend(
                    (upload["Key"], upload["UploadId"])
                    for upload in page.get("Uploads", [])
                    if key is None or upload["Key"] == key
                )
        except (ClientError, BotoCoreError) as exc:
            where = f"s3://{self.bucket}" if key is None else self._uri(key)
            raise translate_error(exc, f"list uploads {where}") from exc
        return found

    def _abort_orphans(self, key: str) -> None:
        try:
            self.abort_open(key)
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
            if error_code(exc) == "NoSuchUpload":
                info = self._head(key)
                if info is not None and info.size == size and info.sha256 == sha256_hex:
                    return
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                # The bucket's lifecycle rule for incomplete uploads is the backstop.
                logger.warning(
                    "could not abort multipart upload of %s: %s", self._uri(key), error_code(exc)
                )
        except BotoCoreError as exc:
            logger.warning(
                "could not abort multipart upload of %s: %s", self._uri(key), type(exc).__name__
            )
