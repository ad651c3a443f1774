"""The job routes of SPEC §9.1 end to end, on both stores (SQLite in the state
directory, a real redis-server): a real in-process server, the fake model
over real HTTP, a real webhook receiver verifying with `standardwebhooks`.

Every test runs once per store (`srv`). A job is followed by polling its
document (the client's view: there is no other event to await from outside);
a call in flight is held with `Hold` and awaited with `fake.wait_calls`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import redis

from aiwfd.errors import StartupError
from aiwfd.testing.fakeopenai import FakeOpenAI, Hold, Reply
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.metrics import value
from aiwfd.testing.redisproc import RedisServer
from aiwfd.testing.webhook_receiver import Answer, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"test-secret-of-sixteen+").decode()
FRONTEND, REPORTS, METERED = "frontend-key", "reports-key", "metered-key"

CONFIG = """\
version: 0.3
providers:
  fake:
    base_url: @FAKE_URL@
    api_key_env: FAKE_KEY
auth:
  keys:
    - name: frontend
      key_env: FRONTEND_KEY
    - name: reports
      key_env: REPORTS_KEY
    - name: metered
      key_env: METERED_KEY
      limits: {requests: 3/min, tokens: 15/min}
types:
  In:
    name: string
  Out:
    message: string
assistants:
  greeter:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 1
  free:                      # any JSON object in
    use: fake
    model: gpt-4o-mini
    output_type: Out
    max_attempts: 1
  other:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 1
jobs:
  concurrency: @CONCURRENCY@
  lease: 3s
  webhook:
    url: @HOOK_URL@
    allow_private: true
  allow_request_webhooks: ["@HOOK_BASE@/own/"]
"""
_ids = itertools.count()


def text(fake: FakeOpenAI, rx: WebhookReceiver, concurrency: int = 4, drop: str = "") -> str:
    t = (CONFIG.replace("@FAKE_URL@", fake.base_url).replace("@HOOK_URL@", rx.url)
         .replace("@HOOK_BASE@", rx.base_url).replace("@CONCURRENCY@", str(concurrency)))
    if drop:  # the agent `drop` removed (its block is the last)
        t = t[:t.index(f"  {drop}:\n")] + t[t.index("jobs:\n"):]
    return t


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver([SECRET]) as r:
        yield r


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FAKE_KEY="sk-fake", FRONTEND_KEY=FRONTEND, REPORTS_KEY=REPORTS, METERED_KEY=METERED,
                    AIWF_WEBHOOK_SECRET=SECRET)


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> dict[str, Any]:
    if request.param == "redis":
        redis.Redis.from_url(redis_server.url).flushall()  # a test's leftovers are not the next one's jobs
        return {"redis_url": redis_server.url, "state_dir": str(tmp_path / "unused")}
    return {"state_dir": str(tmp_path / "state")}


@pytest.fixture
async def srv(fake: FakeOpenAI, rx: WebhookReceiver, store_settings: dict[str, Any],
              tmp_path: Path) -> AsyncIterator[InProcess]:
    fake.reset()
    rx.deliveries.clear()
    cfg = write_config(tmp_path, text(fake, rx))
    async with serve(cfg, env=env(fake), **store_settings) as s:
        yield s


async def request(srv: InProcess, method: str, path: str, body: Any = None, api_key: str = FRONTEND,
                  **headers: str) -> tuple[int, dict[str, str], Any]:
    h = {"X-API-Key": api_key, **headers}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    async with srv.session.request(method, srv.url(path), data=data, headers=h) as r:
        return r.status, dict(r.headers), await r.json()


async def submit(srv: InProcess, agent: str = "greeter", body: Any = None, api_key: str = FRONTEND,
                 **headers: str) -> dict[str, Any]:
    status, h, doc = await request(srv, "POST", f"/agent/{agent}/jobs", body or {"name": f"n{next(_ids)}"},
                                   api_key, **headers)
    assert status == 202, doc
    assert h["Location"] == f"/jobs/{doc['id']}"
    return dict(doc)


async def until(srv: InProcess, job_id: str, *statuses: str, api_key: str = FRONTEND,
                webhook: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The job's document once its status is one of `statuses` (and its webhook's, if given)."""
    end = time.monotonic() + timeout
    while True:
        status, _, doc = await request(srv, "GET", f"/jobs/{job_id}", api_key=api_key)
        assert status == 200, doc
        if doc["status"] in statuses and (webhook is None or (doc["webhook"] or {}).get("status") == webhook):
            return dict(doc)
        assert time.monotonic() < end, f"job {job_id} stayed {doc['status']}: {doc}"
        await asyncio.sleep(0.02)


