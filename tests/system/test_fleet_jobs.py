"""The fleet's jobs (issue 16, "Must be shown" 3; SPEC §9): three real
`aiwfd serve` processes behind real nginx (the shipped deploy/nginx/aiwfd.conf,
aiwfd.testing.nginxconf), sharing their jobs through one real Redis
(aiwfd.testing.redisproc) or, separately, through one SQLite state directory
(`--state-dir`, what the `aiwfd@.service` instances of one host share).

Each variant starts its own fake model process (aiwfd.testing.fakeopenai, no
latency), its own webhook receiver in the test's loop
(aiwfd.testing.webhook_receiver, verifying with `standardwebhooks`), its own
store and its own instances, configured with `jobs.webhook: {url: <the
receiver>, allow_private: true}`, AIWF_WEBHOOK_SECRET a fresh "whsec_" secret
and API_KEY one key (so that every instance knows the client as the same one).
Then, all through nginx:

* JOBS submissions to `POST /agent/greeter/jobs`, CONCURRENCY at a time:
  every one 202 with `Location: /jobs/{id}` and a queued job document;
* every id polled with `GET /jobs/{id}` (CONCURRENCY at a time) until it
  ended: any instance answers any id, whichever ran it (the nginx access log
  names the upstream of each GET; some GETs must have been answered by an
  instance that did not run the job, and every instance answered some);
* every job `succeeded` with `attempts: 1` (nothing crashed here), and each
  ran once: the sum over the instances of aiwfd_jobs_total{outcome="succeeded"}
  (each instance's /metrics, read from its own port) is JOBS, no other
  outcome was counted, and the instances' "job <id> (greeter): succeeded after
  1 attempt" lines name each id exactly once; each instance ran some (the
  split is printed);
* the receiver got JOBS deliveries, JOBS distinct `webhook-id`s, each verified
  by `standardwebhooks` with the configured secret, `job.succeeded` with the
  job's document; and `GET /jobs` (paged through nginx) lists exactly the
  JOBS jobs, each with `webhook: {status: delivered, attempts: 1, last_status: 200}`.

A failed assertion carries the counts and the instances' stderr tails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from aiwfd.jobs.sqlite import FILENAME
from aiwfd.testing.metrics import scrape, value
from aiwfd.testing.nginxconf import NGINX
from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess, fake_process
from aiwfd.testing.redisproc import REDIS_SERVER, RedisServer
from aiwfd.testing.webhook_receiver import WebhookReceiver
from tests.system.test_fleet import Nginx, stop_fleet

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
]
needs_redis = pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="redis-server is not installed")

INSTANCES = 3
JOBS = 300
CONCURRENCY = 16
RUN_TIMEOUT = 30.0    # from the first submission until every job ended
WEBHOOK_TIMEOUT = 15.0
START_TIMEOUT = 60.0
TERMINAL = {"succeeded", "failed", "canceled"}
API_KEY = f"fleet-jobs-{secrets.token_hex(16)}"
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
DONE_RE = re.compile(r"job (\S+) \(greeter\): (\w+) after (\d+) attempts?")
UPSTREAM_RE = re.compile(r'"GET /jobs/([A-Za-z0-9_-]+) HTTP/[\d.]+" (\d+) .* upstream=127\.0\.0\.1:(\d+) ')

CONFIG = """\
# tests/system/test_fleet_jobs.py: the greeter of tests/configs/fleet.yaml, no limits; jobs with a webhook
version: 0.3
types:
  GreetingRequest:
    name: string(1..100)
  GreetingResponse:
    message: string
assistants:
  greeter:
    use: openai
    model: gpt-4o-mini
    system_prompt: "Generate a friendly greeting"
    input_type: GreetingRequest
    output_type: GreetingResponse
jobs:
  concurrency: 8
  webhook:
    url: {url}
    allow_private: true
