"""The job store of SPEC §9 (issue 16): one suite, run against both backends,
SQLite (a real file in tmp_path) and Redis Streams (a real redis-server).

Several store objects on one file or one Redis stand for several instances:
each has its own connection (SQLite: its own thread and connection, so the
file's locks are really contended). Leases are 0.2-0.3 s; the only sleeps
are waits for a lease to run out. Then what only one backend has: the SQLite
file surviving a SIGKILL of the process that submitted, Redis's dead-letter
stream, and each backend's failure as StoreError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from aiwfd.jobs import open_job_store
from aiwfd.jobs.delivery import run_deliveries
from aiwfd.jobs.redis_streams import RedisJobStore
from aiwfd.jobs.sqlite import FILENAME, SQLiteJobStore
from aiwfd.jobs.webhooks import open_session
from aiwfd.jobs.store import Delivery, InvalidCursor, JobFinished, JobStore, StoreError, WebhookStatus
from aiwfd.testing.processes import free_port, stop_process
from aiwfd.testing.redisproc import RedisServer
from aiwfd.testing.webhook_receiver import Answer, Hang, WebhookReceiver

REPO = Path(__file__).resolve().parents[2]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEASE = 0.25  # a lease that runs out within a test; waits are LEASE + a margin
WAIT = LEASE + 0.1
LONG = 30.0  # a lease that never runs out within a test
# A W3C traceparent as telemetry.traceparent() gives it (version, trace id, span id, sampled).
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

_runs = itertools.count()

Factory = Callable[..., JobStore]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, server: RedisServer,
                 tmp_path: Path) -> AsyncIterator[Factory]:
    """A factory of store objects (= instances) sharing one fresh set of jobs:
    one SQLite directory, or one Redis under a prefix of the test's own."""
    opened: list[JobStore] = []
    prefix = f"t{next(_runs)}:"

    def make(**kw: object) -> JobStore:
        store: JobStore
        if request.param == "redis":
            store = open_job_store(server.url, tmp_path, prefix=prefix, **kw)  # type: ignore[arg-type]
        else:
            store = open_job_store(None, tmp_path, **kw)  # type: ignore[arg-type]
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for st in opened:
            await st.close()


def backend(store: JobStore) -> str:
    return "redis" if isinstance(store, RedisJobStore) else "sqlite"


# -- both backends ---------------------------------------------------------


async def test_submit_get_and_the_document(stores: Factory) -> None:
    st = stores()
    before = time.time()
    job = await st.submit("alice", "summarize", {"text": "hi", "n": [1, 2]}, webhook_url="https://h.example/x")
    assert job.status == "queued" and job.attempts == 0 and job.client == "alice"
    assert job.body == {"text": "hi", "n": [1, 2]} and job.webhook_url == "https://h.example/x"
    assert before - 1 <= job.created_at <= time.time() + 1  # Redis's clock, the same host here
    assert await st.get(job.id, "alice") == job
    assert await st.get(job.id, "bob") is None  # another client's job does not exist for it
    assert await st.get("nope", "alice") is None
    doc = job.to_document()
    assert set(doc) == {"id", "agent", "status", "created_at", "started_at", "finished_at", "attempts",
                        "result", "error", "webhook"}
    # Its own Webhook-URL: a webhook, pending from the start (SPEC §9.1's shape).
    assert doc["webhook"] == {"status": "pending", "attempts": 0, "last_status": None}
    assert RFC3339.match(doc["created_at"]) and doc["started_at"] is None and doc["finished_at"] is None
    # Unguessable ids: 128 random bits, URL-safe.
    other = await st.submit("alice", "summarize", None)
    assert other.id != job.id and re.fullmatch(r"[A-Za-z0-9_-]{22,}", other.id) and other.webhook_url is None
    assert other.webhook is None and other.to_document()["webhook"] is None  # no webhook at all
    configured = await st.submit("alice", "summarize", None, webhook=True)  # the configured URL's
    assert configured.webhook_url is None and configured.webhook == WebhookStatus("pending", 0, None)
    assert await st.get(configured.id, "alice") == configured
    assert (await st.submit("alice", "s", None, "https://h.example/y", webhook=False)).webhook is None


async def test_a_jobs_traceparent_is_kept_and_not_shown(stores: Factory) -> None:
    """The submitting request's traceparent comes back with the job (claim,
    get, list), for its run to link to; a job submitted without one has None
    (Redis: no field at all). Internal: never in the document."""
    st = stores()
    traced = await st.submit("c", "a", 1, traceparent=TRACEPARENT)
    plain = await st.submit("c", "a", 2)
    assert traced.traceparent == TRACEPARENT and plain.traceparent is None
    assert (await st.get(traced.id, "c")) == traced and (await st.get(plain.id, "c")) == plain
    page, _ = await st.list("c")
    assert {j.id: j.traceparent for j in page} == {traced.id: TRACEPARENT, plain.id: None}
    assert "traceparent" not in traced.to_document() and TRACEPARENT not in str(traced.to_document())
    first, second = await st.claim("w", LONG), await st.claim("w", LONG)
    assert first is not None and first.id == traced.id and first.traceparent == TRACEPARENT
    assert second is not None and second.id == plain.id and second.traceparent is None
    assert await st.finish(traced.id, "w", "succeeded", {"data": 1})
    got = await st.get(traced.id, "c")
    assert got is not None and got.status == "succeeded" and got.traceparent == TRACEPARENT
    if isinstance(st, RedisJobStore):
        assert not await st._client.hexists(st._key(plain.id), "traceparent")


