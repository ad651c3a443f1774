"""A job submission's retry with its Idempotency-Key is safe even when the
first try was answered 503 although its job was stored (F5): the store's
write outlived its timeout (Redis paused with SIGSTOP past the 0.5 s while
the request is in flight) and was done once Redis went on. The job's id is
derived from the key, so the retry is that job: 202 with the same id, one
model call; another body is 422 `idempotency_key_reused` as ever.

A real in-process server on a real redis-server (and SQLite in the state
directory), the fake model over real HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from aiwfd.errors import IdempotencyKeyReused
from aiwfd.http import idempotency
from aiwfd.http.jobs import _store_job
from aiwfd.jobs.sqlite import FILENAME, SQLiteJobStore
from aiwfd.jobs.store import JobStore, StoreError, keyed_job_id
from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.redisproc import RedisServer

FRONTEND = "frontend-key"
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
jobs:
  concurrency: 2
  lease: 3s
"""
_ids = itertools.count()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FAKE_KEY="sk-fake", FRONTEND_KEY=FRONTEND)


async def request(srv: InProcess, method: str, path: str, body: Any = None,
                  **headers: str) -> tuple[int, dict[str, str], Any]:
    h = {"X-API-Key": FRONTEND, **headers}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    async with srv.session.request(method, srv.url(path), data=data, headers=h) as r:
        return r.status, dict(r.headers), await r.json()


async def post(srv: InProcess, body: Any, key: str, timeout: float = 40.0) -> tuple[int, dict[str, str], Any]:
    """POST the job; a 409 (the first try still holds the key: its release
    may not have reached a paused Redis) is retried, as a client would."""
    end = time.monotonic() + timeout
    while True:
        status, h, doc = await request(srv, "POST", "/agent/greeter/jobs", body, **{"Idempotency-Key": key})
        if status != 409:
            return status, h, doc
        assert time.monotonic() < end, doc
        await asyncio.sleep(0.2)


