"""Idempotency keys (SPEC §9.4) on `POST /agent/{name}` and `/batch`, on both
stores: SQLite in the state directory, and a real redis-server.

Every test runs once per store (the `srv` fixture); the fake model is the
module's, reset per test. A call in flight is held with `Hold` and the test
waits on `fake.wait_calls`, never on a sleep.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import orjson
import pytest

from aiwfd.errors import InvalidRequest, RetryableStartupError
from aiwfd.http import idempotency
from aiwfd.store.idempotency import FILE_NAME, Answer, SqliteIdempotency, open_idempotency
from aiwfd.testing.fakeopenai import FakeOpenAI, Hold, Reply, Status
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.redisproc import RedisServer

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
  other:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 1
"""
FRONTEND, REPORTS = "frontend-key", "reports-key"
_keys = itertools.count()


def new_key() -> str:
    """A fresh Idempotency-Key per use: the Redis is shared by the module's tests."""
    return f"key-{next(_keys)}-{id(object())}"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def config(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("idem"), CONFIG.replace("@FAKE_URL@", fake.base_url))


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FAKE_KEY="sk-fake", FRONTEND_KEY=FRONTEND, REPORTS_KEY=REPORTS)


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_settings(store_kind: str, redis_server: RedisServer, tmp_path: Path) -> dict[str, Any]:
    if store_kind == "redis":
        return {"redis_url": redis_server.url, "state_dir": str(tmp_path / "unused")}
    return {"state_dir": str(tmp_path / "state")}


@pytest.fixture
async def srv(config: Path, fake: FakeOpenAI, store_settings: dict[str, Any]) -> AsyncIterator[InProcess]:
    fake.reset()
    async with serve(config, env=env(fake), **store_settings) as s:
        yield s


async def post(srv: InProcess, path: str, body: Any, key: str | None = None, api_key: str = FRONTEND,
               **headers: str) -> tuple[int, dict[str, str], Any]:
    h = {"X-API-Key": api_key, **headers}
    if key is not None:
        h["Idempotency-Key"] = key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.setdefault("Content-Type", "application/json")
    async with srv.session.post(srv.url(path), data=data, headers=h) as r:
        return r.status, dict(r.headers), await r.json()


# -- the first request runs, a repeat replays ---------------------------------


