"""The boto3 S3 client of a run: how it is built, and what its errors mean.

botocore's ``standard`` retry mode, configured in :func:`build_s3_client`, is the one retry
layer of S3 requests; :func:`translate_error` maps what is left after it into the recarchive
error tree, for :class:`~recarchive.media.s3.MediaStore` and everything that writes through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, cast

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError

from recarchive.errors import (
    MediaIntegrityError,
    RecarchiveError,
    RetryableError,
    ServerError,
    StorageUnavailableError,
    TransportError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1024 * 1024
#: Read size when hashing a part or an object: large enough for throughput, small for memory.
READ_BLOCK = 1 * MiB
#: Total attempts of one S3 request in botocore's standard retry mode (first try included).
S3_MAX_ATTEMPTS = 6

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
    # Imported here, not with the module: boto3 and botocore's config cost ~0.3 s of a process's
    # start-up, which a run without media (``--skip-media``, an export) never needs.
    import boto3
    from botocore.config import Config

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


def error_code(exc: ClientError) -> str:
    """The S3 error code of ``exc`` (``"NoSuchKey"``, ``"PreconditionFailed"``, ...), or ``""``."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    """The HTTP status of the answer behind ``exc`` (``0`` when there was none)."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_not_found(exc: ClientError) -> bool:
    """Whether ``exc`` says the key (or the object behind a HEAD) does not exist."""
    return error_code(exc) in _NOT_FOUND_CODES or http_status(exc) == 404


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
        code, status = error_code(exc), http_status(exc)
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
