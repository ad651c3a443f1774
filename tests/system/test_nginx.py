"""Real nginx in front of real `aiwfd serve` instances (issue 4, item 6; SPEC §5).

The nginx config is generated from the shipped deploy/nginx/aiwfd.conf: only
the upstream's server lines, the listen line and the access-log path are
replaced, so the test runs the shipped settings (upstream keep-alive, HTTP/1.1
with an empty Connection header, `proxy_next_upstream error timeout http_503
non_idempotent`, tries, timeouts, max_fails). Everything nginx writes (pid,
logs, temp files) stays in tmp_path; nginx runs with `daemon off;` as a child
of the test and is stopped at the end of each test.

The module shares one fake model process (aiwfd.testing.fakeopenai, LATENCY_MS per
answer) and INSTANCES long-lived instances on loopback; each test puts a fresh
nginx in front and sends CALLS or more agent calls through it, CONCURRENCY at a
time, from one keep-alive aiohttp client. Once DISRUPT_AT calls completed:

* test_rolling_restart_and_reload_lose_nothing (5 runs, a different instance
  each time): A gets SIGTERM, drains, exits 0 and starts again on the same
  port; B gets SIGHUP with a changed system prompt. Zero failed calls: every
  answer is 200 with a `{"data", "trace"}` body.
* test_kill_9_cost: kill -9 of an instance, restarted like Restart=always
  would: zero failed calls, and a "KILL -9 COST:" line (calls nginx passed on
  to another instance, possible second model calls).
* test_back_to_back_and_random_restarts_lose_nothing (issue 12): all
  instances restarted back to back with no pause, then each RESTARTS_EACH
  times at random moments, under plain calls, streams and batches at once
  (run_mixed): zero failed requests. This is what the upstream's
  `max_fails=0` is for; AIWFD_TEST_NGINX_SERVER_PARAMS="max_fails=3
  fail_timeout=10s" runs it with other server parameters, to measure them.
* test_cluster_sh_rolling_restart_loses_nothing: scripts/cluster.sh --mock
  and its SIGUSR1 rolling restart (back to back), twice, under the same load.
* test_nginx_own_errors_are_json: nginx's own 502/504/413/400/414/431/404
  answer in SPEC 3.1's JSON shape with the request id; aiwfd's pass untouched.
* test_a_long_drain_loses_nothing: SIGTERM while one slow call keeps the drain
  going for SLOW_SECONDS, longer than proxy_next_upstream_timeout (10 s). This
  is the keep-alive race of production (model calls take seconds): nginx keeps
  sending requests on its idle pooled connections to the draining instance,
  and each must be answered or refused at once. A drain that merely stops
  reading them (aiohttp's RequestHandler.close() on idle connections) holds
  them until the drain ends, and nginx then answers 502 because its retry
  window is over.

A failed assertion carries nginx's error.log, the access-log lines of the
failed calls (`upstream=` / `ustatus=` list every attempt nginx made) and the
instances' logs; all files are in pytest's tmp_path (`--basetemp DIR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import orjson
import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.nginxconf import NGINX, SHIPPED, main_conf, shipped_conf
from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess, LineReader, fake_process, free_port
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")

AGENTS = CONFIGS / "nginx_cluster.yaml"

INSTANCES = 3
RUNS = 5
CALLS = 2000          # at least this many agent calls per run
CONCURRENCY = 32
LATENCY_MS = 20       # the fake model's answer time
DISRUPT_AT = 400      # completed calls before the signals start
TAIL = 300            # calls still sent after the last disruption finished
SLOW_SECONDS = 11.0   # the slow agent's model: longer than proxy_next_upstream_timeout (10 s)
RUN_TIMEOUT = 120.0   # a hung run fails instead of hanging the suite
RESTARTS_EACH = 5     # test_back_to_back_and_random_restarts_lose_nothing: random restarts per instance
MAX_GAP = 1.5         # ... each after a random pause of up to this many seconds (seeded)
SEED = 12
TAIL_SECONDS = 2.0    # mixed load still sent after the last restart
MIXED_TIMEOUT = 150.0
# For measuring alternatives, not for CI: replaces the parameters of every
# upstream `server` line (e.g. "max_fails=3 fail_timeout=10s", the old ones).
SERVER_PARAMS = os.environ.get("AIWFD_TEST_NGINX_SERVER_PARAMS")

INPUT = orjson.dumps({"name": "Alice"})
HEADERS = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------
# nginx


def upstream_conf(listen: int, ports: list[int], access_log: Path) -> str:
    """deploy/nginx/aiwfd.conf with this test's servers, a loopback listen and a tmp log path.

    Everything else (keep-alive, retries, timeouts, headers) is the shipped text.
    """
    text = SHIPPED.read_text(encoding="utf-8")
    # The settings this test exists for: fail loudly if the example loses one,
    # rather than silently testing something else.
    code = re.sub(r"\s+", " ", "\n".join(ln.split("#", 1)[0] for ln in text.splitlines()))
    assert re.search(r"upstream aiwfd \{[^}]* keepalive \d+;", code), "shipped config: no upstream keepalive"
    assert "proxy_http_version 1.1;" in code and 'proxy_set_header Connection "";' in code
    next_upstream = re.search(r"proxy_next_upstream ([^;]*);", code)
    assert next_upstream, "shipped config: no proxy_next_upstream"
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(next_upstream.group(1).split())
    text = shipped_conf(listen, access_log, ports)
    if SERVER_PARAMS is not None:
        text, n = re.subn(r"^([ \t]*server 127\.0\.0\.1:\d+)[^;\n]*;", rf"\g<1> {SERVER_PARAMS};", text, flags=re.M)
        assert n == len(ports)
    return text


class Nginx:
    """nginx (daemon off) as a child process; its stderr (notice level) read by a thread."""

    def __init__(self, d: Path, ports: list[int]) -> None:
        assert NGINX is not None
        self.dir = d
        self.port = free_port()
        self.access_log = d / "access.log"
        self.error_log = d / "error.log"
        (d / "aiwfd.conf").write_text(upstream_conf(self.port, ports, self.access_log), encoding="utf-8")
        self.conf = d / "nginx.conf"
        self.conf.write_text(main_conf(d, workers=2, connections=1024, stderr_notices=True), encoding="utf-8")
        self.cmd = [NGINX, "-p", str(d), "-c", str(self.conf)]
        help_text = subprocess.run([NGINX, "-h"], capture_output=True, text=True, timeout=30).stderr
        if "-e filename" in help_text:  # nginx >= 1.19.5: not even /var/log/nginx/error.log
            self.cmd[1:1] = ["-e", str(self.error_log)]
        t = subprocess.run(self.cmd + ["-t"], capture_output=True, text=True, timeout=60)
        assert t.returncode == 0, f"nginx -t failed:\n{t.stderr}"
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._stderr = LineReader(self.proc.stderr)
        self.lines = self._stderr.lines
        try:
            # The master opens the listening sockets before it forks workers:
            # once a worker is started, connections are accepted.
            self.wait_for(r"start worker process \d+")
        except BaseException:
            self.stop()
            raise

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        try:
            return self._stderr.wait_for(pattern, timeout)
        except AssertionError as e:
            raise AssertionError(f"nginx: {e}\n{self.read_error_log()}") from None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def read_error_log(self) -> str:
        try:
            return self.error_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """error.log lines at [warn] or worse (upstream failures, retries, disabled servers)."""
        return [ln for ln in self.read_error_log().splitlines()
                if re.search(r"\[(warn|error|crit|alert|emerg)\]", ln)]

    def access(self) -> list[dict[str, str]]:
        """The shipped `aiwfd` log format, parsed: status, upstream (every attempt), ustatus."""
        out = []
        for ln in self.access_log.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.search(r'"(?P<req>[^"]*)" (?P<status>\d{3}) .* rid=(?P<rid>\S+) '
                          r'upstream=(?P<upstream>.*?) ustatus=(?P<ustatus>.*?) rt=', ln)
            if m:
                out.append({**m.groupdict(), "line": ln})
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.join(5)


# --------------------------------------------------------------------------
# the cluster


@dataclass
class Cluster:
    """A fake model process and N long-lived aiwfd instances, shared by the module's tests.

    Each test puts its own fresh nginx in front (fresh keep-alive pools,
    fail counters and logs) and restarts or kills an instance itself.
    """

    dir: Path
    base_url: str
    slow_url: str
    instances: list[AiwfdProcess] = field(default_factory=list)
    retired: list[AiwfdProcess] = field(default_factory=list)  # stopped ones, kept for their logs

    def config(self, i: int) -> Path:
        return self.dir / f"agents-{i}.yaml"

    def write_config(self, i: int, prompt: str) -> None:
        text = AGENTS.read_text(encoding="utf-8")
        text = text.replace("@PROMPT@", prompt).replace("@SLOW_URL@", self.slow_url)
        self.config(i).write_text(text, encoding="utf-8")

    def start_instance(self, i: int, port: int = 0) -> AiwfdProcess:
        """`aiwfd serve` for instance i; returns once it logged its listening line."""
        env = {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": "sk-test-nginx",
               "TMPDIR": str(self.dir)}
        # cwd: no stray ./.env from the repository; --env-file: an empty one.
        proc = AiwfdProcess(["serve", "-f", str(self.config(i)), "--host", "127.0.0.1", "-p", str(port),
                             "--env-file", str(self.dir / "empty.env")],
                            env=env, cwd=self.dir, wait_ready=False)
        try:
            m = LISTEN_RE.search(proc.wait_for_log(LISTEN_RE.pattern, timeout=30))
            assert m
        except BaseException:
            proc.stop(signal.SIGKILL, 5)  # never leave a half-started instance behind
            raise
        proc.host, proc.port = m.group(1), int(m.group(2))
        return proc

    async def restart(self, i: int) -> None:
        """`systemctl restart`: SIGTERM, the drain, exit 0, start again on the same port.

        Returns once the new process listens, as `systemctl restart` of the
        Type=notify unit returns once READY=1 came.
        """
        old = self.instances[i]
        old.send(signal.SIGTERM)
        rc = await asyncio.to_thread(old.wait, 40)
        self.retired.append(old)
        assert rc == 0, f"instance {old.port} exited {rc}:\n{old.stderr[-3000:]}"
        self.instances[i] = await asyncio.to_thread(self.start_instance, i, old.port or 0)

    def ports(self) -> list[int]:
        out = [p.port for p in self.instances]
        assert None not in out
        return out  # type: ignore[return-value]

    def ensure_running(self) -> None:
        """Bring back an instance a failed test left dead, on its port, so tests stay independent."""
        for i, p in enumerate(self.instances):
            if p.proc.poll() is not None:
                p.wait(5)
                self.retired.append(p)
                self.instances[i] = self.start_instance(i, p.port or 0)

    def stop_all(self) -> None:
        for p in self.instances:
            if p.proc.poll() is None:
                p.send(signal.SIGTERM)  # all drain side by side
        for p in self.instances + self.retired:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.wait(5)


@pytest.fixture(scope="module")
async def slow_fake() -> AsyncIterator[FakeOpenAI]:
    """The `slow` agent's model: in this process, so a test knows when a slow call has arrived."""
    async with FakeOpenAI(latency=SLOW_SECONDS, record=False) as fake:
        yield fake


