"""The IDs a run is given: a list, a manifest (local or ``s3://``), or a creation window.

The flows in ``flows/`` take their IDs here, and a fan-out backfill writes its children's
manifests here: only a manifest's location travels as a flow-run parameter, never the IDs.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from recarchive.config import Settings
from recarchive.errors import InputError, RecarchiveError
from recarchive.ids.discover import discover_ids
from recarchive.ids.read import collect_ids, raise_for_problems
from recarchive.ids.spool import IdList
from recarchive.ids.window import Window
from recarchive.run.clients import (
    build_bird_client,
    build_bird_http,
    shared_permits,
)
from recarchive.run.database import open_store


async def discover_window(settings: Settings, window: Window) -> IdList:
    """List the IDs created in ``window`` (one spooled, de-duplicated list).

    With ``RECARCHIVE_RATE_LIMIT_SHARED``, the list requests draw from the shared rate limit
    in the ledger database like every other request.
    """
    engine = open_store(settings)[0] if settings.rate_limit_shared else None
    try:
        async with build_bird_http(settings) as http:
            shared = shared_permits(settings, engine) if engine is not None else None
            bird = build_bird_client(settings, http, shared=shared)
            return await discover_ids(
                bird, since=window.since, until=window.until, spool_dir=settings.temp_dir
            )
    finally:
        if engine is not None:
            engine.dispose()


@contextlib.contextmanager
def open_manifest(settings: Settings, manifest: str) -> Iterator[IdList]:
    """Read a manifest of IDs (local path or ``s3://bucket/key``) as a validated ID list.

    Raises:
        InputError: Unreadable manifest or invalid IDs in it (with their line numbers).
    """
    with contextlib.ExitStack() as stack:
        path = manifest
        if manifest.startswith("s3://"):
            path = stack.enter_context(_downloaded(settings, manifest))
        id_list = stack.enter_context(collect_ids(files=[path], spool_dir=settings.temp_dir))
        raise_for_problems(id_list)
        yield id_list


@contextlib.contextmanager
def _downloaded(settings: Settings, uri: str) -> Iterator[str]:
    from recarchive.run.clients import build_media_store

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    store = build_media_store(settings, bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="recarchive-manifest-") as folder:
        target = Path(folder) / "manifest.txt"
        try:
            store.download_manifest(key, target)
        except RecarchiveError as exc:
            # The store's message holds the S3 error code and status only: no credentials.
            raise InputError(f"cannot read manifest {uri}: {exc}") from exc
        yield str(target)


#: Child runs of a fan-out backfill when neither ``children`` nor ``chunks_per_child`` is given:
#: enough to spread even a few thousand IDs over several workers.
DEFAULT_CHILDREN = 8
#: Most child runs one fan-out starts: each is a flow run the parent waits on (and polls).
MAX_CHILDREN = 1000


def ids_per_child(
    total: int, *, chunk_size: int, children: int | None, chunks_per_child: int | None
) -> int:
    """How many IDs each child run of a fan-out gets (the last one gets the rest).

    Args:
        total: IDs to split.
        chunk_size: IDs per chunk task.
        children: How many child runs (at most; fewer when there are fewer IDs).
        chunks_per_child: Chunks per child run instead: every child gets
            ``chunk_size * chunks_per_child`` IDs, however many children that makes.

    Raises:
        InputError: See :func:`check_fan_out`.
    """
    check_fan_out(children, chunks_per_child)
    if chunks_per_child is not None:
        return chunk_size * chunks_per_child
    return max(1, -(-total // (children or DEFAULT_CHILDREN)))


def check_fan_out(children: int | None, chunks_per_child: int | None) -> None:
    """Refuse a fan-out split before any work: both ways given, or one below 1.

    Raises:
        InputError: Naming the parameter.
    """
    if children is not None and chunks_per_child is not None:
        raise InputError("give children or chunks_per_child, not both")
    if chunks_per_child is not None and chunks_per_child < 1:
        raise InputError(f"chunks_per_child must be at least 1, not {chunks_per_child}")
    if children is not None and not 1 <= children <= MAX_CHILDREN:
        raise InputError(f"children must be from 1 to {MAX_CHILDREN}, not {children}")


def write_manifests(
    settings: Settings, id_list: IdList, *, ids_per_manifest: int, run_key: str
) -> list[str]:
    """Split ``id_list`` into manifests for child runs; return their locations.

    Manifests go to S3 (``{prefix}/manifests/{run_key}/part-NNNNN.txt``) when a bucket is
    configured, so workers on other machines can read them, else to a local folder beside
    the database. Only the manifest location travels as a flow-run parameter: Prefect stores
    parameters in its database, and 100k IDs do not belong there. In S3 they are written
    through the media store (:meth:`~recarchive.media.s3.MediaStore.put_manifest`): encrypted
    like media, and with its errors translated.
    """
    locations: list[str] = []
    local_root = Path(settings.temp_dir or "recarchive-data") / "manifests" / run_key
    store = None
    bucket = settings.s3_bucket
    if bucket:
        from recarchive.run.clients import build_media_store

        store = build_media_store(settings)
    else:
        local_root.mkdir(parents=True, exist_ok=True)
    for index, group in enumerate(id_list.chunks(ids_per_manifest)):
        body = "\n".join(group) + "\n"
        name = f"part-{index:05d}.txt"
        if store is not None:
            key = f"{settings.s3_prefix}/manifests/{run_key}/{name}"
            store.put_manifest(key, body.encode())
            locations.append(f"s3://{bucket}/{key}")
        else:
            path = local_root / name
            path.write_text(body)
            locations.append(str(path.resolve()))
    return locations


@contextlib.contextmanager
def open_id_input(
    settings: Settings, ids: list[str] | None, ids_file: str | None
) -> Iterator[IdList]:
    """The IDs a flow was given: a list parameter or a manifest (path or ``s3://`` key).

    Raises:
        InputError: Neither or both given, or invalid IDs (with their places).
    """
    if bool(ids) == bool(ids_file):
        raise InputError("give exactly one of ids or ids_file")
    if ids_file:
        with open_manifest(settings, ids_file) as id_list:
            yield id_list
        return
    with collect_ids(ids or [], spool_dir=settings.temp_dir) as id_list:
        raise_for_problems(id_list)
        yield id_list
