"""`scripts/bench.py --jobs [--quick]`: what jobs cost (issue 16, SPEC §9), on each job store.

Everything on 127.0.0.1: the fake model of the main table (0 ms), `aiwfd serve`
(aiohttp transport) on scripts/bench/bench.yaml plus a `jobs:` section, API_KEY
set so that auth runs, once per store:

  sqlite   the embedded store: `--state-dir` a fresh directory (SQLite, WAL)
  redis    `--redis-url` a real loopback redis-server (aiwfd.testing.redisproc,
           no persistence), pinned with the fake and the load generator

and four measurements per store:

1. Submission throughput at c16: wrk (scripts/bench/post.lua) against
   `POST /agent/greeter/jobs` for a few seconds, and against `POST /agent/greeter`
   (a plain call) on the same instance, interleaved (plain, jobs, then the
   next run); the ratio divides the two medians. After each jobs cell the
   instance is left to run the backlog (jobs.concurrency 8) until no job is
   queued or running and every webhook arrived, so the next cell starts idle;
   the server's CPU from the first submission to the last webhook, per job,
   is "CPU per job, end to end" (the submission, the run, the webhook).
2. Webhook latency: a receiver in this script (aiohttp, in a thread) records
   when each delivery arrives; its latency is that time minus the job's
   `finished_at` in the delivered document (both this host's wall clock;
   `finished_at` has millisecond resolution). Measured twice: for every job of
   the throughput cells (deliveries made while the instance is saturated by
   submissions and the backlog), and for N jobs submitted one at a time, each
   after the previous one's webhook arrived (an idle instance: the number of
   the target, p50 ≤ 50 ms on loopback).
3. 10,000 queued jobs: a second instance per store (the held one), its own
   state directory (or Redis database), `jobs.concurrency: 1` and a fake
   model that answers after 10 minutes, so that the first job runs and every
   other stays queued, and its twin, configured the same, that holds BASE
   jobs only. BASE jobs in each, RSS of the held one; submissions with
   nothing running (wrk, c16, the same cell as the plain call's: the
   submission alone); an aiohttp client in this script tops the held store up
   to 10,000 queued; RSS again; then `GET /jobs/{id}` of the first and of the
   newest job and `GET /jobs?limit=20` (a full page) on both instances, c16
   (wrk with a GET script written to the work directory), `runs` times
   interleaved (so that the machine's noise falls on both), medians. The
   ratios divide the held instance's p99 by the twin's.

Targets: webhook p50 ≤ 50 ms (idle); RSS growth over 10,000 queued jobs
≤ RSS_GROWTH_MIB; `GET /jobs/{id}` p99 with 10,000 jobs ≤ GET_RATIO × the
p99 with one. Submission throughput has no target: the ratio is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import bench  # the running scripts/bench.py (it registers itself under this name)

BEGIN = "<!-- jobs:begin (written by scripts/bench.py --jobs) -->"
END = "<!-- jobs:end -->"

STORES = ("sqlite", "redis")
C = 16
QUEUED = 10_000
BASE = 20  # jobs in the held instance's store for the "few jobs" GET cells (a full page of GET /jobs?limit=20)
HELD_MS = 600_000  # the held instance's model answers after 10 minutes: its jobs stay queued
WEBHOOK_P50_MS = 50.0
RSS_GROWTH_MIB = 16.0
GET_RATIO = 1.5
SUBMIT_BODY = bench.GREETER_BODY
HEADERS = {"X-API-Key": bench.API_KEY, "Content-Type": "application/json"}
SECRET = "whsec_" + "YmVuY2gtam9icy1zZWNyZXQtMzItYnl0ZXMtbG9uZyE="  # a fixed bench secret (32 bytes)

GET_LUA = """-- written by scripts/bench_jobs.py: GET the URL with the headers given, one summary line at the end
wrk.method = "GET"
function init(args)
  for i = 1, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name then wrk.headers[name] = value end
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def jobs_config(webhook_url: str | None, concurrency: int) -> str:
    text = bench.CONFIG.read_text(encoding="utf-8")
    text += f"\njobs:\n  concurrency: {concurrency}\n"
    if webhook_url is not None:
        text += f"  webhook:\n    url: {webhook_url}\n    allow_private: true\n"
    return text


@dataclass
class JobsPlan:
    quick: bool
    runs: int
    duration: float
    paced: int  # jobs submitted one at a time for the idle webhook latency
    get_duration: float
    queued: int
    warmup: float


def plan_for(args: argparse.Namespace) -> JobsPlan:
    if args.quick:
        p = JobsPlan(True, 1, 2, 50, 2, QUEUED, 0)
    else:
        p = JobsPlan(False, 3, 5, 300, 5, QUEUED, 1)
    if args.runs:
        p.runs = args.runs
    if args.duration:
        p.duration = p.get_duration = args.duration
    return p


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ----------------------------------------------------------------------------- the webhook receiver


@dataclass
class Arrival:
    at: float  # time.time() when the request was read
    msg_id: str
    job_id: str
    finished_at: float
    created_at: float