async def test_claim_renew_finish_once(stores: Factory) -> None:
    st = stores()
    job = await st.submit("c", "a", {"x": 1})
    got = await st.claim("w1", LONG)
    assert got is not None and got.id == job.id and got.status == "running" and got.attempts == 1
    assert got.started_at is not None and RFC3339.match(got.to_document()["started_at"])
    assert await st.claim("w2", LONG) is None  # the only job is leased
    assert await st.renew(job.id, "w1", LONG)
    assert not await st.renew(job.id, "w2", LONG)  # not w2's lease
    assert not await st.finish(job.id, "w2", "succeeded", {"data": "no"})
    result = {"data": {"y": 2}, "trace": {"attempts": 1}}
    assert await st.finish(job.id, "w1", "succeeded", result)
    assert not await st.finish(job.id, "w1", "failed", error={"type": "x"})  # written once
    assert not await st.renew(job.id, "w1", LONG)
    done = await st.get(job.id, "c")
    assert done is not None and done.status == "succeeded" and done.result == result and done.error is None
    assert done.finished_at is not None and done.finished_at >= done.started_at  # type: ignore[operator]
    assert RFC3339.match(done.to_document()["finished_at"])
    assert await st.claim("w1", LONG) is None  # nothing left to run
    failed = await st.submit("c", "a", 1)
    await st.claim("w1", LONG)
    err = {"type": "upstream_error", "message": "m", "details": []}
    assert await st.finish(failed.id, "w1", "failed", error=err)
    got = await st.get(failed.id, "c")
    assert got is not None and got.status == "failed" and got.error == err and got.result is None


async def test_two_instances_never_claim_one_job_at_once(stores: Factory) -> None:
    a, b = stores(), stores()
    ids = {(await a.submit("c", "a", i)).id for i in range(10)}
    claims = await asyncio.gather(*(st.claim(f"w{i}", LONG) for i in range(15) for st in (a, b)))
    got = [j.id for j in claims if j is not None]
    assert sorted(got) == sorted(ids)  # each once; the 20 other claims found nothing


async def test_an_expired_lease_runs_again_on_an_idle_queue(stores: Factory) -> None:
    """The owner is killed (it stops renewing): once its lease runs out another
    instance claims the job, with no new job submitted, attempts 2; the stale
    owner's renew and finish then answer False and change nothing."""
    a, b = stores(), stores()
    job = await a.submit("c", "a", {})
    first = await a.claim("dead", LEASE)
    assert first is not None and first.attempts == 1
    assert await b.claim("alive", LEASE) is None  # the lease holds
    await asyncio.sleep(WAIT)
    second = await b.claim("alive", LONG)
    assert second is not None and second.id == job.id and second.attempts == 2 and second.status == "running"
    assert not await a.renew(job.id, "dead", LEASE)
    assert not await a.finish(job.id, "dead", "succeeded", {"data": "stale"})
    assert await b.finish(job.id, "alive", "succeeded", {"data": "fresh"})
    done = await a.get(job.id, "c")
    assert done is not None and done.result == {"data": "fresh"} and done.attempts == 2


async def test_renewing_keeps_the_lease(stores: Factory) -> None:
    a, b = stores(), stores()
    job = await a.submit("c", "a", {})
    assert await a.claim("w1", LEASE)
    for _ in range(3):  # 3 x LEASE/2: past the first lease, never past a renewed one
        await asyncio.sleep(LEASE / 2)
        assert await a.renew(job.id, "w1", LEASE)
        assert await b.claim("w2", LEASE) is None


async def test_release_puts_it_back(stores: Factory) -> None:
    st = stores()
    job = await st.submit("c", "a", {})
    assert await st.claim("w1", LONG)
    await st.release(job.id, "w2")  # not w2's: nothing happens
    assert await st.claim("w2", LONG) is None
    await st.release(job.id, "w1")
    queued = await st.get(job.id, "c")
    assert queued is not None and queued.status == "queued"
    again = await st.claim("w2", LONG)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert not await st.finish(job.id, "w1", "succeeded")
    assert await st.finish(job.id, "w2", "succeeded", {"data": 1})


async def test_cancel_queued_running_finished(stores: Factory) -> None:
    st = stores()
    queued = await st.submit("c", "a", 1)
    running = await st.submit("c", "a", 2)
    finished = await st.submit("c", "a", 3)
    # queued: canceled, never runs
    canceled = await st.cancel(queued.id, "c")
    assert canceled is not None and canceled.status == "canceled" and canceled.finished_at is not None
    assert await st.cancel(running.id, "someone-else") is None
    assert await st.cancel("nope", "c") is None
    got = await st.claim("w", LONG)
    assert got is not None and got.id == running.id
    # running: canceled; the runner's next renew and finish answer False
    canceled = await st.cancel(running.id, "c")
    assert canceled is not None and canceled.status == "canceled"
    assert not await st.renew(running.id, "w", LONG)
    assert not await st.finish(running.id, "w", "succeeded", {"data": 1})
    got = await st.claim("w", LONG)
    assert got is not None and got.id == finished.id
    assert await st.finish(finished.id, "w", "succeeded", {"data": 3})
    assert await st.claim("w", LONG) is None  # the queued one never ran
    # finished (a cancel too): JobFinished, holding the job (-> 409)
    for jid, status in ((finished.id, "succeeded"), (queued.id, "canceled")):
        with pytest.raises(JobFinished) as exc:
            await st.cancel(jid, "c")
        assert exc.value.job.status == status
    assert [(await st.get(j.id, "c")).status for j in (queued, running, finished)] == [  # type: ignore[union-attr]
        "canceled", "canceled", "succeeded"]