# -- the life of a job --------------------------------------------------------


async def test_a_job_runs_to_the_end_and_its_webhook_arrives_signed(srv: InProcess, fake: FakeOpenAI,
                                                                     rx: WebhookReceiver) -> None:
    fake.script(Reply(data={"message": "Hello, Ann"}))
    doc = await submit(srv, body={"name": "Ann"})
    assert doc["status"] == "queued" and doc["attempts"] == 0 and doc["result"] is None
    assert doc["webhook"] == {"status": "pending", "attempts": 0, "last_status": None}
    assert doc["created_at"].endswith("Z")
    done = await until(srv, doc["id"], "succeeded", webhook="delivered")
    assert done["result"]["data"] == {"message": "Hello, Ann"}
    assert done["attempts"] == 1 and done["error"] is None
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["webhook"] == {"status": "delivered", "attempts": 1, "last_status": 200}
    (d,) = rx.by_id("msg_" + doc["id"])
    assert d.verified and d.path == "/hook"
    event = d.json()
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == doc["id"] and event["data"]["result"] == done["result"]
    assert "webhook" not in event["data"]
    assert fake.calls == 1
    assert value(await srv.scrape(), "aiwfd_jobs_total", agent="greeter", outcome="succeeded") == 1


async def test_a_failed_call_fails_the_job_with_the_error_shape(srv: InProcess, fake: FakeOpenAI,
                                                                rx: WebhookReceiver) -> None:
    fake.script(Reply(content="not json"))
    doc = await submit(srv)
    done = await until(srv, doc["id"], "failed", webhook="delivered")
    assert done["error"]["type"] == "invalid_output" and isinstance(done["error"]["message"], str)
    assert done["result"] is None
    (d,) = rx.by_id("msg_" + doc["id"])
    assert d.json()["type"] == "job.failed"


async def test_list_is_the_clients_own_newest_first_and_paged(srv: InProcess) -> None:
    mine = [(await submit(srv))["id"] for _ in range(5)]
    other = await submit(srv, "other")
    theirs = await submit(srv, api_key=REPORTS)
    for j in mine + [other["id"]]:
        await until(srv, j, "succeeded")
    seen: list[str] = []
    cursor = None
    while True:
        q = "/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = await request(srv, "GET", q)
        assert status == 200 and len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(mine + [other["id"]]))
    assert theirs["id"] not in seen
    _, _, only = await request(srv, "GET", "/jobs?agent=other&status=succeeded")
    assert [j["id"] for j in only["jobs"]] == [other["id"]]
    _, _, none = await request(srv, "GET", "/jobs?status=queued&agent=greeter")
    assert none == {"jobs": [], "next_cursor": None}


@pytest.mark.parametrize("query, message", [
    ("status=done", "status must be one of"), ("limit=0", "limit must be"), ("limit=101", "limit must be"),
    ("limit=x", "limit must be"), ("cursor=bogus", "invalid cursor"), ("sort=new", "unknown query parameter"),
])
async def test_a_bad_listing_query_is_400(srv: InProcess, query: str, message: str) -> None:
    status, _, body = await request(srv, "GET", "/jobs?" + query)
    assert status == 400 and body["error"]["type"] == "invalid_request"
    assert message in body["error"]["message"]


async def test_another_clients_job_is_404_to_read_and_to_cancel(srv: InProcess) -> None:
    doc = await submit(srv)
    for method in ("GET", "DELETE"):
        status, _, body = await request(srv, method, f"/jobs/{doc['id']}", api_key=REPORTS)
        assert status == 404 and body["error"]["type"] == "not_found"
    status, _, body = await request(srv, "GET", "/jobs/no-such-job")
    assert status == 404
    status, _, body = await request(srv, "GET", f"/jobs/{doc['id']}", api_key="wrong")
    assert status == 401 and body["error"]["type"] == "unauthorized"
    await until(srv, doc["id"], "succeeded")


# -- cancel -------------------------------------------------------------------