class Receiver:
    """An aiohttp webhook receiver on 127.0.0.1 in a thread of its own: records, answers 200."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.bad = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the webhook receiver did not start")

    def _run(self, sock: Any) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            at = time.time()
            try:
                doc = json.loads(body)["data"]
                a = Arrival(at, request.headers.get("webhook-id", ""), doc["id"], parse_time(doc["finished_at"]),
                            parse_time(doc["created_at"]))
            except (ValueError, KeyError, TypeError):
                with self._cond:
                    self.bad += 1
                return web.Response(text="ok")
            with self._cond:
                self.arrivals.append(a)
                self._cond.notify_all()
            return web.Response(text="ok")

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/hook", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._stop = asyncio.Event()
            self._started.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
        self._loop.close()

    def count(self) -> int:
        with self._cond:
            return len(self.arrivals)

    def wait_for(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.arrivals) >= n, timeout)

    def since(self, i: int) -> list[Arrival]:
        with self._cond:
            return list(self.arrivals[i:])

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


# ----------------------------------------------------------------------------- HTTP helpers


def http_json(port: int, method: str, path: str, body: str | None = None, timeout: float = 30) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body.encode() if body is not None else None, headers=HEADERS)
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode(errors="replace")
    finally:
        conn.close()


def sys_seconds(pid: int) -> float:
    """stime of `pid` (/proc/PID/stat), the kernel's part of its CPU."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def http_text(port: int, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode(errors="replace")
    finally:
        conn.close()


