"""Building the clients of a run from :class:`~recarchive.config.Settings`.

This is the one place where httpx and boto3 clients are created (SQLAlchemy's engine:
:mod:`~recarchive.run.database`); everything else receives them. Each builder is called by the
CLI or a flow at run time, never at import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from recarchive.bird.client import BirdClient
from recarchive.bird.http import build_http_client
from recarchive.bird.limits import AnswerLimits
from recarchive.bird.ratelimit import RequestPacer, SharedPermits
from recarchive.bird.redirect import RedirectPolicy
from recarchive.bird.retry import RetryPolicy
from recarchive.config import Settings
from recarchive.leases import active_owner, run_owner
from recarchive.run.context import ArchiveContext
from recarchive.store.archive import ArchiveStore
from recarchive.store.permits import RequestPermits

if TYPE_CHECKING:
    from recarchive.media.s3 import MediaStore


def build_media_store(settings: Settings, *, bucket: str | None = None) -> MediaStore:
    """Build the S3 media store for ``RECARCHIVE_S3_BUCKET``.

    Args:
        settings: The run's settings.
        bucket: Another bucket, e.g. the one of an ``s3://`` manifest given as input; then
            ``RECARCHIVE_S3_BUCKET`` need not be set.

    Raises:
        ConfigError: No ``bucket`` given and the setting is not set.
    """
    # Imported here: boto3 costs about half a second, and --skip-media runs never need it.
    from recarchive.media.locks import RetentionPolicy
    from recarchive.media.s3 import MediaStore
    from recarchive.media.s3client import build_s3_client

    bucket = settings.require_bucket() if bucket is None else bucket
    s3 = build_s3_client(
        endpoint_url=settings.s3_endpoint_url,
        request_checksum_calculation=settings.s3_request_checksum_calculation,
        max_pool_connections=max(settings.concurrency * 2, 10),
    )
    return MediaStore(
        s3,
        bucket=bucket,
        sse=settings.s3_sse,
        kms_key_id=settings.s3_sse_kms_key_id,
        multipart_threshold=settings.s3_multipart_threshold_bytes,
        multipart_chunk_size=settings.s3_multipart_chunk_bytes,
        storage_class=settings.s3_storage_class,
        retention=RetentionPolicy(settings.s3_object_lock_mode, settings.s3_retention_days),
    )


#: Buckets whose Object Lock this process saw enabled: it can never be disabled again, so
#: one request per bucket and process is enough (``archive --since`` checks before listing,
#: and its run's context then does not ask again).
_LOCKED_BUCKETS: set[tuple[str | None, str]] = set()


def check_media_bucket(settings: Settings, media: MediaStore | None = None) -> None:
    """Fail before any Bird request when a lock mode is set on a bucket without Object Lock.

    Without ``RECARCHIVE_S3_OBJECT_LOCK_MODE`` this only requires the bucket setting (no
    request). With it, one ``GetObjectLockConfiguration`` of the media bucket.

    Args:
        settings: The run's settings.
        media: The run's media store, when built already (else one is built).

    Raises:
        ConfigError: No bucket set, or the bucket has no Object Lock while a mode is set.
    """
    bucket = settings.require_bucket() if media is None else media.bucket
    if settings.s3_object_lock_mode is None:
        return
    if (settings.s3_endpoint_url, bucket) in _LOCKED_BUCKETS:
        return
    from recarchive.media.locks import check_object_lock

    media = media or build_media_store(settings)
    check_object_lock(media.s3, bucket)
    _LOCKED_BUCKETS.add((settings.s3_endpoint_url, bucket))


def redirect_policy(settings: Settings) -> RedirectPolicy:
    """Where the API's media redirects may go (``RECARCHIVE_MEDIA_ALLOWED_HOSTS``)."""
    return RedirectPolicy(settings.bird_api_url, allowed_hosts=settings.media_allowed_host_set)


