"""Discovering the IDs of a creation-time window through the list endpoint."""

from __future__ import annotations

from datetime import datetime

from recarchive.bird.client import BirdClient
from recarchive.ids.spool import IdCollector, IdList


async def discover_ids(
    bird: BirdClient, *, since: datetime, until: datetime, spool_dir: str | None = None
) -> IdList:
    """List the IDs of recordings created in ``[since, until)`` into an :class:`IdList`.

    Args:
        bird: The API client.
        since: Inclusive lower bound of ``createdAt`` (UTC).
        until: Exclusive upper bound of ``createdAt`` (UTC).
        spool_dir: Folder of the spool file.

    Returns:
        The IDs, de-duplicated, in listing order; a malformed ID from the API is recorded as a
        problem (``list endpoint:N``), never archived.
    """
    collector = IdCollector(spool_dir)
    position = 0
    try:
        async for payload in bird.list_recordings(since=since, until=until):
            position += 1
            collector.add(str(payload.get("id", "")), "list endpoint", position)
    except BaseException:
        collector.discard()
        raise
    return collector.finish()
