"""Benchmark aiwfd's hot path against the least code that does the same job (issue #5).

    python scripts/bench.py                 # full run (a few minutes), writes BENCHMARKS.md
    python scripts/bench.py --quick         # < 1 minute, 1 run each; prints, writes only with --write
    python scripts/bench.py --lean-survey   # which use of the openai SDK is cheapest (picks sdk-lean)
    python scripts/bench.py --profile       # py-spy on aiwfd under load: where its CPU goes
    python scripts/bench.py --stream [--quick]  # /agent/{name}/stream vs a raw SSE forwarder (bench_stream.py)
    python scripts/bench.py --limits [--quick]  # limits (memory, Redis) and JWT vs no limits (bench_limits.py)
    python scripts/bench.py --jobs [--quick]    # jobs on SQLite and Redis: submissions, webhooks, 10k queued (bench_jobs.py)
    python scripts/bench.py --otel [--quick]    # tracing on (OTLP/HTTP to a loopback receiver) vs off (bench_otel.py)
    python scripts/bench.py --compat [--quick]  # MCP tools/call and /v1/chat/completions vs /agent/{name} (bench_compat.py)

Everything runs on 127.0.0.1: a fake OpenAI-compatible server
(aiwfd.testing.fakeopenai, uvloop, no records), the reference forwarders
(scripts/bench_refs.py: raw aiohttp, the leanest SDK call, the SDK's default
call) and `aiwfd serve` on scripts/bench/bench.yaml (OPENAI_BASE_URL at the
fake, OPENAI_API_KEY=sk-bench, API_KEY set so that auth runs; AIWF_TRANSPORT
picks aiwfd's call path). The load comes from wrk (scripts/bench/post.lua) when
it is installed, else from scripts/bench_load.py; the 1,000-in-flight and the
reload checks always use bench_load.py. The server under test is pinned to CPU
0, the fake, the load generator and this script to CPU 1 (taskset).

Every process started here is stopped at the end, also on Ctrl-C or SIGTERM
(and, should this script be killed, by the kernel: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "scripts" / "bench"
FAKE_MODULE = "aiwfd.testing.fakeopenai"  # run with -m; the children import the installed aiwfd
REFS = REPO / "scripts" / "bench_refs.py"
LOADER = REPO / "scripts" / "bench_load.py"
LUA = BENCH_DIR / "post.lua"
CONFIG = BENCH_DIR / "bench.yaml"
BENCHMARKS = REPO / "BENCHMARKS.md"

sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))
from gen_agents import AGENT_BODY, generate  # noqa: E402

from aiwfd.testing.processes import free_port  # noqa: E402

# scripts/bench_stream.py does `import bench`: run as a script, this module is
# __main__, and a second import would be a second copy without main's globals.
sys.modules.setdefault("bench", sys.modules[__name__])

API_KEY = "bench-key"  # aiwfd checks it on every call; the references ignore it
AUTH_HEADER = f"X-API-Key: {API_KEY}"
GREETER_BODY = '{"name":"Alice","language":"fr"}'
TRIAGE_BODY = json.dumps({
    "customer_id": "CUST-0042-XY", "email": "alice@example.com", "subject": "Cannot log in",
    "body": "Since the update I get an error when I log in from the mobile app.",
    "priority": "high", "channel": "chat", "product_version": "4.2.1", "seats": 25,
    "satisfaction": 0.4, "tags": ["login", "mobile"],
}, separators=(",", ":"))
REFERENCES = ("raw", "sdk-lean", "sdk-default")
LEAN_CANDIDATES = ("sdk-default", "sdk-aiohttp", "sdk-raw-response", "sdk-post",
                   "sdk-post-aiohttp", "sdk-post-bytes", "raw")
SERVER_CPU, LOAD_CPU = 0, 1
N_AGENTS = 200
NPROC = os.cpu_count() or 1  # CPUs available to the benchmark (set in main, before it pins itself)
ALL_CPUS = "0-1"  # the same, as a taskset list


# ----------------------------------------------------------------------------- processes

def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child if this script dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        parts = []
        for p in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "".join(parts)

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def err_size(self) -> int:
        try:
            return self.err_path.stat().st_size
        except OSError:
            return 0

    def wait_for(self, pattern: str, *, offset: int = 0, timeout: float = 30.0,
                 stream: str = "err") -> tuple[re.Match[str], float]:
        """Wait until `pattern` appears in stdout/stderr after byte `offset`; (match, monotonic time)."""
        path = self.err_path if stream == "err" else self.out_path
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        buf = ""
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                chunk = f.read()
                if chunk:
                    buf += chunk.decode(errors="replace")
                    m = rx.search(buf)
                    if m:
                        return m, time.monotonic()
                    # keep the unfinished last line only: the request log is long
                    buf = buf[buf.rfind("\n") + 1:]
                    continue
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {pattern!r}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no {pattern!r} within {timeout:g}s:\n{self.tail()}")
                time.sleep(0.0005)

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)


class Procs:
    """Every process this script starts; `stop_all` ends them (by pid) whatever happened."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []
        self._n = 0

    def cmd(self, argv: Sequence[str], cpu: int | None) -> list[str]:
        """argv under taskset: on `cpu`, or on every CPU when None (this script itself is pinned)."""
        if self.pin:
            return ["taskset", "-c", str(cpu) if cpu is not None else ALL_CPUS, *argv]
        return list(argv)

    def start(self, name: str, argv: Sequence[str], *, cpu: int | None, env: dict[str, str] | None = None,
              port: int | None = None) -> Proc:
        self._n += 1
        stem = self.workdir / f"{self._n:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(self.cmd(argv, cpu), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.workdir, preexec_fn=_die_with_parent)
        proc = Proc(name, popen, out_path, err_path, port)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_many(self, procs: Sequence[Proc], timeout: float = 10.0) -> None:
        """SIGTERM to all of them first, then wait for each (quicker than one by one)."""
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            self.stop(proc, timeout)

    def stop_all(self) -> None:
        procs = list(reversed(self.procs))
        try:
            self.stop_many(procs)
        except BaseException:  # keep stopping the others, even on a second Ctrl-C
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.popen.kill()
                with contextlib.suppress(Exception):
                    proc.popen.wait(5)
            self.procs.clear()