"""


# --------------------------------------------------------------------------
# the processes


@dataclass
class Fleet:
    instances: list[AiwfdProcess]
    nginx: Nginx
    store: str  # what the start-up line names (the limits' store: Redis, else memory)

    def stderr_tails(self, n: int = 25) -> str:
        return "\n".join(f"--- instance :{p.port} (exit {p.proc.poll()})\n" + "\n".join(p.lines[-n:])
                         for p in self.instances)


def start_instance(d: Path, config: Path, env: dict[str, str], store_args: list[str]) -> AiwfdProcess:
    proc = AiwfdProcess(["serve", "-f", str(config), "--host", "127.0.0.1", "-p", "0",
                         "--env-file", str(d / "empty.env"), *store_args],
                        env=env, cwd=d, wait_ready=False)
    try:
        m = LISTEN_RE.search(proc.wait_for_log(LISTEN_RE.pattern, timeout=START_TIMEOUT))
        assert m
    except BaseException:
        proc.stop(signal.SIGKILL, 5)  # never leave a half-started instance behind
        raise
    proc.host, proc.port = m.group(1), int(m.group(2))
    return proc


@contextlib.asynccontextmanager
async def fleet(d: Path, model_url: str, webhook_url: str, store_args: list[str],
                store: str) -> AsyncIterator[Fleet]:
    """INSTANCES instances started side by side in threads (the receiver lives in
    this loop and must keep answering), nginx in front; all stopped after."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.env").write_text("", encoding="utf-8")
    config = d / "agents.yaml"
    config.write_text(CONFIG.format(url=webhook_url), encoding="utf-8")
    env = {"OPENAI_BASE_URL": model_url, "OPENAI_API_KEY": "sk-test-fleet-jobs", "TMPDIR": str(d),
           "API_KEY": API_KEY, "AIWF_WEBHOOK_SECRET": SECRET}
    results = await asyncio.gather(*(asyncio.to_thread(start_instance, d, config, env, store_args)
                                     for _ in range(INSTANCES)), return_exceptions=True)
    instances = [p for p in results if isinstance(p, AiwfdProcess)]
    nginx: Nginx | None = None
    try:
        for e in results:
            if isinstance(e, BaseException):
                raise e
        nginx = await asyncio.to_thread(Nginx, d / "nginx", [p.port for p in instances if p.port is not None])
        yield Fleet(instances, nginx, store)
    finally:
        await asyncio.to_thread(stop_fleet, instances, nginx)