async def test_list_pages_newest_first_stable_under_inserts(stores: Factory) -> None:
    st = stores()
    mine = [await st.submit("c", "a" if i % 2 else "b", i) for i in range(7)]
    await st.submit("other", "a", "not mine")
    page, cursor = await st.list("c", limit=3)
    assert [j.id for j in page] == [j.id for j in mine[::-1][:3]] and cursor
    newer = await st.submit("c", "a", "new")  # inserted while paging: shifts nothing
    page2, cursor2 = await st.list("c", limit=3, cursor=cursor)
    assert [j.id for j in page2] == [j.id for j in mine[::-1][3:6]] and cursor2
    page3, cursor3 = await st.list("c", limit=3, cursor=cursor2)
    assert [j.id for j in page3] == [mine[0].id] and cursor3 is None
    first, _ = await st.list("c", limit=1)
    assert [j.id for j in first] == [newer.id]
    exact, none = await st.list("c", limit=8)
    assert len(exact) == 8 and none is None  # exactly a page: no empty page after it
    # filters
    by_agent, _ = await st.list("c", agent="b", limit=10)
    assert [j.id for j in by_agent] == [j.id for j in mine[::-2]]
    got = await st.claim("w", LONG)
    assert got is not None and got.id == mine[0].id
    running, _ = await st.list("c", status="running")
    assert [j.id for j in running] == [mine[0].id]
    paged, seen, cur = [], 0, None
    while True:  # a filtered list pages too
        part, cur = await st.list("c", agent="a", status="queued", limit=2, cursor=cur)
        paged += [j.id for j in part]
        seen += 1
        if cur is None:
            break
    assert paged == [newer.id] + [j.id for j in mine[::-1] if j.agent == "a"] and seen == 2
    assert await st.list("nobody") == ([], None)
    for bad in ("garbage", "!!", "ajE6eA"):  # "ajE6eA" = base64 of "j1:x"
        with pytest.raises(InvalidCursor):
            await st.list("c", cursor=bad)


async def test_200_concurrent_submits_3_owners_each_claimed_once(stores: Factory) -> None:
    sub = stores()
    jobs = await asyncio.gather(*(sub.submit(f"c{i % 4}", "a", {"i": i}) for i in range(200)))
    assert len({j.id for j in jobs}) == 200
    owners = [stores() for _ in range(3)]
    claimed: dict[str, list[str]] = {}

    async def work(st: JobStore, owner: str) -> None:
        while (job := await st.claim(owner, LONG)) is not None:
            claimed.setdefault(job.id, []).append(owner)
            assert await st.finish(job.id, owner, "succeeded", {"data": owner})

    # Several claim loops per store object too: concurrency inside one instance.
    await asyncio.gather(*(work(st, f"{k}-{n}") for k, st in enumerate(owners) for n in range(3)))
    assert set(claimed) == {j.id for j in jobs}
    assert all(len(v) == 1 for v in claimed.values())
    # (How the work spreads over instances is the fleet test's: here one
    # store's thread may well win every race.)


async def test_fail_agent_fails_only_its_queued_jobs(stores: Factory) -> None:
    st = stores()
    running = await st.submit("c", "gone", 0)
    assert await st.claim("w", LONG)
    queued = [await st.submit("c", "gone", i) for i in range(3)]
    kept = await st.submit("c", "stays", 9)
    err = {"type": "not_found", "message": "agent 'gone' no longer exists", "details": []}
    assert await st.fail_agent("gone", err) == 3
    for j in queued:
        got = await st.get(j.id, "c")
        assert got is not None and got.status == "failed" and got.error == err and got.finished_at
    assert (await st.get(running.id, "c")).status == "running"  # type: ignore[union-attr]
    got = await st.claim("w", LONG)
    assert got is not None and got.id == kept.id  # the failed ones never run
    assert await st.claim("w", LONG) is None
    assert await st.fail_agent("gone", err) == 0


async def test_a_claim_with_agents_leaves_other_agents_jobs_alone(stores: Factory) -> None:
    """A rolling reload: the old instance's config lacks the agent "new". Its
    claims skip that agent's jobs (queued, or lost: lease ran out) without
    counting an attempt, and the instance that knows it, or a claim that
    names no agents, takes them at once, oldest first."""
    old, new = stores(), stores()
    fresh = [await old.submit("c", "new", i) for i in range(3)]
    mine = await old.submit("c", "a", "a's")
    got = await old.claim("old", LONG, agents={"a"})
    assert got is not None and got.id == mine.id
    assert await old.claim("old", LONG, agents=["a", "b"]) is None  # nothing else it knows
    assert await old.claim("old", LONG, agents=()) is None  # no agent at all: no job
    for j in fresh:
        left = await old.get(j.id, "c")
        assert left is not None and left.status == "queued" and left.attempts == 0 and left.started_at is None
    got = await new.claim("new", LEASE, agents=frozenset({"a", "new"}))
    assert got is not None and got.id == fresh[0].id and got.attempts == 1
    # Lost (its lease runs out): not the old instance's to run again either.
    await asyncio.sleep(WAIT)
    assert await old.claim("old", LONG, agents={"a"}) is None
    again = await new.claim("new", LONG, agents={"new"})
    assert again is not None and again.id == fresh[0].id and again.attempts == 2
    # A claim without agents takes any job, the skipped ones too, in order.
    rest = [await new.claim("any", LONG), await new.claim("any", LONG)]
    assert [j.id for j in rest if j is not None] == [j.id for j in fresh[1:]]
    assert all(j is not None and j.attempts == 1 for j in rest)
    assert await new.claim("any", LONG) is None
    with pytest.raises(TypeError):
        await old.claim("old", LONG, agents="a")  # a str is a collection of letters: refused


async def test_skipped_jobs_do_not_starve_the_known_ones(stores: Factory) -> None:
    """300 jobs of an unknown agent ahead of a known one: the old instance
    gets to its own job within a few claims; the other agent's jobs all run
    later on the instance that knows it, once each, in order; fail_agent
    still fails the skipped jobs of an agent that was removed."""
    # A store timeout for a loaded CI machine: 300 submissions at once are not what is tested.
    old, new = stores(timeout=5.0), stores(timeout=5.0)
    unknown = await asyncio.gather(*(old.submit("c", "new", i) for i in range(300)))
    mine = await old.submit("c", "a", "a's")
    removed = [await old.submit("c", "gone", i) for i in range(2)]
    claims = [await old.claim("old", LONG, agents={"a"}) for _ in range(4)]
    assert [j.id for j in claims if j is not None] == [mine.id]
    assert await old.claim("old", LONG, agents={"a"}) is None
    err = {"type": "not_found", "message": "agent 'gone' no longer exists", "details": []}
    assert await new.fail_agent("gone", err) == 2
    assert [(await new.get(j.id, "c")).status for j in removed] == ["failed"] * 2  # type: ignore[union-attr]
    taken = []
    while (job := await new.claim("new", LONG, agents={"a", "new"})) is not None:
        assert job.attempts == 1
        taken.append(job.id)
    assert sorted(taken) == sorted(j.id for j in unknown) and len(taken) == 300
    created = {j.id: j.created_at for j in unknown}
    assert [created[i] for i in taken] == sorted(created.values())  # oldest first
    assert await new.claim("any", LONG) is None and await new.fail_agent("gone", err) == 0