@pytest.fixture(scope="module")
def shared(slow_fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("cluster")
    (d / "empty.env").write_text("", encoding="utf-8")
    with fake_process(LATENCY_MS) as (_fake, base_url):
        c = Cluster(d, base_url, slow_fake.base_url)
        try:
            for i in range(INSTANCES):
                c.write_config(i, "Generate a friendly greeting")
            # Start-up is ~1.5 s of imports each: start them side by side.
            started: list[AiwfdProcess | BaseException] = [RuntimeError("not started")] * INSTANCES

            def start(i: int) -> None:
                try:
                    started[i] = c.start_instance(i)
                except BaseException as e:  # noqa: BLE001 - raised below
                    started[i] = e

            threads = [threading.Thread(target=start, args=(i,)) for i in range(INSTANCES)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            c.instances = [p for p in started if isinstance(p, AiwfdProcess)]
            for e in started:
                if isinstance(e, BaseException):
                    raise e
            yield c
        finally:
            c.stop_all()


@contextlib.asynccontextmanager
async def nginx_in_front(c: Cluster, d: Path) -> AsyncIterator[Nginx]:
    await asyncio.to_thread(c.ensure_running)
    d.mkdir()
    ng = await asyncio.to_thread(Nginx, d, c.ports())
    try:
        yield ng
    finally:
        await asyncio.to_thread(ng.stop)


# --------------------------------------------------------------------------
# the load


@dataclass
class Result:
    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    disrupted_at: int = -1        # calls completed when the first signal went out
    disruption_done_at: int = -1  # calls completed when the last disruption finished


def valid_body(raw: bytes) -> str | None:
    """None if `raw` is an agent answer: {"data": {"message": str}, "trace": {...}}."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"not JSON: {raw[:200]!r}"
    if not isinstance(doc, dict) or set(doc) != {"data", "trace"}:
        return f"not a {{data, trace}} body: {raw[:300]!r}"
    if not isinstance(doc["data"], dict) or not isinstance(doc["data"].get("message"), str):
        return f"bad data: {raw[:300]!r}"
    if not isinstance(doc["trace"], dict):
        return f"bad trace: {raw[:300]!r}"
    return None


async def run_load(url: str, disrupt: Callable[[], Awaitable[None]], calls: int = CALLS,
                   concurrency: int = CONCURRENCY) -> Result:
    """`calls` or more agent calls, `concurrency` at a time, over keep-alive connections.

    `disrupt` starts once DISRUPT_AT calls have completed; the load goes on
    until it has finished and TAIL more calls were sent (and `calls` in all).
    """
    res = Result()
    target = calls
    trigger = asyncio.Event()
    done = asyncio.Event()
    completed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal completed
        while not done.is_set() or res.sent < target:
            res.sent += 1
            n = res.sent
            try:
                async with session.post(url, data=INPUT, headers={**HEADERS, "X-Request-ID": f"load-{n}"}) as r:
                    body = await r.read()
                    res.statuses[r.status] += 1
                    problem = None if r.status == 200 else f"HTTP {r.status}: {body[:300]!r}"
                    problem = problem or valid_body(body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                res.statuses[0] += 1
                problem = f"{type(e).__name__}: {e}"
            if problem is None:
                res.ok += 1
            else:
                res.failures.append(f"load-{n}: {problem}")
            completed += 1
            if completed >= DISRUPT_AT:
                trigger.set()

    async def disruptor() -> None:
        nonlocal target
        try:
            await trigger.wait()
            res.disrupted_at = completed
            await disrupt()
            res.disruption_done_at = completed
        finally:
            target = max(calls, res.sent + TAIL)
            done.set()

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=90)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        dis = asyncio.create_task(disruptor())
        try:
            await asyncio.wait_for(asyncio.gather(dis, *tasks), RUN_TIMEOUT)
        finally:
            for t in [dis, *tasks]:
                t.cancel()
            await asyncio.gather(dis, *tasks, return_exceptions=True)
    res.seconds = time.monotonic() - started
    return res


def report(c: Cluster, ng: Nginx, res: Result, label: str) -> str:
    """One paragraph for the log, and the diagnostics of a failed run (read once nginx stopped)."""
    access = ng.access()
    agent = [a for a in access if "/agent/" in a["req"]]
    retried = [a for a in agent if "," in a["upstream"]]  # nginx lists every attempt: "A, B"
    problems = ng.problems()
    kinds = error_kinds(problems)
    lines = [
        f"{label}: {res.sent} calls in {res.seconds:.1f}s ({res.sent / max(res.seconds, 1e-9):.0f}/s), "
        f"{res.ok} ok, {len(res.failures)} failed; statuses {dict(res.statuses)}; "
        f"signals at call {res.disrupted_at}, done at {res.disruption_done_at}",
        f"nginx: {len(agent)} agent calls logged, {len(retried)} passed to a second instance "
        f"(ustatus of those: {dict(Counter(a['ustatus'] for a in retried))})",
        f"nginx error.log (warn and worse): {dict(kinds)}",
    ]
    return "\n".join(lines + failure_details(c, access, problems, res.failures))


def failure_details(c: Cluster, access: list[dict[str, str]], problems: list[str], failures: list[str]) -> list[str]:
    """What a failed run's assertion shows: the failures, their access-log lines, nginx's and aiwfd's logs."""
    if not failures:
        return []
    failed = {f.split(":", 1)[0] for f in failures}
    lines = ["first failures:\n  " + "\n  ".join(failures[:20]),
             "their access-log lines:\n  " + "\n  ".join(a["line"] for a in access if a["rid"] in failed)[:20000],
             "nginx error.log (warn and worse):\n  " + "\n  ".join(problems[-60:])]
    for p in c.retired[-8:] + c.instances:
        lines.append(f"aiwfd pid {p.pid} port {p.port} (rc {p.proc.poll()}), last lines:\n  "
                     + "\n  ".join(ln for ln in p.lines if "POST /agent/" not in ln)[-3000:])
    return lines


def error_kinds(problems: list[str]) -> Counter[str]:
    """nginx error.log lines by what happened ("no live upstreams", "connect() failed (111: ...)")."""
    return Counter(re.sub(r"^.*?\[\w+\] \d+#\d+: (\*\d+ )?", "", ln).split(" while ")[0].split(",")[0]
                   for ln in problems)


# --------------------------------------------------------------------------
# the mixed load: plain calls, streams and batches side by side

BATCH_INPUTS = 8      # inputs per batch (batch_concurrency 8: one round of model calls)
MIX = {"plain": 20, "stream": 8, "batch": 4}  # workers of each kind (CONCURRENCY in all)
BATCH_BODY = orjson.dumps({"inputs": [{"name": f"Ann {i}"} for i in range(BATCH_INPUTS)]})


@dataclass
class Mixed:
    """Per kind: requests sent, failures, latencies (seconds, successful ones)."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in MIX})
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    failed_at: list[float] = field(default_factory=list)  # seconds after `started`
    phases: list[str] = field(default_factory=list)  # what the disruption did, and when

    def now(self) -> float:
        return time.monotonic() - self.started

    def p99(self, kind: str) -> float:
        xs = sorted(self.latencies[kind])
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")

    def summary(self) -> str:
        window = (f"; failures from t={min(self.failed_at):.1f}s to t={max(self.failed_at):.1f}s"
                  if self.failed_at else "")
        return ", ".join(f"{k}: {self.sent[k]} sent, {self.sent[k] - self.ok[k]} failed, "
                         f"p99 {self.p99(k) * 1000:.0f} ms, max {max(self.latencies[k], default=0) * 1000:.0f} ms"
                         for k in MIX) + window


def sse_events(raw: bytes) -> list[tuple[str, bytes]]:
    """(event, data) pairs of a complete text/event-stream body; comments dropped."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "message", []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if data:
            out.append((name, b"\n".join(data)))
    return out


def stream_problem(status: int, content_type: str, raw: bytes) -> str | None:
    """None if the stream is an agent answer: 200, events, the last one `result` {data, trace}."""
    if status != 200:
        return f"HTTP {status}: {raw[:300]!r}"
    if not content_type.startswith("text/event-stream"):
        return f"not an event stream ({content_type}): {raw[:300]!r}"
    events = sse_events(raw)
    if not events or events[0][0] != "start":
        return f"no start event: {raw[:300]!r}"
    if events[-1][0] != "result":
        return f"ended with {events[-1][0]!r}, not result: {raw[-300:]!r}"
    return valid_body(events[-1][1])


def batch_problem(status: int, raw: bytes) -> str | None:
    """None if every input of the batch was answered."""
    if status != 200:
        return f"HTTP {status}: {raw[:300]!r}"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"not JSON: {raw[:200]!r}"
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or len(results) != BATCH_INPUTS:
        return f"not {BATCH_INPUTS} results: {raw[:300]!r}"
    for item in results:
        problem = valid_body(orjson.dumps(item))
        if problem:
            return f"an item failed: {problem}"
    return None


async def run_mixed(ng: Nginx, disrupt: Callable[[Mixed], Awaitable[None]]) -> Mixed:
    """MIX workers of each kind through nginx until `disrupt` has finished, and TAIL_SECONDS more.

    The load is on before `disrupt` starts: every kind has had at least
    one success (so the pools are warm and a failure is the disruption's).
    """
    res = Mixed()
    done = asyncio.Event()
    warm = {k: asyncio.Event() for k in MIX}
    n = 0

    async def one(session: aiohttp.ClientSession, kind: str) -> None:
        nonlocal n
        n += 1
        rid = f"{kind}-{n}"
        res.sent[kind] += 1
        started = time.monotonic()
        try:
            if kind == "plain":
                async with session.post(ng.url("/agent/greeter"), data=INPUT,
                                        headers={**HEADERS, "X-Request-ID": rid}) as r:
                    raw = await r.read()
                    problem = (f"HTTP {r.status}: {raw[:300]!r}" if r.status != 200 else None) or valid_body(raw)
            elif kind == "stream":
                async with session.post(ng.url("/agent/greeter/stream"), data=INPUT,
                                        headers={**HEADERS, "X-Request-ID": rid}) as r:
                    raw = await r.read()
                    problem = stream_problem(r.status, r.headers.get("Content-Type", ""), raw)
            else:
                async with session.post(ng.url("/agent/greeter/batch"), data=BATCH_BODY,
                                        headers={**HEADERS, "X-Request-ID": rid}) as r:
                    raw = await r.read()
                    problem = batch_problem(r.status, raw)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            res.ok[kind] += 1
            res.latencies[kind].append(time.monotonic() - started)
            warm[kind].set()
        else:
            res.failures.append(f"{rid}: {problem}")
            res.failed_at.append(res.now())

    async def worker(session: aiohttp.ClientSession, kind: str) -> None:
        while not done.is_set():
            await one(session, kind)

    async def disruptor() -> None:
        try:
            await asyncio.gather(*(e.wait() for e in warm.values()))
            await disrupt(res)
            await asyncio.sleep(TAIL_SECONDS)  # load on the instances restarted last, too
        finally:
            done.set()

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=False)
    timeout = aiohttp.ClientTimeout(total=90)
    res.started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session, kind)) for kind, k in MIX.items() for _ in range(k)]
        dis = asyncio.create_task(disruptor())
        try:
            await asyncio.wait_for(asyncio.gather(dis, *tasks), MIXED_TIMEOUT)
        finally:
            for t in [dis, *tasks]:
                t.cancel()
            await asyncio.gather(dis, *tasks, return_exceptions=True)
    res.seconds = res.now()
    return res