def metric_sum(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(http_text(port, "/metrics")):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def open_jobs(port: int) -> int:
    """Whether a job is queued or running: 0, 1 or 2 (a page of one of each, cheap for the server)."""
    n = 0
    for status in ("queued", "running"):
        code, doc = http_json(port, "GET", f"/jobs?status={status}&limit=1")
        if code != 200:
            raise RuntimeError(f"GET /jobs?status={status}: {code} {doc}")
        n += len(doc["jobs"])
    return n


def count_jobs(port: int, status: str) -> int:
    """Every job of the client with this status (paged, 100 a page)."""
    n, cursor = 0, None
    while True:
        q = f"/jobs?status={status}&limit=100" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
        code, doc = http_json(port, "GET", q)
        if code != 200:
            raise RuntimeError(f"GET {q}: {code} {doc}")
        n += len(doc["jobs"])
        cursor = doc["next_cursor"]
        if not cursor:
            return n


async def submit_many(port: int, n: int, connections: int) -> dict[str, Any]:
    """n submissions, `connections` closed loops over keep-alive; the summary and the last id."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/agent/greeter/jobs"
    lat: list[float] = []
    errors = [0]
    first, last = [""], [""]
    left = [n]
    body = SUBMIT_BODY.encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                try:
                    async with s.post(url, data=body, headers=HEADERS) as r:
                        doc = await r.read()
                        if r.status != 202:
                            errors[0] += 1
                            continue
                        last[0] = json.loads(doc)["id"]
                        first[0] = first[0] or last[0]
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors[0] += 1
                    continue
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        seconds = time.perf_counter() - t0
    return {"ok": len(lat), "errors": errors[0], "seconds": seconds, "rps": n / seconds,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "first_id": first[0], "last_id": last[0]}


# ----------------------------------------------------------------------------- the bench


@dataclass
class Store:
    name: str
    args: list[str]
    proc: bench.Proc | None = None        # the measured instance (webhooks, concurrency 8)
    held: bench.Proc | None = None        # the 10k instance (concurrency 1, a 10-minute model)
    held_dir: Path | None = None          # its state directory (sqlite)
    twin: bench.Proc | None = None        # the same with BASE jobs only: the GET cells' baseline
    plain: list[bench.LoadResult] = field(default_factory=list)
    jobs: list[bench.LoadResult] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)     # 202s per jobs cell (/metrics)
    drain_s: list[float] = field(default_factory=list)      # from the end of the cell to the last webhook
    cpu_per_job_ms: list[float] = field(default_factory=list)
    sys_share: list[float] = field(default_factory=list)      # of that CPU, the kernel's (stime)
    loaded_latency_ms: list[float] = field(default_factory=list)
    idle_latency_ms: list[float] = field(default_factory=list)
    idle_e2e_ms: list[float] = field(default_factory=list)   # submission sent -> webhook arrived
    duplicates: int = 0
    values: dict[str, Any] = field(default_factory=dict)


class JobsBench:
    def __init__(self, procs: bench.Procs, loader: bench.Loader, plan: JobsPlan, log: Callable[[str], None]) -> None:
        self.procs, self.loader, self.plan, self.log = procs, loader, plan, log
        self.stores: list[Store] = []
        self.rx = Receiver()
        self.redis_version = ""
        self.notes: list[str] = []
        self.get_lua = procs.workdir / "get.lua"
        self.get_lua.write_text(GET_LUA, encoding="utf-8")

    def start_instance(self, name: str, config: Path, upstream: str, store_args: list[str]) -> bench.Proc:
        port = bench.free_port()
        env = bench.base_env()
        env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=upstream, API_KEY=bench.API_KEY,
                   AIWF_TRANSPORT="aiohttp", AIWF_WEBHOOK_SECRET=SECRET)
        argv = [sys.executable, "-m", "aiwfd", "serve", "-f", str(config), "-p", str(port), "--host", "127.0.0.1",
                "--shutdown-timeout", "2", *store_args]
        return self.procs.start(name, argv, cpu=None if self.procs.pin else bench.SERVER_CPU, env=env, port=port)

    def start(self, upstream: str, held_upstream: str, redis_url: str | None) -> None:
        wd = self.procs.workdir
        measured = wd / "jobs-measured.yaml"
        measured.write_text(jobs_config(self.rx.url, 8), encoding="utf-8")
        held = wd / "jobs-held.yaml"
        held.write_text(jobs_config(None, 1), encoding="utf-8")
        for name in STORES:
            if name == "redis" and redis_url is None:
                continue
            st = Store(name, [])
            if name == "sqlite":
                st.held_dir = wd / "state-held"
                args, held_args = ["--state-dir", str(wd / "state-measured")], ["--state-dir", str(st.held_dir)]
                twin_args = ["--state-dir", str(wd / "state-twin")]
            else:
                assert redis_url is not None
                base = redis_url.rsplit("/", 1)[0]
                args, held_args, twin_args = (["--redis-url", f"{base}/{db}"] for db in (0, 1, 2))
            st.args = args
            st.proc = self.start_instance(f"aiwfd-jobs-{name}", measured, upstream, args)
            st.held = self.start_instance(f"aiwfd-held-{name}", held, held_upstream, held_args)
            st.twin = self.start_instance(f"aiwfd-twin-{name}", held, held_upstream, twin_args)
            self.stores.append(st)
        for st in self.stores:
            for p in (st.proc, st.held, st.twin):
                assert p is not None
                bench.wait_health(p, p.port or 0, interval=0.02)
                if self.procs.pin:
                    bench.pin_threads(p.pid, bench.SERVER_CPU)

    # -- helpers

    def wait_drained(self, st: Store, expected: int, timeout: float = 300.0) -> float:
        """Until no job is queued or running and `expected` webhooks arrived in all; monotonic time."""
        assert st.proc is not None
        port = st.proc.port or 0
        deadline = time.monotonic() + timeout
        while True:
            if self.rx.count() >= expected and open_jobs(port) == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{st.name}: not drained within {timeout:g} s: {self.rx.count()} of {expected} "
                                   f"webhooks, {open_jobs(port)}+ open jobs\n{st.proc.tail()}")
            if not st.proc.alive():
                raise RuntimeError(f"{st.name} exited:\n{st.proc.tail()}")
            self.rx.wait_for(expected, 0.05)

    def accepted(self, st: Store) -> float:
        assert st.proc is not None
        return metric_sum(st.proc.port or 0, "aiwfd_http_requests_total", route="/agent/{name}/jobs", status="202")

    def get_load(self, url: str, duration: float, target: bench.Proc) -> bench.LoadResult:
        """wrk GET at c16 (the GET script), or the in-process fallback."""
        port = urllib.parse.urlsplit(url).port
        if port:
            bench.settle(port)
        cpu0 = target.cpu_seconds()
        if self.loader.kind == "wrk":
            secs = max(1, round(duration))
            argv = ["wrk", "-t1", f"-c{C}", f"-d{secs}s", "--timeout", "30s", "-s", str(self.get_lua), url, "--",
                    f"X-API-Key: {bench.API_KEY}"]
            out = self.loader._run(argv, secs + 60)
            m = re.search(r"WRK_JSON (\{.*\})", out)
            if not m:
                raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
            d = json.loads(m.group(1))
            seconds = d["duration_us"] / 1e6
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            res = bench.LoadResult(d["requests"], errors, d["requests"] / seconds, d["p50_us"] / 1000,
                                   d["p99_us"] / 1000, d["max_us"] / 1000, seconds, extra=d)
        else:
            res = asyncio.run(_get_python(url, duration))
        res.cpu_s = target.cpu_seconds() - cpu0
        return res

    def get_cells(self, cells: list[tuple[str, bench.Proc, str]]) -> dict[str, bench.LoadResult]:
        """Each (key, target, URL) `runs` times, interleaved; per key the median of each figure (errors summed)."""
        got: dict[str, list[bench.LoadResult]] = {k: [] for k, _, _ in cells}
        for _ in range(self.plan.runs):
            for key, target, url in cells:
                got[key].append(self.get_load(url, self.plan.get_duration, target))
        out = {}
        for key, rs in got.items():
            m = bench.LoadResult(sum(r.requests for r in rs), sum(r.errors for r in rs),
                                 median([r.rps for r in rs]), median([r.p50_ms for r in rs]),
                                 median([r.p99_ms for r in rs]), max(r.max_ms for r in rs), sum(r.seconds for r in rs),
                                 cpu_s=sum(r.cpu_s for r in rs))
            out[key] = m
        return out

    # -- 1 and 2: throughput, webhook latency under load

    def warm(self, st: Store) -> None:
        assert st.proc is not None
        port = st.proc.port or 0
        for _ in range(5 if self.plan.quick else 20):
            status, text = bench.http_post(port, "/agent/greeter", SUBMIT_BODY, {"X-API-Key": bench.API_KEY})
            if status != 200:
                raise RuntimeError(f"{st.name}: POST /agent/greeter answered {status}: {text[:300]!r}\n"
                                   f"{st.proc.tail()}")
        n0 = self.rx.count()
        for _ in range(5 if self.plan.quick else 20):
            status, text = bench.http_post(port, "/agent/greeter/jobs", SUBMIT_BODY, {"X-API-Key": bench.API_KEY})
            if status != 202:
                raise RuntimeError(f"{st.name}: POST /agent/greeter/jobs answered {status}: {text[:300]!r}\n"
                                   f"{st.proc.tail()}")
        self.wait_drained(st, n0 + (5 if self.plan.quick else 20), 60)
        if self.plan.warmup > 0:
            url = f"http://127.0.0.1:{port}/agent/greeter"
            self.loader.run(url, SUBMIT_BODY, C, self.plan.warmup, headers=[bench.AUTH_HEADER])

    def measure(self) -> None:
        url = "http://127.0.0.1:{}/agent/greeter{}"
        for run in range(self.plan.runs):
            for st in self.stores:
                assert st.proc is not None
                port = st.proc.port
                r = self.loader.run(url.format(port, ""), SUBMIT_BODY, C, self.plan.duration,
                                    headers=[bench.AUTH_HEADER], target=st.proc)
                st.plain.append(r)
                self.log(f"  run {run + 1}/{self.plan.runs} {st.name:<6} plain call   {r.rps:8.0f} req/s  "
                         f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  err {r.errors}  "
                         f"cpu {r.cpu_ms_per_req:.3f} ms/req")
                before = self.accepted(st)
                n0 = self.rx.count()
                bench.settle(port or 0)
                cpu0 = st.proc.cpu_seconds()
                sys0 = sys_seconds(st.proc.pid)
                r = self.loader.run(url.format(port, "/jobs"), SUBMIT_BODY, C, self.plan.duration,
                                    headers=[bench.AUTH_HEADER])
                ended = time.monotonic()
                accepted = self.accepted(st) - before
                done = self.wait_drained(st, n0 + int(accepted))
                cpu = st.proc.cpu_seconds() - cpu0
                st.sys_share.append((sys_seconds(st.proc.pid) - sys0) / cpu if cpu > 0 else float("nan"))
                arrivals = self.rx.since(n0)
                st.jobs.append(r)
                st.accepted.append(accepted)
                st.drain_s.append(done - ended)
                st.cpu_per_job_ms.append(cpu * 1000 / accepted if accepted else float("nan"))
                st.loaded_latency_ms += [(a.at - a.finished_at) * 1000 for a in arrivals]
                st.duplicates += len(arrivals) - len({a.msg_id for a in arrivals})
                self.log(f"  run {run + 1}/{self.plan.runs} {st.name:<6} job submit   {r.rps:8.0f} req/s  "
                         f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  err {r.errors}  "
                         f"{accepted:.0f} accepted, drained {done - ended:.1f} s later, "
                         f"{st.cpu_per_job_ms[-1]:.3f} CPU ms/job end to end; webhook latency p50 "
                         f"{pct(st.loaded_latency_ms[-len(arrivals):], 50):.1f} ms")
                bench.wait_idle(st.proc)

    def paced(self) -> None:
        """Jobs one at a time, each after the previous one's webhook arrived: latency on an idle instance."""
        for st in self.stores:
            assert st.proc is not None
            port = st.proc.port or 0
            for _ in range(self.plan.paced):
                n0 = self.rx.count()
                t0 = time.time()
                status, doc = http_json(port, "POST", "/agent/greeter/jobs", SUBMIT_BODY)
                if status != 202:
                    raise RuntimeError(f"{st.name}: submit answered {status}: {doc}")
                if not self.rx.wait_for(n0 + 1, 30):
                    raise RuntimeError(f"{st.name}: no webhook for job {doc['id']} within 30 s\n{st.proc.tail()}")
                a = self.rx.since(n0)[0]
                if a.job_id != doc["id"]:
                    raise RuntimeError(f"{st.name}: a webhook for {a.job_id}, expected {doc['id']}")
                st.idle_latency_ms.append((a.at - a.finished_at) * 1000)
                st.idle_e2e_ms.append((a.at - t0) * 1000)
                time.sleep(0.005)
            lat = st.idle_latency_ms
            self.log(f"  {st.name:<6} {len(lat)} jobs one at a time: job end -> webhook p50 {pct(lat, 50):.1f} ms, "
                     f"p99 {pct(lat, 99):.1f} ms; submission -> webhook p50 {pct(st.idle_e2e_ms, 50):.1f} ms")

    # -- 3: 10,000 queued jobs

    def queued(self, redis_url: str | None) -> None:
        for st in self.stores:
            assert st.held is not None and st.twin is not None
            v = st.values
            # BASE jobs in each: the first runs (its model call held for 10 minutes), the others wait; a
            # page of GET /jobs?limit=20 is as full as it will be with 10,000.
            ids = {}
            for proc in (st.held, st.twin):
                few = asyncio.run(submit_many(proc.port or 0, BASE, 1))
                if few["errors"]:
                    raise RuntimeError(f"{proc.name}: {few['errors']} of {BASE} submissions failed\n{proc.tail()}")
                ids[proc.name] = few["first_id"], few["last_id"]
            time.sleep(0.5)
            urls = {}
            for proc in (st.held, st.twin):
                base = f"http://127.0.0.1:{proc.port}"
                first, newest = ids[proc.name]
                urls[proc.name] = {"first": f"{base}/jobs/{first}", "list": f"{base}/jobs?limit=20"}
                for url in urls[proc.name].values():
                    self.get_load(url, 1, proc)  # warm-up, not counted
                bench.wait_idle(proc)
            held, port = st.held, st.held.port or 0
            v["rss0"] = held.status_kb("VmRSS")
            v["store0"] = self.store_size(st, redis_url)
            # Submissions alone: nothing runs meanwhile (concurrency 1, taken by the held job).
            before = metric_sum(port, "aiwfd_http_requests_total", route="/agent/{name}/jobs", status="202")
            v["alone"] = self.loader.run(f"http://127.0.0.1:{port}/agent/greeter/jobs", SUBMIT_BODY, C,
                                         self.plan.duration, headers=[bench.AUTH_HEADER], target=held)
            accepted = metric_sum(port, "aiwfd_http_requests_total", route="/agent/{name}/jobs", status="202")
            v["alone_accepted"] = accepted - before
            left = max(0, BASE + self.plan.queued - int(accepted))
            v["topup"] = asyncio.run(submit_many(port, left, C)) if left else None
            v["accepted"] = metric_sum(port, "aiwfd_http_requests_total", route="/agent/{name}/jobs", status="202")
            code, page = http_json(port, "GET", "/jobs?limit=1")
            urls[held.name]["newest"] = f"http://127.0.0.1:{port}/jobs/{page['jobs'][0]['id']}"
            urls[st.twin.name]["newest"] = f"http://127.0.0.1:{st.twin.port}/jobs/{ids[st.twin.name][1]}"
            bench.wait_idle(held)
            v["rss1"] = held.status_kb("VmRSS")
            cells = self.get_cells([(f"{kind}0", st.twin, urls[st.twin.name][kind]) for kind in ("first", "newest", "list")]
                                   + [(f"{kind}1", held, urls[held.name][kind]) for kind in ("first", "newest", "list")])
            v.update(cells)
            bench.wait_idle(held)
            v["rss2"] = held.status_kb("VmRSS")
            v["hwm"] = held.status_kb("VmHWM")
            v["store1"] = self.store_size(st, redis_url)
            v["queued"] = count_jobs(port, "queued")
            v["running"] = count_jobs(port, "running")
            a = v["alone"]
            self.log(f"  {st.name:<6} submissions alone (wrk c{C}): {a.rps:.0f} req/s p50 {a.p50_ms:.2f} ms "
                     f"p99 {a.p99_ms:.2f} ms err {a.errors}, {v['alone_accepted']:.0f} accepted; topped up with "
                     f"{left}; RSS {v['rss0'] / 1024:.1f} -> {v['rss1'] / 1024:.1f} -> {v['rss2'] / 1024:.1f} MiB; "
                     f"GET /jobs/{{id}} p99 {v['first0'].p99_ms:.2f} vs {v['first1'].p99_ms:.2f} (newest "
                     f"{v['newest0'].p99_ms:.2f} vs {v['newest1'].p99_ms:.2f}) ms; {v['queued']} queued, "
                     f"{v['running']} running")

    def store_size(self, st: Store, redis_url: str | None) -> str:
        if st.name == "sqlite":
            d = st.held_dir
            if d is None:
                return "?"
            total = sum(p.stat().st_size for p in d.glob("jobs.sqlite3*") if p.is_file())
            return f"{total / 1024 / 1024:.1f} MiB on disk (jobs.sqlite3 + -wal + -shm)"
        if redis_url is None:
            return "?"
        import redis as redis_py

        client = redis_py.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/1")
        try:
            info = client.info("memory")
            keys = client.dbsize()
        finally:
            client.close()
        return f"Redis used_memory {int(info['used_memory']) / 1024 / 1024:.1f} MiB ({keys} keys in db 1)"


async def _get_python(url: str, duration: float) -> bench.LoadResult:
    import aiohttp

    lat: list[float] = []
    errors = [0]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=C)) as s:
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    async with s.get(url, headers={"X-API-Key": bench.API_KEY}) as r:
                        await r.read()
                        if r.status != 200:
                            errors[0] += 1
                            continue
                except aiohttp.ClientError:
                    errors[0] += 1
                    continue
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(C)))
        seconds = time.perf_counter() - t0
    n = len(lat) + errors[0]
    return bench.LoadResult(n, errors[0], n / seconds, pct(lat, 50) * 1000, pct(lat, 99) * 1000,
                            max(lat, default=0) * 1000, seconds)


