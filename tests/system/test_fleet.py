"""The fleet's limits (issue 15, "Must be shown" 4; SPEC §8.2): three real
`aiwfd serve` processes behind real nginx, with and without one real Redis.

The module starts one fake model process (aiwfd.testing.fakeopenai, no
latency) and one redis-server (aiwfd.testing.redisproc, a free loopback port,
nothing persisted). The tests run INSTANCES instances of
tests/configs/fleet.yaml (four clients c1..c4, `requests: 600/min` each; the
agent `greeter`, `requests: 1000/min` for all of them together) and nginx in
front of them, with the shipped deploy/nginx/aiwfd.conf (upstream keep-alive,
retries; aiwfd.testing.nginxconf rewrites only the servers, the listen line
and the log path). Then the four clients each send CALLS calls through nginx
as fast as they can, side by side, CONNECTIONS keep-alive connections each,
and every answer is counted by client and status.

* test_redis_holds_the_agent_limit_for_the_fleet: REDIS_URL set, the calls
  to `greeter`. Per client at most 600 + INSTANCES succeed (SPEC: the limit
  plus one call per instance in flight), all clients together at most
  1000 + INSTANCES, and at least 1000 - SLACK: the agent's limit is the one
  that binds (4 × 600 > 1000), and the fleet lets it be used whole. Every
  other answer is 429 `rate_limited` with `Retry-After` ≥ 1, a
  `RateLimit-Policy` and details naming the limit that refused (the client's
  600 or the agent's 1000, window 60): no 5xx, no connection error. The
  store answered every call (aiwfd_store_errors_total is 0 on every
  instance: a call passed uncounted under `on_store_error: allow` would make
  the bounds above meaningless).
* test_redis_holds_each_client_limit_for_the_fleet: the same instances and
  Redis, the calls to `open`, which has no limit of its own: there each
  client's 600 binds, and each client gets 600 (at most + INSTANCES), every
  refusal naming the client's limit. (With `greeter` alone the clients'
  limit is never reached: the agent's 1000 is shared by four.)
  The module's Redis tests share one set of instances; each empties Redis
  (FLUSHDB) first, so each starts with fresh windows.
* test_embedded_store_counts_alone: no REDIS_URL. Each instance counts alone,
  so about INSTANCES × 1000 get through: more than twice the agent's limit,
  at most INSTANCES × 1000 + INSTANCES; each instance warned at start-up that
  it counts alone.

All check that the start-up line names the store ("store redis://127.0.0.1:PORT/0"
or "store memory") and that /health/ready answers 200 (each instance, and
through nginx) before the load starts.

The window: the limits are per 60 s and slide (aiwfd/store/base.py: 60
buckets of 1 s, the oldest counted whole), so a bucket leaves the window no
earlier than 60 s after its first call. A run takes a few seconds: every call
of it is inside one window, and the test asserts the run took less than
MAX_RUN seconds, so that the bounds above are the limits, not the limits plus
what slid out.

The instances and nginx work in pytest's tmp_path (Redis in a temporary directory); a failed
assertion carries the counts, the odd answers and the instances' stderr tails.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import orjson
import pytest

from aiwfd.testing.nginxconf import NGINX, main_conf, shipped_conf
from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess, LineReader, fake_process, free_port, stop_process
from aiwfd.testing.redisproc import REDIS_SERVER, RedisServer
from tests.conftest import CONFIGS

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
    pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="redis-server is not installed"),
]

CONFIG = CONFIGS / "fleet.yaml"
INSTANCES = 3
CLIENTS = ("c1", "c2", "c3", "c4")
CLIENT_QUOTA = 600     # fleet.yaml: each client's requests per WINDOW
AGENT_QUOTA = 1000     # fleet.yaml: the agent's requests per WINDOW, all clients together
WINDOW = 60
CALLS = 1500           # per client
CONNECTIONS = 16       # keep-alive connections per client
SLACK = 0              # below the binding quota with Redis: the script is atomic and all or nothing,
                       # so a limit is used whole (a call counted but not answered would be an odd answer)
MAX_RUN = WINDOW - 5.0  # a run longer than this could let calls slide out of the window
RUN_TIMEOUT = 120.0
START_TIMEOUT = 60.0

KEYS = {name: f"fleet-{name}-{secrets.token_hex(16)}" for name in CLIENTS}
ENV_OF = {name: f"FLEET_KEY_{name.upper()}" for name in CLIENTS}
INPUT = orjson.dumps({"name": "Alice"})
WARNING = "limits are configured but REDIS_URL is not set: each instance counts alone"


# --------------------------------------------------------------------------
# the processes


class Nginx:
    """nginx (daemon off) in `d`, the shipped config in front of `ports`; stderr read by a thread."""

    def __init__(self, d: Path, ports: list[int]) -> None:
        assert NGINX is not None
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.error_log = d / "error.log"
        (d / "aiwfd.conf").write_text(shipped_conf(self.port, d / "access.log", ports), encoding="utf-8")
        conf = d / "nginx.conf"
        conf.write_text(main_conf(d, workers=2, connections=1024, stderr_notices=True), encoding="utf-8")
        cmd = [NGINX, "-p", str(d), "-c", str(conf)]
        help_text = subprocess.run([NGINX, "-h"], capture_output=True, text=True, timeout=30).stderr
        if "-e filename" in help_text:  # nginx >= 1.19.5: not even /var/log/nginx/error.log
            cmd[1:1] = ["-e", str(self.error_log)]
        t = subprocess.run(cmd + ["-t"], capture_output=True, text=True, timeout=60)
        assert t.returncode == 0, f"nginx -t failed:\n{t.stderr}"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._stderr = LineReader(self.proc.stderr)
        try:
            # The master listens before it forks workers: once one started, connections are accepted.
            self._stderr.wait_for(r"start worker process \d+", timeout=20)
        except BaseException:
            self.stop()
            raise

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def problems(self) -> list[str]:
        try:
            text = self.error_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if re.search(r"\[(warn|error|crit|alert|emerg)\]", ln)]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, 15)  # graceful: workers finish, then exit
        self._stderr.join(5)


@dataclass
class Fleet:
    instances: list[AiwfdProcess]
    nginx: Nginx
    store: str  # what the start-up line must name

    def stderr_tails(self, n: int = 30) -> str:
        return "\n".join(f"--- instance :{p.port} (exit {p.proc.poll()})\n" + "\n".join(p.lines[-n:])
                         for p in self.instances)


def start_instance(d: Path, model_url: str, redis_url: str | None) -> AiwfdProcess:
    env = {"OPENAI_BASE_URL": model_url, "OPENAI_API_KEY": "sk-test-fleet", "TMPDIR": str(d),
           **{ENV_OF[name]: key for name, key in KEYS.items()}}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    proc = AiwfdProcess(["serve", "-f", str(CONFIG), "--host", "127.0.0.1", "-p", "0",
                         "--env-file", str(d / "empty.env")],
                        env=env, cwd=d, wait_ready=False)
    try:
        m = LISTEN_RE.search(proc.wait_for_log(LISTEN_RE.pattern, timeout=START_TIMEOUT))
        assert m
    except BaseException:
        proc.stop(signal.SIGKILL, 5)  # never leave a half-started instance behind
        raise
    proc.host, proc.port = m.group(1), int(m.group(2))
    return proc


@contextlib.contextmanager
def fleet(d: Path, model_url: str, redis_url: str | None) -> Iterator[Fleet]:
    """INSTANCES instances started side by side (~1.5 s of imports each), nginx in front; all stopped after."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.env").write_text("", encoding="utf-8")
    started: list[AiwfdProcess | BaseException] = [RuntimeError("not started")] * INSTANCES
    instances: list[AiwfdProcess] = []

    def start(i: int) -> None:
        try:
            started[i] = start_instance(d, model_url, redis_url)
        except BaseException as e:  # noqa: BLE001 - raised below
            started[i] = e

    nginx: Nginx | None = None
    try:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(INSTANCES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        instances = [p for p in started if isinstance(p, AiwfdProcess)]
        for e in started:
            if isinstance(e, BaseException):
                raise e
        nginx = Nginx(d / "nginx", [p.port for p in instances if p.port is not None])
        yield Fleet(instances, nginx, redis_url if redis_url is not None else "memory")
    finally:
        stop_fleet(instances, nginx)


def stop_fleet(instances: list[AiwfdProcess], nginx: Nginx | None) -> None:
    """nginx first, then every instance drained side by side (SIGKILL after 15 s)."""
    if nginx is not None:
        nginx.stop()
    for p in instances:
        if p.proc.poll() is None:
            p.send(signal.SIGTERM)
    for p in instances:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.wait(5)


@pytest.fixture(autouse=True)
def no_outside_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """AiwfdProcess inherits the environment: a REDIS_URL of the run's must not reach the instances."""
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with fake_process(0) as (_proc, base_url):
        yield base_url


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_fleet(model_url: str, redis_server: RedisServer,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The instances sharing Redis, shared by the module's Redis tests (each empties Redis first)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REDIS_URL", raising=False)
        with fleet(tmp_path_factory.mktemp("redis"), model_url, redis_server.url) as f:
            yield f


def flush(server: RedisServer) -> None:
    """Every counter gone: each test starts with fresh windows."""
    import redis  # the `redis` package: installed with aiwfd's Redis store

    client = redis.Redis.from_url(server.url)
    try:
        client.flushdb()
    finally:
        client.close()


# --------------------------------------------------------------------------
# the load


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    ok: int = 0
    by_scope: Counter[str] = field(default_factory=Counter)  # refusals by the limit named in details
    odd: list[str] = field(default_factory=list)              # answers that are neither 200 nor a proper 429


def check_refusal(headers: Any, body: bytes) -> str | None:
    """None if this is SPEC §8.2's refusal: 429 rate_limited, Retry-After ≥ 1, details naming the limit."""
    retry = headers.get("Retry-After", "")
    if not retry.isdigit() or int(retry) < 1:
        return f"Retry-After {retry!r}"
    try:
        doc = orjson.loads(body)
        err = doc["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"not an error body: {body[:300]!r}"
    if err.get("type") != "rate_limited":
        return f"type {err.get('type')!r}"
    details = err.get("details")
    expected = [{"limit": "requests", "scope": "client", "quota": CLIENT_QUOTA, "window": WINDOW}], \
        [{"limit": "requests", "scope": "agent", "quota": AGENT_QUOTA, "window": WINDOW}]
    if details not in expected:
        return f"details {details!r}"
    if "RateLimit-Policy" not in headers:
        return "no RateLimit-Policy"
    return None


async def one_client(url: str, name: str, tally: Tally) -> None:
    """CALLS agent calls as client `name`, CONNECTIONS at a time, over keep-alive connections."""
    todo = iter(range(CALLS))
    headers = {"Content-Type": "application/json", "X-API-Key": KEYS[name]}

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in todo:
            try:
                async with session.post(url, data=INPUT,
                                        headers={**headers, "X-Request-ID": f"fleet-{name}-{n}"}) as r:
                    body = await r.read()
                    tally.statuses[r.status] += 1
                    if r.status == 200:
                        tally.ok += 1
                        continue
                    problem = check_refusal(r.headers, body) if r.status == 429 else f"{body[:300]!r}"
                    if problem is None:
                        tally.by_scope[orjson.loads(body)["error"]["details"][0]["scope"]] += 1
                    else:
                        tally.odd.append(f"{name}-{n}: HTTP {r.status}: {problem}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                tally.statuses[0] += 1
                tally.odd.append(f"{name}-{n}: {type(e).__name__}: {e}")

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONNECTIONS)))


async def run_load(f: Fleet, agent: str = "greeter") -> tuple[dict[str, Tally], float]:
    tallies = {name: Tally() for name in CLIENTS}
    url = f.nginx.url(f"/agent/{agent}")
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one_client(url, name, tallies[name]) for name in CLIENTS)),
                           RUN_TIMEOUT)
    return tallies, time.monotonic() - started


