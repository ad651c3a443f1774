"""Fallback models (SPEC §11.1): two fake providers on two ports, a real
in-process server. The primary fails in each way a provider fails (down,
500s, 429s, hanging, always invalid) and the fallback answers; every model
failing is the primary's error with every failure in `details`; the one
deadline is shared; batch, stream, jobs, MCP and the OpenAI-compatible API
take the same path.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from openai import AsyncOpenAI

from aiwfd import engine
from aiwfd.errors import ConfigError, StartupError
from aiwfd.spec.config import load
from aiwfd.testing.fakeopenai import FakeOpenAI, Hang, InvalidJSON, Reply, Status
from aiwfd.testing.inprocess import InProcess, serve, write_config
from aiwfd.testing.metrics import value
from aiwfd.testing.processes import free_port

CONFIG = """\
version: 0.3
providers:
  first:
    base_url: @FIRST@
    api_key_env: FIRST_KEY
  second:
    base_url: @SECOND@
    api_key_env: SECOND_KEY
types:
  In:
    name: string
  Out:
    message: string
assistants:
  greeter:
    use: first
    model: big-model
    input_type: In
    output_type: Out
    max_attempts: 2
    timeout: 0.5
    fallbacks:
      - model: small-model          # the same provider
      - use: second
        model: other-model
  down:
    use: first
    model: big-model
    input_type: In
    output_type: Out
    max_attempts: 2
    fallbacks:
      - use: second
        model: other-model
