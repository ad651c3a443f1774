"""The Redis store's client-side CPU per agent call, in one process (run by scripts/bench.py --limits).

    python scripts/bench/store_cpu.py REDIS_URL CALLS      # prints one JSON line

16 and 256 callers at once on uvloop, process CPU time per operation: aiwfd's
RedisStore admit+finish for the five limits of scripts/bench_store.py, the
admit alone, bare EVALSHAs of a one-line script (what redis-py costs for the
admit's arguments, as they are and packed into one), and PING (the floor of
one round trip). Whether redis-py uses hiredis is up to this process's
PYTHONPATH (bench.py runs it with hiredis hidden and, when it has it, with).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

CONCURRENCIES = (16, 256)
STORE_CASES = ("admit+finish (aiwfd's RedisStore)", "admit only (no finish)",
               "EVALSHA of a 1-line script, the admit's 5 keys + 19 args", "the same, the 19 args packed in one",
               "PING (one round trip)")


async def _store_cpu(url: str, calls: int) -> dict[str, dict[int, float]]:
    import redis as _unused  # noqa: F401  (the import decides hiredis)
    from bench_store import LIMITS

    from aiwfd.store.limits import open_store

    store = open_store(url)
    client = store._client  # the benchmark reaches in: the same client, its pool and its parser
    sha = await client.script_load("return 0")
    keys = [store._key(lim) for lim in LIMITS]
    args: list[Any] = [1, 1, 150_000_000, "0123456789abcdef"]
    for lim in LIMITS:
        args += ({"requests": "r", "tokens": "t", "concurrency": "c"}[lim.kind], lim.quota, lim.width_us)
    bkeys, packed = [k.encode() for k in keys], ",".join(str(a) for a in args).encode()

    async def full() -> None:
        adm = await store.admit(LIMITS)
        await store.finish(adm.lease, LIMITS, 250)

    ops = [full, lambda: store.admit(LIMITS), lambda: client.evalsha(sha, len(keys), *keys, *args),
           lambda: client.evalsha(sha, len(bkeys), *bkeys, packed), client.ping]
    out: dict[str, dict[int, float]] = {}
    try:
        for callers in CONCURRENCIES:
            for name, op in zip(STORE_CASES, ops, strict=True):
                async def worker(n: int, op: Any = op) -> None:
                    for _ in range(n):
                        await op()

                await worker(200)
                t0 = time.process_time()
                await asyncio.gather(*(worker(calls // callers) for _ in range(callers)))
                out.setdefault(name, {})[callers] = (time.process_time() - t0) / (calls // callers * callers) * 1e6
    finally:
        await store.close()
    return out


def store_cpu_child(url: str, calls: int) -> None:
    scripts = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(scripts))  # bench_store
    sys.path.insert(0, str(scripts.parent))  # aiwfd, unless PYTHONPATH names another tree
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()  # what `aiwfd serve` runs on
    import redis.utils

    res = asyncio.run(_store_cpu(url, calls))
    print(json.dumps({"hiredis": bool(redis.utils.HIREDIS_AVAILABLE), "cpu_us": res}))


if __name__ == "__main__":
    store_cpu_child(sys.argv[1], int(sys.argv[2]))
