"""A closed-loop HTTP load generator on aiohttp (the benchmark's fallback for wrk).

    python scripts/bench_load.py --url http://127.0.0.1:8080/agent/greeter \
        --body '{"name": "Alice"}' -c 64 -d 10 [-H 'X-API-Key: k'] [--warmup 1]

N connections, each sending its next request as soon as the previous answer
has been read, for a duration. Prints one JSON line on stdout:
`{"requests", "ok", "errors", "rps", "p50_ms", "p99_ms", "max_ms", "max_inflight", ...}` —
percentiles from every request's latency, an error being a non-200 answer, a
connection error or a timeout. `--requests N` stops after N requests instead
(each connection sends its share), for "all of them succeed" checks.
SIGTERM or SIGINT ends a run early, and the summary is still printed.
Traffic goes where --url says; the benchmark only ever points it at 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections import Counter
from typing import Any

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


async def run_load(url: str, body: bytes, connections: int, duration: float | None = None,
                   headers: dict[str, str] | None = None, requests: int | None = None,
                   timeout: float = 60.0, warmup: float = 0.0) -> dict[str, Any]:
    """Drive `url` with `connections` closed loops; returns the summary dict."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    counting = warmup <= 0
    inflight = [0, 0]  # now, most at once
    quota = [requests] if requests is not None else None

    # SIGTERM/SIGINT end the run early: requests under way finish, the summary is printed.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopping.set)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        async def one() -> None:
            t0 = time.perf_counter()
            inflight[0] += 1
            if inflight[0] > inflight[1]:
                inflight[1] = inflight[0]
            try:
                async with session.post(url, data=body, headers=hdrs) as r:
                    await r.read()
                    status = r.status
            except asyncio.TimeoutError:
                if counting:
                    errors["timeout"] += 1
                return
            except aiohttp.ClientError as e:
                if counting:
                    errors[type(e).__name__] += 1
                return
            finally:
                inflight[0] -= 1
            if not counting:
                return
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[f"status_{status}"] += 1

        async def worker(stop_at: float) -> None:
            while not stopping.is_set():
                if quota is not None:
                    if quota[0] <= 0:
                        return
                    quota[0] -= 1
                elif time.perf_counter() >= stop_at:
                    return
                await one()

        if warmup > 0:
            await asyncio.gather(*(worker(time.perf_counter() + warmup) for _ in range(connections)))
            counting = True
        started = time.perf_counter()
        stop_at = started + (duration if duration is not None else 1e9)
        await asyncio.gather(*(worker(stop_at) for _ in range(connections)))
        elapsed = time.perf_counter() - started

    latencies.sort()
    n_err = sum(errors.values())
    total = len(latencies) + n_err
    return {
        "requests": total,
        "ok": len(latencies),
        "errors": n_err,
        "error_kinds": dict(errors),
        "seconds": round(elapsed, 3),
        "rps": round(total / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "max_ms": round((latencies[-1] if latencies else 0.0) * 1000, 3),
        "connections": connections,
        "max_inflight": inflight[1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="the JSON request body")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds (ignored with --requests)")
    p.add_argument("-n", "--requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of uncounted load first")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    coro = run_load(args.url, args.body.encode(), args.connections,
                    None if args.requests is not None else args.duration,
                    headers, args.requests, args.timeout, args.warmup)
    result: dict[str, Any]
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            result = asyncio.run(coro)
        else:
            result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