async def test_cancel_queued_running_and_finished(srv: InProcess, fake: FakeOpenAI, rx: WebhookReceiver,
                                                  tmp_path: Path) -> None:
    gates = [asyncio.Event() for _ in range(4)]
    fake.script(*(Hold(g) for g in gates))
    running = [await submit(srv) for _ in range(4)]  # concurrency 4: all four run
    await fake.wait_calls(4)
    queued = await submit(srv)
    status, _, doc = await request(srv, "GET", f"/jobs/{queued['id']}")
    assert doc["status"] == "queued"
    # Queued: it never runs.
    status, _, doc = await request(srv, "DELETE", f"/jobs/{queued['id']}")
    assert status == 200 and doc["status"] == "canceled" and doc["attempts"] == 0
    # Running: its model call is closed.
    status, _, doc = await request(srv, "DELETE", f"/jobs/{running[0]['id']}")
    assert status == 200 and doc["status"] == "canceled"
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert fake.disconnects == 1
    for g in gates[1:]:
        g.set()
    for j in running[1:]:
        await until(srv, j["id"], "succeeded")
    assert fake.calls == 4  # the canceled queued job never reached the model
    # Finished: 409.
    status, _, body = await request(srv, "DELETE", f"/jobs/{running[1]['id']}")
    assert status == 409 and body["error"]["type"] == "conflict"
    for j in (queued, running[0]):
        final = await until(srv, j["id"], "canceled", webhook="delivered")
        assert final["result"] is None
        (d,) = rx.by_id("msg_" + j["id"])
        assert d.json()["type"] == "job.canceled"
    assert value(await srv.scrape(), "aiwfd_jobs_total", agent="greeter", outcome="canceled") == 1


# -- what fails before acceptance fails now -----------------------------------


async def test_validation_auth_and_limits_are_synchronous(srv: InProcess, fake: FakeOpenAI) -> None:
    status, _, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": 3})
    assert status == 422 and body["error"]["type"] == "invalid_input"
    status, _, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": "x"}, api_key="")
    assert status == 401
    status, _, body = await request(srv, "POST", "/agent/nope/jobs", {"name": "x"})
    assert status == 404 and body["error"]["type"] == "not_found"
    status, _, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": "x"},
                                    **{"Webhook-URL": "http://127.0.0.1:9/elsewhere"})
    assert status == 422 and "allow_request_webhooks" in body["error"]["message"]
    # metered: 3 requests/min, 15 tokens/min; a call of the fake reports 10 tokens.
    first = await submit(srv, api_key=METERED)
    done = await until(srv, first["id"], "succeeded", api_key=METERED)
    assert done["result"]["trace"]["usage"]["total"] == 10
    second = await submit(srv, api_key=METERED)  # 10 < 15 tokens so far: admitted
    await until(srv, second["id"], "succeeded", api_key=METERED)
    # The runs' tokens were counted when they ran: 20 ≥ 15, refused at submission.
    status, h, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": "x"}, api_key=METERED)
    assert status == 429 and body["error"]["type"] == "rate_limited"
    assert body["error"]["details"][0]["limit"] == "tokens"
    assert int(h["Retry-After"]) >= 1
    assert fake.calls == 2
    _, _, listing = await request(srv, "GET", "/jobs", api_key=METERED)
    assert len(listing["jobs"]) == 2  # nothing was stored for the refusals


async def test_a_job_names_its_own_webhook_under_an_allowed_prefix(srv: InProcess, rx: WebhookReceiver) -> None:
    doc = await submit(srv, **{"Webhook-URL": rx.base_url + "/own/hook?token=abc"})
    await until(srv, doc["id"], "succeeded", webhook="delivered")
    (d,) = rx.by_id("msg_" + doc["id"])
    assert d.path == "/own/hook" and d.verified


async def test_a_webhook_that_fails_three_times_is_delivered_on_the_fourth(srv: InProcess,
                                                                           rx: WebhookReceiver) -> None:
    rx.script(Answer(503, retry_after="0", times=3), Answer(200))
    doc = await submit(srv)
    done = await until(srv, doc["id"], "succeeded", webhook="delivered")
    assert done["webhook"] == {"status": "delivered", "attempts": 4, "last_status": 200}
    got = rx.by_id("msg_" + doc["id"])
    assert [d.answered for d in got] == [503, 503, 503, 200]
    assert len({d.body for d in got}) == 1 and all(d.verified for d in got)  # one id, one body