async def test_a_retried_claim_gets_its_job_back(stores: Factory) -> None:
    """A claim whose reply was lost (it timed out, the store ran it): the
    retry with the same token returns the job it took, no attempt counted;
    another token, or no token, claims afresh."""
    st = stores()
    first = await st.submit("c", "a", 1)
    second = await st.submit("c", "a", 2)
    got = await st.claim("w", LONG, token="t1")
    assert got is not None and got.id == first.id and got.attempts == 1
    retry = await st.claim("w", LONG, token="t1")
    assert retry is not None and retry.id == first.id and retry.attempts == 1 and retry.status == "running"
    fresh = await st.claim("other", LONG, token="t1")  # tokens are per owner: a fresh claim
    assert fresh is not None and fresh.id == second.id and fresh.attempts == 1
    assert await st.finish(first.id, "w", "succeeded", {"data": 1})
    assert await st.claim("w", LONG, token="t1") is None  # its job finished: a fresh claim, and nothing is left
    third = await st.submit("c", "a", 3)
    got = await st.claim("w", LONG, token="t2")
    assert got is not None and got.id == third.id
    assert await st.claim("w", LONG, token="t3") is None


async def test_listed_jobs_have_no_body(stores: Factory) -> None:
    st = stores()
    job = await st.submit("c", "a", {"big": "x" * 10_000}, webhook=True)
    assert await st.claim("w", LONG)
    assert await st.finish(job.id, "w", "succeeded", {"data": {"y": 1}, "trace": {}})
    other = await st.submit("c", "b", [1, 2])
    page, _ = await st.list("c")
    full = [await st.get(j.id, "c") for j in (other, job)]
    assert [j.body for j in page] == [None, None]
    assert page == [dataclasses.replace(j, body=None) for j in full if j is not None]
    assert full[1] is not None and full[1].body == {"big": "x" * 10_000}  # get reads it
    filtered, _ = await st.list("c", agent="a", status="succeeded")
    assert filtered == [page[1]]


async def test_cursors_out_of_range_are_invalid(stores: Factory) -> None:
    st = stores()
    await st.submit("c", "a", 1)
    for bad in ("9" * 40, str(2**63), "٣", "²", "1" * 20, "-1", " 1", "+1"):
        with pytest.raises(InvalidCursor):
            await st.list("c", cursor=cursor_of(bad))
    with pytest.raises(InvalidCursor):
        await st.list("c", cursor="a" * 10_000)
    for good, n in ((str(2**63 - 1), 1), ("0", 0), ("00001", 0)):
        page, nxt = await st.list("c", cursor=cursor_of(good))
        assert len(page) == n and nxt is None


def cursor_of(seq: str) -> str:
    """A cursor as encode_cursor would write it, for any text after the tag."""
    return base64.urlsafe_b64encode(f"j1:{seq}".encode()).decode().rstrip("=")


async def test_purge_deletes_finished_jobs_past_retention(stores: Factory) -> None:
    st = stores()
    done = await st.submit("c", "a", 1)
    canceled = await st.submit("c", "a", 2)
    await st.claim("w", LONG)
    await st.finish(done.id, "w", "succeeded", {"data": 1})
    await st.cancel(canceled.id, "c")
    waiting = await st.submit("c", "a", 3)
    assert await st.purge(3600) == 0  # finished less than an hour ago
    await asyncio.sleep(0.02)
    assert await st.purge(0.01) == 2
    assert await st.get(done.id, "c") is None and await st.get(canceled.id, "c") is None
    assert [j.id for j in (await st.list("c"))[0]] == [waiting.id]
    assert await st.purge(0) == 0


async def test_dead_letter_after_max_attempts(stores: Factory) -> None:
    """A job whose runs are lost again and again (it kills its instance) fails
    after max_attempts instead of being run forever; the queue goes on."""
    st = stores(max_attempts=2)
    job = await st.submit("c", "a", {})
    for attempt in (1, 2):
        got = await st.claim(f"crash{attempt}", LEASE)
        assert got is not None and got.id == job.id and got.attempts == attempt
        await asyncio.sleep(WAIT)
    nxt = await st.submit("c", "a", {"next": True})
    got = await st.claim("w", LONG)
    assert got is not None and got.id == nxt.id
    dead = await st.get(job.id, "c")
    assert dead is not None and dead.status == "failed" and dead.attempts == 2
    assert dead.error is not None and dead.error["type"] == "internal_error" and "2 times" in dead.error["message"]
    if isinstance(st, RedisJobStore):
        assert await st.dead_letters() == [job.id]


async def test_ping_and_description(stores: Factory, server: RedisServer, tmp_path: Path) -> None:
    st = stores()
    await st.ping()
    if isinstance(st, RedisJobStore):
        assert st.description == server.url and st.shared
    else:
        assert st.description == f"sqlite:{tmp_path / FILENAME}" and not st.shared


# -- webhook deliveries (SPEC §9.3), both backends ---------------------------


async def drain(st: JobStore, owner: str = "d") -> list[Delivery]:
    """Every delivery due now, claimed (and left leased) by `owner`."""
    got = []
    while (d := await st.claim_delivery(owner, LONG)) is not None:
        got.append(d)
    return got