async def until(srv: InProcess, job_id: str, *statuses: str, timeout: float = 15.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        status, _, doc = await request(srv, "GET", f"/jobs/{job_id}")
        if status == 200 and doc["status"] in statuses:
            return dict(doc)
        assert time.monotonic() < end, f"job {job_id}: {status} {doc}"
        await asyncio.sleep(0.02)


async def job_ids(srv: InProcess) -> list[str]:
    status, _, listing = await request(srv, "GET", "/jobs?limit=100")
    assert status == 200, listing
    return [j["id"] for j in listing["jobs"]]


def calls_for(fake: FakeOpenAI, name: str) -> int:
    """The model calls whose request carried `name` (the job's input)."""
    return sum(1 for r in fake.requests if name in json.dumps(r.body))


def stored_then_503(store: JobStore, on_first: Any) -> list[str | None]:
    """Wrap the store's submit: the first keyed call runs `on_first(original, args, kwargs)`;
    the ids asked for are recorded."""
    original = store.submit
    asked: list[str | None] = []

    async def submit(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("job_id"))
        if len(asked) == 1:
            return await on_first(original, args, kwargs)
        return await original(*args, **kwargs)

    store.submit = submit  # type: ignore[method-assign]
    return asked


async def check_the_retry(srv: InProcess, fake: FakeOpenAI, asked: list[str | None], key: str, name: str,
                          before: list[str]) -> None:
    """After the first try's 503: the job it stored is there; the same key with
    another body is 422 (and stores nothing); the retry is 202 with that job;
    one model call for it; another body still 422; a last retry is a replay."""
    for _ in range(200):  # the write the 503 gave up on was done
        stored = [j for j in await job_ids(srv) if j not in before]
        if stored:
            break
        await asyncio.sleep(0.02)
    assert len(stored) == 1, stored
    first_id = stored[0]
    # Another body before the retry: 422 like a mismatched key, though no answer was stored
    status, _, body = await post(srv, {"name": name + "-other"}, key)
    assert status == 422 and body["error"]["type"] == "idempotency_key_reused", body
    assert "different request body" in body["error"]["message"]
    # The retry: the job the first try stored, not a second one
    status, h, doc = await post(srv, {"name": name}, key)
    assert status == 202, doc
    assert doc["id"] == first_id and h["Location"] == f"/jobs/{first_id}"
    assert asked[0] == first_id  # the id derived from the key, named before the write
    assert "Idempotency-Replayed" not in h  # the store's job, not a stored answer (there was none)
    done = await until(srv, first_id, "succeeded")
    assert done["attempts"] == 1
    await asyncio.sleep(0.3)  # a second job, if there were one, would have been claimed by now
    assert calls_for(fake, name) == 1
    assert calls_for(fake, name + "-other") == 0
    assert sorted(await job_ids(srv)) == sorted([*before, first_id])
    # Now the answer is stored: another body is the key store's 422, the retry a replay
    status, _, body = await post(srv, {"name": name + "-other"}, key)
    assert status == 422 and body["error"]["type"] == "idempotency_key_reused"
    status, h, doc = await post(srv, {"name": name}, key)
    assert status == 202 and doc["id"] == first_id and h["Idempotency-Replayed"] == "true"
    assert calls_for(fake, name) == 1 and sorted(await job_ids(srv)) == sorted([*before, first_id])


async def test_a_redis_write_that_outlived_its_timeout_is_one_job_on_retry(fake: FakeOpenAI,
                                                                           tmp_path: Path) -> None:
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE_URL@", fake.base_url))
    with RedisServer() as own:
        async with serve(cfg, env=env(fake), redis_url=own.url, state_dir=str(tmp_path / "s")) as s:
            # A first job: the submit script is loaded (a paused Redis would
            # otherwise answer NOSCRIPT to a request it ran nothing for).
            status, _, warm = await request(s, "POST", "/agent/greeter/jobs", {"name": "warm"})
            assert status == 202, warm
            await until(s, warm["id"], "succeeded")
            assert s.server.runtime is not None and s.server.runtime.jobs is not None
            paused_for: list[float] = []

            async def paused(original: Any, args: Any, kwargs: Any) -> Any:
                own.pause()  # SIGSTOP while the write is in flight: it outlives the 0.5 s timeout
                started = time.monotonic()
                try:
                    return await original(*args, **kwargs)
                finally:
                    paused_for.append(time.monotonic() - started)
                    # SIGCONT once the store gave up, before the 503 is sent: Redis runs
                    # the write it was sent, and the key's release reaches it (paused
                    # longer, the release is lost too and the key is held for its
                    # 30 s lease: 409 until then, which `post` waits out).
                    own.resume()

            asked = stored_then_503(s.server.runtime.jobs, paused)
            key, name = f"retry-{next(_ids)}", f"Ann-{next(_ids)}"
            try:
                status, h, body = await request(s, "POST", "/agent/greeter/jobs", {"name": name},
                                                **{"Idempotency-Key": key})
            finally:
                own.resume()  # SIGCONT: Redis runs what it was sent, the job's write too
            assert status == 503 and body["error"]["type"] == "unavailable", body
            assert h["Retry-After"] == "1"
            assert paused_for and paused_for[0] >= 0.4  # the store's timeout (0.5 s) ran out
            await check_the_retry(s, fake, asked, key, name, [warm["id"]])


async def test_a_sqlite_write_answered_503_is_one_job_on_retry(fake: FakeOpenAI, tmp_path: Path) -> None:
    """The same on SQLite: the write is done, then the store raises (as a
    failure after the commit would)."""
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE_URL@", fake.base_url))
    async with serve(cfg, env=env(fake), state_dir=str(tmp_path / "s")) as s:
        assert s.server.runtime is not None and s.server.runtime.jobs is not None

        async def done_then_fail(original: Any, args: Any, kwargs: Any) -> Any:
            await original(*args, **kwargs)
            raise StoreError("sqlite: the answer was lost after the commit")

        asked = stored_then_503(s.server.runtime.jobs, done_then_fail)
        key, name = f"retry-{next(_ids)}", f"Bea-{next(_ids)}"
        status, _, body = await request(s, "POST", "/agent/greeter/jobs", {"name": name},
                                        **{"Idempotency-Key": key})
        assert status == 503 and body["error"]["type"] == "unavailable", body
        await check_the_retry(s, fake, asked, key, name, [])


async def test_without_a_key_ids_stay_random(fake: FakeOpenAI, redis_server: RedisServer, tmp_path: Path) -> None:
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE_URL@", fake.base_url))
    async with serve(cfg, env=env(fake), redis_url=redis_server.url, state_dir=str(tmp_path / "s")) as s:
        assert s.server.runtime is not None and s.server.runtime.jobs is not None
        asked = stored_then_503(s.server.runtime.jobs, lambda original, a, kw: original(*a, **kw))
        ids = []
        for _ in range(2):
            status, _, doc = await request(s, "POST", "/agent/greeter/jobs", {"name": "same"})
            assert status == 202
            ids.append(doc["id"])
        assert asked == [None, None] and ids[0] != ids[1]
        # With a key: the id is the key's, on every instance alike
        status, _, doc = await request(s, "POST", "/agent/greeter/jobs", {"name": "keyed"},
                                       **{"Idempotency-Key": "k-1"})
        assert status == 202 and asked[-1] is not None and asked[-1] == doc["id"]
        for jid in [*ids, doc["id"]]:
            await until(s, jid, "succeeded")


# -- the key used again after its 24 h, while its job is retained ---------------


async def test_a_key_used_again_after_its_24_h_is_a_new_job(tmp_path: Path) -> None:
    """A stored answer is kept 24 h, a job jobs.retention: past the 24 h the
    key is a new one (SPEC §9.4), so a job of the key older than that is not
    this request's: the next id of the key's chain, itself retry-safe."""
    store = SQLiteJobStore(tmp_path)
    scope = "scope-of-a-key"
    try:
        kw: dict[str, Any] = {"webhook": False, "traceparent": None}
        first = await _store_job(store, scope, "frontend", "greeter", {"name": "A"}, None, **kw)
        assert first.id == keyed_job_id(scope)
        assert (await _store_job(store, scope, "frontend", "greeter", {"name": "A"}, None, **kw)) == first
        with pytest.raises(IdempotencyKeyReused):
            await _store_job(store, scope, "frontend", "greeter", {"name": "B"}, None, **kw)
        with pytest.raises(idempotency.ReusedUnstored):  # the Webhook-URL is part of the request
            await _store_job(store, scope, "frontend", "greeter", {"name": "A"}, "https://h.example/", **kw)
        with sqlite3.connect(tmp_path / FILENAME) as conn:  # a day and an hour later
            conn.execute("UPDATE jobs SET created = created - ? WHERE id = ?",
                         (idempotency.RETENTION + 3600, first.id))
        later = await _store_job(store, scope, "frontend", "greeter", {"name": "B"}, None, **kw)
        assert later.id == keyed_job_id(scope, 1) != first.id and later.body == {"name": "B"}
        again = await _store_job(store, scope, "frontend", "greeter", {"name": "B"}, None, **kw)
        assert again == later
        page, _ = await store.list("frontend")
        assert [j.id for j in page] == [later.id, first.id]
    finally:
        await store.close()