async def test_a_retry_after_success_replays_status_and_body(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    fake.script(Reply(data={"message": "Hello, Ann"}))
    status, headers, first = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 200 and first["data"] == {"message": "Hello, Ann"}
    assert "Idempotency-Replayed" not in headers
    assert fake.calls == 1
    # The same body written otherwise (key order, spaces, gzip) is the same request.
    for body, extra in ((b'{ "name" :"Ann" }', {}), (gzip.compress(b'{"name":"Ann"}'), {"Content-Encoding": "gzip"})):
        status, headers, again = await post(srv, "/agent/greeter", body, key, **extra)
        assert status == 200, again
        assert again == first  # trace and request id included: the stored answer, byte for byte
        assert headers["Idempotency-Replayed"] == "true"
        assert headers["Content-Type"].startswith("application/json")
        assert headers["X-Request-ID"] != first["trace"]["request_id"]  # the header is the new request's
    assert fake.calls == 1
    lines = [ln for ln in srv.log_lines() if "POST /agent/greeter" in ln]
    assert len(lines) == 3 and "attempts=1" in lines[0] and "attempts=" not in lines[2]


async def test_another_body_with_the_same_key_is_422(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    assert (await post(srv, "/agent/greeter", {"name": "Ann"}, key))[0] == 200
    status, _, doc = await post(srv, "/agent/greeter", {"name": "Bob"}, key)
    assert status == 422 and doc["error"]["type"] == "idempotency_key_reused", doc
    assert doc["request_id"]
    assert fake.calls == 1


async def test_twenty_concurrent_requests_make_one_model_call(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    gate = asyncio.Event()
    fake.script(Hold(gate, Reply(data={"message": "once"})))
    first = asyncio.ensure_future(post(srv, "/agent/greeter", {"name": "Ann"}, key))
    await fake.wait_calls(1)
    others = await asyncio.gather(*(post(srv, "/agent/greeter", {"name": "Ann"}, key) for _ in range(19)))
    for status, headers, doc in others:
        assert status == 409, doc
        assert doc["error"]["type"] == "conflict"
        assert headers["Retry-After"] == "1"
    gate.set()
    status, _, doc = await first
    assert status == 200 and doc["data"] == {"message": "once"}
    # Now that it finished, the same 20 get its answer.
    after = await asyncio.gather(*(post(srv, "/agent/greeter", {"name": "Ann"}, key) for _ in range(20)))
    assert all(s == 200 and h["Idempotency-Replayed"] == "true" and d == doc for s, h, d in after)
    assert fake.calls == 1


async def test_twenty_at_once_from_the_start(srv: InProcess, fake: FakeOpenAI) -> None:
    """No request is ahead: whichever claims first runs, the rest are 409 or replays."""
    key = new_key()
    fake.script(Reply(data={"message": "once"}, delay=0.2))
    answers = await asyncio.gather(*(post(srv, "/agent/greeter", {"name": "Ann"}, key) for _ in range(20)))
    statuses = sorted(a[0] for a in answers)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}, statuses
    ran = [a for a in answers if a[0] == 200 and "Idempotency-Replayed" not in a[1]]
    assert len(ran) == 1
    assert fake.calls == 1


async def test_a_5xx_is_not_stored(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    fake.script(Status(500))  # max_attempts 1: the call fails with 502
    status, _, doc = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 502 and doc["error"]["type"] == "upstream_error"
    status, headers, doc = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 200 and "Idempotency-Replayed" not in headers
    assert fake.calls == 2
    status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 200 and headers["Idempotency-Replayed"] == "true"
    assert fake.calls == 2


async def test_a_429_is_not_stored(srv: InProcess, fake: FakeOpenAI) -> None:
    """A 429 says "try again": replaying it for 24 h would refuse the call for good."""
    key = new_key()
    fake.script(Status(429, retry_after=1))  # max_attempts 1: the call is refused with 429
    status, _, doc = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 429 and doc["error"]["type"] == "rate_limited"
    status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 200 and "Idempotency-Replayed" not in headers
    assert fake.calls == 2


def test_what_is_stored() -> None:
    from aiohttp import web

    from aiwfd.errors import Conflict, InvalidInput, RateLimited, UpstreamError

    ok = web.Response(status=202, body=b'{"id":"j1"}', headers={"Location": "/jobs/j1", "X-Other": "no"},
                      content_type="application/json")
    answer = idempotency.stored(ok)
    assert answer is not None and answer.status == 202 and answer.body == b'{"id":"j1"}'
    assert dict(answer.headers) == {"Content-Type": "application/json", "Location": "/jobs/j1"}
    for status in (408, 409, 429, 500, 502, 503):
        assert idempotency.stored(web.Response(status=status, body=b"{}")) is None, status
    err = idempotency.error_answer(InvalidInput("bad webhook"), "rid-1")
    assert err is not None and err.status == 422
    assert orjson.loads(err.body) == {"error": {"type": "invalid_input", "message": "bad webhook", "details": []},
                                      "request_id": "rid-1"}
    for e in (Conflict(), RateLimited(), UpstreamError()):
        assert idempotency.error_answer(e, "rid") is None, e
    replayed = idempotency.replay(answer)
    assert replayed.status == 202 and replayed.headers["Location"] == "/jobs/j1"
    assert replayed.headers["Idempotency-Replayed"] == "true"


async def test_keys_are_per_client_and_per_route(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    body = {"name": "Ann"}
    assert (await post(srv, "/agent/greeter", body, key))[0] == 200
    status, headers, _ = await post(srv, "/agent/greeter", body, key, api_key=REPORTS)
    assert status == 200 and "Idempotency-Replayed" not in headers  # another client: its own key
    status, headers, _ = await post(srv, "/agent/other", body, key)
    assert status == 200 and "Idempotency-Replayed" not in headers  # another agent
    status, headers, doc = await post(srv, "/agent/greeter/batch", {"inputs": [body]}, key)
    assert status == 200 and "Idempotency-Replayed" not in headers, doc  # another route
    assert fake.calls == 4
    # And each of them replays its own.
    for api_key, path, b in ((FRONTEND, "/agent/greeter", body), (REPORTS, "/agent/greeter", body),
                             (FRONTEND, "/agent/other", body), (FRONTEND, "/agent/greeter/batch", {"inputs": [body]})):
        status, headers, _ = await post(srv, path, b, key, api_key=api_key)
        assert status == 200 and headers["Idempotency-Replayed"] == "true", path
    assert fake.calls == 4


async def test_batch_replays_and_conflicts(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    gate = asyncio.Event()
    fake.script(Hold(gate, Reply(data={"message": "a"})), Reply(data={"message": "b"}))
    body = {"inputs": [{"name": "A"}, {"name": "B"}]}
    first = asyncio.ensure_future(post(srv, "/agent/greeter/batch", body, key))
    await fake.wait_calls(1)
    status, headers, doc = await post(srv, "/agent/greeter/batch", body, key)
    assert status == 409 and headers["Retry-After"] == "1", doc
    gate.set()
    status, _, doc = await first
    assert status == 200 and len(doc["results"]) == 2
    status, headers, again = await post(srv, "/agent/greeter/batch", body, key)
    assert status == 200 and headers["Idempotency-Replayed"] == "true" and again == doc
    status, _, reused = await post(srv, "/agent/greeter/batch", {"inputs": [{"name": "A"}]}, key)
    assert status == 422 and reused["error"]["type"] == "idempotency_key_reused"
    assert fake.calls == 2


async def test_refusals_before_the_call_store_nothing(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    status, _, doc = await post(srv, "/agent/greeter", {"name": 5}, key)
    assert status == 422 and doc["error"]["type"] == "invalid_input"
    status, _, doc = await post(srv, "/agent/greeter", {"name": "Ann"}, key, api_key="wrong")
    assert status == 401
    # The key is still free: a good body with it runs.
    status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    assert status == 200 and "Idempotency-Replayed" not in headers
    assert fake.calls == 1


@pytest.mark.parametrize("value", ['""', "", "a b", '"unterminated', 'x"y', "é", "k" * 256, '"' + "k" * 256 + '"',
                                   '"tab\there"', '"bad \\n escape"'])
async def test_a_malformed_key_is_400(srv: InProcess, fake: FakeOpenAI, value: str) -> None:
    h = {"X-API-Key": FRONTEND, "Content-Type": "application/json"}
    async with srv.session.post(srv.url("/agent/greeter"), data=b'{"name":"Ann"}',
                                headers={**h, "Idempotency-Key": value}) as r:
        doc = await r.json()
        assert r.status == 400, (value, doc)
        assert doc["error"]["type"] == "invalid_request"
        assert len(value) < 5 or value not in doc["error"]["message"]  # never quoted back
    assert fake.calls == 0


async def test_two_keys_in_one_request_are_400(srv: InProcess, fake: FakeOpenAI) -> None:
    from multidict import CIMultiDict

    h = CIMultiDict([("X-API-Key", FRONTEND), ("Content-Type", "application/json"),
                     ("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    async with srv.session.post(srv.url("/agent/greeter"), data=b'{"name":"Ann"}', headers=h) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request"


async def test_no_key_runs_every_time(srv: InProcess, fake: FakeOpenAI) -> None:
    for _ in range(3):
        status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"})
        assert status == 200 and "Idempotency-Replayed" not in headers
    assert fake.calls == 3


async def test_a_quoted_key_is_the_bare_key(srv: InProcess, fake: FakeOpenAI) -> None:
    key = new_key()
    assert (await post(srv, "/agent/greeter", {"name": "Ann"}, key))[0] == 200
    status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"}, f'"{key}"')
    assert status == 200 and headers["Idempotency-Replayed"] == "true"
    # A quoted key may hold spaces and escaped quotes.
    spaced = '"a key with \\"quotes\\" ' + new_key() + '"'
    assert (await post(srv, "/agent/greeter", {"name": "Ann"}, spaced))[0] == 200
    status, headers, _ = await post(srv, "/agent/greeter", {"name": "Ann"}, spaced)
    assert headers.get("Idempotency-Replayed") == "true"
    assert fake.calls == 2


# -- the store itself ---------------------------------------------------------


async def test_two_instances_sharing_a_state_dir_share_the_keys(config: Path, fake: FakeOpenAI,
                                                                tmp_path: Path) -> None:
    fake.reset()
    state = str(tmp_path / "shared")
    key = new_key()
    async with serve(config, env=env(fake), state_dir=state) as a, serve(config, env=env(fake), state_dir=state) as b:
        gate = asyncio.Event()
        fake.script(Hold(gate, Reply(data={"message": "from a"})))
        first = asyncio.ensure_future(post(a, "/agent/greeter", {"name": "Ann"}, key))
        await fake.wait_calls(1)
        status, headers, _ = await post(b, "/agent/greeter", {"name": "Ann"}, key)
        assert status == 409 and headers["Retry-After"] == "1"
        gate.set()
        status, _, doc = await first
        assert status == 200
        status, headers, again = await post(b, "/agent/greeter", {"name": "Ann"}, key)
        assert status == 200 and headers["Idempotency-Replayed"] == "true" and again == doc
        status, _, reused = await post(b, "/agent/greeter", {"name": "Bob"}, key)
        assert status == 422 and reused["error"]["type"] == "idempotency_key_reused"
    assert fake.calls == 1
    db = Path(state) / FILE_NAME
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        (count,) = conn.execute("SELECT count(*) FROM idempotency").fetchone()
        assert count == 1


async def test_the_keys_file_is_made_only_when_a_key_is_used(config: Path, fake: FakeOpenAI, tmp_path: Path) -> None:
    state = tmp_path / "lazy"
    async with serve(config, env=env(fake), state_dir=str(state)) as s:
        assert (await post(s, "/agent/greeter", {"name": "Ann"}))[0] == 200
        # The directory is there from the start (the job store opens at start: a
        # 202 must be a promise); the idempotency keys' file comes with the first key.
        assert state.is_dir() and not (state / FILE_NAME).exists()
        assert (await post(s, "/agent/greeter", {"name": "Ann"}, new_key()))[0] == 200
        assert (state / FILE_NAME).exists()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_store_leases_expire_and_stale_owners_change_nothing(kind: str, redis_server: RedisServer,
                                                                  tmp_path: Path) -> None:
    store = open_idempotency(redis_server.url if kind == "redis" else None, tmp_path)
    fp, other = "a" * 64, "b" * 64
    key = new_key()
    try:
        # A lease long enough for the two claims below on a loaded CI machine (each takes ms).
        first = await store.claim(key, fp, 0.5)
        assert first.state == "acquired"
        running = await store.claim(key, fp, 0.5)
        assert running.state == "running" and 0 < running.retry_after <= 0.5
        assert (await store.claim(key, other, 0.5)).state == "mismatch"
        await asyncio.sleep(0.6)  # the lease itself is what is tested: real time passes
        second = await store.claim(key, fp, 5)
        assert second.state == "acquired" and second.token != first.token
        answer = Answer(200, (("Location", "/jobs/1"),), b'{"x":1}')
        assert not await store.complete(key, first.token, Answer(201, (), b"stale"), 60)
        await store.release(key, first.token)  # the stale owner's release leaves the key alone
        assert (await store.claim(key, fp, 5)).state == "running"
        assert await store.complete(key, second.token, answer, 60)
        done = await store.claim(key, fp, 5)
        assert done.state == "done" and done.answer == answer
        # Released: the next claim takes it.
        key2 = new_key()
        c = await store.claim(key2, fp, 5)
        await store.release(key2, c.token)
        assert (await store.claim(key2, fp, 5)).state == "acquired"
    finally:
        await store.close()


async def test_an_unreachable_store_is_503(config: Path, fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.reset()
    state = tmp_path / "state"
    (state / FILE_NAME).mkdir(parents=True)  # the keys' database cannot be opened; the jobs' can
    async with serve(config, env=env(fake), state_dir=str(state)) as s:
        status, headers, doc = await post(s, "/agent/greeter", {"name": "Ann"}, new_key())
        assert status == 503 and headers["Retry-After"] == "1", doc
        assert doc["error"]["type"] == "unavailable"
        assert (await post(s, "/agent/greeter", {"name": "Ann"}))[0] == 200  # without a key: served
    assert fake.calls == 1


async def test_a_state_dir_that_cannot_be_made_does_not_start(config: Path, fake: FakeOpenAI,
                                                               tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RetryableStartupError, match=r"cannot open the job store in .*file/state.*--state-dir"):
        async with serve(config, env=env(fake), state_dir=str(blocker / "state")):
            pass


def test_parse_and_fingerprint() -> None:
    class R:
        def __init__(self, *values: str) -> None:
            from multidict import CIMultiDict

            self.headers = CIMultiDict([("Idempotency-Key", v) for v in values])

    assert idempotency.parse_key(R()) is None  # type: ignore[arg-type]
    assert idempotency.parse_key(R("8e03978e-40d5-43e8-bc93-6894a57f9324")) == "8e03978e-40d5-43e8-bc93-6894a57f9324"  # type: ignore[arg-type]
    assert idempotency.parse_key(R('"a \\"b\\" \\\\ c"')) == 'a "b" \\ c'  # type: ignore[arg-type]
    assert idempotency.parse_key(R("k" * 255)) == "k" * 255  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        idempotency.parse_key(R("a", "b"))  # type: ignore[arg-type]
    assert idempotency.fingerprint({"a": 1, "b": [1, 2]}) == idempotency.fingerprint(orjson.loads(b'{"b":[1,2],"a":1}'))
    assert idempotency.fingerprint({"a": 1}) != idempotency.fingerprint({"a": 1.5})
    assert idempotency.fingerprint({"n": 10 ** 30}) != idempotency.fingerprint({"n": 10 ** 30 + 1})


def test_sqlite_store_class_is_the_default(tmp_path: Path) -> None:
    assert isinstance(open_idempotency(None, tmp_path), SqliteIdempotency)


async def test_openapi_documents_the_header_and_real_answers_conform(srv: InProcess, fake: FakeOpenAI) -> None:
    from openapi_spec_validator import validate

    from tests.http.test_openapi import response_schema, validator_for

    async with srv.session.get(srv.url("/openapi.json")) as r:
        doc = await r.json()
    validate(doc)
    param = {"$ref": "#/components/parameters/Idempotency-Key"}
    assert doc["components"]["parameters"]["Idempotency-Key"]["in"] == "header"
    for path in ("/agent/greeter", "/agent/greeter/batch"):
        op = doc["paths"][path]["post"]
        assert param in op["parameters"], path
        assert "Idempotency-Replayed" in op["responses"]["200"]["headers"], path
        assert {"409", "422"} <= set(op["responses"]), path
    assert param not in doc["paths"]["/agent/greeter/stream"]["post"]["parameters"]
    conflict = doc["components"]["responses"]["Conflict"]
    assert "Retry-After" in conflict["headers"]
    # A real 409 and a real 422 validate against what the document says of them.
    op = doc["paths"]["/agent/greeter"]["post"]
    key = new_key()
    gate = asyncio.Event()
    fake.script(Hold(gate))
    first = asyncio.ensure_future(post(srv, "/agent/greeter", {"name": "Ann"}, key))
    await fake.wait_calls(1)
    status, _, busy = await post(srv, "/agent/greeter", {"name": "Ann"}, key)
    reused_status, _, reused = await post(srv, "/agent/greeter", {"name": "Bob"}, key)
    gate.set()
    ok_status, _, ok = await first
    assert (status, reused_status, ok_status) == (409, 422, 200)
    validator_for(doc, response_schema(doc, op, 409)).validate(busy)
    validator_for(doc, response_schema(doc, op, 422)).validate(reused)
    validator_for(doc, response_schema(doc, op, 200)).validate(ok)