async def test_one_delivery_per_job_end(stores: Factory) -> None:
    """Every way a job with a webhook ends makes one delivery task of the
    right event, in the transaction that ends it; a job without one, none."""
    st = stores()
    ok = await st.submit("c", "a", 0, webhook=True)  # the configured webhook
    bad = await st.submit("c", "a", 1, "https://h.example/x")  # its own
    plain = await st.submit("c", "a", 2)  # none
    for job in (ok, bad, plain):
        assert (await st.claim("w", LONG)).id == job.id  # type: ignore[union-attr]
    assert await drain(st) == []  # nothing ended yet
    assert await st.finish(ok.id, "w", "succeeded", {"data": 1})
    assert await st.finish(bad.id, "w", "failed", error={"type": "upstream_error"})
    assert await st.finish(plain.id, "w", "succeeded", {"data": 2})
    running = await st.submit("c", "a", 4, webhook=True)
    assert (await st.claim("w", LONG)).id == running.id  # type: ignore[union-attr]
    queued = await st.submit("c", "a", 3, webhook=True)
    await st.cancel(queued.id, "c")
    await st.cancel(running.id, "c")
    with pytest.raises(JobFinished):  # a second cancel ends nothing
        await st.cancel(running.id, "c")
    removed = [await st.submit("c", "gone", i, webhook=True) for i in range(2)]
    assert await st.fail_agent("gone", {"type": "not_found"}) == 2
    assert await st.fail_agent("gone", {"type": "not_found"}) == 0
    got = {d.id: d for d in await drain(st)}
    assert {i: d.type for i, d in got.items()} == {
        ok.id: "job.succeeded", bad.id: "job.failed", queued.id: "job.canceled", running.id: "job.canceled",
        removed[0].id: "job.failed", removed[1].id: "job.failed"}
    d = got[bad.id]
    assert d.msg_id == "msg_" + bad.id and d.attempts == 0 and d.webhook_url == "https://h.example/x"
    assert d.job.status == "failed" and d.first_at == d.job.finished_at and d.next_at == d.first_at
    assert d.first_at <= d.claimed_at <= time.time() + 1
    event = got[ok.id].event()
    assert event["type"] == "job.succeeded"
    assert event["data"] == {k: v for k, v in got[ok.id].job.to_document().items() if k != "webhook"}
    assert event["data"]["result"] == {"data": 1} and event["timestamp"] == event["data"]["finished_at"]


async def test_a_stale_finish_and_a_dead_letter(stores: Factory) -> None:
    """A dead letter (inside claim) makes a job.failed delivery; the stale
    owner's finish then answers False and makes none."""
    st = stores(max_attempts=1)
    job = await st.submit("c", "a", {}, webhook=True)
    assert await st.claim("crashed", LEASE)
    await asyncio.sleep(WAIT)
    assert await st.claim("w", LONG) is None  # the claim that dead-letters it
    assert not await st.finish(job.id, "crashed", "succeeded", {"data": "late"})
    got = await drain(st)
    assert [(d.id, d.type) for d in got] == [(job.id, "job.failed")]
    assert got[0].job.error["type"] == "internal_error"  # type: ignore[index]


async def test_claim_delivery_is_exclusive_and_leased(stores: Factory) -> None:
    a, b = stores(), stores()
    jobs = [await a.submit("c", "a", i, webhook=True) for i in range(6)]
    for job in jobs:
        await a.cancel(job.id, "c")
    owners = [(f"o{i}{k}", st) for i in range(6) for k, st in enumerate((a, b))]
    claims = await asyncio.gather(*(st.claim_delivery(o, LONG) for o, st in owners))
    got = [d.id for d in claims if d is not None]
    assert sorted(got) == sorted(j.id for j in jobs)  # each once; six claims found none
    assert await a.claim_delivery("x", LONG) is None and await b.claim_delivery("x", LONG) is None
    for (o, st), d in zip(owners, claims, strict=True):
        if d is not None:
            assert await st.delivery_result(d.id, o, "retry", 500, delay=0)  # all due again now
    # One claimer dies: once its lease runs out another owner takes the
    # delivery, and the dead one's late result changes nothing.
    lost = await a.claim_delivery("dead", LEASE)
    assert lost is not None and lost.attempts == 1
    await drain(a)  # the other five, leased for long
    await asyncio.sleep(WAIT)
    again = await b.claim_delivery("heir", LONG)
    assert again is not None and again.id == lost.id and again.attempts == 1
    assert await b.claim_delivery("x", LONG) is None
    assert not await a.delivery_result(lost.id, "dead", "delivered", 200)
    assert await b.delivery_result(again.id, "heir", "delivered", 200)
    assert not await b.delivery_result(again.id, "heir", "delivered", 200)  # recorded once
    done = await a.get(lost.id, "c")
    assert done is not None and done.webhook == WebhookStatus("delivered", 2, 200)


async def test_retries_follow_their_schedule_then_end(stores: Factory) -> None:
    st = stores()
    job = await st.submit("c", "a", 1, webhook=True)
    assert await st.claim("w", LONG)
    assert await st.finish(job.id, "w", "succeeded", {"data": 1})
    d = await st.claim_delivery("d", LONG)
    assert d is not None and d.attempts == 0
    assert await st.delivery_result(d.id, "d", "retry", 503, delay=30)  # due in 30 s: not now
    assert await st.claim_delivery("d", LONG) is None
    assert not await st.delivery_result(d.id, "d", "delivered", 200)  # the retry released the lease
    got = await st.get(job.id, "c")
    assert got is not None and got.status == "succeeded" and got.attempts == 1  # the agent never re-ran
    assert got.to_document()["webhook"] == {"status": "pending", "attempts": 1, "last_status": 503}
    # Due again at once (delay 0 stands for "the wait is over"): claimable, attempts kept.
    other = await st.submit("c", "a", 2, webhook=True)
    await st.cancel(other.id, "c")
    second = await st.claim_delivery("d", LONG)
    assert second is not None and second.id == other.id  # the 30 s one is not due yet
    assert await st.delivery_result(other.id, "d", "retry", None, delay=0)  # a network error: no status
    third = await st.claim_delivery("d", LONG)
    assert third is not None and third.id == other.id and third.attempts == 1 and third.next_at >= second.claimed_at
    assert third.msg_id == second.msg_id  # the same webhook-id on every retry
    assert await st.delivery_result(other.id, "d", "gone", 410)
    gone = await st.get(other.id, "c")
    assert gone is not None and gone.webhook == WebhookStatus("failed", 2, 410)
    assert await st.claim_delivery("d", LONG) is None
    for bad in ({"outcome": "retry"}, {"outcome": "delivered", "delay": 1.0}, {"outcome": "nope"}):
        with pytest.raises(ValueError):
            await st.delivery_result(d.id, "d", **bad)


