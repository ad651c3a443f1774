"""`scripts/bench.py --limits [--quick]`: what limits and JWT cost per agent call (issue 15).

The c16/c256 load of the main table (wrk and scripts/bench/post.lua, or
scripts/bench_load.py), the same fake model at 0 ms, against `aiwfd serve`
(aiohttp transport) on scripts/bench/bench.yaml plus one client key in
`auth.keys` (`key_sha256`; no API_KEY), in five variants started side by side
and measured interleaved (run 1 of every variant, then run 2 …), each run on
a fresh process of each variant (a process's memory layout moves its CPU per
call by a few µs for its whole life: the medians are over processes too):

  no limits       the key, no limits: the baseline of every ratio
  memory          client and agent limits (requests 100000000/min, tokens 10^12/min,
                  concurrency 10000 each: nothing is refused), the in-process store
  redis           the same limits, REDIS_URL at a real loopback redis-server
                  (aiwfd.testing.redisproc), redis-py's pure-Python reply parser
                  (hiredis hidden from the process, if installed)
  redis+hiredis   the same with hiredis importable (installed, or --hiredis-path DIR):
                  redis-py uses it by itself; skipped when neither
  jwt             no limits, `auth.jwt` against aiwfd.testing.issuer run as a process,
                  one pre-minted RS256 token (Authorization: Bearer): the key set is
                  cached and so, after the first call, is the verified token

Redis gets CPU 1 (with the fake and the load generator), aiwfd CPU 0. Every
variant's /metrics is read after the runs: no 429, no store error; the Redis
variants' request counters in Redis are compared with the calls they answered
(so the limits were really counted there). scripts/bench_jwt.py's in-process
measurement (verify without the token cache, cached JWKS) runs too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bench  # the running scripts/bench.py (it registers itself under this name)

BEGIN = "<!-- limits:begin (written by scripts/bench.py --limits) -->"
END = "<!-- limits:end -->"

CLIENT = "bench"
GENEROUS = "{requests: 100000000/min, tokens: 1000000000000/min, concurrency: 10000}"
# The client's requests window is an hour, so that every call of a full run (minutes) is still in
# it when the Redis counters are compared with the calls answered; the cost per call is the same.
GENEROUS_CLIENT = GENEROUS.replace("/min,", "/hour,", 1)
# redis-py 8's asyncio pool holds at most 100 connections and raises MaxConnectionsError past
# that (it does not wait): at c256 aiwfd's admits and finishes need more. The measured Redis
# variants raise the cap through REDIS_URL (a redis-py URL option); "redis, default pool"
# shows what REDIS_URL without it does.
POOL_QUERY = "?max_connections=1024"
CONCURRENCIES = (16, 256)
MEMORY_RATIO, REDIS_RATIO, JWT_EXTRA_US = 0.9, 0.7, 60.0
DECIDES = (
    "Which ratio decides: every server under test is pinned to one CPU and runs it near 100 % busy, so "
    "what limits cost it is CPU per call; 'req/s if CPU-bound' (1000 ÷ server CPU ms/req, as in the otel "
    "block) measures that alone, while req/s also moves with whatever else runs on the load CPU and the "
    "machine (the load generator, the fake, Redis, other people's work): on this 2-core shared machine the "
    "memory row's req/s ratio flipped around 0.9× from run to run. The memory store never waits (admit and "
    "finish do not suspend), so its CPU-bound ratio decides and its req/s ratio is shown. Redis also makes "
    "each call wait for a round trip, which CPU does not show: its rows must pass on both ratios. Targets "
    "as in issue 15: ≥ 0.9× memory, ≥ 0.7× Redis.")


@dataclass
class Variant:
    name: str
    what: str
    limits: bool = False
    redis_db: int | None = None  # REDIS_URL's database (one per Redis variant: their counters apart)
    hiredis: bool | None = None  # None: as installed; False: hidden; True: importable
    jwt: bool = False
    query: str = POOL_QUERY  # appended to REDIS_URL
    only: tuple[int, ...] = CONCURRENCIES  # the concurrencies it is measured at
    checked: bool = True  # part of the correctness row
    proc: bench.Proc | None = None
    header: str = bench.AUTH_HEADER
    runs: dict[int, list[bench.LoadResult]] = field(default_factory=dict)
    redis_cpu: dict[int, list[float]] = field(default_factory=dict)  # Redis CPU µs per answered call
    metrics: dict[str, float] = field(default_factory=dict)  # summed over the variant's processes
    config: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LimitsPlan:
    quick: bool
    runs: int
    durations: dict[int, float]
    warmup: float
    jwt_n: int
    jwt_distinct: int


def plan_for(args: argparse.Namespace) -> LimitsPlan:
    if args.quick:
        p = LimitsPlan(True, 1, {16: 1, 256: 2}, 0, 2000, 200)
    else:
        # Five runs: the medians of the CPU per call (what decides the memory row) settle within ~1 %.
        p = LimitsPlan(False, 5, {16: 5, 256: 5}, 2, 20000, 2000)
    if args.runs:
        p.runs = args.runs
    if args.duration:
        p.durations = {c: args.duration for c in CONCURRENCIES}
    return p


def config_text(limits: bool, issuer: str | None = None) -> str:
    """bench.yaml with one key client (and its limits, the greeter's limits, or auth.jwt)."""
    text = bench.CONFIG.read_text(encoding="utf-8")
    if limits:
        marker = "\n  greeter:\n"
        assert marker in text, "scripts/bench/bench.yaml has no greeter agent"
        text = text.replace(marker, marker + f"    limits: {GENEROUS}\n", 1)
    digest = hashlib.sha256(bench.API_KEY.encode()).hexdigest()
    text += f"\nauth:\n  keys:\n    - name: {CLIENT}\n      key_sha256: \"{digest}\"\n"
    if limits:
        text += f"      limits: {GENEROUS_CLIENT}\n"
    if issuer:
        text += (f"  jwt:\n    issuer: {issuer}\n    audience: aiwfd\n    algorithms: [RS256]\n"
                 "    client_claim: azp\n")
    return text


def hiredis_available(extra: Path | None) -> bool:
    if extra is not None:
        return (extra / "hiredis").is_dir()
    return bench.has_module("hiredis")


def parse_metrics(text: str) -> dict[str, float]:
    """The few series the checks need, summed over their labels that do not matter here."""
    out = {"answered_200": 0.0, "answered_429": 0.0, "agent_calls": 0.0, "rate_limited": 0.0,
           "store_errors": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if series.startswith("aiwfd_http_requests_total{") and 'route="/agent/{name}"' in series:
            if 'status="200"' in series:
                out["answered_200"] += v
            elif 'status="429"' in series:
                out["answered_429"] += v
        elif series.startswith("aiwfd_agent_calls_total{"):
            out["agent_calls"] += v
            if 'outcome="rate_limited"' in series:
                out["rate_limited"] += v
        elif series.startswith("aiwfd_store_errors_total"):
            out["store_errors"] += v
    return out


def http_text(port: int, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.read().decode(errors="replace")
    finally:
        conn.close()


def redis_pid_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LimitsBench:
    def __init__(self, procs: bench.Procs, loader: bench.Loader, plan: LimitsPlan, log: Callable[[str], None],
                 hiredis_path: Path | None) -> None:
        self.procs = procs
        self.loader = loader
        self.plan = plan
        self.log = log
        self.hiredis_path = hiredis_path
        self.variants = [
            Variant("no limits", "the key, no limits"),
            Variant("memory", "limits, in-process store", limits=True),
            Variant("redis", "limits on loopback Redis, pure-Python parser", limits=True, redis_db=0,
                    hiredis=False),
        ]
        self.has_hiredis = hiredis_available(hiredis_path)
        if self.has_hiredis:
            self.variants.append(Variant("redis+hiredis", "limits on loopback Redis, hiredis parser",
                                         limits=True, redis_db=1, hiredis=True))
        self.variants.append(Variant("jwt", "auth.jwt, one RS256 token, no limits", jwt=True))
        self.variants.append(Variant("redis, default pool", "as redis, REDIS_URL without max_connections "
                                     "(redis-py's default pool), c256 only", limits=True, redis_db=2,
                                     hiredis=False, query="", only=(256,), checked=False))
        self.jwt_micro: dict[str, float] = {}
        self.store_cpu: dict[str, dict[str, dict[str, float]]] = {}  # parser -> case -> callers -> µs
        self.redis_counted: dict[str, float] = {}
        self.redis_version = ""
        self.notes: list[str] = []

    def env_for(self, v: Variant, redis_url: str | None, upstream: str, shadow: Path) -> dict[str, str]:
        env = bench.base_env()
        env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=upstream, AIWF_TRANSPORT="aiohttp")
        path = [env.get("PYTHONPATH", str(bench.REPO))]
        if v.hiredis is False:
            path.insert(0, str(shadow))  # a hiredis module that fails to import: redis-py's own parser
        elif v.hiredis and self.hiredis_path is not None:
            path.append(str(self.hiredis_path))
        env["PYTHONPATH"] = os.pathsep.join(path)
        if v.redis_db is not None:
            assert redis_url is not None
            env["REDIS_URL"] = f"{redis_url.rsplit('/', 1)[0]}/{v.redis_db}{v.query}"
        return env

    def start(self, upstream: str, redis_url: str, issuer: str) -> None:
        workdir = self.procs.workdir
        shadow = workdir / "no-hiredis"
        shadow.mkdir(exist_ok=True)
        (shadow / "hiredis.py").write_text('raise ImportError("hidden by scripts/bench.py --limits")\n')
        configs = {False: workdir / "limits-none.yaml", True: workdir / "limits-generous.yaml"}
        for limited, path in configs.items():
            path.write_text(config_text(limited), encoding="utf-8")
        jwt_config = workdir / "limits-jwt.yaml"
        jwt_config.write_text(config_text(False, issuer), encoding="utf-8")
        for v in self.variants:
            v.config = jwt_config if v.jwt else configs[v.limits]
            v.env = self.env_for(v, redis_url, upstream, shadow)
            self.spawn(v)
        for v in self.variants:
            self.ready(v)

    def spawn(self, v: Variant) -> None:
        port = bench.free_port()
        argv = [sys.executable, "-m", "aiwfd", "serve", "-f", str(v.config), "-p", str(port),
                "--host", "127.0.0.1", "--shutdown-timeout", "2"]
        v.proc = self.procs.start(f"aiwfd-{v.name}", argv, cpu=None if self.procs.pin else bench.SERVER_CPU,
                                  env=v.env, port=port)

    def ready(self, v: Variant) -> None:
        assert v.proc is not None
        bench.wait_health(v.proc, v.proc.port or 0, interval=0.02)
        if self.procs.pin:
            bench.pin_threads(v.proc.pid, bench.SERVER_CPU)

    def restart(self, v: Variant) -> None:
        """A fresh process for the next round. Measured here: the same server
        started anew lands ±7 µs per call apart (+20 to +34 µs for memory limits
        in three A/B pairs), its memory laid out differently, and keeps that all
        its life; one process per variant made the verdict that process's luck."""
        self.add_metrics(v)
        assert v.proc is not None
        self.procs.stop(v.proc)
        self.spawn(v)
        self.ready(v)
        self.check_started(v)
        self.warm(v)

    def add_metrics(self, v: Variant) -> None:
        assert v.proc is not None
        for key, value in parse_metrics(http_text(v.proc.port or 0, "/metrics")).items():
            v.metrics[key] = v.metrics.get(key, 0.0) + value

    def check_started(self, v: Variant) -> None:
        """The store the variant was meant to use is the one its start-up log names."""
        assert v.proc is not None
        if v.redis_db is not None:
            # The start-up line may follow the first 200 of /health (it waits for the artifacts).
            v.proc.wait_for(r"redis://", timeout=30)

    def mint(self, issuer_proc: bench.Proc, issuer: str) -> str:
        status, body = bench.http_post(issuer_proc.port or 0, "/realms/test/mint",
                                       json.dumps({"alg": "RS256", "lifetime": 3600}))
        if status != 200:
            raise RuntimeError(f"the issuer's /mint answered {status}: {body[:300]!r}")
        return body.decode()

    def warm(self, v: Variant) -> None:
        assert v.proc is not None
        port = v.proc.port or 0
        name, _, value = v.header.partition(": ")
        headers = {name: value}
        deadline = time.monotonic() + 30
        n = 0
        while n < (5 if self.plan.quick else 20):
            status, text = bench.http_post(port, "/agent/greeter", bench.GREETER_BODY, headers)
            if status == 503 and v.jwt and time.monotonic() < deadline:
                time.sleep(0.02)  # JWT calls are 503 until the issuer's keys load: poll, bounded
                continue
            if status != 200:
                raise RuntimeError(f"{v.proc.name}: POST /agent/greeter answered {status}: {text[:300]!r}\n"
                                   f"{v.proc.tail()}")
            n += 1
        if self.plan.warmup > 0:
            self.loader.run(f"http://127.0.0.1:{port}/agent/greeter", bench.GREETER_BODY, max(CONCURRENCIES),
                            self.plan.warmup, headers=[v.header])

    def measure(self, redis_pid: int) -> None:
        for run in range(self.plan.runs):
            if run:
                for v in self.variants:
                    self.restart(v)
            for c in CONCURRENCIES:
                for v in self.variants:
                    assert v.proc is not None
                    if c not in v.only:
                        continue
                    r0 = redis_pid_cpu(redis_pid)
                    r = self.loader.run(f"http://127.0.0.1:{v.proc.port}/agent/greeter", bench.GREETER_BODY, c,
                                        self.plan.durations[c], headers=[v.header], target=v.proc)
                    ok = r.requests - r.errors
                    if v.redis_db is not None and ok > 0:
                        v.redis_cpu.setdefault(c, []).append((redis_pid_cpu(redis_pid) - r0) * 1e6 / ok)
                    v.runs.setdefault(c, []).append(r)
                    self.log(f"  run {run + 1}/{self.plan.runs} c{c:<4} {v.name:<14} {r.rps:8.0f} req/s  "
                             f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  err {r.errors}  "
                             f"cpu {r.cpu_ms_per_req:.3f} ms/req ({r.busy:.0%} busy)")

    def collect(self, redis_url: str) -> None:
        for v in self.variants:
            self.add_metrics(v)
        import redis as redis_py

        for v in self.variants:
            if v.redis_db is None:
                continue
            client = redis_py.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/{v.redis_db}")
            try:
                counted = sum(int(x) for x in client.hvals(f"aiwfd:requests:3600000:client:{CLIENT}"))
                self.redis_version = str(client.info("server").get("redis_version", ""))
            finally:
                client.close()
            self.redis_counted[v.name] = counted

    def store_probe(self, redis_url: str) -> None:
        """scripts/bench/store_cpu.py on the server CPU, with hiredis hidden and (when there is one) visible."""
        calls = 2000 if self.plan.quick else 10000
        url = f"{redis_url.rsplit('/', 1)[0]}/3{POOL_QUERY}"
        shadow = self.procs.workdir / "no-hiredis"
        for parser, hidden in (("python", True), ("hiredis", False)):
            if not hidden and not self.has_hiredis:
                continue
            env = bench.base_env()
            path = [env.get("PYTHONPATH", str(bench.REPO))]
            if hidden:
                path.insert(0, str(shadow))
            elif self.hiredis_path is not None:
                path.append(str(self.hiredis_path))
            env["PYTHONPATH"] = os.pathsep.join(path)
            argv = [sys.executable, str(bench.BENCH_DIR / "store_cpu.py"), url, str(calls)]
            cp = subprocess.run(self.procs.cmd(argv, bench.SERVER_CPU), capture_output=True, text=True, env=env,
                                timeout=300, cwd=self.procs.workdir, preexec_fn=bench._die_with_parent)
            if cp.returncode != 0:
                raise RuntimeError(f"store_cpu.py failed ({cp.returncode}):\n{cp.stderr[-3000:]}")
            d = json.loads(cp.stdout.strip().splitlines()[-1])
            if d["hiredis"] == hidden:
                raise RuntimeError(f"store_cpu.py: hiredis {'visible' if d['hiredis'] else 'missing'} "
                                   f"in the {parser} run")
            self.store_cpu[parser] = {case: {str(k): v for k, v in by.items()} for case, by in d["cpu_us"].items()}
            self.log(f"  store client CPU ({parser} parser): " + ", ".join(
                f"{case} c16 {by['16']:.0f} µs" for case, by in self.store_cpu[parser].items()))

    def jwt_inprocess(self) -> None:
        """scripts/bench_jwt.py in this process (on the load CPU, idle by now)."""
        sys.path.insert(0, str(bench.REPO / "scripts"))
        import bench_jwt

        rows = asyncio.run(bench_jwt.bench(self.plan.jwt_n, self.plan.jwt_distinct))
        for row in rows:
            self.jwt_micro[f"{row['alg']} {row['case']}"] = row["cpu_us"]

    # -- results

    def value(self, v: Variant, c: int, what: str) -> float:
        rs = v.runs.get(c, [])
        if what == "rps":
            return bench.median([r.rps for r in rs])
        if what == "cpu":
            return bench.median([r.cpu_ms_per_req for r in rs])
        if what == "cpu_rps":  # what the server would answer if its CPU were the only bound
            cpu = bench.median([r.cpu_ms_per_req for r in rs])
            return 1000 / cpu if cpu == cpu and cpu > 0 else float("nan")
        if what == "p50":
            return bench.median([r.p50_ms for r in rs])
        if what == "p99":
            return bench.median([r.p99_ms for r in rs])
        if what == "err":
            return float(sum(r.errors for r in rs))
        if what == "busy":
            return bench.median([r.busy for r in rs])
        if what == "redis_us":
            return bench.median(v.redis_cpu.get(c, []))
        raise KeyError(what)

    def paired(self, v: Variant, base: Variant, c: int, what: str) -> float:
        """The median over rounds of v ÷ base in the same round (each round a fresh
        process of each, measured one after the other): the pairs the interleaving makes."""
        def metric(r: bench.LoadResult) -> float:
            if what == "rps":
                return r.rps
            return 1000 / r.cpu_ms_per_req if r.cpu_ms_per_req > 0 else float("nan")  # cpu_rps
        pairs = [metric(x) / metric(b) for x, b in zip(v.runs.get(c, []), base.runs.get(c, []), strict=False)
                 if metric(b) and metric(b) == metric(b)]
        return bench.median(pairs) if pairs else float("nan")

    def by_name(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def _fmt(v: float | None, fmt: str) -> str:
    return "—" if v is None or v != v else fmt.format(v)


def render(lb: LimitsBench) -> tuple[str, str, list[tuple[str, bool]]]:
    """The measurements table, the targets table, and (row, ok) of each target."""
    names = [v.name for v in lb.variants]
    head = "| metric | " + " | ".join(f"**{n}**" if n == "no limits" else n for n in names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    spec = [("rps", "req/s", "{:.0f}"), ("cpu", "server CPU ms/req", "{:.3f}"),
            ("cpu_rps", "req/s if CPU-bound (1000 ÷ server CPU ms/req)", "{:.0f}"), ("p50", "p50 ms", "{:.2f}"),
            ("p99", "p99 ms", "{:.2f}"), ("err", "errors", "{:.0f}"), ("busy", "server CPU busy", "{:.0%}"),
            ("redis_us", "Redis CPU µs per call", "{:.1f}")]
    for key, label, fmt in spec:
        for c in CONCURRENCIES:
            lines.append(f"| {label} c{c} | " + " | ".join(_fmt(lb.value(v, c, key), fmt) for v in lb.variants) + " |")
    for key, label in (("answered_200", "agent calls answered 200 (/metrics)"),
                       ("answered_429", "answered 429 (/metrics)"),
                       ("store_errors", "aiwfd_store_errors_total")):
        lines.append(f"| {label} | " + " | ".join(_fmt(v.metrics.get(key), "{:.0f}") for v in lb.variants) + " |")
    lines.append("| calls counted in Redis (client requests window) | " + " | ".join(
        _fmt(lb.redis_counted.get(v.name), "{:.0f}") for v in lb.variants) + " |")

    base = lb.by_name("no limits")
    assert base is not None
    targets: list[tuple[str, str, str, bool | None]] = []  # label, value, target, ok (None: no target)

    def ratio_rows(name: str, floor: float, rps_decides: bool) -> None:
        """Per concurrency: the req/s ratio and the CPU-bound one (see DECIDES); each row
        that decides has a verdict, the other is shown against the same target."""
        v = lb.by_name(name)
        if v is None:
            return
        for c in CONCURRENCIES:
            for key, what, decides in (("rps", "req/s", rps_decides),
                                       ("cpu_rps", "req/s if CPU-bound (1000 ÷ server CPU ms/req)", True)):
                r = lb.paired(v, base, c, key)
                ok = (r == r and r >= floor) if decides else None
                targets.append((f"{name} ÷ no limits, {what} c{c}", _fmt(r, "{:.2f}×"),
                                f"≥ {floor:g}×" + ("" if decides else " (shown; the CPU-bound row decides)"), ok))
        cells = []
        for c in CONCURRENCIES:
            a, b = base_v(c, "cpu"), lb.value(v, c, "cpu")
            cells.append(f"c{c} {_fmt((b - a) * 1000 if a == a and b == b else None, '{:+.0f}')}")
        targets.append((f"{name}: extra server CPU µs per call vs no limits", ", ".join(cells), "", None))

    def base_v(c: int, key: str) -> float:
        return lb.value(base, c, key)

    ratio_rows("memory", MEMORY_RATIO, rps_decides=False)
    ratio_rows("redis", REDIS_RATIO, rps_decides=True)
    if lb.by_name("redis+hiredis") is not None:
        ratio_rows("redis+hiredis", REDIS_RATIO, rps_decides=True)
    jwt_v = lb.by_name("jwt")
    if jwt_v is not None:
        for c in CONCURRENCIES:
            a, b = base_v(c, "cpu"), lb.value(jwt_v, c, "cpu")
            extra = (b - a) * 1000 if a == a and b == b else float("nan")
            targets.append((f"jwt: extra server CPU µs per call vs the API key, end to end, c{c} "
                            "(one token: cached JWKS and verified-token cache)", _fmt(extra, "{:+.0f}"),
                            f"≤ {JWT_EXTRA_US:g} µs", extra <= JWT_EXTRA_US if extra == extra else False))
    for case in ("RS256 verify, no cache", "RS256 verify, cache miss", "RS256 verify, cache hit"):
        us = lb.jwt_micro.get(case)
        target = case == "RS256 verify, no cache"
        targets.append((f"jwt: {case}, CPU µs per verify (scripts/bench_jwt.py, cached JWKS)", _fmt(us, "{:.1f}"),
                        f"≤ {JWT_EXTRA_US:g} µs" if target else "",
                        (us is not None and us <= JWT_EXTRA_US) if target else None))
    # Correctness: nothing refused, nothing failed, every call counted where it should be.
    checked = [v for v in lb.variants if v.checked]
    errors = sum(lb.value(v, c, "err") for v in checked for c in v.only)
    refused = sum(v.metrics.get("answered_429", 0) + v.metrics.get("rate_limited", 0) for v in checked)
    store_err = sum(v.metrics.get("store_errors", 0) for v in checked)
    missing = [v.name for v in checked if not v.metrics or not v.runs
               or (v.redis_db is not None and v.name not in lb.redis_counted)]
    uncounted = [v.name for v in checked if v.redis_db is not None
                 and lb.redis_counted.get(v.name, 0) < v.metrics.get("answered_200", 0)]
    ok = errors == 0 and refused == 0 and store_err == 0 and not missing and not uncounted
    targets.append((f"errors ({', '.join(v.name for v in checked)}): failed requests + 429s + store errors",
                    f"{errors:.0f} + {refused:.0f} + {store_err:.0f}"
                    + (f"; Redis counted fewer calls than answered: {', '.join(uncounted)}" if uncounted else "")
                    + (f"; not measured: {', '.join(missing)}" if missing else ""),
                    "0, and Redis counts every call answered", ok))
    pool = lb.by_name("redis, default pool")
    if pool is not None:
        errs = pool.metrics.get("store_errors", float("nan"))
        answered = pool.metrics.get("answered_200", 0)
        targets.append(("redis, default pool (REDIS_URL without max_connections), c256: calls the store did "
                        "not answer (passed uncounted, on_store_error: allow)",
                        f"{_fmt(errs, '{:.0f}')} of {answered:.0f}", "0", errs == 0))
    t = ["| row | value | target | verdict |", "|---|---:|---|---|"]
    if lb.store_cpu:
        parsers = list(lb.store_cpu)
        cases = list(next(iter(lb.store_cpu.values())))
        probe = ["| Redis client CPU µs per call, in one process | "
                 + " | ".join(f"c{c}, {p}" for c in CONCURRENCIES for p in parsers) + " |",
                 "|---|" + "---:|" * (len(parsers) * len(CONCURRENCIES))]
        for case in cases:
            probe.append(f"| {case} | " + " | ".join(_fmt(lb.store_cpu[p].get(case, {}).get(str(c)), "{:.1f}")
                                                 for c in CONCURRENCIES for p in parsers) + " |")
        lines += ["", *probe]
    verdicts = []
    for label, value, target, ok_ in targets:
        t.append(f"| {label} | {value} | {target} | {'' if ok_ is None else ('PASS' if ok_ else 'FAIL')} |")
        if ok_ is not None:
            verdicts.append((label, ok_))
    return "\n".join(lines), "\n".join(t), verdicts


def report(lb: LimitsBench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    measured, targets, verdicts = render(lb)
    p = lb.plan
    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return "not installed"

    hiredis = ("hiredis " + (version("hiredis") if lb.hiredis_path is None else
                             f"from {lb.hiredis_path}") if lb.has_hiredis else "hiredis not available: no redis+hiredis column")
    out = [
        f"## Limits and JWT: latest run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run: {p.runs} run(s) per cell, "
        + ", ".join(f"c{c} {p.durations[c]:g} s" for c in CONCURRENCIES)
        + f", median per cell, errors summed; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- redis-server {lb.redis_version or '?'} (aiwfd.testing.redisproc: loopback, no persistence) on CPU "
        f"{bench.LOAD_CPU}; redis-py {version('redis')}; {hiredis}",
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine: numbers are noisy)",
        "",
        "Variants (all `aiwfd serve`, aiohttp transport, greeter at 0 ms model latency, one client key in "
        "`auth.keys` with `key_sha256`): " + "; ".join(f"**{v.name}**: {v.what}" for v in lb.variants)
        + f". Limits: the client's and the greeter's, each `{GENEROUS}`: six limits per call (requests, tokens and concurrency of each), nothing refused.",
        "",
        measured,
        "",
        targets,
        "",
        "Notes:",
        "- the ratios are the median over the runs of the variant ÷ no limits in the same run: the runs are "
        "interleaved (run 1 of every variant, then run 2), so each is a pair measured back to back, and each "
        "run is on a fresh process of every variant (one process keeps its memory layout's luck, a few µs "
        "per call, all its life: three A/B pairs of fresh processes put memory limits at +20, +27 and +34 µs); "
        "the table above shows each variant's own medians. "
        "'extra server CPU' is the variant's CPU ms/req (user+sys of the server, /proc) minus the no-limits one's. "
        + DECIDES,
        "- Redis CPU µs per call: redis-server's user+sys during the cell ÷ calls answered (it shares CPU "
        f"{bench.LOAD_CPU} with the fake and the load generator, as a Redis on another host would not).",
        "- the redis column hides hiredis from aiwfd (a `hiredis` module that fails to import, first on "
        "PYTHONPATH): redis-py then parses replies in Python; redis+hiredis lets redis-py find it.",
        "- jwt end to end: one token minted by `python -m aiwfd.testing.issuer` (RS256, 1 h), sent on every "
        "request; after the first call aiwfd answers it from its verified-token cache (a SHA-256 and a "
        "lookup). The full RS256 verification a new token costs is the bench_jwt.py 'no cache' row.",
        f"- the measured Redis variants' REDIS_URL ends in `{POOL_QUERY}`: redis-py {version('redis')}'s asyncio "
        "pool holds at most 100 connections and raises MaxConnectionsError past that instead of waiting. The "
        "limits store no longer draws on that pool per call: its admits and finishes share one pipelined "
        "connection (aiwfd/store/redis.py `_Link`: the admits of one event-loop pass in one write), so "
        "'redis, default pool' (REDIS_URL without it, c256) must answer every call too (its store-errors row); "
        "before, it held one pooled connection per admit in flight and failed most calls at c256.",
        "- the client's requests limit is 100000000/hour (the agent's: /min) so that every call of the run is "
        "still in its window when the Redis counters are compared with the calls answered (same cost per call).",
        "- the Redis client CPU table: scripts/bench/store_cpu.py, one process on CPU "
        f"{bench.SERVER_CPU} (uvloop), no HTTP: the client side of the store alone, per agent call.",
        *[f"- {n}" for n in lb.notes],
    ]
    if verdicts:
        failed = [label for label, ok in verdicts if not ok]
        out += ["", f"Targets: {sum(ok for _, ok in verdicts)}/{len(verdicts)} PASS"
                + (f"; FAIL: {'; '.join(failed)}" if failed else "")]
    return "\n".join(out) + "\n"


def run(procs: bench.Procs, args: argparse.Namespace, log: Callable[[str], None], command: str,
        machine: list[str], loadavg_before: str, began: float) -> str:
    """The whole --limits mode; returns the report (bench.py prints and writes it)."""
    from aiwfd.testing.redisproc import RedisServer

    loader = bench.Loader(procs, args.loader)
    hiredis_path = Path(args.hiredis_path).resolve() if args.hiredis_path else None
    lb = LimitsBench(procs, loader, plan_for(args), log, hiredis_path)
    _, upstream = bench.start_fake(procs, 0)
    issuer_proc = procs.start("issuer", [sys.executable, "-m", "aiwfd.testing.issuer", "--port", "0",
                                         "--max-age", "3600"], cpu=bench.LOAD_CPU, env=bench.base_env())
    m, _ = issuer_proc.wait_for(r"LISTENING (\d+)", stream="out")
    issuer_proc.port = int(m.group(1))
    issuer = f"http://127.0.0.1:{issuer_proc.port}/realms/test"
    redis = RedisServer()
    redis.start()
    try:
        assert redis.proc is not None
        if procs.pin:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(redis.proc.pid, {bench.LOAD_CPU})
        log(f"variants: {', '.join(v.name for v in lb.variants)}; redis-server pid {redis.proc.pid} "
            f"port {redis.port}; issuer port {issuer_proc.port}; loader {loader.kind}")
        lb.start(upstream, redis.url, issuer)
        jwt_v = lb.by_name("jwt")
        if jwt_v is not None:
            jwt_v.header = f"Authorization: Bearer {lb.mint(issuer_proc, issuer)}"
        for v in lb.variants:
            lb.check_started(v)
            lb.warm(v)
        log("  servers ready and warmed up: " + ", ".join(f"{v.name} pid {v.proc.pid}" for v in lb.variants
                                                          if v.proc is not None))
        log(f"[1/3] c{'/c'.join(str(c) for c in CONCURRENCIES)}, {lb.plan.runs} run(s), interleaved")
        lb.measure(redis.proc.pid)
        lb.collect(redis.url)
        procs.stop_many([v.proc for v in lb.variants if v.proc is not None])
        procs.stop(issuer_proc)
        log("[2/3] the store's client CPU per call in one process (scripts/bench/store_cpu.py)")
        lb.store_probe(redis.url)
    finally:
        redis.__exit__(None, None, None)
    log("[3/3] scripts/bench_jwt.py in process")
    lb.jwt_inprocess()
    return report(lb, machine, command, time.monotonic() - began, (loadavg_before, bench._loadavg()))