# --------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("run", range(RUNS))
async def test_rolling_restart_and_reload_lose_nothing(shared: Cluster, tmp_path: Path, run: int) -> None:
    """SIGTERM + restart of A and SIGHUP of B during CALLS calls through nginx: zero failures."""
    c = shared
    ia, ib = run % INSTANCES, (run + 1) % INSTANCES  # a different instance restarts in each run
    notes: dict[str, Any] = {}
    async with nginx_in_front(c, tmp_path / "nginx") as ng:
        a, b = c.instances[ia], c.instances[ib]

        async def restart_a() -> None:
            a.send(signal.SIGTERM)
            rc = await asyncio.to_thread(a.wait, 40)
            c.retired.append(a)
            assert rc == 0, f"instance A exited {rc}:\n{a.stderr[-3000:]}"
            notes["drain"] = [ln for ln in a.lines if "in-flight" in ln]
            # systemctl restart: the same port again, ready once it logged its listening line.
            c.instances[ia] = await asyncio.to_thread(c.start_instance, ia, a.port or 0)

        async def reload_b() -> None:
            c.write_config(ib, f"Generate a friendly greeting (run {run})")
            start = len(b.lines)
            b.send(signal.SIGHUP)
            line = await asyncio.to_thread(b.wait_for_log, r"reloaded|reload failed", 20, start)
            assert "reloaded" in line, line

        async def disrupt() -> None:
            await asyncio.gather(restart_a(), reload_b())

        res = await run_load(ng.url("/agent/greeter"), disrupt)
    text = report(c, ng, res, f"run {run} (SIGTERM+restart :{a.port}, SIGHUP :{b.port})")
    print(text + f"\ndrain of A: {notes.get('drain')}")
    assert not res.failures, text
    assert res.ok == res.sent >= CALLS
    assert 0 <= res.disruption_done_at < res.sent, "the signals did not happen during the load"
    assert b.proc.poll() is None and b.pid == c.instances[ib].pid, "B was restarted, not reloaded"


