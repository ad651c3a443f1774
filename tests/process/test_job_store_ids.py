"""Job ids given to submit (an Idempotency-Key's, aiwfd.jobs.store.keyed_job_id):
a submit under an id that exists already stores nothing and returns that job,
atomically, on both stores (SQLite in tmp_path, a real redis-server). And
the case it is for: a Redis submit whose reply outlived the timeout (the
server paused with SIGSTOP) was stored all the same, and its retry under the
same id gets that job, not a second one.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio

from aiwfd.jobs import open_job_store
from aiwfd.jobs.redis_streams import RedisJobStore
from aiwfd.jobs.store import JobStore, StoreError, keyed_job_id, new_job_id
from aiwfd.testing.redisproc import RedisServer

LONG = 30.0
_runs = itertools.count()

Factory = Callable[..., JobStore]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, server: RedisServer, tmp_path: Path) -> AsyncIterator[Factory]:
    """Store objects (= instances) sharing one fresh set of jobs."""
    opened: list[JobStore] = []
    prefix = f"ids{next(_runs)}:"

    def make(**kw: object) -> JobStore:
        url = server.url if request.param == "redis" else None
        store = open_job_store(url, tmp_path, prefix=prefix, **kw)  # type: ignore[arg-type]
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for st in opened:
            await st.close()


def test_a_keyed_id_has_the_format_of_a_random_one() -> None:
    shape = re.compile(r"[A-Za-z0-9_-]{22}")
    a, b = keyed_job_id("scope-a"), keyed_job_id("scope-b")
    assert shape.fullmatch(a) and shape.fullmatch(b) and shape.fullmatch(new_job_id())
    assert len(a) == len(new_job_id()) == 22
    assert keyed_job_id("scope-a") == a and a != b  # deterministic, per scope
    assert keyed_job_id("scope-a", 1) not in (a, keyed_job_id("scope-a", 2))  # the generations differ
    assert new_job_id() != new_job_id()


async def test_a_second_submit_under_one_id_returns_the_first_job(stores: Factory) -> None:
    st, other = stores(), stores()  # two instances
    jid = keyed_job_id(f"s{next(_runs)}")
    first = await st.submit("alice", "greeter", {"name": "Ann"}, "https://h.example/x", job_id=jid)
    assert first.id == jid and first.status == "queued" and first.body == {"name": "Ann"}
    again = await other.submit("alice", "greeter", {"name": "Ann"}, "https://h.example/x", job_id=jid)
    assert again == first
    page, _ = await st.list("alice")
    assert [j.id for j in page] == [jid]
    claimed = await st.claim("w", LONG)
    assert claimed is not None and claimed.id == jid
    assert await st.claim("w", LONG) is None  # one job, one queue entry
    # The job as it is now, and as it was stored: another body or webhook is not written over it
    # (the caller compares them: aiwfd.http.jobs).
    now = await other.submit("alice", "greeter", {"name": "Bob"}, None, job_id=jid, traceparent="x")
    assert now.id == jid and now.status == "running" and now.attempts == 1
    assert now.body == {"name": "Ann"} and now.webhook_url == "https://h.example/x" and now.traceparent is None
    assert await st.finish(jid, "w", "succeeded", {"data": 1})
    assert await st.claim("w", LONG) is None
    page, _ = await st.list("alice")
    assert [j.id for j in page] == [jid]


async def test_concurrent_submits_under_one_id_are_one_job(stores: Factory) -> None:
    instances = [stores() for _ in range(3)]
    jid = keyed_job_id(f"s{next(_runs)}")
    jobs = await asyncio.gather(*(instances[i % 3].submit("c", "a", {"n": 1}, job_id=jid) for i in range(20)))
    assert {j.id for j in jobs} == {jid} and len({j.created_at for j in jobs}) == 1
    page, _ = await instances[0].list("c")
    assert [j.id for j in page] == [jid]
    assert (await instances[1].claim("w", LONG)) is not None
    assert await instances[2].claim("w", LONG) is None


async def test_without_an_id_every_submit_is_a_new_job(stores: Factory) -> None:
    st = stores()
    a, b = await st.submit("c", "a", {"n": 1}), await st.submit("c", "a", {"n": 1})
    assert a.id != b.id
    page, _ = await st.list("c")
    assert len(page) == 2


async def test_a_redis_submit_that_timed_out_was_stored_and_its_retry_gets_it(server: RedisServer) -> None:
    """F5 at the store: the reply outlives the timeout (SIGSTOP), the script
    runs once Redis is back; the retry under the same id is that job."""
    prefix = f"ids{next(_runs)}:"
    st = RedisJobStore(server.url, timeout=0.3, prefix=prefix)
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        await st.submit("c", "a", {"warm": True})  # the script is loaded (else EVALSHA answers NOSCRIPT)
        jid = keyed_job_id(f"s{next(_runs)}")
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="redis"):
                await st.submit("c", "a", {"name": "Ann"}, job_id=jid)
            assert time.monotonic() - started < 1.5
        finally:
            server.resume()
        for _ in range(200):  # the script ran after all (the request was sent before the pause ended)
            if await raw.exists(st._key(jid)):
                break
            await asyncio.sleep(0.01)
        assert await raw.hget(st._key(jid), "status") == "queued"
        created = await raw.hget(st._key(jid), "created")
        again = await st.submit("c", "a", {"name": "Ann"}, job_id=jid)
        assert again.id == jid and again.body == {"name": "Ann"}
        assert await raw.hget(st._key(jid), "created") == created  # not written again
        page, _ = await st.list("c")
        assert len(page) == 2 and page[0].id == jid  # this one and the warm-up's
        assert await raw.xlen(st.stream) == 2  # one queue entry each
    finally:
        await raw.aclose()
        await st.close()