async def test_a_pending_delivery_survives_a_restart(stores: Factory) -> None:
    """A new store object on the same file / Redis (= the daemon restarted)
    finds the pending delivery, and a leased one once its lease ran out."""
    first = stores()
    job = await first.submit("c", "a", 1, webhook=True)
    assert await first.claim("w", LONG)
    assert await first.finish(job.id, "w", "succeeded", {"data": 1})
    held = await first.submit("c", "a", 2, webhook=True)
    await first.cancel(held.id, "c")
    assert await first.claim_delivery("killed", LEASE)  # the oldest: job's, leased by an instance that dies
    await first.close()
    await asyncio.sleep(WAIT)
    again = stores()
    got = {d.id: d for d in await drain(again, "new")}
    assert set(got) == {job.id, held.id}
    assert got[job.id].msg_id == "msg_" + job.id and got[job.id].job.result == {"data": 1}
    assert await again.delivery_result(job.id, "new", "failed", None)  # given up (retry_for)
    done = await again.get(job.id, "c")
    assert done is not None and done.webhook == WebhookStatus("failed", 1, None)


async def test_purge_takes_a_pending_delivery_with_its_job(stores: Factory) -> None:
    st = stores()
    job = await st.submit("c", "a", 1, webhook=True)
    await st.cancel(job.id, "c")
    await asyncio.sleep(0.02)
    assert await st.purge(0.01) == 1
    assert await st.claim_delivery("d", LONG) is None


# -- the delivery loop (aiwfd/jobs/delivery.py), both backends ---------------

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def finished_job(st: JobStore, **submit: Any) -> str:
    job = await st.submit("c", "a", {"q": 1}, **submit)
    assert await st.claim("w", LONG)
    assert await st.finish(job.id, "w", "succeeded", {"data": {"a": 42}, "trace": {}})
    return job.id


@contextlib.asynccontextmanager
async def delivering(st: JobStore, **kw: Any) -> AsyncIterator[asyncio.Event]:
    """run_deliveries on `st` for the block; the loop's `wake` event."""
    stop, wake = asyncio.Event(), asyncio.Event()
    async with open_session(True) as session:
        task = asyncio.create_task(run_deliveries(st, session, [SECRET], owner="loop", allow_private=True,
                                                  stop=stop, wake=wake, idle=0.05, **kw))
        try:
            yield wake
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)


async def webhook_done(st: JobStore, job_id: str) -> WebhookStatus:
    """The job's webhook status once it is no longer pending."""
    for _ in range(200):
        job = await st.get(job_id, "c")
        assert job is not None and job.webhook is not None
        if job.webhook.status != "pending":
            return job.webhook
        await asyncio.sleep(0.01)
    raise AssertionError(f"still pending: {job.webhook if job else None}")


async def test_loop_retries_with_one_webhook_id_after_a_restart(stores: Factory) -> None:
    """The job ends on one store object, which goes away (a restart); the
    loop on another delivers it: 503 three times (Retry-After: 0, honoured),
    then 200 → delivered, attempts 4, one webhook-id, every request signed;
    the agent ran once."""
    before = stores()
    job_id = await finished_job(before, webhook=True)
    await before.close()
    st = stores()
    async with WebhookReceiver([SECRET]) as rx:
        rx.script(Answer(503, retry_after="0", times=3), Answer(200))
        async with delivering(st, default_url=rx.url):
            got = await rx.wait_for(4)
            assert await webhook_done(st, job_id) == WebhookStatus("delivered", 4, 200)
        assert len(rx.deliveries) == 4 and {d.msg_id for d in got} == {"msg_" + job_id}
        assert all(d.verified for d in got) and [d.answered for d in got] == [503, 503, 503, 200]
        event = got[-1].json()
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        assert event["data"]["result"] == {"data": {"a": 42}, "trace": {}}
        assert len({d.body for d in got}) == 1  # the same event on every attempt
    job = await st.get(job_id, "c")
    assert job is not None and job.attempts == 1 and job.status == "succeeded"
    assert await st.claim_delivery("x", LONG) is None


async def test_loop_410_stops_and_retry_for_gives_up(stores: Factory) -> None:
    st = stores()
    async with WebhookReceiver([SECRET]) as rx:
        rx.script(Answer(410))
        gone = await finished_job(st, webhook_url=rx.url + "?k=1")  # the job's own URL
        async with delivering(st, default_url=None):
            await rx.wait_for(1)
            assert await webhook_done(st, gone) == WebhookStatus("failed", 1, 410)
            await asyncio.sleep(0.1)  # no second request: 410 stops, whatever retry_for says
            assert len(rx.deliveries) == 1
        async with delivering(st, default_url=None, retry_for=0) as wake:
            # retry_for ran out (0 here): the first failure is the last
            rx.script(Answer(500, retry_after="0"))
            late = await finished_job(st, webhook_url=rx.url)
            wake.set()
            await rx.wait_for(2)
            assert await webhook_done(st, late) == WebhookStatus("failed", 1, 500)
            # a job for the configured webhook when none is configured any more: failed, no request
            orphan = await finished_job(st, webhook=True)
            wake.set()
            assert await webhook_done(st, orphan) == WebhookStatus("failed", 1, None)
        assert len(rx.deliveries) == 2
    assert await st.claim_delivery("x", LONG) is None


async def test_two_loops_deliver_each_job_once(stores: Factory) -> None:
    a, b = stores(), stores()
    ids = [await finished_job(a, webhook=True) for _ in range(10)]
    async with WebhookReceiver([SECRET]) as rx:
        async with delivering(a, default_url=rx.url), delivering(b, default_url=rx.url):
            await rx.wait_for(10)
            for job_id in ids:
                assert await webhook_done(a, job_id) == WebhookStatus("delivered", 1, 200)
        assert sorted(d.msg_id or "" for d in rx.deliveries) == sorted("msg_" + i for i in ids)


