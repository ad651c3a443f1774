"""The SSE client of `scripts/bench.py --stream`: N streams, C at a time, each read to its end.

    python scripts/bench_stream_load.py --url http://127.0.0.1:8080/agent/stream_4k/stream \
        --body '{"topic":"x"}' -n 100 -c 100 --expect answer.json [-H 'X-API-Key: k']

Each stream is read as it arrives and counted: body bytes, the time from
sending the request to the end of the first `delta` event, and the events by
name. A stream is complete when it answered 200, its `delta` texts joined are
the expected answer, and it ended with a `result` whose data is the expected
answer (aiwfd: `{"data": <the parsed answer>}`; the stream-raw forwarder:
`{"text": <the answer>}`); anything else is a failure, counted by kind. Only
the `delta` and `result` events are parsed, so that reading today's full
`partial` snapshots costs this client little. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Stream:
    size: int = 0  # body bytes read
    ttfd: float | None = None  # seconds to the first delta
    events: Counter[str] = field(default_factory=Counter)
    deltas: list[bytes] = field(default_factory=list)
    result: bytes | None = None
    error: bytes | None = None


def read_events(s: Stream, block: bytes, t0: float) -> None:
    """Count the complete events of `block` (events separated by a blank line)."""
    for ev in block.split(b"\n\n"):
        if not ev.startswith(b"event: "):
            continue  # a `: keep-alive` comment
        nl = ev.find(b"\n")
        name = ev[7:nl].decode()
        s.events[name] += 1
        if name == "delta":
            if s.ttfd is None:
                s.ttfd = time.perf_counter() - t0
            s.deltas.append(ev[nl + 7:])
        elif name == "result":
            s.result = ev[nl + 7:]
        elif name == "error":
            s.error = ev[nl + 7:]


def verdict(s: Stream, answer: str, expected: Any) -> str | None:
    """None when the stream is complete and right, else what is wrong."""
    if s.result is None:
        if s.error is not None:  # the §3.1 shape: {"error": {"type", …}}
            return "error:" + str((json.loads(s.error).get("error") or {}).get("type"))
        return "no_result"
    if "".join(json.loads(d)["text"] for d in s.deltas) != answer:
        return "wrong_deltas"
    doc = json.loads(s.result)
    if not (doc.get("data") == expected if "data" in doc else doc.get("text") == answer):
        return "wrong_result"
    return None


async def run(url: str, body: bytes, n: int, c: int, headers: dict[str, str], answer: str,
              timeout: float) -> dict[str, Any]:
    expected = json.loads(answer)
    hdrs = {"Content-Type": "application/json", **headers}
    done: list[Stream] = []
    failures: Counter[str] = Counter()
    quota = [n]
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one() -> None:
            s = Stream()
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=hdrs) as r:
                    if r.status != 200:
                        failures[f"status_{r.status}"] += 1
                        return
                    pending = b""
                    async for chunk in r.content.iter_any():
                        s.size += len(chunk)
                        buf = pending + chunk
                        end = buf.rfind(b"\n\n")
                        if end < 0:
                            pending = buf
                            continue
                        read_events(s, buf[:end], t0)
                        pending = buf[end + 2:]
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                failures[type(e).__name__] += 1
                return
            wrong = verdict(s, answer, expected)
            if wrong:
                failures[wrong] += 1
            else:
                done.append(s)

        async def worker() -> None:
            while quota[0] > 0:
                quota[0] -= 1
                await one()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        elapsed = time.perf_counter() - started
    events: Counter[str] = Counter()
    for s in done:
        events.update(s.events)
    return {
        "streams": n,
        "ok": len(done),
        "failed": n - len(done),
        "failures": dict(failures),
        "seconds": round(elapsed, 4),
        "bytes": [s.size for s in done],
        "ttfd_ms": [round((s.ttfd or 0.0) * 1000, 4) for s in done],
        "events": dict(events),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="the JSON request body")
    p.add_argument("-n", "--streams", type=int, default=1)
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("--expect", required=True, help="file holding the answer the model streams")
    p.add_argument("--timeout", type=float, default=120.0, help="per-stream timeout in seconds")
    args = p.parse_args(argv)
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    with open(args.expect, encoding="utf-8") as f:
        answer = f.read()
    coro = run(args.url, args.body.encode(), args.streams, args.concurrency, headers, answer, args.timeout)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