async def check_started(f: Fleet) -> None:
    """The start-up line names the store; /health/ready is 200 on each instance and through nginx."""
    for p in f.instances:
        line = p.wait_for_log(r"serving .* on http://")
        # The limits' store; without Redis the jobs' SQLite file follows it.
        assert f"store {f.store})" in line or f"store {f.store}, jobs sqlite:" in line, (
            f"the start-up line does not name the store {f.store}: {line}")
    async with aiohttp.ClientSession() as s:
        for url in [p.url("/health/ready") for p in f.instances] + [f.nginx.url("/health/ready")]:
            async with s.get(url) as r:
                assert r.status == 200, f"{url}: {r.status} {await r.text()}"


async def store_errors(f: Fleet) -> dict[int | None, float]:
    """aiwfd_store_errors_total of each instance (all decisions), read from its own port."""
    out: dict[int | None, float] = {}
    async with aiohttp.ClientSession() as s:
        for p in f.instances:
            async with s.get(p.url("/metrics")) as r:
                text = await r.text()
            out[p.port] = sum(float(m.group(1)) for m in
                              re.finditer(r"^aiwfd_store_errors_total(?:\{[^}]*\})? (\S+)$", text, re.M))
    return out


def served(f: Fleet, before: dict[int | None, int] | None = None) -> dict[int | None, int]:
    """The 200s of agent calls each instance logged (since `before`)."""
    return {p.port: sum(1 for ln in p.lines if "request_id=fleet-" in ln and "status=200" in ln)
            - (before or {}).get(p.port, 0) for p in f.instances}