# ----------------------------------------------------------------------------- the report


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return fmt.format(v)


def report(jb: JobsBench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    p = jb.plan
    names = [st.name for st in jb.stores]
    rows: list[tuple[str, list[str]]] = []
    targets: list[tuple[str, str, str, bool | None]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    def med(rs: list[bench.LoadResult], key: str) -> float:
        return median([getattr(r, key) for r in rs])

    def pair(a: float, b: float, fmt: str = "{:.2f}") -> str:
        return f"{_f(a, fmt)} / {_f(b, fmt)}"

    def load_cell(r: bench.LoadResult | None) -> str:
        return "—" if r is None else \
            f"{r.rps:.0f} req/s, p50 {r.p50_ms:.2f}, p99 {r.p99_ms:.2f} ms, {r.cpu_ms_per_req:.3f} CPU ms/req, " \
            f"err {r.errors}"

    def held(st: Store, key: str) -> Any:
        return st.values.get(key)

    row(f"plain `POST /agent/greeter` c{C}: req/s", [_f(med(st.plain, "rps"), "{:.0f}") for st in jb.stores])
    row("plain call: p50 / p99 ms", [pair(med(st.plain, "p50_ms"), med(st.plain, "p99_ms")) for st in jb.stores])
    row("plain call: server CPU ms/req", [_f(med(st.plain, "cpu_ms_per_req"), "{:.3f}") for st in jb.stores])
    row(f"job submission `POST /agent/greeter/jobs` c{C}, the jobs running meanwhile: req/s",
        [_f(med(st.jobs, "rps"), "{:.0f}") for st in jb.stores])
    row("… p50 / p99 ms", [pair(med(st.jobs, "p50_ms"), med(st.jobs, "p99_ms")) for st in jb.stores])
    row("… jobs accepted per cell (202s, /metrics)", [_f(median(st.accepted), "{:.0f}") for st in jb.stores])
    row("… the backlog run after the cell: seconds to its last webhook", [_f(median(st.drain_s), "{:.1f}")
                                                                        for st in jb.stores])
    row("… server CPU ms per job, end to end (submission, run, webhook); the kernel's share",
        [f"{_f(median(st.cpu_per_job_ms), '{:.3f}')}; {_f(median(st.sys_share), '{:.0%}')}" for st in jb.stores])
    row(f"job submission c{C}, nothing running (the held instance): req/s",
        [_f(getattr(held(st, "alone"), "rps", None), "{:.0f}") for st in jb.stores])
    row("… p50 / p99 ms", [pair(getattr(held(st, "alone"), "p50_ms", None), getattr(held(st, "alone"), "p99_ms", None))
                           for st in jb.stores])
    row("… server CPU ms per submission", [_f(getattr(held(st, "alone"), "cpu_ms_per_req", None), "{:.3f}")
                                          for st in jb.stores])
    row("webhook latency under load (every job of the cells above): p50 / p99 ms",
        [pair(pct(st.loaded_latency_ms, 50), pct(st.loaded_latency_ms, 99), "{:.1f}") for st in jb.stores])
    row(f"webhook latency, idle ({p.paced} jobs one at a time): p50 / p99 ms",
        [pair(pct(st.idle_latency_ms, 50), pct(st.idle_latency_ms, 99), "{:.1f}") for st in jb.stores])
    row("… submission sent → webhook arrived: p50 / p99 ms",
        [pair(pct(st.idle_e2e_ms, 50), pct(st.idle_e2e_ms, 99), "{:.1f}") for st in jb.stores])
    row("webhooks received / duplicate webhook-ids",
        [f"{sum(1 for _ in st.loaded_latency_ms) + len(st.idle_latency_ms)} / {st.duplicates}" for st in jb.stores])

    def opened(st: Store) -> str:
        v = st.values
        return "—" if "queued" not in v else f"{v['queued']:,} / {v['running']}"

    row("held instance: jobs queued / running when measured", [opened(st) for st in jb.stores])
    row(f"… top-up to {p.queued:,} (aiohttp client, c{C}): jobs, req/s, p99 ms, failed",
        ["—" if held(st, "topup") is None else
         f"{held(st, 'topup')['ok']:,}, {held(st, 'topup')['rps']:.0f}, {held(st, 'topup')['p99_ms']:.1f}, "
         f"{held(st, 'topup')['errors']}" for st in jb.stores])
    row(f"… RSS MiB: {BASE} jobs → ≥ {p.queued:,} queued → after the GET cells (VmHWM)",
        ["—" if "rss0" not in st.values else
         f"{st.values['rss0'] / 1024:.1f} → {st.values['rss1'] / 1024:.1f} → {st.values['rss2'] / 1024:.1f} "
         f"({st.values['hwm'] / 1024:.1f})" for st in jb.stores])
    row(f"… the store: {BASE} jobs → ≥ {p.queued:,}", [f"{held(st, 'store0') or '?'} → {held(st, 'store1') or '?'}"
                                                    for st in jb.stores])
    for key, label in (("first0", f"`GET /jobs/{{id}}` c{C}, {BASE} jobs (twin; the first, running)"),
                       ("first1", f"`GET /jobs/{{id}}` c{C}, ≥ {p.queued:,} queued (the first, running)"),
                       ("newest0", f"`GET /jobs/{{id}}` c{C}, {BASE} jobs (twin; the newest)"),
                       ("newest1", f"`GET /jobs/{{id}}` c{C}, ≥ {p.queued:,} queued (the newest)"),
                       ("list0", f"`GET /jobs?limit=20` c{C}, {BASE} jobs (twin)"),
                       ("list1", f"`GET /jobs?limit=20` c{C}, ≥ {p.queued:,} queued")):
        row(label, [load_cell(held(st, key)) for st in jb.stores])

    for st in jb.stores:
        a = med(st.plain, "rps")
        b = med(st.jobs, "rps")
        targets.append((f"{st.name}: job submissions (jobs running meanwhile) ÷ plain calls, req/s c{C}",
                        _f(b / a if a else None, "{:.2f}×"), "", None))
        alone = held(st, "alone")
        if alone is not None:
            targets.append((f"{st.name}: job submissions (nothing running) ÷ plain calls, req/s c{C}",
                            _f(alone.rps / a if a else None, "{:.2f}×"), "", None))
            pa = med(st.plain, "p99_ms")
            targets.append((f"{st.name}: job submission p99 (nothing running) ÷ plain call p99, c{C}",
                            _f(alone.p99_ms / pa if pa else None, "{:.2f}×"), "", None))
            ca = med(st.plain, "cpu_ms_per_req")
            targets.append((f"{st.name}: server CPU per submission (nothing running) ÷ per plain call",
                            _f(alone.cpu_ms_per_req / ca if ca else None, "{:.2f}×"), "", None))
        a, b = med(st.plain, "cpu_ms_per_req"), median(st.cpu_per_job_ms)
        targets.append((f"{st.name}: server CPU of a job end to end ÷ a plain call's",
                        _f(b / a if a else None, "{:.2f}×"), "", None))
        p50 = pct(st.idle_latency_ms, 50)
        targets.append((f"{st.name}: webhook p50, job end → arrival, idle loopback", _f(p50, "{:.1f} ms"),
                        f"≤ {WEBHOOK_P50_MS:g} ms", p50 <= WEBHOOK_P50_MS))
        v = st.values
        if "rss2" in v:
            growth = (max(v["rss1"], v["rss2"]) - v["rss0"]) / 1024
            n = v["queued"]
            targets.append((f"{st.name}: RSS growth, {BASE} → {n:,} queued jobs", f"{growth:+.1f} MiB",
                            f"≤ {RSS_GROWTH_MIB:g} MiB", growth <= RSS_GROWTH_MIB))
            for before, after, what in (("first0", "first1", "the first job"), ("newest0", "newest1", "the newest")):
                r = v[after].p99_ms / v[before].p99_ms if v[before].p99_ms else float("nan")
                targets.append((f"{st.name}: `GET /jobs/{{id}}` p99 with {n:,} queued ÷ with {BASE} ({what})",
                                _f(r, "{:.2f}×"), f"≤ {GET_RATIO:g}×", r <= GET_RATIO))
            r = v["list1"].p99_ms / v["list0"].p99_ms if v["list0"].p99_ms else float("nan")
            targets.append((f"{st.name}: `GET /jobs?limit=20` p99 with {n:,} queued ÷ with {BASE}", _f(r, "{:.2f}×"),
                            "", None))
            topup_err = v["topup"]["errors"] if v["topup"] else 0
            errs = topup_err + v["alone"].errors + sum(v[k].errors for k in ("first0", "newest0", "first1", "newest1",
                                                                           "list0", "list1"))
            total = int(v["accepted"])
            ok = errs == 0 and v["queued"] + v["running"] == total and n >= p.queued
            targets.append((f"{st.name}: held instance: failed requests; jobs open = jobs accepted (≥ {p.queued:,} "
                            "queued)", f"{errs}; {v['queued'] + v['running']:,} = {total:,}", "0; equal", ok))
        errs = sum(r.errors for r in st.plain + st.jobs)
        targets.append((f"{st.name}: failed requests in the throughput cells; duplicate webhooks",
                        f"{errs}; {st.duplicates}", "0; 0", errs == 0 and st.duplicates == 0))
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    t = ["| row | value | target | verdict |", "|---|---:|---|---|"]
    verdicts: list[tuple[str, bool]] = []
    for label, value, target, ok in targets:
        t.append(f"| {label} | {value} | {target} | {'' if ok is None else ('PASS' if ok else 'FAIL')} |")
        if ok is not None:
            verdicts.append((label, ok))
    out = [
        f"## Jobs: latest run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run: {p.runs} run(s) of {p.duration:g} s per "
        f"throughput cell at c{C}, median per cell; {p.paced} paced jobs; {p.queued:,} queued jobs, GET cells of "
        f"{p.get_duration:g} s; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- stores: sqlite (`--state-dir`, a fresh directory), redis (`--redis-url`, redis-server "
        f"{jb.redis_version or '?'}, aiwfd.testing.redisproc: loopback, no persistence, on CPU {bench.LOAD_CPU})",
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine: numbers are noisy)",
        "",
        *lines,
        "",
        *t,
        "",
        "Notes:",
        "- `aiwfd serve` (aiohttp transport) on scripts/bench/bench.yaml plus `jobs: {concurrency: 8, webhook: "
        "{url: <the receiver>, allow_private: true}}`, API_KEY set, the greeter against the 0 ms fake; one "
        "instance per store on the server CPU, measured interleaved (plain, jobs, per run and store).",
        "- 'the jobs running meanwhile': the instance starts running the jobs as they come (8 at once) on the "
        "same CPU, so submissions share it with the runs and the webhooks (what a client submitting as fast as "
        "it can gets while the instance works). Each cell's backlog is run to its last webhook before the next "
        "cell; 'CPU per job end to end' is the server's user+sys from the first submission to the last "
        "webhook ÷ jobs accepted. 'nothing running': wrk against the held instance below, whose one job slot "
        "is taken, so a submission is all it does (the same wrk and post.lua as the plain cell).",
        "- the plain call does not touch the job store: its two columns measure the same thing, and the gap "
        "between them is the machine's noise (other work shares it). The CPU figures (ms/req, from /proc) are "
        "the ones to compare; req/s and p99 move with the load average.",
        "- webhook latency = arrival at the receiver (time.time(), a thread of this script on CPU "
        f"{bench.LOAD_CPU}) − the delivered document's `finished_at` (ms resolution, the instance's clock for "
        "SQLite, Redis's TIME for Redis: one host). Under load: every delivery of the throughput cells. Idle: "
        "one job at a time, the next submitted 5 ms after the previous webhook arrived.",
        f"- queued jobs: a second instance per store (the held one: its own state directory, or Redis database "
        f"1), `jobs.concurrency: 1`, its model a fake answering after {HELD_MS // 60000} minutes: the first job "
        f"runs, every other stays queued; and its twin (the same, state directory of its own or database 2) "
        f"holding {BASE} jobs, the baseline. {BASE} jobs in each and 1 s of each GET first (warm-up), then RSS, "
        f"the 'nothing running' wrk cell and an aiohttp client topping the held store up to {p.queued:,} "
        "queued, RSS again, then the GET cells of both, interleaved (twin, held, per run), medians; RSS is "
        "VmRSS of the held instance (/proc), read once its CPU is idle. GET cells: wrk with a GET script "
        f"written to the work directory (aiohttp when wrk is missing), c{C}; 'CPU ms/req' is the instance's.",
        f"- on this 2-CPU machine redis-server shares CPU {bench.LOAD_CPU} with wrk and the fake: a Redis "
        "cell whose CPU ms/req is below 1000 ÷ its req/s waited for Redis (on another host it would not share "
        "the load generator's CPU).",
        *[f"- {n}" for n in jb.notes],
    ]
    if verdicts:
        failed = [label for label, ok in verdicts if not ok]
        out += ["", f"Targets: {sum(ok for _, ok in verdicts)}/{len(verdicts)} PASS"
                + (f"; FAIL: {'; '.join(failed)}" if failed else "")]
    return "\n".join(out) + "\n"


def run(procs: bench.Procs, args: argparse.Namespace, log: Callable[[str], None], command: str,
        machine: list[str], loadavg_before: str, began: float) -> str:
    """The whole --jobs mode; returns the report (bench.py prints and writes it)."""
    from aiwfd.testing.redisproc import REDIS_SERVER, RedisServer

    loader = bench.Loader(procs, args.loader)
    jb = JobsBench(procs, loader, plan_for(args), log)
    _, upstream = bench.start_fake(procs, 0)
    _, held_upstream = bench.start_fake(procs, HELD_MS)
    jb.rx.start()
    redis: RedisServer | None = None
    try:
        if Path(REDIS_SERVER).exists():
            redis = RedisServer()
            redis.start()
            assert redis.proc is not None
            if procs.pin:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(redis.proc.pid, {bench.LOAD_CPU})
            out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"v=(\S+)", out)
            jb.redis_version = m.group(1) if m else ""
        else:
            jb.notes.append("redis-server is not installed: the redis column is missing")
        redis_url = redis.url if redis is not None else None
        jb.start(upstream, held_upstream, redis_url)
        log(f"stores: {', '.join(st.name for st in jb.stores)}; receiver port {jb.rx.port}; loader {loader.kind}")
        for st in jb.stores:
            jb.warm(st)
        log(f"[1/3] plain calls and job submissions, c{C}, {jb.plan.runs} run(s) of {jb.plan.duration:g} s, "
            "interleaved; each backlog run to its last webhook")
        jb.measure()
        log(f"[2/3] webhook latency: {jb.plan.paced} jobs one at a time per store")
        jb.paced()
        log(f"[3/3] {jb.plan.queued:,} queued jobs on the held instances")
        jb.queued(redis_url)
        procs.stop_many([p for st in jb.stores for p in (st.proc, st.held, st.twin) if p is not None])
    finally:
        jb.rx.stop()
        if redis is not None:
            redis.__exit__(None, None, None)
    return report(jb, machine, command, time.monotonic() - began, (loadavg_before, bench._loadavg()))
