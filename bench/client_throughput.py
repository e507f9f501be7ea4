"""Metadata requests/s through BirdClient vs a bare httpx loop, and pacing under a rate limit.

Run: ``.venv/bin/python -m bench.client_throughput [--requests 3000] [--concurrency 16]
[--rate 200]``. The simulator runs in its own process (the machine has two cores: one for
it, one for the client). Figures:

1. requests/s of a bare ``httpx.AsyncClient`` loop (default transport and aiohttp transport)
   and of :class:`BirdClient` (pacing, retries, error translation) at the same concurrency;
   the ratio client / bare loop on the same transport.
2. with the simulator limited to R requests/s and the client paced at R: achieved rate / R
   (target >= 0.95) and the share of 429 answers after the first second (target < 1%).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
from pydantic import SecretStr

from bench.sim_process import SimulatorProcess, simulator_process
from recarchive.bird.client import BirdClient
from recarchive.bird.http import build_http_client
from recarchive.bird.ratelimit import RequestPacer
from recarchive.bird.retry import RetryPolicy


async def _ids(sim: SimulatorProcess) -> list[str]:
    async with httpx.AsyncClient() as http:
        url = f"{sim.api_url}/workspaces/{sim.workspace_id}/recordings"
        headers = {"Authorization": f"AccessKey {sim.access_key}"}
        ids: list[str] = []
        token = None
        while True:
            params = {"limit": "99", **({"pageToken": token} if token else {})}
            body = (await http.get(url, params=params, headers=headers)).json()
            ids += [item["id"] for item in body["results"]]
            token = body.get("nextPageToken")
            if not token:
                return ids


async def _run(total: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Run ``call(i)`` for i < total with ``concurrency`` workers; return requests/s."""
    counter = iter(range(total))

    async def worker() -> None:
        for index in counter:
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def bare_loop(
    sim: SimulatorProcess, ids: list[str], total: int, concurrency: int, *, aiohttp: bool
) -> float:
    """Bare httpx GETs of recording metadata, no pacing, no retries."""
    http = build_http_client(max_connections=concurrency * 2, aiohttp=aiohttp)
    headers = {"Authorization": f"AccessKey {sim.access_key}"}
    base = f"{sim.api_url}/workspaces/{sim.workspace_id}/recordings/"
    try:

        async def call(index: int) -> object:
            response = await http.get(base + ids[index % len(ids)], headers=headers)
            response.raise_for_status()
            return response.json()

        await _run(min(200, total), concurrency, call)  # warm-up: connections
        return await _run(total, concurrency, call)
    finally:
        await http.aclose()


def _client(sim: SimulatorProcess, http: httpx.AsyncClient, rate: float) -> BirdClient:
    return BirdClient(
        http,
        api_url=sim.api_url,
        workspace_id=sim.workspace_id,
        access_key=SecretStr(sim.access_key),
        pacer=RequestPacer(rate),
        retry=RetryPolicy(),
    )


async def client_loop(
    sim: SimulatorProcess, ids: list[str], total: int, concurrency: int, *, aiohttp: bool
) -> float:
    """The same GETs through BirdClient (pacer set far above the achievable rate)."""
    http = build_http_client(max_connections=concurrency * 2, aiohttp=aiohttp)
    client = _client(sim, http, rate=1e6)
    try:

        async def call(index: int) -> object:
            return await client.get_recording(ids[index % len(ids)])

        await _run(min(200, total), concurrency, call)
        return await _run(total, concurrency, call)
    finally:
        await http.aclose()


async def paced_loop(
    sim: SimulatorProcess, ids: list[str], rate: float, seconds: float, concurrency: int
) -> tuple[float, float, int]:
    """Client paced at ``rate`` against a simulator limited to ``rate``.

    Returns:
        (achieved successful requests/s, share of 429s after the first second, requests)
    """
    http = build_http_client(max_connections=concurrency * 2)
    client = _client(sim, http, rate=rate)
    total = int(rate * seconds)
    limited_after_first_second = 0
    sent_after_first_second = 0
    started = time.perf_counter()
    original = http.request

    async def counting_request(*args: object, **kwargs: object) -> httpx.Response:
        nonlocal limited_after_first_second, sent_after_first_second
        response = await original(*args, **kwargs)  # type: ignore[arg-type]
        if time.perf_counter() - started > 1.0:
            sent_after_first_second += 1
            limited_after_first_second += response.status_code == 429
        return response

    http.request = counting_request  # type: ignore[method-assign]
    try:

        async def call(index: int) -> object:
            return await client.get_recording(ids[index % len(ids)])

        await _run(total, concurrency, call)
        elapsed = time.perf_counter() - started
    finally:
        await http.aclose()
    share = limited_after_first_second / max(1, sent_after_first_second)
    return total / elapsed, share, client.stats["requests"]


async def main() -> None:
    """Run every measurement and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with simulator_process(recordings=500) as sim:
        ids = await _ids(sim)
        print(f"metadata GETs: {args.requests} at concurrency {args.concurrency}")
        results = {}
        for aiohttp in (False, True):
            name = "aiohttp transport" if aiohttp else "httpx default transport"
            # Interleaved rounds, median of each: the machine's noise hits both sides alike.
            bares, ourss = [], []
            for _round in range(args.rounds):
                bares.append(
                    await bare_loop(sim, ids, args.requests, args.concurrency, aiohttp=aiohttp)
                )
                ourss.append(
                    await client_loop(sim, ids, args.requests, args.concurrency, aiohttp=aiohttp)
                )
            bare, ours = statistics.median(bares), statistics.median(ourss)
            results[name] = (bare, ours)
            print(
                f"  {name:24s} bare httpx loop {bare:8.0f} req/s   BirdClient {ours:8.0f} "
                f"req/s   ratio {ours / bare:.2f}  (median of {args.rounds} rounds)"
            )
        default_bare = results["httpx default transport"][0]
        ours = results["aiohttp transport"][1]
        print(f"  BirdClient (aiohttp) vs bare httpx default transport: {ours / default_bare:.2f}x")

    with simulator_process(recordings=500, rate_limit=args.rate) as sim:
        ids = await _ids(sim)
        await asyncio.sleep(1.5)  # let the listing's tokens refill
        achieved, share, sent = await paced_loop(
            sim, ids, args.rate, args.seconds, args.concurrency
        )
        print(
            f"rate limit R={args.rate:.0f}/s, client paced at R, {args.seconds:.0f}s: "
            f"achieved {achieved:.1f}/s = {achieved / args.rate:.3f} of R (target >= 0.95); "
            f"429s after the first second {share:.2%} of requests (target < 1%); "
            f"{sent} requests sent"
        )


if __name__ == "__main__":
    asyncio.run(main())