@pytest.fixture(autouse=True)
def no_outside_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """AiwfdProcess inherits the environment: a store of the run's must not reach the instances."""
    for name in ("REDIS_URL", "AIWF_STATE_DIR", "STATE_DIRECTORY", "AIWF_WEBHOOK_SECRET", "AIWF_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------
# the run


@dataclass
class Run:
    submitted: dict[str, dict[str, Any]]  # id -> the 202's document
    final: dict[str, dict[str, Any]]      # id -> the document once it ended
    gets: int
    submit_s: float
    run_s: float
    odd: list[str]


async def submit_all(session: aiohttp.ClientSession, url: str, odd: list[str]) -> dict[str, dict[str, Any]]:
    todo = iter(range(JOBS))
    out: dict[str, dict[str, Any]] = {}

    async def worker() -> None:
        for n in todo:
            try:
                async with session.post(url, data=orjson.dumps({"name": f"Ann {n}"}),
                                        headers={"Content-Type": "application/json", "X-API-Key": API_KEY,
                                                 "X-Request-ID": f"fjobs-submit-{n}"}) as r:
                    body = await r.read()
                    if r.status != 202:
                        odd.append(f"submit {n}: HTTP {r.status}: {body[:300]!r}")
                        continue
                    doc = orjson.loads(body)
                    if r.headers.get("Location") != f"/jobs/{doc.get('id')}" or doc.get("status") != "queued" \
                            or doc.get("agent") != "greeter" or doc.get("attempts") != 0:
                        odd.append(f"submit {n}: Location {r.headers.get('Location')!r}, document {doc}")
                    out[doc["id"]] = doc
            except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, KeyError) as e:
                odd.append(f"submit {n}: {type(e).__name__}: {e}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


async def poll_all(session: aiohttp.ClientSession, f: Fleet, ids: list[str], deadline: float,
                   odd: list[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """GET /jobs/{id} through nginx for every id not yet ended, CONCURRENCY at a
    time, round after round, until all ended (or the deadline)."""
    final: dict[str, dict[str, Any]] = {}
    gets = 0
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still: list[str] = []

        async def worker(todo: Iterator[str], still: list[str]) -> None:
            nonlocal gets
            for job_id in todo:
                gets += 1
                try:
                    async with session.get(f.nginx.url(f"/jobs/{job_id}"),
                                           headers={"X-API-Key": API_KEY}) as r:
                        body = await r.read()
                        if r.status != 200:
                            odd.append(f"GET /jobs/{job_id}: HTTP {r.status}: {body[:300]!r}")
                            still.append(job_id)
                            continue
                        doc = orjson.loads(body)
                except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as e:
                    odd.append(f"GET /jobs/{job_id}: {type(e).__name__}: {e}")
                    still.append(job_id)
                    continue
                if doc.get("status") in TERMINAL:
                    final[job_id] = doc
                else:
                    still.append(job_id)

        todo = iter(pending)
        await asyncio.gather(*(worker(todo, still) for _ in range(CONCURRENCY)))
        pending = still
        if pending:
            await asyncio.sleep(0.05)
    return final, gets


async def list_all(session: aiohttp.ClientSession, f: Fleet) -> list[dict[str, Any]]:
    """GET /jobs through nginx, every page (100 a page), newest first."""
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(JOBS // 100 + 3):
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        async with session.get(f.nginx.url("/jobs"), params=params, headers={"X-API-Key": API_KEY}) as r:
            assert r.status == 200, f"GET /jobs: {r.status} {await r.text()}"
            page = await r.json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs
    raise AssertionError(f"GET /jobs: still a next_cursor after {len(jobs)} jobs")


async def check_started(session: aiohttp.ClientSession, f: Fleet) -> None:
    """The start-up line names the store; /health/ready is 200 on each instance and through nginx."""
    for p in f.instances:
        line = p.wait_for_log(r"serving .* on http://")
        # The limits' store; without Redis the jobs' SQLite file follows it.
        assert f"store {f.store})" in line or f"store {f.store}, jobs sqlite:" in line, (
            f"the start-up line does not name the store {f.store}: {line}")
    for url in [p.url("/health/ready") for p in f.instances] + [f.nginx.url("/health/ready")]:
        async with session.get(url) as r:
            assert r.status == 200, f"{url}: {r.status} {await r.text()}"


def ran_by(f: Fleet) -> dict[str, list[tuple[int | None, str, int]]]:
    """job id -> every (instance port, status, attempts) its instances logged at its end."""
    out: dict[str, list[tuple[int | None, str, int]]] = {}
    for p in f.instances:
        for ln in list(p.lines):
            m = DONE_RE.search(ln)
            if m:
                out.setdefault(m.group(1), []).append((p.port, m.group(2), int(m.group(3))))
    return out


def upstreams_of_gets(f: Fleet) -> list[tuple[str, int, int]]:
    """(job id, status, upstream port) of every GET /jobs/{id} in nginx's access log."""
    try:
        text = (f.nginx.error_log.parent / "access.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in UPSTREAM_RE.finditer(text)]


async def run_variant(tmp_path: Path, label: str, store_args: list[str], store: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    with fake_process(0) as (_proc, model_url):
        async with WebhookReceiver([SECRET]) as rx, \
                fleet(tmp_path / "fleet", model_url, rx.url, store_args, store) as f:
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
                await check_started(s, f)
                started = time.monotonic()
                ready_s = started - began
                odd: list[str] = []
                submitted = await submit_all(s, f.nginx.url("/agent/greeter/jobs"), odd)
                submit_s = time.monotonic() - started
                final, gets = await poll_all(s, f, list(submitted), started + RUN_TIMEOUT, odd)
                run = Run(submitted, final, gets, submit_s, time.monotonic() - started, odd)
                webhook_error = ""
                try:
                    await rx.wait_for(JOBS, timeout=WEBHOOK_TIMEOUT)
                except asyncio.TimeoutError:
                    webhook_error = f"only {len(rx.deliveries)} of {JOBS} webhooks within {WEBHOOK_TIMEOUT:g} s"
                webhook_s = time.monotonic() - started
                # The delivery's outcome is recorded after the receiver answered: wait for it.
                listed = await list_all(s, f)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and \
                        any((j.get("webhook") or {}).get("status") != "delivered" for j in listed):
                    await asyncio.sleep(0.1)
                    listed = await list_all(s, f)
                # Each instance logs a job's end right after writing it: its stderr reader may lag a little.
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not set(submitted) <= set(ran_by(f)):
                    await asyncio.sleep(0.05)
                samples = {p.port: await scrape(s, p.url("/metrics")) for p in f.instances}
            check(f, rx, run, samples, listed, webhook_error, label, ready_s, webhook_s, capsys)


def check(f: Fleet, rx: WebhookReceiver, run: Run, samples: dict[int | None, Any], listed: list[dict[str, Any]],
          webhook_error: str, label: str, ready_s: float, webhook_s: float,
          capsys: pytest.CaptureFixture[str]) -> None:
    succeeded = {port: value(s, "aiwfd_jobs_total", agent="greeter", outcome="succeeded")
                 for port, s in samples.items()}
    others = {port: {o: value(s, "aiwfd_jobs_total", agent="greeter", outcome=o)
                     for o in ("failed", "canceled", "lost", "released")
                     if value(s, "aiwfd_jobs_total", agent="greeter", outcome=o)}
              for port, s in samples.items()}
    statuses = Counter(d.get("status") for d in run.final.values())
    attempts = Counter(d.get("attempts") for d in run.final.values())
    logged = ran_by(f)
    runner_of = {job_id: ends[0][0] for job_id, ends in logged.items() if len(ends) == 1}
    gets = upstreams_of_gets(f)
    get_split = Counter(port for _, _, port in gets)
    elsewhere = sum(1 for job_id, _, port in gets if runner_of.get(job_id) not in (None, port))
    ids = set(run.submitted)
    msg_ids = Counter(d.msg_id for d in rx.deliveries)
    unverified = [d.msg_id for d in rx.deliveries if not d.verified]
    delivered_jobs = set()
    bad_events = []
    for d in rx.deliveries:
        try:
            event = d.json()
            delivered_jobs.add(event["data"]["id"])
            if event["type"] != "job.succeeded" or event["data"]["status"] != "succeeded":
                bad_events.append(f"{d.msg_id}: {event['type']} {event['data']['status']}")
        except (ValueError, KeyError, TypeError) as e:
            bad_events.append(f"{d.msg_id}: {type(e).__name__}: {e}")
    hooks = Counter(orjson.dumps(j.get("webhook")).decode() for j in listed)
    text = (f"FLEET JOBS {label}: {len(ids)} of {JOBS} submitted in {run.submit_s:.2f}s (c{CONCURRENCY}, "
            f"{len(ids) / run.submit_s:.0f}/s through nginx), all ended after {run.run_s:.2f}s "
            f"({run.gets} GETs), webhooks after {webhook_s:.2f}s; start-up {ready_s:.1f}s\n"
            f"  statuses {dict(statuses)}; attempts {dict(attempts)}; run per instance (aiwfd_jobs_total "
            f"succeeded) {succeeded}; other outcomes {others}\n"
            f"  GET /jobs/{{id}} answered per instance {dict(get_split)}, {elsewhere} by an instance that did "
            f"not run the job; {len(rx.deliveries)} webhooks, {len(msg_ids)} distinct ids, "
            f"{len(unverified)} unverified; listed webhooks {dict(hooks)}; {len(run.odd)} odd answers\n"
            + "\n".join(run.odd[:20]))
    with capsys.disabled():
        print("\n" + text)
    diag = f"{text}\n{webhook_error}\nnginx: {f.nginx.problems()[:10]}\n{f.stderr_tails()}"

    assert not run.odd and len(ids) == JOBS, diag
    assert set(run.final) == ids, f"{len(ids) - len(run.final)} jobs had not ended after {RUN_TIMEOUT:g}s\n{diag}"
    assert statuses == {"succeeded": JOBS}, diag
    assert attempts == {1: JOBS}, diag
    for job_id, doc in run.final.items():
        assert (doc.get("result") or {}).get("data", {}).get("message"), f"{job_id}: {doc}\n{diag}"
    # Each ran once: counted once over the instances, logged once, and nothing lost or released.
    assert sum(succeeded.values()) == JOBS, diag
    assert not any(others.values()), diag
    twice = {job_id: ends for job_id, ends in logged.items() if len(ends) != 1}
    assert not twice, f"jobs ended more than once: {dict(list(twice.items())[:10])}\n{diag}"
    assert set(logged) == ids and all(ends[0][1:] == ("succeeded", 1) for ends in logged.values()), diag
    # The work is spread over the fleet, and any instance answers any id.
    assert all(n > 0 for n in succeeded.values()), diag
    assert len(get_split) == INSTANCES and all(n > 0 for n in get_split.values()), diag
    assert all(status == 200 for _, status, _ in gets), diag
    assert elsewhere > 0, diag
    # One signed webhook per job: the receiver verified each with the configured secret.
    assert not webhook_error, diag
    assert len(rx.deliveries) == JOBS and len(msg_ids) == JOBS, diag
    assert not unverified, diag
    assert not bad_events and delivered_jobs == ids, f"{bad_events[:10]}\n{diag}"
    assert {j["id"] for j in listed} == ids and len(listed) == JOBS, diag
    assert hooks == {'{"status":"delivered","attempts":1,"last_status":200}': JOBS}, diag


# --------------------------------------------------------------------------
# the tests


@needs_redis
async def test_three_instances_share_the_jobs_through_redis(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with RedisServer() as server:
        await run_variant(tmp_path, f"with Redis ({server.url})", ["--redis-url", server.url], server.url, capsys)
        # The jobs were in Redis, not in a state directory.
        assert not list((tmp_path / "fleet").rglob(FILENAME))


async def test_three_instances_share_the_jobs_through_one_state_dir(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    await run_variant(tmp_path, f"with SQLite in one state directory ({state})", ["--state-dir", str(state)],
                      "memory", capsys)
    assert (state / FILENAME).is_file()  # the one file the three shared