async def test_a_job_submitted_twice_with_one_key_is_one_job(srv: InProcess, fake: FakeOpenAI) -> None:
    key = f"job-key-{next(_ids)}"
    first = await submit(srv, body={"name": "Ann"}, **{"Idempotency-Key": key})
    status, h, again = await request(srv, "POST", "/agent/greeter/jobs", {"name": "Ann"},
                                     **{"Idempotency-Key": key})
    assert status == 202 and again["id"] == first["id"] and h["Idempotency-Replayed"] == "true"
    assert h["Location"] == f"/jobs/{first['id']}"
    status, _, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": "Bob"},
                                    **{"Idempotency-Key": key})
    assert status == 422 and body["error"]["type"] == "idempotency_key_reused"
    await until(srv, first["id"], "succeeded")
    _, _, listing = await request(srv, "GET", "/jobs")
    assert [j["id"] for j in listing["jobs"]] == [first["id"]]
    assert fake.calls == 1


# -- reload -------------------------------------------------------------------


async def test_an_agent_removed_by_a_reload_fails_its_queued_jobs(fake: FakeOpenAI, rx: WebhookReceiver,
                                                                  store_settings: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    fake.reset()
    gate = asyncio.Event()
    fake.script(Hold(gate))
    cfg = write_config(tmp_path, text(fake, rx, concurrency=1))
    async with serve(cfg, env=env(fake), **store_settings) as srv:
        held = await submit(srv)
        await fake.wait_calls(1)
        queued = [await submit(srv, "other") for _ in range(3)]
        cfg.write_text(text(fake, rx, concurrency=1, drop="other"))
        assert await srv.server.reload()
        for j in queued:
            doc = await until(srv, j["id"], "failed")
            assert doc["error"]["type"] == "not_found" and "'other'" in doc["error"]["message"]
            assert doc["attempts"] == 0
        gate.set()
        await until(srv, held["id"], "succeeded")
        assert fake.calls == 1


async def test_a_webhook_without_its_secret_does_not_start(fake: FakeOpenAI, rx: WebhookReceiver,
                                                           tmp_path: Path) -> None:
    cfg = write_config(tmp_path, text(fake, rx))
    e = env(fake)
    del e["AIWF_WEBHOOK_SECRET"]
    with pytest.raises(StartupError, match="AIWF_WEBHOOK_SECRET"):
        async with serve(cfg, env=e, state_dir=str(tmp_path / "s")):
            pass
    e["AIWF_WEBHOOK_SECRET"] = "not-a-secret"
    with pytest.raises(StartupError, match='does not start with "whsec_"') as info:
        async with serve(cfg, env=e, state_dir=str(tmp_path / "s")):
            pass
    assert "not-a-secret" not in str(info.value)


# -- what the review found ------------------------------------------------------


@pytest.mark.parametrize("url", [
    "@BASE@/own/../hook", "@BASE@/own/%2e%2e/hook", "@BASE@/own/.%2E/x", "http://user@127.0.0.1:1/own/x",
    "@BASE@/ownership", "@BASE@:99/own/x",
])
async def test_a_webhook_url_cannot_leave_its_prefix(srv: InProcess, rx: WebhookReceiver, url: str) -> None:
    target = url.replace("@BASE@", rx.base_url)
    status, _, body = await request(srv, "POST", "/agent/greeter/jobs", {"name": "x"}, **{"Webhook-URL": target})
    assert status == 422 and "allow_request_webhooks" in body["error"]["message"], target


async def test_a_rotated_api_key_keeps_its_jobs(fake: FakeOpenAI, rx: WebhookReceiver, store_settings: dict[str, Any],
                                                tmp_path: Path) -> None:
    """API_KEY's keys are one client being rotated: its jobs stay its own whichever key asks."""
    fake.reset()
    cfg = write_config(tmp_path, text(fake, rx))
    e = {**env(fake), "API_KEY": "old-key,new-key"}
    async with serve(cfg, env=e, **store_settings) as s:
        doc = await submit(s, api_key="old-key")
        await until(s, doc["id"], "succeeded", api_key="new-key")
    async with serve(cfg, env={**e, "API_KEY": "new-key"}, **store_settings) as s:
        status, _, again = await request(s, "GET", f"/jobs/{doc['id']}", api_key="new-key")
        assert status == 200 and again["status"] == "succeeded"
        _, _, listing = await request(s, "GET", "/jobs", api_key="new-key")
        assert [j["id"] for j in listing["jobs"]] == [doc["id"]]


async def test_a_reload_that_narrows_a_clients_allowlist_fails_its_queued_jobs(
        fake: FakeOpenAI, rx: WebhookReceiver, store_settings: dict[str, Any], tmp_path: Path) -> None:
    fake.reset()
    gate = asyncio.Event()
    fake.script(Hold(gate))
    cfg = write_config(tmp_path, text(fake, rx, concurrency=1))
    async with serve(cfg, env=env(fake), **store_settings) as s:
        held = await submit(s)
        await fake.wait_calls(1)
        queued = await submit(s, "other")
        cfg.write_text(text(fake, rx, concurrency=1).replace(
            "      key_env: FRONTEND_KEY\n", "      key_env: FRONTEND_KEY\n      agents: [greeter]\n"))
        assert await s.server.reload()
        gate.set()
        await until(s, held["id"], "succeeded")
        doc = await until(s, queued["id"], "failed")
        assert doc["error"]["type"] == "forbidden"
        assert fake.calls == 1


async def test_a_run_stops_when_its_lease_cannot_be_renewed(fake: FakeOpenAI, rx: WebhookReceiver,
                                                            tmp_path: Path) -> None:
    """Redis stops answering mid-run for longer than the lease: the run stops
    (its model call is closed) rather than go on beside another instance's,
    and the job runs again once Redis is back."""
    fake.reset()
    gate = asyncio.Event()
    fake.script(Hold(gate))
    # The least lease (1 s): the test waits out the run's hold on it, then the lease itself.
    cfg = write_config(tmp_path, text(fake, rx, concurrency=1).replace("lease: 3s", "lease: 1s"))
    with RedisServer() as own:
        async with serve(cfg, env=env(fake), redis_url=own.url, state_dir=str(tmp_path / "s")) as s:
            doc = await submit(s)
            await fake.wait_calls(1)
            own.pause()
            try:
                await asyncio.wait_for(fake.disconnected.wait(), 10)  # lease 1 s: the run stops within it
            finally:
                own.resume()
            done = await until(s, doc["id"], "succeeded", timeout=20)
            assert done["attempts"] == 2
            assert value(await s.scrape(), "aiwfd_jobs_total", agent="greeter", outcome="lost") == 1


async def test_an_instance_that_lacks_an_agent_leaves_its_jobs_to_one_that_has_it(
        fake: FakeOpenAI, rx: WebhookReceiver, store_settings: dict[str, Any], tmp_path: Path) -> None:
    """A rolling reload: two instances on one store, only A knows `other` yet."""
    fake.reset()
    full = write_config(tmp_path, text(fake, rx), "full.yaml")
    older = write_config(tmp_path, text(fake, rx, drop="other"), "older.yaml")
    async with serve(older, env=env(fake), **store_settings) as b, \
            serve(full, env=env(fake), **store_settings) as a:
        jobs = [await submit(a, "other") for _ in range(6)]
        for j in jobs:
            done = await until(a, j["id"], "succeeded")
            assert done["attempts"] == 1
        assert value(await a.scrape(), "aiwfd_jobs_total", agent="other", outcome="succeeded") == 6
        assert not [k for k in await b.scrape() if k[0] == "aiwfd_jobs_total"]


async def test_a_body_with_an_integer_past_64_bits_is_a_job_like_any_other(srv: InProcess, fake: FakeOpenAI) -> None:
    """The request parser allows integers past 64 bits (SPEC §3.1); the stores keep them exactly."""
    big = 139483281760964766072832
    data = ('{"name": "Ann", "extra": %d}' % big).encode()
    async with srv.session.post(srv.url("/agent/free/jobs"), data=data,
                                headers={"X-API-Key": FRONTEND, "Content-Type": "application/json"}) as r:
        assert r.status == 202, await r.text()
        doc = await r.json()
    await until(srv, doc["id"], "succeeded")
    assert str(big) in fake.requests[-1].messages[-1]["content"]
    status, _, body = await request(srv, "GET", "/jobs?limit=\u00b2")
    assert status == 400 and body["error"]["type"] == "invalid_request"