async def test_a_loop_killed_mid_attempt_leaves_it_to_another(stores: Factory) -> None:
    """The instance dies during an attempt (its loop is cancelled: nothing is
    recorded); once the lease runs out another instance's loop makes it
    again, with the same webhook-id."""
    a, b = stores(), stores()
    job_id = await finished_job(a, webhook=True)
    async with WebhookReceiver([SECRET]) as rx, open_session(True) as session:
        rx.script(Hang())
        task = asyncio.create_task(run_deliveries(a, session, [SECRET], owner="dies", allow_private=True,
                                                  stop=asyncio.Event(), default_url=rx.url, timeout=LEASE - 0.05,
                                                  lease=LEASE, idle=0.05))
        await rx.wait_for(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with delivering(b, default_url=rx.url):
            got = await rx.wait_for(2)
            assert await webhook_done(b, job_id) == WebhookStatus("delivered", 1, 200)
        assert [d.msg_id for d in got] == ["msg_" + job_id] * 2 and len(rx.deliveries) == 2


# -- SQLite only ------------------------------------------------------------


async def test_sqlite_file_survives_a_kill(tmp_path: Path) -> None:
    """A process submits (the 202 would go out now) and is SIGKILLed at once:
    the job is in the file, and another process's store sees it and runs it."""
    code = ("import asyncio, sys, time; from aiwfd.jobs.sqlite import SQLiteJobStore\n"
            "async def main():\n"
            "    st = SQLiteJobStore(sys.argv[1])\n"
            "    job = await st.submit('c', 'a', {'k': 1})\n"
            "    print(job.id, flush=True)\n"
            "    time.sleep(60)\n"
            "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().decode().strip()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop_process(proc, signal.SIGKILL, 5)
    assert job_id
    st = SQLiteJobStore(tmp_path)
    try:
        job = await st.get(job_id, "c")
        assert job is not None and job.status == "queued" and job.body == {"k": 1}
        got = await st.claim("w", LONG)
        assert got is not None and got.id == job_id
    finally:
        await st.close()
    assert (tmp_path / FILENAME).exists()
    mode = sqlite3.connect(tmp_path / FILENAME).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_sqlite_processes_sharing_the_directory_share_the_jobs(tmp_path: Path) -> None:
    """Three processes (= aiwfd@ instances on one host) claim from one file at
    once: every job runs once, none twice; the file's locks are the only
    coordination."""
    st = SQLiteJobStore(tmp_path)
    try:
        ids = {(await st.submit("c", "a", i)).id for i in range(150)}
    finally:
        await st.close()
    code = ("import asyncio, sys; from aiwfd.jobs.sqlite import SQLiteJobStore\n"
            "async def main():\n"
            "    st = SQLiteJobStore(sys.argv[1])\n"
            "    sys.stdin.readline()\n"  # all three start claiming together
            "    while (job := await st.claim(sys.argv[2], 30)) is not None:\n"
            "        assert await st.finish(job.id, sys.argv[2], 'succeeded', {'data': sys.argv[2]})\n"
            "        print(job.id, flush=True)\n"
            "    await st.close()\n"
            "asyncio.run(main())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"p{i}"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in range(3)]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=30)[0].decode().split() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            stop_process(p, signal.SIGKILL, 5)
    claimed = [jid for out in outs for jid in out]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    st = SQLiteJobStore(tmp_path)
    try:
        for jid in list(ids)[:5]:
            job = await st.get(jid, "c")
            assert job is not None and job.status == "succeeded" and job.attempts == 1
    finally:
        await st.close()


async def test_sqlite_locked_past_the_timeout_is_a_store_error(tmp_path: Path) -> None:
    st = SQLiteJobStore(tmp_path, timeout=0.2)
    try:
        await st.ping()  # the file and its schema exist
        other = sqlite3.connect(tmp_path / FILENAME, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another instance holds the write lock
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked"):
                await st.submit("c", "a", {})
            assert 0.15 < time.monotonic() - started < 2
            assert (await st.list("c")) == ([], None)  # readers are not blocked (WAL)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await st.submit("c", "a", {})).status == "queued"  # and it recovers
    finally:
        await st.close()


async def test_sqlite_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    st = SQLiteJobStore(tmp_path / "file" / "state")
    try:
        with pytest.raises(StoreError):
            await st.ping()
    finally:
        await st.close()


# -- Redis only -------------------------------------------------------------


async def test_redis_down_is_a_store_error() -> None:
    st = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    try:
        started = time.monotonic()
        for call in (st.submit("c", "a", {}), st.claim("w", 1), st.get("x", "c"), st.list("c")):
            with pytest.raises(StoreError, match="redis"):
                await call
        assert time.monotonic() - started < 3
    finally:
        await st.close()


async def test_redis_hanging_is_a_store_error_then_recovers(server: RedisServer) -> None:
    st = RedisJobStore(server.url, timeout=0.3, prefix=f"t{next(_runs)}:")
    try:
        job = await st.submit("c", "a", {})
        server.pause()  # accepts, never answers
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="redis"):
                await st.claim("w", LONG)
            assert time.monotonic() - started < 1.5
        finally:
            server.resume()
        got = await st.claim("w", LONG)  # the claim that timed out did not take it away
        if got is None:  # ... unless Redis ran it after all: then it holds a lease of "w"
            got = await st.get(job.id, "c")
        assert got is not None and got.id == job.id and got.status == "running"
    finally:
        await st.close()


async def test_redis_a_lost_stream_and_group_come_back(server: RedisServer) -> None:
    """A Redis that lost its data (restarted without persistence, flushed):
    the next claim makes the stream and the group again."""
    import redis.asyncio

    st = RedisJobStore(server.url, prefix=f"t{next(_runs)}:")
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        await st.submit("c", "a", 1)
        await raw.delete(st.stream)
        assert await st.claim("w", LONG) is None  # that job's entry is gone with the stream
        job = await st.submit("c", "a", 2)
        got = await st.claim("w", LONG)
        assert got is not None and got.id == job.id
    finally:
        await raw.aclose()
        await st.close()


async def test_redis_a_filtered_page_ends_early_on_its_budget(server: RedisServer) -> None:
    st = RedisJobStore(server.url, prefix=f"t{next(_runs)}:")
    st.list_budget = 5  # and 10 x limit: 10 documents per page at most
    try:
        wanted = [await st.submit("c", "x", 0)]
        for i in range(30):
            await st.submit("c", "a", i)
        wanted.append(await st.submit("c", "x", 1))
        pages, cursor, ids = 0, None, []
        while True:
            page, cursor = await st.list("c", agent="x", limit=1, cursor=cursor)
            assert len(page) <= 1
            ids += [j.id for j in page]
            pages += 1
            if cursor is None:
                break
        assert ids == [wanted[1].id, wanted[0].id] and pages >= 3  # 32 ids, 10 per page
    finally:
        await st.close()


async def test_redis_entries_are_acked_and_deleted(server: RedisServer) -> None:
    """Finished and canceled jobs leave nothing in the stream or the pending list."""
    import redis.asyncio

    prefix = f"t{next(_runs)}:"
    st = RedisJobStore(server.url, prefix=prefix)
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        a, b, c = [await st.submit("c", "a", i) for i in range(3)]
        await st.claim("w", LONG)
        await st.finish(a.id, "w", "succeeded", {"data": 0})
        await st.cancel(b.id, "c")
        assert await raw.xlen(st.stream) == 1
        await st.claim("w", LONG)
        await st.cancel(c.id, "c")
        assert await raw.xlen(st.stream) == 0
        pending = await raw.xpending(st.stream, "aiwfd")
        assert pending["pending"] == 0
        # A consumer (owner) with nothing pending, idle long enough, is forgotten;
        # one with a run pending never is (its run would be lost).
        d = await st.submit("c", "a", 3)
        assert await st.claim("busy", LONG)
        await asyncio.sleep(0.05)
        await st.purge(3600, consumer_idle=0.01)
        assert [c["name"] for c in await raw.xinfo_consumers(st.stream, "aiwfd")] == ["busy"]
        assert await st.finish(d.id, "busy", "succeeded", {"data": 3})
    finally:
        await raw.aclose()
        await st.close()


async def test_redis_a_claim_that_timed_out_is_not_stranded(server: RedisServer) -> None:
    """Redis stalls past the client's timeout; the claim script runs once it
    goes on, after the client gave up. The retry with the same token gets
    that job, attempts 1, instead of it waiting a lease under our owner."""
    import redis.asyncio

    st = RedisJobStore(server.url, timeout=0.3, prefix=f"t{next(_runs)}:")
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        assert await st.claim("w", LONG) is None  # the script is loaded (else EVALSHA answers NOSCRIPT)
        job = await st.submit("c", "a", {})
        server.pause()
        try:
            with pytest.raises(StoreError, match="redis"):
                await st.claim("w", LONG, token="tok")
        finally:
            server.resume()
        for _ in range(100):  # the script ran after all (the request was sent)
            if await raw.hget(st._key(job.id), "status") == "running":
                break
            await asyncio.sleep(0.01)
        assert await raw.hget(st._key(job.id), "owner") == "w"
        got = await st.claim("w", LONG, token="tok")
        assert got is not None and got.id == job.id and got.attempts == 1 and got.status == "running"
        assert await st.claim("w", LONG, token="next") is None
        assert await st.finish(job.id, "w", "succeeded", {"data": 1})
    finally:
        await raw.aclose()
        await st.close()


async def test_redis_list_reads_no_bodies(server: RedisServer) -> None:
    """A listing looks at the status and the agent of each job it scans
    (HMGET), never at the whole hash: 20 jobs of 900 KB bodies do not go
    through the script."""
    import redis.asyncio

    st = RedisJobStore(server.url, prefix=f"t{next(_runs)}:")
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        big = "x" * 900_000
        ids = [(await st.submit("c", "a" if i % 2 else "b", {"t": big})).id for i in range(20)]
        await raw.config_resetstat()
        page, _ = await st.list("c", agent="a", limit=5)
        assert [j.id for j in page] == ids[::-1][:10:2] and all(j.body is None for j in page)
        stats = await raw.info("commandstats")
        assert "cmdstat_hgetall" not in stats and stats["cmdstat_hmget"]["calls"] >= 11
        assert await raw.hstrlen(st._key(ids[0]), "body") > 900_000  # the bodies are there: only not read
    finally:
        await raw.aclose()
        await st.close()


def _old_file(path: Path, missing: tuple[str, ...]) -> None:
    """A jobs file as an older aiwfd made it: today's schema without the
    `missing` columns of `jobs` (checked gone, so the test is not vacuous),
    and one queued job."""
    from aiwfd.jobs.sqlite import SCHEMA, _statements

    conn = sqlite3.connect(path / FILENAME)
    for statement in _statements(SCHEMA):
        for name in missing:
            statement = re.sub(rf",\s*{name} TEXT\b", "", statement)
        conn.execute(statement)
    assert not set(missing) & {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    conn.execute("INSERT INTO jobs (id, client, agent, state, created, body) VALUES ('j', 'c', 'a', 'queued', 1, '1')")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("missing", [("claim_token", "traceparent"), ("traceparent",)],
                         ids=["before-claim-tokens", "before-traceparents"])
async def test_sqlite_an_old_file_gets_the_new_columns(tmp_path: Path, missing: tuple[str, ...]) -> None:
    """A jobs file made before the claim_token or the traceparent column gets
    them when opened: its jobs run, and new ones keep their traceparent."""
    _old_file(tmp_path, missing)
    st = SQLiteJobStore(tmp_path)
    try:
        got = await st.claim("w", LONG, token="t")
        assert got is not None and got.id == "j" and got.body == 1 and got.traceparent is None
        again = await st.claim("w", LONG, token="t")
        assert again is not None and again.id == "j" and again.attempts == 1
        new = await st.submit("c", "a", 2, traceparent=TRACEPARENT)
        assert (await st.get(new.id, "c")) == new and new.traceparent == TRACEPARENT
    finally:
        await st.close()