def summary(label: str, tallies: dict[str, Tally], seconds: float, f: Fleet,
            before: dict[int | None, int] | None = None) -> str:
    total = sum(t.ok for t in tallies.values())
    per = ", ".join(f"{n}={t.ok}" for n, t in tallies.items())
    statuses = sum((t.statuses for t in tallies.values()), Counter())
    scopes = sum((t.by_scope for t in tallies.values()), Counter())
    odd = [o for t in tallies.values() for o in t.odd]
    return (f"FLEET {label}: {total} of {len(CLIENTS) * CALLS} calls succeeded in {seconds:.1f}s "
            f"(per client {per}; per instance {served(f, before)}); statuses {dict(statuses)}; "
            f"refused by {dict(scopes)}; {len(odd)} odd answers\n" + "\n".join(odd[:20]))


# --------------------------------------------------------------------------
# the tests


async def redis_run(f: Fleet, server: RedisServer, agent: str,
                    capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Tally], str]:
    """The load against `agent` on fresh counters; the common checks; the tallies and the diagnostics."""
    await check_started(f)
    for p in f.instances:
        assert WARNING not in p.stderr, p.stderr
    flush(server)
    before = served(f)
    tallies, seconds = await run_load(f, agent)
    errors = await store_errors(f)
    text = summary(f"with Redis ({server.url}), /agent/{agent}", tallies, seconds, f, before)
    with capsys.disabled():
        print("\n" + text)
    diag = f"{text}\nstore errors per instance: {errors}\nnginx: {f.nginx.problems()[:10]}\n" \
        f"{f.stderr_tails()}"
    assert seconds < MAX_RUN, diag
    assert not any(t.odd for t in tallies.values()), diag
    for name, t in tallies.items():
        assert sum(t.statuses.values()) == CALLS and set(t.statuses) <= {200, 429}, diag
        assert t.ok <= CLIENT_QUOTA + INSTANCES, f"client {name}: {t.ok} > {CLIENT_QUOTA} + {INSTANCES}\n{diag}"
    # Every call was counted: none passed uncounted under on_store_error: allow.
    assert not any(errors.values()), diag
    return tallies, diag