@pytest.mark.system
async def test_back_to_back_and_random_restarts_lose_nothing(
        shared: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every instance restarted back to back (the operator's `for p in ...; do systemctl
    restart aiwfd@$p; done`, no wait in between), then each RESTARTS_EACH more times at
    random moments (at most INSTANCES-1 at once, so one always serves), under plain calls,
    streams and batches through the shipped config: not one request fails.

    With the old `max_fails=3 fail_timeout=10s` the refusals of the first restarts marked
    the instances down for 10 s each, and nginx answered "no live upstreams" to everything
    once the third went down.
    """
    c = shared
    rng = random.Random(SEED)
    pauses = [[rng.uniform(0, MAX_GAP) for _ in range(RESTARTS_EACH)] for _ in range(INSTANCES)]
    async with nginx_in_front(c, tmp_path / "nginx") as ng:
        at_most = asyncio.Semaphore(INSTANCES - 1)

        async def randomly(i: int) -> None:
            for pause in pauses[i]:
                await asyncio.sleep(pause)
                async with at_most:
                    await c.restart(i)

        async def disrupt(res: Mixed) -> None:
            started = res.now()
            for i in range(INSTANCES):
                await c.restart(i)
            res.phases.append(f"{INSTANCES} back to back from t={started:.1f}s to t={res.now():.1f}s")
            started = res.now()
            await asyncio.gather(*(randomly(i) for i in range(INSTANCES)))
            res.phases.append(f"{INSTANCES}x{RESTARTS_EACH} at random from t={started:.1f}s to t={res.now():.1f}s")

        res = await run_mixed(ng, disrupt)
    access, problems = ng.access(), ng.problems()
    moved = [a for a in access if "/agent/" in a["req"] and "," in a["upstream"]]
    text = "\n".join([
        f"restarts ({SERVER_PARAMS or 'shipped server parameters'}): {'; '.join(res.phases)}; "
        f"{sum(res.sent.values())} requests in {res.seconds:.1f}s, {len(res.failures)} failed",
        f"  {res.summary()}",
        f"  nginx: {len(moved)} passed to another instance; error.log: {dict(error_kinds(problems))}",
        *failure_details(c, access, problems, res.failures),
    ])
    with capsys.disabled():
        print("\n" + text)
    assert len(res.phases) == 2, text
    if res.failures:
        pytest.fail(text, pytrace=False)
    assert all(res.sent[k] >= 10 * n for k, n in MIX.items()), text


def nginx_error(status: int, headers: Any, raw: bytes, want_status: int, want_type: str,
                rid: str | None = None) -> str:
    """Check one of nginx's own errors: SPEC 3.1's shape, JSON, the id in body and header; returns the id."""
    assert status == want_status, (status, raw[:300])
    assert headers.get("Content-Type", "").split(";")[0] == "application/json", (headers, raw[:300])
    doc = orjson.loads(raw)
    assert set(doc) == {"error", "request_id"}, doc
    assert set(doc["error"]) == {"type", "message", "details"}, doc
    assert doc["error"]["type"] == want_type and doc["error"]["details"] == [], doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc
    assert headers.get("X-Request-ID") == doc["request_id"], (headers, doc)
    if rid is None:
        assert re.fullmatch(r"[0-9a-f]{32}", doc["request_id"]), doc  # nginx's $request_id
    else:
        assert doc["request_id"] == rid, doc
    return doc["request_id"]


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes aiohttp would refuse to send; read the answer until nginx closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(ln.split(": ", 1) for ln in lines[1:] if ": " in ln)
    return int(lines[0].split()[1]), headers, body


async def test_nginx_own_errors_are_json(shared: Cluster, tmp_path: Path) -> None:
    """nginx's own 502 (nothing reachable), 504 (connect timed out), 413, 400, 414, 431 and
    404 answer in SPEC 3.1's JSON shape with nginx's request id; aiwfd's own errors
    (here a 404) pass through untouched."""
    dead = free_port()  # nothing listens there
    # An upstream that never completes a connect: a listening socket whose
    # accept queue is full drops further SYNs, so nginx's 2 s connect timeout fires.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    with contextlib.ExitStack() as stack:
        stack.callback(stuck.close)
        for _ in range(2):  # the queue holds backlog + 1
            f = socket.socket()
            stack.callback(f.close)
            f.setblocking(False)
            f.connect_ex(stuck.getsockname())
            fillers.append(f)
        (tmp_path / "dead").mkdir()
        (tmp_path / "stuck").mkdir()
        ng = await asyncio.to_thread(Nginx, tmp_path / "dead", [dead])
        stack.callback(ng.stop)
        ng_stuck = await asyncio.to_thread(Nginx, tmp_path / "stuck", [stuck.getsockname()[1]])
        stack.callback(ng_stuck.stop)
        async with nginx_in_front(shared, tmp_path / "cluster") as ng_live, aiohttp.ClientSession() as http:

            async def call(url: str, data: bytes = INPUT, **headers: str) -> tuple[int, Any, bytes]:
                async with http.post(url, data=data, headers={**HEADERS, **headers}) as r:
                    return r.status, r.headers, await r.read()

            # 502: every instance refused. The client's id is kept; one aiwfd
            # would not keep (and that would break the JSON) is replaced.
            nginx_error(*await call(ng.url("/agent/greeter"), **{"X-Request-ID": "client-7"}), 502,
                        "upstream_error", "client-7")
            nginx_error(*await call(ng.url("/agent/greeter/stream")), 502, "upstream_error")
            nginx_error(*await call(ng.url("/agent/greeter"), **{"X-Request-ID": 'a"b\\c'}), 502, "upstream_error")
            async with http.get(ng.url("/health")) as r:
                nginx_error(r.status, r.headers, await r.read(), 502, "upstream_error")
            # 504: the connect timed out (proxy_connect_timeout 2s).
            nginx_error(*await call(ng_stuck.url("/agent/greeter"), **{"X-Request-ID": "slow-1"}), 504,
                        "upstream_timeout", "slow-1")
            # 413: over client_max_body_size, answered by nginx before any instance sees it.
            nginx_error(*await call(ng.url("/agent/greeter"), b"{" + b" " * (1 << 20) + b"}",
                                    **{"X-Request-ID": "big-1"}), 413, "payload_too_large", "big-1")
            # 400, 414 and 431 (nginx's 494): requests nginx cannot parse or hold.
            for data, status, kind in [
                    (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
                    (b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request"),
                    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid_request"),
                    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "invalid_request"),
                    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
                    (b"GET /_aiwfd/502 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found")]:
                nginx_error(*await asyncio.to_thread(raw_exchange, ng.port, data), status, kind)

            # aiwfd's own errors are not replaced (no proxy_intercept_errors): its 404, its id.
            async with http.get(ng_live.url("/no/such/path"), headers={"X-Request-ID": "mine-1"}) as r:
                raw = await r.read()
                direct = orjson.loads(raw)
                assert r.status == 404 and direct["error"]["type"] == "not_found", raw
                assert direct["error"]["message"] != "no such path", "nginx's page, not aiwfd's answer"
                assert direct["request_id"] == r.headers["X-Request-ID"] == "mine-1"
            # ... nor its 422.
            status, _, raw = await call(ng_live.url("/agent/greeter"), b'{"name": ""}')
            assert status == 422 and orjson.loads(raw)["error"]["type"] == "invalid_input", raw
    assert ng.proc.returncode is not None and ng_stuck.proc.returncode is not None


def consecutive_free_ports(n: int) -> list[int]:
    """n consecutive free loopback ports (cluster.sh numbers its instances from a base port)."""
    for base in range(30000 + os.getpid() % 20000, 60000, 89):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
    raise RuntimeError("no free ports")


@dataclass
class Front:
    """What run_mixed needs of an nginx: its URLs."""

    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.mark.system
async def test_cluster_sh_rolling_restart_loses_nothing(tmp_path: Path) -> None:
    """scripts/cluster.sh --mock (real instances behind the shipped config): SIGUSR1 restarts
    every instance back to back; twice, under plain calls, streams and batches, none fails."""
    *instances, front = consecutive_free_ports(INSTANCES + 1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT", "HOST", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "cluster.sh"), "--mock", "--instances", str(INSTANCES),
         "--base-port", str(instances[0]), "--port", str(front), "-f", str(REPO / "config.example.yaml"),
         "--aiwfd", f"{sys.executable} -m aiwfd"],
        env={**env, "TMPDIR": str(tmp_path)}, cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    err = LineReader(proc.stderr)
    try:
        await asyncio.to_thread(err.wait_for, r"rolling restart: kill -USR1", 60)
        pids = {ln.split("pid ")[1].split(",")[0] for ln in err.lines if ln.startswith("cluster.sh: aiwfd on")}

        async def disrupt(res: Mixed) -> None:
            for n in range(2):
                start = len(err.lines)
                proc.send_signal(signal.SIGUSR1)
                await asyncio.to_thread(err.wait_for, r"rolling restart done|error", 60, start)
                res.phases.append(f"rolling restart {n + 1} done at t={res.now():.1f}s")

        res = await run_mixed(Front(front), disrupt)  # type: ignore[arg-type]
    finally:
        proc.send_signal(signal.SIGTERM)  # the trap stops nginx and drains the instances
        try:
            rc = await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = await asyncio.to_thread(proc.wait, 10)
        err.join(5)
    text = f"cluster.sh: {'; '.join(res.phases)}; {res.summary()}\n" + "\n".join(res.failures[:20]) \
        + "\n" + err.text[-5000:]
    print(text)
    assert rc == 143, text
    assert len(res.phases) == 2 and "error" not in err.text, text
    restarted = {ln.split("pid ")[1].rstrip(")") for ln in err.lines if ln.startswith("cluster.sh: restarted")}
    assert len(restarted) == 2 * INSTANCES and not restarted & pids, text
    assert not res.failures, text
    for port in [*instances, front]:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


async def test_kill_9_cost(shared: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash under plain calls loses none (nginx passes the broken ones on); what it costs is printed.

    Only plain calls: a stream whose instance dies after its first event
    cannot be passed on (nginx has sent its start to the client), and that
    is a client's retry whatever the config.
    """
    c = shared
    async with nginx_in_front(c, tmp_path / "nginx") as ng:
        victim = c.instances[0]

        async def crash_and_restart() -> None:
            victim.send(signal.SIGKILL)
            rc = await asyncio.to_thread(victim.wait, 20)
            c.retired.append(victim)
            assert rc == -signal.SIGKILL
            # Restart=always brings it back on the same port.
            c.instances[0] = await asyncio.to_thread(c.start_instance, 0, victim.port or 0)

        res = await run_load(ng.url("/agent/greeter"), crash_and_restart)
    text = report(c, ng, res, f"kill -9 of :{victim.port}")
    # Calls nginx sent to the killed instance first and then to another one.
    # Those whose connection broke after nginx had sent them (ustatus 502,
    # "prematurely closed"/"reset") may have cost a second model call.
    victim_addr = f"127.0.0.1:{victim.port}"
    moved = [a for a in ng.access() if "/agent/" in a["req"] and a["upstream"].startswith(victim_addr + ",")]
    problems = ng.problems()
    broken = sum(1 for ln in problems if victim_addr in ln and
                 ("prematurely closed" in ln or "reset by peer" in ln))
    refused = sum(1 for ln in problems if victim_addr in ln and "Connection refused" in ln)
    summary = (f"KILL -9 COST: {len(res.failures)} failed of {res.sent} calls (concurrency {CONCURRENCY}, "
               f"{LATENCY_MS} ms model); {len(moved)} calls passed on to another instance: {broken} after "
               f"their connection broke (in flight or sent on a pooled connection: possibly a second model "
               f"call), {refused} refused at connect (free)")
    with capsys.disabled():
        print("\n" + text + "\n" + summary)
    assert not res.failures, text
    # The kill hit traffic: nginx had calls on the victim's connections and
    # passed them on (a kill between calls would prove nothing).
    assert moved, f"no call was passed on from {victim_addr}: the kill hit no traffic\n{text}"
    # ... and the restarted instance (same port) is back in the rotation: with
    # max_fails=0 nginx never benches it, so some of the TAIL calls reach it.
    reborn = c.instances[0]
    assert reborn is not victim
    served = [ln for ln in reborn.lines if "request_id=load-" in ln and "status=200" in ln]
    assert served, f"the restarted instance on :{reborn.port} answered no call\n{text}"


async def test_a_long_drain_loses_nothing(shared: Cluster, slow_fake: FakeOpenAI, tmp_path: Path) -> None:
    """SIGTERM while a slow call (SLOW_SECONDS) keeps the drain going for longer than nginx's
    proxy_next_upstream_timeout: nginx keeps using its idle keep-alive connections to the
    draining instance all that time, and every request on them must be answered (or
    refused at once), never held until the drain ends."""
    c = shared
    async with nginx_in_front(c, tmp_path / "nginx") as ng:
        a = c.instances[2]
        slow: dict[str, Any] = {}

        async def slow_call() -> None:
            async with aiohttp.ClientSession() as s:  # straight to A: it must be A that drains it
                async with s.post(a.url("/agent/slow"), data=INPUT, headers=HEADERS,
                                  timeout=aiohttp.ClientTimeout(total=SLOW_SECONDS + 30)) as r:
                    slow["status"], slow["body"] = r.status, await r.read()

        async def disrupt() -> None:
            calls = slow_fake.calls
            task = asyncio.create_task(slow_call())
            try:
                await slow_fake.wait_calls(calls + 1, timeout=20)  # the slow call reached the model
                started = time.monotonic()
                a.send(signal.SIGTERM)
                rc = await asyncio.to_thread(a.wait, SLOW_SECONDS + 30)
                slow["drain"] = time.monotonic() - started
                c.retired.append(a)
                assert rc == 0, f"instance A exited {rc}:\n{a.stderr[-3000:]}"
            finally:
                await task
            # Not restarted: the last test of the module (ensure_running brings it
            # back if another test runs after this one).

        res = await run_load(ng.url("/agent/greeter"), disrupt)
    text = report(c, ng, res, f"long drain ({slow.get('drain', 0):.1f}s) of :{a.port}")
    print(text)
    assert slow.get("status") == 200 and valid_body(slow["body"]) is None, slow
    assert slow["drain"] > 10, "the drain was not longer than proxy_next_upstream_timeout"
    assert not res.failures, text
    assert res.ok == res.sent >= CALLS
