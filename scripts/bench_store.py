#!/usr/bin/env python3
"""The rate-limit store's cost per agent call: one admit + one finish for the
five limits of a typical call (the client's requests, tokens and concurrency,
the agent's requests and tokens), in memory and on loopback Redis, one caller
after another and 16 at once. A Redis PING is the floor of one round trip.

    python3 scripts/bench_store.py [--calls 20000] [--redis-url redis://...]

Without --redis-url (or REDIS_URL) it starts its own redis-server
(aiwfd.testing.redisproc). Quotas are generous: nothing is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiwfd.store.limits import Limit, Store, open_store  # noqa: E402
from aiwfd.testing.redisproc import RedisServer  # noqa: E402

LIMITS = [
    Limit("requests", "client", "bench", 10**12, 60.0),
    Limit("tokens", "client", "bench", 10**15, 60.0),
    Limit("concurrency", "client", "bench", 10**6, 0.0),
    Limit("requests", "agent", "greeter", 10**12, 60.0),
    Limit("tokens", "agent", "greeter", 10**15, 60.0),
]


async def one_call(store: Store) -> None:
    adm = await store.admit(LIMITS)
    assert adm.allowed, adm
    await store.finish(adm.lease, LIMITS, 250)


async def run(op: Callable[[], Awaitable[None]], calls: int, callers: int) -> float:
    """µs of wall time per operation, `callers` of them at once."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await op()

    for _ in range(min(calls // 10, 1000)):  # warm up: connections, the script cached
        await op()
    started = time.perf_counter()
    await asyncio.gather(*(worker(calls // callers) for _ in range(callers)))
    return (time.perf_counter() - started) / (calls // callers * callers) * 1e6


async def script_us(redis_url: str) -> float:
    """The scripts' mean run time inside Redis (INFO commandstats): what one
    call costs Redis itself, the part that does not scale with instances."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


async def bench(redis_url: str, calls: int) -> list[tuple[str, int, float]]:
    rows: list[tuple[str, int, float]] = []
    memory = open_store(None)
    for callers in (1, 16):
        rows.append(("memory admit+finish", callers, await run(lambda: one_call(memory), calls * 5, callers)))
    redis = open_store(redis_url)
    try:
        for callers in (1, 16):
            rows.append(("redis admit+finish", callers, await run(lambda: one_call(redis), calls, callers)))
        for callers in (1, 16):
            rows.append(("redis PING (one round trip)", callers, await run(redis.ping, calls, callers)))
        rows.append(("in Redis: one script (mean)", 0, await script_us(redis_url)))
    finally:
        await redis.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per Redis row (memory rows: 5x)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--no-uvloop", action="store_true", help="the asyncio loop instead of uvloop")
    args = parser.parse_args()
    loop = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()  # what `aiwfd serve` runs on when it is installed
            loop = "uvloop"
        except ImportError:
            pass
    if args.redis_url:
        rows = asyncio.run(bench(args.redis_url, args.calls))
    else:
        with RedisServer() as server:
            rows = asyncio.run(bench(server.url, args.calls))
    print(f"5 limits per call (client requests+tokens+concurrency, agent requests+tokens); "
          f"Python {sys.version.split()[0]}, {loop}")
    print(f"{'':30} {'callers':>7} {'µs/call':>9} {'calls/s':>9}")
    for what, callers, us in rows:
        print(f"{what:30} {callers or '':>7} {us:>9.1f} {1e6 / us if us else 0:>9.0f}")


if __name__ == "__main__":
    main()