async def test_redis_holds_the_agent_limit_for_the_fleet(redis_fleet: Fleet, redis_server: RedisServer,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """4 x 1500 calls to `greeter`: the agent's 1000/min binds (4 x 600 > 1000), across clients and instances."""
    tallies, diag = await redis_run(redis_fleet, redis_server, "greeter", capsys)
    total = sum(t.ok for t in tallies.values())
    assert AGENT_QUOTA - SLACK <= total <= AGENT_QUOTA + INSTANCES, diag
    # The agent's limit is the one that binds: most refusals name it.
    scopes = sum((t.by_scope for t in tallies.values()), Counter())
    assert scopes["agent"] > scopes["client"], diag


async def test_redis_holds_each_client_limit_for_the_fleet(redis_fleet: Fleet, redis_server: RedisServer,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """4 x 1500 calls to `open` (no agent limit): each client's 600/min binds, over the three instances."""
    tallies, diag = await redis_run(redis_fleet, redis_server, "open", capsys)
    for name, t in tallies.items():
        assert CLIENT_QUOTA - SLACK <= t.ok <= CLIENT_QUOTA + INSTANCES, f"client {name}\n{diag}"
        assert set(t.by_scope) == {"client"}, diag


async def test_embedded_store_counts_alone(model_url: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with fleet(tmp_path / "memory", model_url, None) as f:
        await check_started(f)
        for p in f.instances:
            assert any(WARNING in ln for ln in p.lines), f"instance :{p.port} did not warn:\n{p.stderr}"
        tallies, seconds = await run_load(f)
        text = summary("with the embedded store", tallies, seconds, f)
        with capsys.disabled():
            print("\n" + text)
        diag = f"{text}\nnginx: {f.nginx.problems()[:10]}\n{f.stderr_tails()}"
        total = sum(t.ok for t in tallies.values())
        assert seconds < MAX_RUN, diag
        assert not any(t.odd for t in tallies.values()), diag
        assert all(sum(t.statuses.values()) == CALLS for t in tallies.values()), diag
        for name, t in tallies.items():
            assert t.ok <= INSTANCES * CLIENT_QUOTA + INSTANCES, f"client {name}\n{diag}"
        # Each instance lets its own 1000 through: about 3x the fleet's limit.
        assert 2 * AGENT_QUOTA <= total <= INSTANCES * AGENT_QUOTA + INSTANCES, diag
        for port, n in served(f).items():
            assert n <= AGENT_QUOTA, f"instance :{port} served {n} > {AGENT_QUOTA}\n{diag}"
