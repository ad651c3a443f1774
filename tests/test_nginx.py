"""Real nginx in front of real `aiwfd serve` instances (issue 4, item 6; SPEC §5).

The nginx config is generated from the shipped deploy/nginx/aiwfd.conf: only
the upstream's server lines, the listen line and the access-log path are
replaced, so the test runs the shipped settings (upstream keep-alive, HTTP/1.1
with an empty Connection header, `proxy_next_upstream error timeout http_503
non_idempotent`, tries, timeouts, max_fails). Everything nginx writes (pid,
logs, temp files) stays in tmp_path; nginx runs with `daemon off;` as a child
of the test and is stopped at the end of each test.

The module shares one fake model process (tests/fakeopenai.py, LATENCY_MS per
answer) and INSTANCES long-lived instances on loopback; each test puts a fresh
nginx in front and sends CALLS or more agent calls through it, CONCURRENCY at a
time, from one keep-alive aiohttp client. Once DISRUPT_AT calls completed:

* test_rolling_restart_and_reload_lose_nothing (5 runs, a different instance
  each time): A gets SIGTERM, drains, exits 0 and starts again on the same
  port; B gets SIGHUP with a changed system prompt. Zero failed calls: every
  answer is 200 with a `{"data", "trace"}` body.
* test_kill_9_cost: kill -9 of an instance, restarted like Restart=always
  would. Measured, not asserted: prints a "KILL -9 COST:" line (failed calls,
  calls nginx passed on to another instance, possible second model calls).
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
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import orjson
import pytest

from tests.fakeopenai import FakeOpenAI
from tests.nginxconf import NGINX, SHIPPED, main_conf, shipped_conf
from tests.utils import CONFIGS, LISTEN_RE, AiwfdProcess, LineReader, fake_process, free_port

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
    return shipped_conf(listen, access_log, ports)


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
    kinds = Counter(re.sub(r"^.*?\[\w+\] \d+#\d+: (\*\d+ )?", "", ln).split(" while ")[0].split(",")[0]
                    for ln in problems)
    lines = [
        f"{label}: {res.sent} calls in {res.seconds:.1f}s ({res.sent / max(res.seconds, 1e-9):.0f}/s), "
        f"{res.ok} ok, {len(res.failures)} failed; statuses {dict(res.statuses)}; "
        f"signals at call {res.disrupted_at}, done at {res.disruption_done_at}",
        f"nginx: {len(agent)} agent calls logged, {len(retried)} passed to a second instance "
        f"(ustatus of those: {dict(Counter(a['ustatus'] for a in retried))})",
        f"nginx error.log (warn and worse): {dict(kinds)}",
    ]
    if res.failures:
        lines.append("first failures:\n  " + "\n  ".join(res.failures[:20]))
        failed = {f.split(":", 1)[0] for f in res.failures}
        lines.append("their access-log lines:\n  " + "\n  ".join(
            a["line"] for a in access if a["rid"] in failed)[:20000])
        lines.append("nginx error.log (warn and worse):\n  " + "\n  ".join(problems[-60:]))
        for p in c.retired + c.instances:
            lines.append(f"aiwfd pid {p.pid} port {p.port} (rc {p.proc.poll()}), last lines:\n  "
                         + "\n  ".join(ln for ln in p.lines if "POST /agent/" not in ln)[-3000:])
    return "\n".join(lines)


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


async def test_kill_9_cost(shared: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a crash costs with the shipped config: measured and printed, not asserted to be zero."""
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
    assert res.ok + len(res.failures) == res.sent >= CALLS


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