def build_bird_http(settings: Settings) -> httpx.AsyncClient:
    """Build the HTTP client for the Bird API; the caller closes it.

    Its connector checks every resolved address against :func:`redirect_policy` before it
    connects, so a name that resolves to a private address only at download time is refused.
    """
    return build_http_client(
        timeout_seconds=settings.http_timeout_seconds,
        max_connections=max(settings.concurrency * 2, 8),
        connect_check=redirect_policy(settings).check_connect,
    )


def shared_permits(settings: Settings, engine: Engine) -> SharedPermits | None:
    """This process's share of the deployment-wide API rate limit, or ``None`` when unshared.

    With ``RECARCHIVE_RATE_LIMIT_SHARED``, every process on the ledger database ``engine``
    draws from one limit of ``RECARCHIVE_REQUESTS_PER_SECOND`` per API host and workspace
    (:mod:`recarchive.store.permits`); its own pacer still spaces its requests and pauses on
    a 429.
    """
    if not settings.rate_limit_shared:
        return None
    workspace_id, _ = settings.require_bird()
    url = urlsplit(settings.bird_api_url)
    # Host and port only: never URL user info, and one limit however the port is written.
    port = url.port or (443 if url.scheme == "https" else 80)
    name = f"bird-api {(url.hostname or '').lower()}:{port} {workspace_id}"
    source = RequestPermits(engine, name[:255], settings.requests_per_second)
    return SharedPermits(
        source, batch=settings.rate_limit_batch_size, rate=settings.requests_per_second
    )


def build_bird_client(
    settings: Settings, http: httpx.AsyncClient, *, shared: SharedPermits | None = None
) -> BirdClient:
    """Build the Bird API client over ``http``, with a pacer shared by its requests.

    Args:
        settings: The run's settings.
        http: The HTTP client (:func:`build_bird_http`).
        shared: Permits of the deployment-wide rate limit (:func:`shared_permits`).

    Raises:
        ConfigError: Workspace or access key not set.
    """
    workspace_id, access_key = settings.require_bird()
    return BirdClient(
        http,
        api_url=settings.bird_api_url,
        workspace_id=workspace_id,
        access_key=access_key,
        auth_scheme=settings.bird_auth_scheme,
        pacer=RequestPacer(settings.requests_per_second, shared=shared),
        retry=RetryPolicy(
            max_attempts=settings.http_max_attempts,
            max_total_seconds=settings.http_max_retry_seconds,
        ),
        redirects=redirect_policy(settings),
        limits=AnswerLimits(
            metadata_max_bytes=settings.metadata_max_bytes,
            media_max_bytes=settings.media_max_bytes,
            low_speed_bytes=settings.media_low_speed_bytes,
            low_speed_seconds=settings.media_low_speed_seconds,
            allowed_hosts=settings.media_allowed_host_set,
        ),
    )


@asynccontextmanager
async def open_archive_context(
    settings: Settings, store: ArchiveStore, *, skip_media: bool
) -> AsyncIterator[ArchiveContext]:
    """Open the API and S3 clients an archive run needs and close them afterwards.

    Args:
        settings: The run's settings.
        store: The opened SQL store (see :func:`~recarchive.run.database.open_store`); the
            caller disposes its engine.
        skip_media: When true, no S3 client is built and the bucket is not required.

    Yields:
        The context for :func:`recarchive.run.chunk.archive_chunk`.
    """
    workspace_id, _ = settings.require_bird()
    media = None if skip_media else build_media_store(settings)
    if media is not None:
        check_media_bucket(settings, media)  # before the first Bird request
    http = build_bird_http(settings)
    try:
        with active_owner(run_owner()) as owner:
            yield ArchiveContext(
                bird=build_bird_client(
                    settings, http, shared=shared_permits(settings, store.engine)
                ),
                store=store,
                media=media,
                workspace_id=workspace_id,
                s3_prefix=settings.s3_prefix,
                owner=owner,
                concurrency=settings.concurrency,
                lease_seconds=settings.lease_seconds,
                item_max_attempts=settings.item_max_attempts,
                temp_dir=Path(settings.temp_dir) if settings.temp_dir else None,
            )
    finally:
        await http.aclose()
