"""The bare-loop contenders of :mod:`bench.peers`, each run as a process of its own.

Run (by ``bench.peers``): ``.venv/bin/python -m bench.peer_loops KIND CONFIG.json`` with KIND
one of ``httpx``, ``aiohttp`` (metadata GET of every ID, JSON parsed, nothing stored) or
``media`` (per recording the requests the pipeline makes for a new recording: metadata GET,
``.mp3`` GET answered 307, GET of the presigned URL, checksummed conditional ``put_object``
with the ``sha256`` metadata, the verifying HEAD and the sidecar PUT). No pacing, no retries,
no ledger. It imports nothing of recarchive, so its process start costs what a bare script's
does. Prints one JSON line: recordings done and bytes downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


async def for_each(ids: list[str], concurrency: int, call: Callable[[str], Awaitable[int]]) -> int:
    """Run ``call(id)`` for every ID with ``concurrency`` workers; return the sum of results."""
    pending = iter(ids)
    total = 0

    async def worker() -> None:
        nonlocal total
        for recording_id in pending:
            # Not ``total += await ...``: that reads ``total`` before the await, and loses the
            # sizes other workers added meanwhile.
            size = await call(recording_id)
            total += size

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


def _base(config: dict[str, Any]) -> str:
    return f"{config['api_url']}/workspaces/{config['workspace_id']}/recordings/"


def _auth(config: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"AccessKey {config['access_key']}"}


async def httpx_metadata(config: dict[str, Any], ids: list[str]) -> int:
    """Metadata GETs through ``httpx.AsyncClient`` with its default transport."""
    import httpx

    concurrency = int(config["concurrency"])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=_auth(config), limits=limits, timeout=30) as http:

        async def fetch(recording_id: str) -> int:
            response = await http.get(_base(config) + recording_id)
            response.raise_for_status()
            response.json()
            return len(response.content)

        return await for_each(ids, concurrency, fetch)


async def aiohttp_metadata(config: dict[str, Any], ids: list[str]) -> int:
    """Metadata GETs through a plain ``aiohttp.ClientSession``."""
    import aiohttp

    concurrency = int(config["concurrency"])
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=_auth(config), connector=connector) as session:

        async def fetch(recording_id: str) -> int:
            async with session.get(_base(config) + recording_id) as response:
                response.raise_for_status()
                body = await response.read()
                json.loads(body)
                return len(body)

        return await for_each(ids, concurrency, fetch)


def _s3_client(config: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    settings = Config(
        retries={"mode": "standard"},
        max_pool_connections=int(config["concurrency"]) * 2,
        request_checksum_calculation="when_supported",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=config["s3_endpoint"], config=settings)


def _checksum(digest: Any) -> str:
    return base64.b64encode(digest.digest()).decode()


def put_media(s3: Any, bucket: str, key: str, body: bytes) -> None:
    """The pipeline's PUT of an MP3: create-only, its SHA-256 as checksum and as metadata."""
    digest = hashlib.sha256(body)
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType="audio/mpeg",
        IfNoneMatch="*",
        ChecksumSHA256=_checksum(digest),
        Metadata={"sha256": digest.hexdigest()},
    )


def _store(s3: Any, bucket: str, key: str, body: bytes, sidecar: bytes) -> None:
    # The pipeline's S3 requests for a new recording (recarchive.media.s3): the media PUT,
    # the HEAD that reads it back, the sidecar PUT with its own checksum.
    put_media(s3, bucket, key, body)
    s3.head_object(Bucket=bucket, Key=key)
    sidecar_digest = hashlib.sha256(sidecar)
    s3.put_object(
        Bucket=bucket,
        Key=key[:-4] + ".json",
        Body=sidecar,
        ContentType="application/json",
        ChecksumSHA256=_checksum(sidecar_digest),
    )


async def media(config: dict[str, Any], ids: list[str]) -> int:
    """The pipeline's requests for each recording, with aiohttp and boto3 in threads."""
    import aiohttp

    concurrency = int(config["concurrency"])
    # As many S3 threads as recordings in flight (asyncio's default pool has cpu + 4).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(concurrency))
    s3 = _s3_client(config)
    bucket, workspace = config["bucket"], config["workspace_id"]
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def transfer(recording_id: str) -> int:
            url = _base(config) + recording_id
            async with session.get(url, headers=_auth(config)) as response:
                response.raise_for_status()
                sidecar = await response.read()
            created = json.loads(sidecar)["createdAt"]
            async with session.get(
                url + ".mp3", headers=_auth(config), allow_redirects=False
            ) as response:
                if response.status != 307:
                    raise RuntimeError(f"{recording_id}: .mp3 answered {response.status}")
                location = response.headers["Location"]
            async with session.get(location) as response:
                response.raise_for_status()
                body = await response.read()
            day = created[:10].replace("-", "/")
            key = f"recordings/{workspace}/{day}/{recording_id}.mp3"
            await asyncio.to_thread(_store, s3, bucket, key, body, sidecar)
            return len(body)

        return await for_each(ids, concurrency, transfer)


LOOPS = {"httpx": httpx_metadata, "aiohttp": aiohttp_metadata, "media": media}


def main() -> None:
    """Run the loop named on the command line; print what it did as JSON."""
    kind, config_file = sys.argv[1], Path(sys.argv[2])
    config = json.loads(config_file.read_text())
    ids = Path(config["ids_file"]).read_text().split()
    size = asyncio.run(LOOPS[kind](config, ids))
    print(json.dumps({"done": len(ids), "bytes": size}))


if __name__ == "__main__":
    main()