def http_get(port: int, path: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def http_post(port: int, path: str, body: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body.encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_health(proc: Proc, port: int, timeout: float = 60.0, interval: float = 0.002) -> float:
    """Poll GET /health until it answers 200; returns the monotonic time of that answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_get(port, "/health", timeout=1.0) == 200:
                return time.monotonic()
        except OSError:
            pass
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: /health not 200 within {timeout:g}s:\n{proc.tail()}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- the servers

@dataclass(frozen=True)
class Server:
    """A server under test: a reference variant, or aiwfd with a transport."""

    name: str
    kind: str  # "ref" | "aiwfd"
    variant: str  # the reference variant, or aiwfd's AIWF_TRANSPORT

    @property
    def is_aiwfd(self) -> bool:
        return self.kind == "aiwfd"


def servers_for(refs: Sequence[str], transports: Sequence[str]) -> list[Server]:
    out = [Server(r, "ref", r) for r in refs]
    out += [Server(f"aiwfd[{t}]", "aiwfd", t) for t in transports]
    return out


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("OPENAI_", "AIWF_", "GROK_")) or k in ("API_KEY", "PORT", "HOST"))}
    env["PYTHONUNBUFFERED"] = "1"
    # The children run `-m aiwfd` from a temporary directory: this checkout's aiwfd
    # unless PYTHONPATH names another tree (a "before" run), so that a stale or
    # missing editable install is not what gets measured.
    env.setdefault("PYTHONPATH", str(REPO))
    return env


def start_server(procs: Procs, srv: Server, upstream: str, *, config: Path = CONFIG,
                 port: int | None = None, wait: bool = True, pin_late: bool = False) -> Proc:
    """Start a server under test, pinned to the server CPU.

    pin_late: start on every CPU (starting several at once is quicker) and pin
    all its threads to the server CPU once /health answers; needs wait=True.
    """
    port = port or free_port()
    env = base_env()
    env["OPENAI_API_KEY"] = "sk-bench"
    if srv.is_aiwfd:
        env.update(OPENAI_BASE_URL=upstream, API_KEY=API_KEY, AIWF_TRANSPORT=srv.variant)
        # a short drain: requests a load generator left behind must not hold up the next step
        argv = [sys.executable, "-m", "aiwfd", "serve", "-f", str(config), "-p", str(port),
                "--host", "127.0.0.1", "--shutdown-timeout", "2"]
    else:
        argv = [sys.executable, str(REFS), "--variant", srv.variant, "--port", str(port), "--upstream", upstream]
    late = pin_late and procs.pin
    proc = procs.start(srv.name, argv, cpu=None if late else SERVER_CPU, env=env, port=port)
    if wait:
        wait_health(proc, port, interval=0.02)
        if late:
            pin_threads(proc.pid, SERVER_CPU)
    return proc


def pin_threads(pid: int, cpu: int) -> None:
    """sched_setaffinity on every thread of `pid` (a thread pool made at start-up keeps its own mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            os.sched_setaffinity(int(tid), {cpu})


def start_servers(procs: Procs, servers: Sequence[Server], upstream: str) -> dict[str, Proc]:
    """Start them all at once, on every CPU; pin each to the server CPU when its /health answers."""
    started = {srv.name: start_server(procs, srv, upstream, wait=False, pin_late=True) for srv in servers}
    for proc in started.values():
        wait_health(proc, proc.port or 0, interval=0.02)
        if procs.pin:
            pin_threads(proc.pid, SERVER_CPU)
    return started


def start_fake(procs: Procs, latency_ms: float) -> tuple[Proc, str]:
    argv = [sys.executable, "-m", FAKE_MODULE, "--port", "0", "--latency-ms", f"{latency_ms:g}"]
    if has_module("uvloop"):
        argv.append("--uvloop")
    proc = procs.start(f"fake-{latency_ms:g}ms", argv, cpu=LOAD_CPU, env=base_env())
    m, _ = proc.wait_for(r"LISTENING (\d+)", stream="out")
    proc.port = int(m.group(1))
    return proc, f"http://127.0.0.1:{proc.port}/v1"


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- load

@dataclass
class LoadResult:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    seconds: float
    cpu_s: float = 0.0  # CPU the server under test spent during the run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_ms_per_req(self) -> float:
        ok = self.requests - self.errors
        return self.cpu_s * 1000 / ok if ok > 0 else float("nan")

    @property
    def busy(self) -> float:
        return self.cpu_s / self.seconds if self.seconds > 0 else 0.0


# /proc/net/tcp states of a connection that is being closed but still holds its
# 4-tuple (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING; not TIME_WAIT). Open
# connections of other clients (a server's pool to the fake) are left alone.
_CLOSING_STATES = {"04", "05", "08", "09", "0B"}


def closing_connections(port: int) -> int:
    """Connections that use `port` at either end and are still closing."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state in _CLOSING_STATES and port in (int(local.rsplit(":", 1)[1], 16),
                                                      int(remote.rsplit(":", 1)[1], 16)):
                    n += 1
    return n


def settle(port: int, timeout: float = 15.0) -> None:
    """Wait until the previous run's connections to `port` are gone.

    A load generator that stops leaves hundreds of server sockets in CLOSE_WAIT
    while the server finishes the requests it had queued. The next run's new
    connections reuse those client ports (tcp_tw_reuse on loopback), their SYNs
    meet a socket that is still open, and each waits out the 1 s SYN
    retransmission: a 1-4 s p99 at c256 that measured the bench, not the server.
    """
    deadline = time.monotonic() + timeout
    while closing_connections(port) and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_idle(proc: Proc, timeout: float = 30.0) -> None:
    """Wait until `proc` has finished the requests the load generator left queued.

    Every server under test shares one CPU. A slow server stopped at c256
    still has up to 256 requests to answer (sdk-default: ~2 s of CPU), and
    the next server's run would share the CPU with that backlog.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline and proc.alive():
        before = proc.cpu_seconds()
        time.sleep(0.1)
        quiet = quiet + 1 if proc.cpu_seconds() - before <= 0.01 else 0


class Loader:
    """wrk when available (and not refused), else scripts/bench_load.py."""

    def __init__(self, procs: Procs, kind: str) -> None:
        self.procs = procs
        if kind == "auto":
            kind = "wrk" if shutil.which("wrk") else "python"
        if kind == "wrk" and not shutil.which("wrk"):
            raise SystemExit("--loader wrk: wrk is not installed (apt-get install -y wrk)")
        self.kind = kind

    def run(self, url: str, body: str, connections: int, duration: float, *, headers: Sequence[str] = (),
            target: Proc | None = None, kind: str | None = None, requests: int | None = None) -> LoadResult:
        kind = kind or self.kind
        port = urllib.parse.urlsplit(url).port
        if port:
            settle(port)
        cpu0 = target.cpu_seconds() if target else 0.0
        if kind == "wrk" and requests is None:
            secs = max(1, round(duration))
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", "30s", "-s", str(LUA),
                    url, "--", body, *headers]
            out = self._run(argv, secs + 60)
            m = re.search(r"WRK_JSON (\{.*\})", out)
            if not m:
                raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
            d = json.loads(m.group(1))
            seconds = d["duration_us"] / 1e6
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            nan = float("nan")
            done = d["requests"] > errors
            res = LoadResult(requests=d["requests"], errors=errors, rps=d["requests"] / seconds,
                             p50_ms=d["p50_us"] / 1000 if done else nan, p99_ms=d["p99_us"] / 1000 if done else nan,
                             max_ms=d["max_us"] / 1000 if done else nan, seconds=seconds, extra=d)
        else:
            argv = [sys.executable, str(LOADER), "--url", url, "--body", body, "-c", str(connections),
                    "-d", f"{duration:g}", "--timeout", "60"]
            if requests is not None:
                argv += ["-n", str(requests)]
            for h in headers:
                argv += ["-H", h]
            out = self._run(argv, (duration if requests is None else 60) + 120)
            d = json.loads(out.strip().splitlines()[-1])
            nan = float("nan")
            done = d["ok"] > 0
            res = LoadResult(requests=d["requests"], errors=d["errors"], rps=d["rps"],
                             p50_ms=d["p50_ms"] if done else nan, p99_ms=d["p99_ms"] if done else nan,
                             max_ms=d["max_ms"] if done else nan, seconds=d["seconds"], extra=d)
        if target:
            res.cpu_s = target.cpu_seconds() - cpu0
            wait_idle(target)
        return res

    def _run(self, argv: list[str], timeout: float) -> str:
        cp = subprocess.run(self.procs.cmd(argv, LOAD_CPU), capture_output=True, text=True, timeout=timeout,
                            cwd=self.procs.workdir, preexec_fn=_die_with_parent)
        if cp.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({cp.returncode}):\n{cp.stdout[-1000:]}\n{cp.stderr[-2000:]}")
        return cp.stdout

    def popen(self, url: str, body: str, connections: int, duration: float, headers: Sequence[str]) -> Proc:
        argv = [sys.executable, str(LOADER), "--url", url, "--body", body, "-c", str(connections),
                "-d", f"{duration:g}", "--timeout", "60"]
        for h in headers:
            argv += ["-H", h]
        return self.procs.start("bench_load", argv, cpu=LOAD_CPU, env=base_env())


# ----------------------------------------------------------------------------- measurements

@dataclass
class Plan:
    quick: bool
    runs: int
    duration: float
    concurrencies: list[int]
    latency_duration: float
    inflight: int
    inflight_requests: int
    startup_runs: int
    reloads: int
    warmup: float


def plan_for(args: argparse.Namespace) -> Plan:
    if args.quick:
        p = Plan(quick=True, runs=1, duration=2, concurrencies=[16, 256], latency_duration=1,
                 inflight=1000, inflight_requests=1000, startup_runs=1, reloads=1, warmup=0)
    else:
        p = Plan(quick=False, runs=3, duration=5, concurrencies=[16, 64, 256], latency_duration=5,
                 inflight=1000, inflight_requests=3000, startup_runs=3, reloads=3, warmup=2)
    if args.runs:
        p.runs = p.startup_runs = args.runs
    if args.duration:
        p.duration = p.latency_duration = args.duration
    if args.concurrency:
        p.concurrencies = sorted({int(c) for c in args.concurrency.split(",")})
    return p


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


class Bench:
    def __init__(self, procs: Procs, loader: Loader, plan: Plan, servers: list[Server], log: Callable[[str], None]):
        self.procs = procs
        self.loader = loader
        self.plan = plan
        self.servers = servers
        self.log = log
        self.results: dict[str, dict[str, float]] = {s.name: {} for s in servers}
        self.notes: list[str] = []
        self.busy: dict[str, dict[int, float]] = {s.name: {} for s in servers}

    def side_servers(self, every_aiwfd: bool = True) -> list[Server]:
        """Servers for the phases after the throughput one: --quick keeps raw and aiwfd
        (with every_aiwfd=False, only the first aiwfd transport)."""
        if not self.plan.quick:
            return list(self.servers)
        aiwfds = [s for s in self.servers if s.is_aiwfd]
        return [s for s in self.servers if s.name == "raw"] + (aiwfds if every_aiwfd else aiwfds[:1])

    def put(self, srv: Server, key: str, value: float) -> None:
        self.results[srv.name][key] = value

    def warm(self, proc: Proc, path: str, body: str) -> None:
        hdrs = {"X-API-Key": API_KEY}
        for _ in range(5 if self.plan.quick else 20):
            status, text = http_post(proc.port or 0, path, body, hdrs)
            if status != 200:
                raise RuntimeError(f"{proc.name}: POST {path} answered {status}: {text[:300]!r}\n{proc.tail()}")
        if self.plan.warmup > 0:  # at the highest concurrency: every connection is open before measuring
            self.loader.run(f"http://127.0.0.1:{proc.port}{path}", body, max(self.plan.concurrencies),
                            self.plan.warmup, headers=[AUTH_HEADER])

    # -- 0 ms model: throughput and latency at each concurrency
    def throughput(self, upstream0: str) -> None:
        plan = self.plan
        started: dict[str, Proc] = {}
        try:
            started = start_servers(self.procs, self.servers, upstream0)
            self.log("  servers ready: " + ", ".join(f"{n} pid {p.pid}" for n, p in started.items()))
            for srv in self.servers:
                self.warm(started[srv.name], "/agent/greeter", GREETER_BODY)
            self.log("  warmed up")
            per: dict[tuple[str, str], list[LoadResult]] = {}
            # Runs are interleaved (run 1 of every server, then run 2 …) so that a burst
            # of background work hurts every server alike rather than one of them.
            cases = [("greeter", c, GREETER_BODY) for c in plan.concurrencies]
            if not plan.quick:
                cases.append(("triage", 16, TRIAGE_BODY))
            for run in range(plan.runs):
                for agent, c, body in cases:
                    for srv in self.servers:
                        proc = started[srv.name]
                        secs = plan.duration if not plan.quick else (2 if c >= 128 else 1)
                        r = self.loader.run(f"http://127.0.0.1:{proc.port}/agent/{agent}", body, c, secs,
                                            headers=[AUTH_HEADER], target=proc)
                        per.setdefault((srv.name, f"{agent}:{c}"), []).append(r)
                        self.log(f"  run {run + 1}/{plan.runs} {agent} c{c:<4} {srv.name:<16} {r.rps:8.0f} req/s  "
                                 f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  err {r.errors}  "
                                 f"cpu {r.cpu_ms_per_req:.3f} ms/req ({r.busy:.0%} busy)")
            for srv in self.servers:
                for agent, c, _ in cases:
                    rs = per[(srv.name, f"{agent}:{c}")]
                    if agent == "triage":
                        self.put(srv, "rps_triage", median([r.rps for r in rs]))
                        continue
                    self.put(srv, f"rps_c{c}", median([r.rps for r in rs]))
                    self.put(srv, f"p50_c{c}", median([r.p50_ms for r in rs]))
                    self.put(srv, f"p99_c{c}", median([r.p99_ms for r in rs]))
                    self.put(srv, f"err_c{c}", sum(r.errors for r in rs))
                    self.put(srv, f"cpu_c{c}", median([r.cpu_ms_per_req for r in rs]))
                    self.busy[srv.name][c] = median([r.busy for r in rs])
        finally:
            self.procs.stop_many(list(started.values()))

    # -- 200 ms model: latency added at concurrency 16
    def added_latency(self, upstream200: str, fake200: Proc) -> None:
        plan = self.plan
        servers = self.side_servers()
        started: dict[str, Proc] = {}
        payload = json.dumps(_greeter_payload(GREETER_BODY), separators=(",", ":"))
        try:
            started = start_servers(self.procs, servers, upstream200)
            for srv in servers:
                self.warm(started[srv.name], "/agent/greeter", GREETER_BODY)
            direct: list[float] = []
            per: dict[str, list[float]] = {s.name: [] for s in servers}
            for run in range(plan.runs):
                r = self.loader.run(f"{upstream200}/chat/completions", payload, 16, plan.latency_duration,
                                    headers=["Authorization: Bearer sk-bench"])
                direct.append(r.p50_ms)
                self.log(f"  run {run + 1}/{plan.runs} 200ms c16  fake directly     p50 {r.p50_ms:7.2f} ms")
                for srv in servers:
                    proc = started[srv.name]
                    r = self.loader.run(f"http://127.0.0.1:{proc.port}/agent/greeter", GREETER_BODY, 16,
                                        plan.latency_duration, headers=[AUTH_HEADER], target=proc)
                    per[srv.name].append(r.p50_ms)
                    self.log(f"  run {run + 1}/{plan.runs} 200ms c16  {srv.name:<16} p50 {r.p50_ms:7.2f} ms  "
                             f"err {r.errors}")
            model = median(direct)
            self.notes.append(f"Model latency baseline: the fake called directly at c16 with 200 ms latency "
                              f"answers in p50 {model:.2f} ms; 'added' = server p50 − that.")
            for srv in servers:
                self.put(srv, "p50_200", median(per[srv.name]))
                self.put(srv, "added_200", median(per[srv.name]) - model)
            # The loopback hops themselves cost 1-5 ms on this VM from one run to the next (the raw
            # forwarder shows it): what aiwfd adds on top of the least code is the stable figure.
            if "raw" in per:
                raw = median(per["raw"])
                for srv in servers:
                    if srv.is_aiwfd:
                        self.notes.append(f"Added latency beyond the raw forwarder: {srv.name} p50 "
                                          f"{median(per[srv.name]) - raw:+.2f} ms (raw itself: "
                                          f"{raw - model:+.2f} ms over the model).")
        finally:
            self.procs.stop_many(list(started.values()))

    # -- 1 s model: 1,000 requests in flight, peak RSS
    def inflight(self, upstream1000: str) -> None:
        plan = self.plan
        for srv in self.side_servers(every_aiwfd=False):
            proc = start_server(self.procs, srv, upstream1000, pin_late=True)
            try:
                r = self.loader.run(f"http://127.0.0.1:{proc.port}/agent/greeter", GREETER_BODY, plan.inflight,
                                    0, headers=[AUTH_HEADER], target=proc, kind="python",
                                    requests=plan.inflight_requests)
                hwm = proc.status_kb("VmHWM") / 1024
                ok = r.requests - r.errors
                self.put(srv, "inflight_ok", ok)
                self.put(srv, "inflight_err", plan.inflight_requests - ok)
                self.put(srv, "rss_mb", hwm)
                kinds = r.extra.get("error_kinds") or {}
                self.put(srv, "inflight_max", r.extra.get("max_inflight", float("nan")))
                self.log(f"  {plan.inflight} connections x {plan.inflight_requests // plan.inflight} rounds "
                         f"{srv.name:<16} ok {ok}/{plan.inflight_requests}, at most "
                         f"{r.extra.get('max_inflight')} in flight  peak RSS {hwm:.1f} MB  "
                         f"p50 {r.p50_ms:.0f} ms  max {r.max_ms:.0f} ms {kinds or ''}")
            finally:
                self.procs.stop(proc)

    # -- start-up to the first 200 on /health (aiwfd: the 200-agent config), then (aiwfd)
    #    SIGHUP reloads of that config with a client loop running, on the last process started
    def startup_and_reload(self, upstream0: str, big: Path, do_startup: bool, do_reload: bool) -> None:
        for srv in self.side_servers(every_aiwfd=False):
            if not do_startup and not (do_reload and srv.is_aiwfd):
                continue
            times = []
            runs = self.plan.startup_runs if do_startup else 1
            proc = None
            try:
                for i in range(runs):
                    port = free_port()
                    t0 = time.monotonic()
                    proc = start_server(self.procs, srv, upstream0, config=big, port=port, wait=False)
                    t1 = wait_health(proc, port, interval=0.002)
                    times.append(t1 - t0)
                    if i < runs - 1:
                        self.procs.stop(proc)
                if do_startup:
                    self.put(srv, "startup_s", median(times))
                    self.log(f"  start-up {srv.name:<16} " + " ".join(f"{t:.3f}s" for t in times)
                             + (f" ({N_AGENTS} agents)" if srv.is_aiwfd else " (no config)"))
                if do_reload and srv.is_aiwfd and proc is not None:
                    self.reload(srv, proc, big)
            finally:
                if proc is not None:
                    self.procs.stop(proc)
        if do_startup:
            self.startup_side_by_side(big)

    def startup_side_by_side(self, big: Path) -> None:
        """`aiwfd serve` (first 200 on /health) and `aiwfd validate` of `big` against a bare
        aiohttp app's start-up, interleaved in one run (scripts/bench_startup.py, issue 13).
        In these rows the raw column holds the bare app, so aiwfd ÷ raw is the ratio the
        targets name; aiwfd runs with the default transport (the SDK transport imports the SDK)."""
        sys.path.insert(0, str(REPO / "scripts"))
        import bench_startup

        runs = 3 if self.plan.quick else 7
        cases = {c.name: c for c in bench_startup.side_by_side(big, runs, pin=self.procs.pin,
                                                               warm=not self.plan.quick)}
        bare = cases["bare aiohttp app"]
        if "raw" in self.results:
            self.results["raw"].update(startup_side_s=bare.median, validate_side_s=bare.median)
        default = next((s for s in self.servers if s.is_aiwfd and s.variant == "aiohttp"), None)
        if default is not None:
            self.put(default, "startup_side_s", cases["aiwfd serve"].median)
            self.put(default, "validate_side_s", cases["aiwfd validate"].median)
        self.log("  side by side, median of " + str(runs) + ": " + ", ".join(
            f"{c.name} {c.median * 1000:.0f} ms ({c.median / bare.median:.2f}×)" for c in cases.values()))
        self.notes.append("start-up side by side (scripts/bench_startup.py, median of " + str(runs)
                          + " interleaved runs): " + ", ".join(f"{c.name} {c.median * 1000:.0f} ms"
                                                               for c in cases.values())
                          + "; in its two rows the raw column is the bare aiohttp app")

    def reload(self, srv: Server, proc: Proc, big: Path) -> None:
        """SIGHUPs under a 16-connection load: each after an edit of agent_000's input type
        (a full compile), then one with no file changed (the key-rotation path)."""
        plan = self.plan
        self.warm(proc, "/agent/agent_000", AGENT_BODY)
        pause = 0.5 if plan.quick else 1.0
        original = big.read_text()
        if EDIT_FROM not in original:
            raise RuntimeError(f"{big} has no {EDIT_FROM!r} to edit")
        # The client loop runs until SIGTERM (then prints its summary): it covers every reload whole.
        client = self.loader.popen(f"http://127.0.0.1:{proc.port}/agent/agent_000", AGENT_BODY, 16,
                                   3600, [AUTH_HEADER])
        live, done, same = [], [], []
        try:
            time.sleep(pause)
            for k in range(plan.reloads + 1):
                edited = k < plan.reloads
                if edited:
                    big.write_text(original.replace(EDIT_FROM, f"count?: int(0..{1000 + k})", 1))
                offset = proc.err_size()
                t0 = time.monotonic()
                os.kill(proc.pid, signal.SIGHUP)
                if edited:  # the new config answers: its schema has the new bound
                    marker = f'"maximum":{1000 + k}'.encode()
                    live.append(poll_until(proc.port or 0, "/agent/agent_000/schema", marker, t0) * 1000)
                m, t1 = proc.wait_for(r"reloaded |reload failed", offset=offset, timeout=60)
                if "failed" in m.group(0):
                    raise RuntimeError(f"{proc.name}: the reload failed:\n{proc.tail()}")
                (done if edited else same).append((t1 - t0) * 1000)
                time.sleep(pause)
        finally:
            self.procs.stop(client, timeout=70)
            big.write_text(original)
        out = client.out_path.read_text().strip().splitlines()
        if not out:
            raise RuntimeError(f"reload client loop printed nothing:\n{client.tail()}")
        d = json.loads(out[-1])
        self.put(srv, "reload_ms", median(live))
        self.put(srv, "reload_done_ms", median(done))
        self.put(srv, "reload_same_ms", median(same))
        self.put(srv, "reload_failed", d["errors"])
        self.put(srv, "reload_max_ms", d["max_ms"])
        self.log(f"  reload {srv.name:<16} edited: new config answering after "
                 + " ".join(f"{t:.0f}ms" for t in live) + ", `reloaded` line after "
                 + " ".join(f"{t:.0f}ms" for t in done) + f"; unchanged: {same[0]:.0f}ms"
                 + f"  client loop: {d['requests']} requests, {d['errors']} failed "
                   f"{d.get('error_kinds') or ''}, max latency {d['max_ms']:.0f} ms")


# The line of agent_000's input type (Req000) that a reload edits.
EDIT_FROM = "count?: int(0..100)"


def poll_until(port: int, path: str, marker: bytes, t0: float, timeout: float = 30.0) -> float:
    """Seconds from `t0` until GET `path` answers a body containing `marker` (polled every 2 ms)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        while True:
            conn.request("GET", path, headers={"X-API-Key": API_KEY})
            r = conn.getresponse()
            body = r.read()
            now = time.monotonic()
            if r.status == 200 and marker in body:
                return now - t0
            if now - t0 > timeout:
                raise RuntimeError(f"GET {path} did not show {marker!r} within {timeout:g} s")
            time.sleep(0.002)
    finally:
        conn.close()


def _greeter_payload(body: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_refs

    return bench_refs.payload_for(json.loads(body))


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str
    target: str = ""
    check: Callable[[dict[str, float], dict[str, float]], bool] | None = None  # (aiwfd, raw) -> ok
    ratio: bool = True


def rows_for(plan: Plan) -> list[Row]:
    rows: list[Row] = []
    for c in plan.concurrencies:
        tgt = c in (16, 256)
        rows.append(Row(f"rps_c{c}", f"req/s c{c}", "{:.0f}",
                        "≥ 0.65× raw" if tgt else "",
                        (lambda a, r, c=c: a[f"rps_c{c}"] >= 0.65 * r[f"rps_c{c}"]) if tgt else None))
    for c in plan.concurrencies:
        rows.append(Row(f"p50_c{c}", f"p50 ms c{c}", "{:.2f}"))
    for c in plan.concurrencies:
        tgt = c == 256
        rows.append(Row(f"p99_c{c}", f"p99 ms c{c}", "{:.2f}",
                        "≤ 3× own p50" if tgt else "",
                        (lambda a, r, c=c: a[f"p99_c{c}"] <= 3 * a[f"p50_c{c}"]) if tgt else None))
    for c in plan.concurrencies:
        rows.append(Row(f"err_c{c}", f"errors c{c}", "{:.0f}", ratio=False))
    for c in plan.concurrencies:
        rows.append(Row(f"cpu_c{c}", f"server CPU ms/req c{c}", "{:.3f}"))
    rows += [
        Row("rps_triage", "req/s c16, 10-field input agent", "{:.0f}"),
        Row("added_200", "p50 added ms, c16, 200 ms model", "{:.2f}", "≤ 2 ms",
            lambda a, r: a["added_200"] <= 2.0),
        Row("inflight_max", "most requests in flight at once (1 s model)", "{:.0f}", ratio=False),
        Row("inflight_err", "failed of 1,000 in flight (1 s model)", "{:.0f}", "0",
            lambda a, r: a["inflight_err"] == 0 and a.get("inflight_max", 0) >= 1000, ratio=False),
        Row("rss_mb", "peak RSS MB, 1,000 in flight", "{:.1f}", "< 150 MB", lambda a, r: a["rss_mb"] < 150),
        Row("startup_s", f"start-up s to first 200 ({N_AGENTS} agents*)", "{:.3f}", "< 1 s",
            lambda a, r: a["startup_s"] < 1.0),
        Row("startup_side_s", f"start-up s to first 200 ({N_AGENTS} agents), side by side: raw = bare aiohttp app",
            "{:.3f}", "≤ 2× bare app", lambda a, r: a["startup_side_s"] <= 2.0 * r["startup_side_s"]),
        Row("validate_side_s", f"`aiwfd validate` s ({N_AGENTS} agents) vs the bare app's start-up", "{:.3f}",
            "≤ 1.5× bare app", lambda a, r: a["validate_side_s"] <= 1.5 * r["validate_side_s"]),
        Row("reload_ms", f"SIGHUP reload ms, edited {N_AGENTS}-agent config (until it answers)", "{:.1f}",
            "< 200 ms", lambda a, r: a["reload_ms"] < 200, ratio=False),
        Row("reload_done_ms", "… until the `reloaded` line (artifacts written)", "{:.1f}", ratio=False),
        Row("reload_same_ms", "SIGHUP reload ms, no file changed (key rotation)", "{:.1f}", ratio=False),
        Row("reload_failed", "failed requests during reloads", "{:.0f}", "0",
            lambda a, r: a["reload_failed"] == 0, ratio=False),
        Row("reload_max_ms", "max latency ms during reloads (c16)", "{:.1f}", ratio=False),
    ]
    return rows


def fmt_value(row: Row, v: float | None) -> str:
    if v is None or v != v:
        return "—"
    return row.fmt.format(v)


def render_table(bench: Bench) -> tuple[str, list[tuple[str, str, bool]]]:
    """The markdown table, and (row, server, ok) for every target checked."""
    refs = [s for s in bench.servers if not s.is_aiwfd]
    aiwfds = [s for s in bench.servers if s.is_aiwfd]
    res = bench.results
    head = ["metric"] + [s.name for s in refs]
    for a in aiwfds:
        head.append(f"**{a.name}**")
        head += [f"÷{r.name}" for r in refs]
    head += ["target", "verdict" + (" (" + " / ".join(a.variant for a in aiwfds) + ")" if len(aiwfds) > 1 else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + ["---", "---"]) + "|"]
    verdicts: list[tuple[str, str, bool]] = []
    raw = res.get("raw", {})
    for row in rows_for(bench.plan):
        if not any(row.key in res[s.name] for s in bench.servers):
            continue
        cells = [row.label] + [fmt_value(row, res[r.name].get(row.key)) for r in refs]
        marks = []
        for a in aiwfds:
            av = res[a.name].get(row.key)
            cells.append(f"**{fmt_value(row, av)}**")
            for r in refs:
                rv = res[r.name].get(row.key)
                if row.ratio and av is not None and rv and rv == rv and av == av:
                    cells.append(f"{av / rv:.2f}×")
                else:
                    cells.append("—")
            if row.check is not None:
                try:
                    ok = bool(row.check(res[a.name], raw))
                    marks.append("PASS" if ok else "FAIL")
                    verdicts.append((row.label, a.name, ok))
                except (KeyError, ZeroDivisionError, TypeError):
                    marks.append("n/a")
        cells += [row.target, " / ".join(marks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


def machine_info(loader: Loader, pinned: bool, why_not: str = "") -> list[str]:
    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return "not installed"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = "not installed"
    if shutil.which("wrk"):
        cp = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        first = (cp.stdout + cp.stderr).strip().splitlines()
        wrk = first[0].split(" Copyright")[0] if first else "installed"
    return [
        f"- machine: nproc {NPROC}, "
        f"{cpu}, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; aiohttp {version('aiohttp')}, openai {version('openai')}, "
        f"orjson {version('orjson')}, uvloop {'yes, ' + version('uvloop') if has_module('uvloop') else 'no'}",
        f"- load generator: {'wrk (' + wrk + ', 1 thread, scripts/bench/post.lua)' if loader.kind == 'wrk' else 'scripts/bench_load.py (' + ('--loader python' if shutil.which('wrk') else 'wrk not installed') + ')'}; "
        f"1,000-in-flight and reload checks: scripts/bench_load.py",
        "- pinning: " + (f"server under test on CPU {SERVER_CPU}; fake, load generator and bench on CPU {LOAD_CPU} (taskset)"
                         if pinned else f"none ({why_not or 'taskset missing or fewer than 2 CPUs'}): numbers are less stable"),
    ]


# ----------------------------------------------------------------------------- BENCHMARKS.md

BEGIN, END = "<!-- bench:begin (written by scripts/bench.py) -->", "<!-- bench:end -->"

SKELETON = f"""# Benchmarks

How much CPU aiwfd spends per agent call compared with the least code that does
the same job, and whether it meets the targets of issue #5. The sections
between the `bench:` markers and the `lean:` markers are rewritten by
`python scripts/bench.py` (the full run) and `python scripts/bench.py
--lean-survey --write`; the rest of this file is kept as it is.

## Decisions

_To be filled in by the lead: the transport chosen for the non-streaming call
(aiohttp or SDK) and why, with the numbers; what was optimised and the
before/after numbers._

{BEGIN}
{END}
"""


LEAN_BEGIN, LEAN_END = "<!-- lean:begin (written by scripts/bench.py --lean-survey) -->", "<!-- lean:end -->"


def write_benchmarks(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between `begin` and `end` (appended when absent); keep everything else."""
    text = path.read_text(encoding="utf-8") if path.exists() else SKELETON
    if "## Decisions" not in text:
        text = text.rstrip("\n") + "\n\n## Decisions\n\n_To be filled in by the lead._\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + begin + "\n" + end + "\n"
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    path.write_text(pre + begin + "\n" + block.strip("\n") + "\n" + end + post, encoding="utf-8")


def report(bench: Bench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    table, verdicts = render_table(bench)
    refs = [s.name for s in bench.servers if not s.is_aiwfd]
    p = bench.plan
    busy = []
    for s in bench.servers:
        if bench.busy[s.name]:
            busy.append(f"{s.name} " + ", ".join(f"c{c} {b:.0%}" for c, b in sorted(bench.busy[s.name].items())))
    out = [
        f"## Latest run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run: {p.runs} run(s) of {p.duration:g} s per cell, "
        f"median per cell, errors summed over runs; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine: numbers are noisy)",
        "",
        table,
        "",
        f"Columns: the references ({', '.join(refs)}), then each aiwfd transport (AIWF_TRANSPORT) with "
        "its ratio to every reference (aiwfd ÷ reference: above 1× is better for req/s, worse for the rest). "
        "**The headline is aiwfd ÷ raw.** The references forward the greeter call and nothing else; "
        "aiwfd also checks the API key, validates input and output, writes the request log and builds the trace.",
        "",
        "Notes:",
        "- req/s, p50, p99 at 0 ms model latency against the greeter (`{\"name\":\"Alice\",\"language\":\"fr\"}`); "
        "'server CPU ms/req' is the CPU time (user+sys, /proc/PID/stat) the server under test spent per answered "
        "request: the least noisy number here. CPU 0 busy: " + ("; ".join(busy) if busy else "—") + ".",
        "- the 10-field agent row posts a valid ticket to `/agent/triage` (the references forward it like the greeter).",
        f"- 1,000 in flight: scripts/bench_load.py with 1,000 connections, {p.inflight_requests} requests, 1 s model; "
        "peak RSS is VmHWM of the fresh server process.",
        f"- *start-up: from process start to the first 200 on /health; aiwfd loads the generated {N_AGENTS}-agent "
        "config (scripts/bench/gen_agents.py), the references have no config (the floor: Python, imports, bind).",
        f"- reload: {p.reloads} SIGHUPs, each after an edit of agent_000's input type (the whole file is "
        "compiled again), timed from the signal until GET /agent/agent_000/schema shows the edit (polled "
        "every 2 ms) and until the `reloaded` log line (artifacts written, READY=1 next); then one SIGHUP with "
        "no file changed. Medians; scripts/bench_load.py keeps 16 connections busy on agent_000 throughout.",
        *[f"- {n}" for n in bench.notes],
        *cpu_ratio_notes(bench),
    ]
    if verdicts:
        failed = [f"{label} ({srv})" for label, srv, ok in verdicts if not ok]
        out += ["", f"Targets: {sum(ok for _, _, ok in verdicts)}/{len(verdicts)} PASS"
                + (f"; FAIL: {'; '.join(failed)}" if failed else "")]
    return "\n".join(out) + "\n"


def cpu_ratio_notes(bench: Bench) -> list[str]:
    """aiwfd ÷ raw throughput as a dedicated core would give it: raw CPU ms/req ÷ aiwfd CPU ms/req.

    On a shared machine the server under test rarely has its core to itself, so req/s
    swing with the neighbours' load; CPU per request does not."""
    raw = bench.results.get("raw", {})
    out = []
    for a in (s for s in bench.servers if s.is_aiwfd):
        cells = []
        for c in bench.plan.concurrencies:
            rv, av = raw.get(f"cpu_c{c}"), bench.results[a.name].get(f"cpu_c{c}")
            if rv and av and rv == rv and av == av:
                cells.append(f"c{c} {rv / av:.2f}×")
        if cells:
            out.append(f"- CPU-bound estimate of {a.name} ÷ raw req/s (raw CPU ms/req ÷ aiwfd CPU ms/req): "
                       + ", ".join(cells) + ".")
    return out


# ----------------------------------------------------------------------------- modes

def lean_survey(procs: Procs, loader: Loader, plan: Plan, log: Callable[[str], None]) -> str:
    """Each candidate use of the SDK as a reference forwarder; prints a table."""
    _, upstream0 = start_fake(procs, 0)
    cands = [Server(v, "ref", v) for v in LEAN_CANDIDATES]
    bench = Bench(procs, loader, plan, cands, log)
    started = {s.name: start_server(procs, s, upstream0) for s in cands}
    per: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        for s in cands:
            bench.warm(started[s.name], "/agent/greeter", GREETER_BODY)
        for run in range(plan.runs):
            for c in plan.concurrencies:
                for s in cands:
                    proc = started[s.name]
                    r = loader.run(f"http://127.0.0.1:{proc.port}/agent/greeter", GREETER_BODY, c, plan.duration,
                                   headers=[AUTH_HEADER], target=proc)
                    per.setdefault((s.name, c), []).append(r)
                    log(f"  run {run + 1} c{c:<4} {s.name:<18} {r.rps:8.0f} req/s  cpu {r.cpu_ms_per_req:.3f} ms/req "
                        f"p99 {r.p99_ms:.1f} ms err {r.errors}")
    finally:
        procs.stop_many(list(started.values()))
    head = "| candidate | " + " | ".join(f"req/s c{c} | CPU ms/req c{c}" for c in plan.concurrencies) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(plan.concurrencies))]
    for s in cands:
        cells = []
        for c in plan.concurrencies:
            rs = per[(s.name, c)]
            cells += [f"{median([r.rps for r in rs]):.0f}", f"{median([r.cpu_ms_per_req for r in rs]):.3f}"]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile(procs: Procs, loader: Loader, plan: Plan, transports: Sequence[str], log: Callable[[str], None],
            seconds: float, outdir: Path) -> str:
    """py-spy on aiwfd while wrk/bench_load drives it at c64; top functions by self and total time."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    _, upstream0 = start_fake(procs, 0)
    outdir.mkdir(parents=True, exist_ok=True)
    sections = []
    for t in transports:
        srv = Server(f"aiwfd[{t}]", "aiwfd", t)
        proc = start_server(procs, srv, upstream0)
        try:
            Bench(procs, loader, plan, [srv], log).warm(proc, "/agent/greeter", GREETER_BODY)
            raw_path, svg_path = outdir / f"aiwfd-{t}.txt", outdir / f"aiwfd-{t}.svg"
            spy = [pyspy, "record", "--pid", str(proc.pid), "--rate", "250", "--duration", f"{seconds:g}",
                   "--nonblocking"]
            p_raw = subprocess.Popen(procs.cmd(spy + ["--format", "raw", "-o", str(raw_path)], LOAD_CPU),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
            try:
                time.sleep(0.5)
                r = loader.run(f"http://127.0.0.1:{proc.port}/agent/greeter", GREETER_BODY, 64, seconds,
                               headers=[AUTH_HEADER], target=proc)
                _, err = p_raw.communicate(timeout=seconds + 60)
            finally:
                if p_raw.poll() is None:
                    p_raw.kill()
                    p_raw.wait()
            if not raw_path.exists():
                raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-1000:]}")
            _collapsed_to_svg(raw_path, svg_path)
            svg_note = f"; flame graph: {svg_path}" if svg_path.exists() else ""
            sections.append(f"### aiwfd[{t}] at c64: {r.rps:.0f} req/s, {r.cpu_ms_per_req:.3f} ms CPU/req "
                            f"(py-spy --nonblocking, {seconds:g} s; collapsed stacks: {raw_path}{svg_note})\n\n"
                            + top_functions(raw_path.read_text()))
        finally:
            procs.stop(proc)
    return "\n\n".join(sections)


def _collapsed_to_svg(raw: Path, svg: Path) -> None:
    """A flame graph needs py-spy's own svg writer: re-record is costly, so only try inferno/flamegraph if present."""
    for tool in ("inferno-flamegraph", "flamegraph.pl"):
        exe = shutil.which(tool)
        if exe:
            with open(raw, "rb") as fin, open(svg, "wb") as fout:
                subprocess.run([exe], stdin=fin, stdout=fout, check=False)
            return


def top_functions(collapsed: str, n: int = 20) -> str:
    """Self time by package, and the top functions by self and by total samples, from py-spy's raw output."""
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    pkg_c: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf = frames[-1]
        self_c[leaf] = self_c.get(leaf, 0) + count
        pkg = _package(leaf)
        pkg_c[pkg] = pkg_c.get(pkg, 0) + count
        for f in set(frames):
            total_c[f] = total_c.get(f, 0) + count
    if not total:
        return "(no samples)"
    # The frames every sample goes through (runpy, main, the event loop's run) say nothing.
    top = max(total_c.values())
    total_c = {k: v for k, v in total_c.items() if v < 0.85 * top}

    def table(d: dict[str, int], title: str, limit: int) -> str:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:limit]
        return (f"| {title} | % of samples |\n|---|---:|\n"
                + "\n".join(f"| `{k}` | {v * 100 / total:.1f} |" for k, v in rows))

    return "\n\n".join([table(pkg_c, "self time by package", 12), table(self_c, "self (leaf) function", n),
                        table(total_c, "total (inclusive) function", n)])