"""


@pytest.fixture(scope="module")
async def first() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
async def second() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


def text(first: FakeOpenAI, second: FakeOpenAI) -> str:
    return CONFIG.replace("@FIRST@", first.base_url).replace("@SECOND@", second.base_url)


ENV = {"FIRST_KEY": "k1", "SECOND_KEY": "k2"}


@pytest.fixture(scope="module")
async def srv(first: FakeOpenAI, second: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[InProcess]:
    cfg = write_config(tmp_path_factory.mktemp("fb"), text(first, second))
    async with serve(cfg, env=ENV) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(first: FakeOpenAI, second: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    first.reset()
    second.reset()
    # The retries before a fallback take over wait a 10 ms backoff, not 0.25 s: the
    # backoff is not what is shown here (test_providers checks it with a fake clock).
    monkeypatch.setattr(engine, "BACKOFF_BASE", 0.01)


async def call(srv: InProcess, agent: str = "greeter", path: str = "") -> tuple[int, Any]:
    async with srv.session.post(srv.url(f"/agent/{agent}{path}"), json={"name": "Ann"}) as r:
        return r.status, await r.json()


def models(fake: FakeOpenAI) -> list[str]:
    return [r.body["model"] for r in fake.requests]


@pytest.mark.parametrize("failure, error_type", [
    (Status(500), "upstream_error"),
    (Status(429, retry_after=0), "rate_limited"),
    (InvalidJSON(), "invalid_output"),
])
async def test_the_next_model_answers_when_one_fails(srv: InProcess, first: FakeOpenAI, second: FakeOpenAI,
                                                     failure: Any, error_type: str) -> None:
    # big-model fails both its attempts; small-model (the same provider) answers.
    first.script(failure, failure, Reply(data={"message": "from small"}))
    status, body = await call(srv)
    assert status == 200, body
    assert body["data"] == {"message": "from small"}
    t = body["trace"]
    assert (t["model"], t["provider"], t["attempts"]) == ("small-model", "first", 3)
    assert [(f["model"], f["provider"], f["error"]["type"]) for f in t["fallbacks"]] == [
        ("big-model", "first", error_type)]
    assert models(first) == ["big-model", "big-model", "small-model"]
    assert second.calls == 0
    # The strict schema is the same for every model.
    assert first.requests[0].schema == first.requests[2].schema is not None


async def test_the_last_fallback_on_another_provider(srv: InProcess, first: FakeOpenAI,
                                                     second: FakeOpenAI) -> None:
    first.script(*[Status(503)] * 4)
    second.script(Reply(data={"message": "from second"}))
    status, body = await call(srv)
    assert status == 200, body
    t = body["trace"]
    assert (t["model"], t["provider"]) == ("other-model", "second")
    assert [f["model"] for f in t["fallbacks"]] == ["big-model", "small-model"]
    assert models(second) == ["other-model"]
    assert second.requests[0].headers["authorization"] == "Bearer k2"  # the fallback's own provider key
    before = await srv.scrape()
    assert value(before, "aiwfd_fallbacks_total", agent="greeter", model="big-model") >= 1
    assert value(before, "aiwfd_fallbacks_total", agent="greeter", model="small-model") >= 1


async def test_a_hanging_model_hands_over_after_one_timeout(srv: InProcess, first: FakeOpenAI,
                                                            second: FakeOpenAI) -> None:
    first.script(Hang(30), Hang(30))
    second.script(Reply(data={"message": "in time"}))
    started = time.monotonic()
    status, body = await call(srv)
    assert status == 200, body
    # One 0.5 s timeout per hanging model, not max_attempts of them each.
    assert first.calls == 2 and models(first) == ["big-model", "small-model"]
    assert [f["error"]["type"] for f in body["trace"]["fallbacks"]] == ["upstream_timeout"] * 2
    assert time.monotonic() - started < 5


async def test_a_primary_that_is_down(first: FakeOpenAI, second: FakeOpenAI, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = write_config(tmp_path, CONFIG.replace("@FIRST@", dead).replace("@SECOND@", second.base_url))
    async with serve(cfg, env=ENV) as s:
        second.script(Reply(data={"message": "up"}))
        status, body = await call(s, "down")
        assert status == 200, body
        assert body["trace"]["fallbacks"][0]["error"]["type"] == "unavailable"
        assert body["trace"]["provider"] == "second"


async def test_every_model_failing_is_the_first_ones_error_with_every_failure(
        srv: InProcess, first: FakeOpenAI, second: FakeOpenAI) -> None:
    first.script(*[Status(500)] * 4)
    second.script(InvalidJSON(), InvalidJSON())
    status, body = await call(srv)
    assert status == 502 and body["error"]["type"] == "upstream_error", body
    assert "every model failed (3)" in body["error"]["message"]
    assert [(d["provider"], d["model"], d["type"]) for d in body["error"]["details"]] == [
        ("first", "big-model", "upstream_error"), ("first", "small-model", "upstream_error"),
        ("second", "other-model", "invalid_output")]
    assert all(d["path"] == "" and d["message"] for d in body["error"]["details"])


async def test_batch_stream_and_jobs_use_the_fallbacks(srv: InProcess, first: FakeOpenAI,
                                                       second: FakeOpenAI) -> None:
    first.script(Status(500), Status(500), Reply(data={"message": "batched"}))
    async with srv.session.post(srv.url("/agent/greeter/batch"), json={"inputs": [{"name": "a"}]}) as r:
        body = await r.json()
    assert r.status == 200, body
    assert body["results"][0]["trace"]["model"] == "small-model"

    # A stream whose first model's answer reached the client and then failed
    # validation gets a `retry` event before the fallback's answer.
    first.script(InvalidJSON('{"message": 1'), InvalidJSON('{"message": 2'), Reply(data={"message": "streamed"}))
    async with srv.session.post(srv.url("/agent/greeter/stream"), json={"name": "a"}) as r:
        events = [line[7:] for line in (await r.text()).splitlines() if line.startswith("event: ")]
    assert events.count("retry") == 2 and events[-1] == "result"

    first.script(Status(500), Status(500), Reply(data={"message": "job"}))
    async with srv.session.post(srv.url("/agent/greeter/jobs"), json={"name": "a"}) as r:
        job = await r.json()
    end = time.monotonic() + 10
    while job["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < end, job
        await asyncio.sleep(0.02)
        async with srv.session.get(srv.url(f"/jobs/{job['id']}")) as r:
            job = await r.json()
    assert job["status"] == "succeeded" and job["result"]["trace"]["model"] == "small-model"


async def test_mcp_and_chat_completions_use_the_fallbacks(srv: InProcess, first: FakeOpenAI,
                                                          second: FakeOpenAI) -> None:
    # The official clients: the MCP Python SDK and the OpenAI Python SDK.
    first.script(Status(500), Status(500), Reply(data={"message": "over mcp"}))
    async with httpx2.AsyncClient(timeout=30) as hc, Client(streamable_http_client(srv.url("/mcp"),
                                                                                   http_client=hc)) as c:
        result = await c.call_tool("greeter", {"name": "Ann"})
    assert result.is_error is False and result.structured_content == {"message": "over mcp"}
    trace = (result.meta or {})["aiwfd/trace"]
    assert trace["model"] == "small-model" and [f["model"] for f in trace["fallbacks"]] == ["big-model"]

    first.reset()
    first.script(Status(500), Status(500), Status(500), Status(500))
    second.script(Reply(data={"message": "over /v1"}))
    client = AsyncOpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0)
    async with client:
        done = await client.chat.completions.create(model="greeter", messages=[{"role": "user", "content": "Ann"}])
    assert json.loads(done.choices[0].message.content or "") == {"message": "over /v1"}
    assert models(first) == ["big-model", "big-model", "small-model", "small-model"]
    assert models(second) == ["other-model"]


def test_fallbacks_are_checked_at_load(tmp_path: Path) -> None:
    base = CONFIG.replace("@FIRST@", "http://127.0.0.1:1/v1").replace("@SECOND@", "http://127.0.0.1:2/v1")
    bad = base.replace("      - model: small-model          # the same provider\n",
                       "      - model: big-model\n      - use: third\n        model: x\n      - {modle: y}\n")
    path = write_config(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        load(path)
    text_ = str(info.value)
    assert "fallbacks[0]: first/big-model is the assistant's own model" in text_
    assert "fallbacks[1].use: unknown provider 'third'" in text_
    assert "fallbacks[2].modle: unknown key (did you mean 'model'?)" in text_
    lines = [p.line for p in info.value.problems]
    assert all(line is not None for line in lines)


async def test_a_fallback_providers_missing_key_does_not_start(first: FakeOpenAI, second: FakeOpenAI,
                                                              tmp_path: Path) -> None:
    cfg = write_config(tmp_path, text(first, second))
    with pytest.raises(StartupError, match="SECOND_KEY"):
        async with serve(cfg, env={"FIRST_KEY": "k1"}):
            pass

