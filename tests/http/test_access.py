"""Named clients and the limits of one instance (SPEC §8.1, §8.2), against the fake model.

tests/configs/access.yaml: `frontend` (key_env, 5 requests/min, 1 at once),
`reports` (key_sha256, greeter only, 30 tokens/min), API_KEY's `api-key-1`
(the default 100/min), and the agent `capped` (3/min for all clients).
Limit tests get a server of their own (the counters are the process's);
the key tests share one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import http_sf
import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, Hold, Reply
from aiwfd.testing.inprocess import InProcess, fake_env, serve
from aiwfd.testing.metrics import delta
from tests.conftest import CONFIGS

FRONTEND = "frontend-secret-key-0123"
REPORTS = "reports-secret-key"
LEGACY = "legacy-api-key-0456"
SECRETS = (FRONTEND, REPORTS, LEGACY, hashlib.sha256(REPORTS.encode()).hexdigest(),
           hashlib.sha256(FRONTEND.encode()).hexdigest(), hashlib.sha256(LEGACY.encode()).hexdigest())
BODY = {"name": "Ada"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (CONFIGS / "access.yaml").read_text(encoding="utf-8")
    text = text.replace("@REPORTS_SHA256@", hashlib.sha256(REPORTS.encode()).hexdigest())
    path = tmp_path_factory.mktemp("access") / "agents.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FRONTEND_API_KEY=FRONTEND, API_KEY=LEGACY)


@pytest.fixture(scope="module")
async def shared(config: Path, fake: FakeOpenAI) -> AsyncIterator[InProcess]:
    async with serve(config, env=env(fake)) as s:
        yield s


@pytest.fixture
async def own(config: Path, fake: FakeOpenAI) -> AsyncIterator[InProcess]:
    """A server whose counters start at zero."""
    async with serve(config, env=env(fake)) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


async def call(srv: InProcess, key: str | None, agent: str = "greeter", body: Any = BODY,
               route: str = "", bearer: bool = False) -> tuple[int, dict[str, str], Any]:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    async with srv.session.post(srv.url(f"/agent/{agent}{route}"), json=body, headers=headers) as r:
        text = await r.text()
        doc = json.loads(text) if r.content_type == "application/json" else text
        return r.status, dict(r.headers), doc


# --------------------------------------------------------------------------- keys


async def test_each_key_is_its_client(shared: InProcess) -> None:
    for key, bearer, name in ((FRONTEND, False, "frontend"), (REPORTS, True, "reports"),
                              (LEGACY, False, "api-key-1")):
        status, _, doc = await call(shared, key, bearer=bearer)
        assert status == 200, doc
        assert f" client={name} attempts=1" in shared.log_lines()[-1]


async def test_missing_and_wrong_keys_are_401_with_a_bearer_challenge(shared: InProcess) -> None:
    status, headers, doc = await call(shared, None)
    assert status == 401 and doc["error"]["type"] == "unauthorized"
    assert headers["WWW-Authenticate"] == "Bearer"
    status, headers, doc = await call(shared, "not-a-key")
    assert status == 401 and doc["error"]["message"] == "invalid API key"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token", error_description="unknown API key"'
    # A key is not a prefix match, nor case-insensitive.
    assert (await call(shared, FRONTEND[:-1]))[0] == 401
    assert (await call(shared, FRONTEND.upper()))[0] == 401


async def test_an_agent_outside_the_allowlist_is_403(shared: InProcess) -> None:
    status, headers, doc = await call(shared, REPORTS, agent="other")
    assert status == 403, doc
    assert doc["error"] == {"type": "forbidden", "message": "client 'reports' may not call agent 'other'",
                            "details": []}
    assert headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    # Unknown agents are still 404, whoever asks; the allowlist does not hide the others.
    assert (await call(shared, REPORTS, agent="nope"))[0] == 404
    assert (await call(shared, FRONTEND, agent="other"))[0] == 200


async def test_clients_label_the_calls_metric(shared: InProcess) -> None:
    before = await shared.scrape()
    await call(shared, FRONTEND)
    await call(shared, REPORTS, agent="other")
    after = await shared.scrape()
    assert delta(before, after, "aiwfd_agent_calls_total", agent="greeter", outcome="ok", client="frontend") == 1
    assert delta(before, after, "aiwfd_agent_calls_total", agent="other", outcome="forbidden",
                 client="reports") == 1


async def test_no_key_or_digest_in_any_log_line_or_answer(shared: InProcess) -> None:
    answers = []
    for key in (FRONTEND, REPORTS, LEGACY, "not-a-key"):
        for agent in ("greeter", "other", "nope"):
            answers.append(json.dumps((await call(shared, key, agent=agent))[1:]))
    seen = "\n".join(shared.log_lines()) + "\n".join(answers)
    for secret in SECRETS:
        assert secret not in seen


# --------------------------------------------------------------------------- limits


def policy(headers: dict[str, str]) -> dict[str, dict[str, int]]:
    return {name: params for name, params in http_sf.parse(headers["RateLimit-Policy"].encode(), tltype="list")}


def state(headers: dict[str, str]) -> dict[str, dict[str, int]]:
    return {name: params for name, params in http_sf.parse(headers["RateLimit"].encode(), tltype="list")}


async def test_requests_per_window_then_429_with_retry_after(own: InProcess) -> None:
    remaining = []
    for _ in range(5):
        status, headers, _ = await call(own, FRONTEND)
        assert status == 200
        assert policy(headers) == {"client": {"q": 5, "w": 60}}
        remaining.append(state(headers)["client"]["r"])
        assert 1 <= state(headers)["client"]["t"] <= 60
    assert remaining == [4, 3, 2, 1, 0]
    status, headers, doc = await call(own, FRONTEND)
    assert status == 429, doc
    assert doc["error"]["type"] == "rate_limited"
    assert doc["error"]["details"] == [{"limit": "requests", "scope": "client", "quota": 5, "window": 60}]
    # Until the first call's bucket leaves the window: up to one bucket (1 s) past it.
    assert 1 <= int(headers["Retry-After"]) <= 61
    assert state(headers)["client"]["r"] == 0
    # Another client is not affected.
    assert (await call(own, LEGACY))[0] == 200


async def test_a_refused_call_counts_nowhere(own: InProcess, fake: FakeOpenAI) -> None:
    for _ in range(3):
        assert (await call(own, LEGACY, agent="capped"))[0] == 200
    before = fake.calls
    status, headers, doc = await call(own, FRONTEND, agent="capped")
    # The agent's 3/min holds across clients; the refusal names it.
    assert status == 429 and doc["error"]["details"][0]["scope"] == "agent"
    assert policy(headers) == {"client": {"q": 5, "w": 60}, "agent": {"q": 3, "w": 60}}
    assert fake.calls == before
    # frontend's own window did not count the refused call: 5 left for other agents.
    for _ in range(5):
        assert (await call(own, FRONTEND))[0] == 200
    assert (await call(own, FRONTEND))[0] == 429


async def test_concurrency_counts_calls_in_flight(own: InProcess, fake: FakeOpenAI) -> None:
    gate = asyncio.Event()
    fake.script(Hold(gate))
    first = asyncio.ensure_future(call(own, FRONTEND))
    await fake.wait_calls(1)
    status, _, doc = await call(own, FRONTEND)
    assert status == 429
    assert doc["error"]["details"] == [{"limit": "concurrency", "scope": "client", "quota": 1, "window": None}]
    gate.set()
    assert (await first)[0] == 200
    assert (await call(own, FRONTEND))[0] == 200  # the slot came back


async def test_tokens_are_counted_after_the_answer(own: InProcess, fake: FakeOpenAI) -> None:
    totals = []
    while True:
        status, _, doc = await call(own, REPORTS, bearer=True)
        if status != 200:
            break
        totals.append(doc["trace"]["usage"]["total"])
        assert len(totals) < 10
    # Refused once the window held 30 tokens or more, not before.
    assert sum(totals) >= 30 and sum(totals[:-1]) < 30
    assert status == 429 and doc["error"]["details"][0]["limit"] == "tokens"


async def test_a_batch_counts_each_input_and_is_refused_whole(own: InProcess, fake: FakeOpenAI) -> None:
    status, headers, doc = await call(own, FRONTEND, body={"inputs": [BODY, BODY, BODY]}, route="/batch")
    assert status == 200 and state(headers)["client"]["r"] == 2
    before = fake.calls
    status, _, doc = await call(own, FRONTEND, body={"inputs": [BODY, BODY, BODY]}, route="/batch")
    assert status == 429 and fake.calls == before
    # An invalid input calls no model and costs nothing.
    status, headers, doc = await call(own, FRONTEND, body={"inputs": [BODY, {"name": 1}]}, route="/batch")
    assert status == 200 and state(headers)["client"]["r"] == 1


async def test_a_refused_stream_is_a_plain_json_429(own: InProcess, fake: FakeOpenAI) -> None:
    for _ in range(3):
        status, headers, text = await call(own, LEGACY, agent="capped", route="/stream")
        assert status == 200 and "event: result" in text
        assert state(headers)["agent"]["r"] >= 0
    status, headers, doc = await call(own, LEGACY, agent="capped", route="/stream")
    assert status == 429 and headers["Content-Type"].startswith("application/json")
    assert doc["error"]["type"] == "rate_limited" and int(headers["Retry-After"]) >= 1


async def test_clients_without_limits_of_their_own_get_the_default(own: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "hi"}))
    status, headers, _ = await call(own, LEGACY)
    assert status == 200 and policy(headers) == {"client": {"q": 100, "w": 60}}