def _package(frame: str) -> str:
    m = re.search(r"\((.*)\)$", frame)
    path = m.group(1) if m else frame
    if path.startswith("<"):
        return "other"
    head = path.split("/", 1)[0]
    if head.endswith(".py"):
        head = "stdlib:" + head
    return head


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.group(1), m.group(2)
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# ----------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="1 run each, 1 s per cell, c16 and c256 only (< 1 minute)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--write", dest="write", action="store_true", default=None,
                   help="write BENCHMARKS.md (default for the full run)")
    w.add_argument("--no-write", dest="write", action="store_false", help="only print")
    p.add_argument("--aiwfd-transport", choices=("aiohttp", "sdk", "both"), default="both",
                   help="aiwfd's call path (AIWF_TRANSPORT); both: two aiwfd columns (default)")
    p.add_argument("--refs", default=",".join(REFERENCES),
                   help=f"references to run, comma-separated (default {','.join(REFERENCES)}; raw is needed for the targets)")
    p.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator for the throughput runs (auto: wrk when installed)")
    p.add_argument("--runs", type=int, default=None, help="runs per cell (median); default 3, --quick 1")
    p.add_argument("--duration", type=float, default=None, help="seconds per cell (default 5, --quick 1)")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 16,64,256; --quick 16,256)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--only", default=None,
                   help="comma-separated phases: throughput,latency,inflight,startup,reload (default all)")
    p.add_argument("--lean-survey", action="store_true", help="measure every candidate use of the SDK and stop")
    p.add_argument("--profile", action="store_true", help="py-spy aiwfd under load (c64) and print top functions")
    p.add_argument("--profile-seconds", type=float, default=8.0)
    p.add_argument("--stream", action="store_true",
                   help="benchmark /agent/{name}/stream against the stream-raw forwarder (its own BENCHMARKS.md block)")
    p.add_argument("--limits", action="store_true",
                   help="limits in memory and on Redis, and JWT, against aiwfd without them (its own BENCHMARKS.md block)")
    p.add_argument("--jobs", action="store_true",
                   help="jobs on SQLite and on Redis: submissions vs plain calls, webhook latency, 10,000 queued "
                        "(its own BENCHMARKS.md block)")
    p.add_argument("--otel", action="store_true",
                   help="OpenTelemetry tracing on (OTLP/HTTP, always_on) vs off at c16 (its own BENCHMARKS.md block)")
    p.add_argument("--compat", action="store_true",
                   help="MCP tools/call and OpenAI-compatible chat completions vs POST /agent/{name} at c16 "
                        "(its own BENCHMARKS.md block)")
    p.add_argument("--hiredis-path", default=None,
                   help="--limits: a directory holding hiredis (pip install --target DIR hiredis) for the "
                        "redis+hiredis variant, when it is not installed")
    p.add_argument("--output", type=Path, default=BENCHMARKS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    loadavg_before = _loadavg()
    command = "python scripts/bench.py" + ("" if argv is None and len(sys.argv) < 2 else
                                           " " + " ".join(list(argv) if argv is not None else sys.argv[1:]))
    write = args.write if args.write is not None else not (args.quick or args.lean_survey or args.profile)
    plan = plan_for(args)
    global NPROC, ALL_CPUS
    NPROC = len(os.sched_getaffinity(0))
    ALL_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    pin = not args.no_pin and shutil.which("taskset") is not None and NPROC >= 2
    notes_pre = []
    if not args.no_pin and not pin:
        notes_pre.append("taskset is missing or fewer than 2 CPUs are available: nothing is pinned")
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})  # this script (and the polling it does) stays off the server's CPU
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="aiwfdbench-"))
    procs = Procs(workdir, pin)
    try:
        loader = Loader(procs, args.loader)
        for n in notes_pre:
            log(f"note: {n}")
        if args.lean_survey:
            log(f"lean survey ({loader.kind}, {plan.runs} run(s) of {plan.duration:g} s)")
            table = lean_survey(procs, loader, plan, log)
            text = (f"## Which use of the openai SDK is cheapest (`sdk-lean`)\n\n"
                    f"Command: `{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, median of {plan.runs} run(s) of "
                    f"{plan.duration:g} s per cell, load average {loadavg_before} → {_loadavg()}; every candidate is "
                    "a reference forwarder of scripts/bench_refs.py (see its docstring) pinned to CPU 0.\n\n"
                    + table + "\n")
            print(text)
            if args.write:
                write_benchmarks(args.output, text, LEAN_BEGIN, LEAN_END)
                log(f"wrote the survey to {args.output}")
            return 0
        if args.stream:
            import bench_stream

            machine = [line if not line.startswith("- load generator") else
                       "- client: scripts/bench_stream_load.py (aiohttp" + (", uvloop" if has_module("uvloop") else "")
                       + "), one process per batch" for line in machine_info(loader, pin, "--no-pin" if args.no_pin else "")]
            log(f"stream benchmark ({'quick' if args.quick else 'full'}); pinned: {pin}; workdir {workdir}")
            text = bench_stream.run(procs, args, log, command, machine, loadavg_before, began)
            print(text)
            if write:
                write_benchmarks(args.output, text, bench_stream.BEGIN, bench_stream.END)
                log(f"wrote the stream block of {args.output}")
            log(f"total {time.monotonic() - began:.1f} s")
            return 0
        # The benchmarks with a block of their own: one module each, the same run() and markers.
        for flag, modname in (("limits", "bench_limits"), ("jobs", "bench_jobs"), ("otel", "bench_otel"),
                              ("compat", "bench_compat")):
            if not getattr(args, flag):
                continue
            import importlib

            mod = importlib.import_module(modname)
            log(f"{flag} benchmark ({'quick' if args.quick else 'full'}); pinned: {pin}; workdir {workdir}")
            text = mod.run(procs, args, log, command, machine_info(loader, pin, "--no-pin" if args.no_pin else ""),
                           loadavg_before, began)
            print(text)
            if write:
                write_benchmarks(args.output, text, mod.BEGIN, mod.END)
                log(f"wrote the {flag} block of {args.output}")
            log(f"total {time.monotonic() - began:.1f} s")
            return 0
        transports = ["aiohttp", "sdk"] if args.aiwfd_transport == "both" else [args.aiwfd_transport]
        if args.profile:
            print(profile(procs, loader, plan, transports, log, args.profile_seconds, workdir.parent / "aiwfdbench-profile"))
            return 0
        refs = [r.strip() for r in args.refs.split(",") if r.strip()]
        unknown = [r for r in refs if r not in REFERENCES + LEAN_CANDIDATES]
        if unknown:
            raise SystemExit(f"unknown reference(s): {', '.join(unknown)}")
        servers = servers_for(refs, transports)
        phases = set((args.only or "throughput,latency,inflight,startup,reload").split(","))
        bench = Bench(procs, loader, plan, servers, log)
        bench.notes += notes_pre
        if plan.quick:
            bench.notes.append("--quick: c16 cells last 1 s, c256 cells 2 s; after the throughput runs only raw "
                               "and aiwfd are measured, and the 1,000-in-flight, start-up and reload checks "
                               f"only for aiwfd[{transports[0]}] (start-up and reload do not depend on the "
                               "transport).")
        big = workdir / "agents200.yaml"
        big.write_text(generate(N_AGENTS), encoding="utf-8")

        log(f"fakes: 0 ms, 200 ms, 1 s model latency; loader: {loader.kind}; pinned: {pin}; workdir {workdir}")
        fake0, upstream0 = start_fake(procs, 0)
        mark = [time.monotonic()]

        def lap(name: str) -> None:
            now = time.monotonic()
            log(f"  ({name}: {now - mark[0]:.1f} s)")
            mark[0] = now

        if "throughput" in phases:
            log("[1/4] throughput and latency at 0 ms model latency")
            bench.throughput(upstream0)
            lap("throughput")
        if "latency" in phases:
            log("[2/4] added latency at c16 with a 200 ms model")
            fake200, upstream200 = start_fake(procs, 200)
            bench.added_latency(upstream200, fake200)
            procs.stop(fake200)
            lap("added latency")
        if "inflight" in phases:
            log(f"[3/4] {plan.inflight} in flight against a 1 s model")
            fake1000, upstream1000 = start_fake(procs, 1000)
            bench.inflight(upstream1000)
            procs.stop(fake1000)
            lap("in flight")
        if "startup" in phases or "reload" in phases:
            log(f"[4/4] start-up to the first 200 on /health; SIGHUP reload of the {N_AGENTS}-agent config under load")
            bench.startup_and_reload(upstream0, big, "startup" in phases, "reload" in phases)
            lap("start-up and reload")

        elapsed = time.monotonic() - began
        text = report(bench, machine_info(loader, pin, "--no-pin" if args.no_pin else ""), command, elapsed,
                      (loadavg_before, _loadavg()))
        print(text)
        if write:
            write_benchmarks(args.output, text)
            log(f"wrote {args.output}")
        else:
            log(f"not writing {args.output.name} (--quick without --write, or --no-write)")
        log(f"total {time.monotonic() - began:.1f} s")
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
