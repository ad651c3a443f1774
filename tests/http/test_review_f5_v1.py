"""Review of F5 (keyed job ids) and the /v1/ additions: defects found, each proved here.

1. GET /v1/models/{model}: the did-you-mean hint of an unknown name listed the
   agents a restricted client may not call (the listing hides them).
2. GET /v1/models/{model}: `created` was a new time on every call until
   GET /v1/models had been asked once, then another: retrieve and list disagreed.
3. An Idempotency-Key used again after its 24 h (the first job purged: the
   default jobs.retention is 24 h) named the very id of the first job: two
   jobs under one id, one webhook-id (`msg_<id>`) that receivers deduplicate.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest

from aiwfd.http import idempotency, jobs, openai_api
from aiwfd.jobs.sqlite import SQLiteJobStore
from aiwfd.jobs.store import msg_id
from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config

FRONTEND, REPORTS = "frontend-key", "reports-key"
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
      agents: [texter]
types:
  In:
    name: string
assistants:
  texter:
    use: fake
    model: gpt-4o-mini
    input_type: In
  secret-admin:
    use: fake
    model: gpt-4o-mini
    input_type: In
"""


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
async def srv(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcess]:
    path = write_config(tmp_path_factory.mktemp("review"), CONFIG.replace("@FAKE_URL@", fake.base_url))
    async with serve(path, env=fake_env(fake, FAKE_KEY="sk-fake", FRONTEND_KEY=FRONTEND,
                                         REPORTS_KEY=REPORTS)) as s:
        yield s


async def get(srv: InProcess, path: str, key: str) -> tuple[int, Any]:
    async with srv.session.get(srv.url(path), headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def test_retrieve_hint_names_no_agent_the_client_may_not_call(srv: InProcess) -> None:
    status, listing = await get(srv, "/v1/models", REPORTS)
    assert status == 200 and [m["id"] for m in listing["data"]] == ["texter"]
    for name in ("secret-admln", "secret_admin", "Secret-admin"):
        status, doc = await get(srv, f"/v1/models/{name}", REPORTS)
        assert status == 404, doc
        assert "secret-admin" not in doc["error"]["message"], doc  # no hint naming a hidden agent
        assert doc["error"]["code"] == "not_found"
    # Known-but-forbidden and unknown answer alike.
    _, forbidden = await get(srv, "/v1/models/secret-admin", REPORTS)
    _, unknown = await get(srv, "/v1/models/nosuch-agent", REPORTS)
    assert forbidden["error"]["message"].replace("secret-admin", "X") == \
        unknown["error"]["message"].replace("nosuch-agent", "X")
    # A client that may call everything still gets its hint.
    status, doc = await get(srv, "/v1/models/secret-admln", FRONTEND)
    assert status == 404 and "secret-admin" in doc["error"]["message"], doc


async def test_retrieve_created_is_the_listing_s(srv: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    openai_api._listings.clear()  # as on a fresh snapshot: nothing listed yet
    status, one = await get(srv, "/v1/models/texter", FRONTEND)
    assert status == 200
    # Later by a minute, as the module sees the clock: a fresh time would differ.
    monkeypatch.setattr(openai_api, "time", SimpleNamespace(time=lambda: time.time() + 60))
    status, again = await get(srv, "/v1/models/texter", FRONTEND)
    status, listing = await get(srv, "/v1/models", FRONTEND)
    created = {m["id"]: m["created"] for m in listing["data"]}
    assert one["created"] == again["created"] == created["texter"], (one, again, listing)


async def test_key_used_again_after_its_job_was_purged_names_a_new_id(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path)
    try:
        base = "a-scope"
        kw: dict[str, Any] = {"webhook": True, "traceparent": None}
        t0 = time.time()
        first = await jobs.submit_keyed(store, base, "frontend", "texter", {"name": "A"}, None, now=t0, **kw)
        # A retry within its 24 h: the same job.
        again = await jobs.submit_keyed(store, base, "frontend", "texter", {"name": "A"}, None,
                                        now=t0 + 3600, **kw)
        assert again.id == first.id
        # The job ends and is purged (jobs.retention 24 h, the default); the key store forgot the key.
        claimed = await store.claim("owner", 30.0)
        assert claimed is not None and claimed.id == first.id
        assert await store.finish(first.id, "owner", "succeeded", {"data": {}, "trace": {}})
        await store.purge(-1.0)
        assert await store.get(first.id, "frontend") is None
        later = await jobs.submit_keyed(store, base, "frontend", "texter", {"name": "B"}, None,
                                        now=t0 + idempotency.RETENTION + 3600, **kw)
        assert later.body == {"name": "B"}
        assert later.id != first.id and msg_id(later.id) != msg_id(first.id)
    finally:
        await store.close()


async def test_a_retry_across_the_window_boundary_is_the_same_job(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path)
    try:
        kw: dict[str, Any] = {"webhook": False, "traceparent": None}
        w = idempotency.RETENTION
        edge = (int(time.time() // w) + 0) * w - 1.0  # one second before the current window began
        first = await jobs.submit_keyed(store, "s2", "frontend", "texter", {"name": "A"}, None, now=edge, **kw)
        # Its store row says when it was made (now, not `edge`): only ids follow `now`.
        retry = await jobs.submit_keyed(store, "s2", "frontend", "texter", {"name": "A"}, None,
                                        now=edge + 2.0, **kw)
        assert retry.id == first.id
        with pytest.raises(idempotency.ReusedUnstored):
            await jobs.submit_keyed(store, "s2", "frontend", "texter", {"name": "B"}, None, now=edge + 2.0, **kw)
    finally:
        await store.close()
