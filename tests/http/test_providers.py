"""Providers and transport failures (SPEC §1.3, §2, §3.1), through both transports.

Every test runs twice: with the provider call sent over aiwfd's shared aiohttp
session (the default) and through the openai SDK (`AIWF_TRANSPORT=sdk`). The
SDK's own retries are off, so the fake's call count is exactly
`trace.attempts` (or the agent's `max_attempts` when every attempt fails).

The HTTP tests go through an in-process aiwfd; the retry tests call the engine
(`call_agent`) with the real provider client against the same fake, on a
clock whose sleeps return at once (`SkippedSleeps`), so they check every
wait exactly instead of paying real jittered backoff.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from aiwfd.engine import BACKOFF_BASE, CallStats, Timing, call_agent
from aiwfd.errors import HTTPError, RateLimited, Unavailable, UpstreamError, UpstreamTimeout
from aiwfd.providers.openai_compatible import OpenAICompatible
from aiwfd.spec.compiler import Compiled, load_and_compile
from aiwfd.testing.fakeopenai import Drop, FakeOpenAI, Hang, Reply, Status
from aiwfd.testing.inprocess import InProcess, serve
from tests.conftest import LOCAL_API_KEY, agents_env

SECRETS = ("sk-test-openai-key", "xai-test-grok-key", LOCAL_API_KEY)


@pytest.fixture(scope="module", params=["aiohttp", "sdk"])
async def srv(request: pytest.FixtureRequest, fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake, AIWF_TRANSPORT=request.param)) as s:
        assert s.server.transport == request.param
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


async def post(srv: InProcess, agent: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    async with srv.session.post(srv.url(f"/agent/{agent}"), json=body or {"name": "Alice"}) as r:
        return r.status, dict(r.headers), await r.json()


def assert_error(status: int, headers: dict[str, str], doc: Any, want_status: int, want_type: str) -> None:
    assert status == want_status, doc
    assert set(doc) == {"error", "request_id"}
    assert set(doc["error"]) == {"type", "message", "details"}
    assert doc["error"]["type"] == want_type
    assert doc["request_id"] == headers["X-Request-ID"]
    text = repr(doc)
    for secret in SECRETS:
        assert secret not in text


# --------------------------------------------------------------------------
# The basic call


async def test_greeter(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hello, Alice!", "mood": None}))
    status, headers, doc = await post(srv, "greeter")
    assert status == 200, doc
    assert doc["data"] == {"message": "Hello, Alice!"}
    assert doc["trace"]["attempts"] == 1
    assert doc["trace"]["request_id"] == headers["X-Request-ID"]
    assert doc["trace"]["usage"]["total"] > 0
    assert fake.calls == 1
    sent = fake.last
    assert sent.body["max_tokens"] == 2000 and sent.body["temperature"] == 0.7
    assert sent.body["response_format"] == srv.server.runtime.snapshot.compiled.agents["greeter"].response_format
    assert sent.headers["authorization"] == "Bearer sk-test-openai-key"
    assert sent.headers["content-type"].startswith("application/json")


async def test_plain_text(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(content="Hi there"))
    status, _, doc = await post(srv, "chat")
    assert status == 200, doc
    assert doc["data"] == "Hi there"
    assert "response_format" not in fake.last.body


# --------------------------------------------------------------------------
# Transport failures: retried within the attempt budget


async def test_429_every_time_is_rate_limited(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(*[Status(429, retry_after=0)] * 3)
    status, headers, doc = await post(srv, "greeter")
    assert_error(status, headers, doc, 429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    assert fake.calls == 3


async def test_4xx_is_not_retried(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(400))
    status, headers, doc = await post(srv, "greeter")
    assert_error(status, headers, doc, 502, "upstream_error")
    assert fake.calls == 1


async def test_hang_is_upstream_timeout(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Hang(5))
    status, headers, doc = await post(srv, "slow")
    assert_error(status, headers, doc, 504, "upstream_timeout")
    assert fake.calls == 1
    assert fake.pending == 0


async def test_server_still_serves_after_failures(srv: InProcess, fake: FakeOpenAI) -> None:
    status, _, doc = await post(srv, "greeter")
    assert status == 200, doc


# --------------------------------------------------------------------------
# Provider selection and keys


@pytest.mark.parametrize("agent, model, authorization", [
    ("greeter", "gpt-4o-mini", "Bearer sk-test-openai-key"),
    ("grokker", "grok-3-mini", "Bearer xai-test-grok-key"),
    ("local_agent", "llama3", f"Bearer {LOCAL_API_KEY}"),
])
async def test_provider_key_is_sent(srv: InProcess, fake: FakeOpenAI, agent: str, model: str,
                                    authorization: str) -> None:
    status, _, doc = await post(srv, agent)
    assert status == 200, doc
    assert doc["trace"]["model"] == model
    assert fake.calls == 1
    assert fake.last.body["model"] == model
    assert fake.last.headers["authorization"] == authorization


async def test_provider_without_api_key_env_sends_no_authorization(srv: InProcess, fake: FakeOpenAI) -> None:
    status, _, doc = await post(srv, "keyless_agent")
    assert status == 200, doc
    assert fake.calls == 1
    assert "authorization" not in fake.last.headers
    assert not any(k in v for v in fake.last.headers.values() for k in SECRETS)


async def test_sane_usage_is_summed_as_integers(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(200, body=completion(usage={"prompt_tokens": 7, "completion_tokens": 5.0})))
    status, _, doc = await post(srv, "greeter")
    assert status == 200, doc
    assert doc["trace"]["usage"] == {"prompt": 7, "completion": 5, "total": 12}
    assert type(doc["trace"]["usage"]["completion"]) is int


# --------------------------------------------------------------------------
# Retries, through the engine with the real client and a clock whose sleeps
# return at once


@dataclass
class SkippedSleeps:
    """Real time plus every sleep asked for; a sleep returns at once and is recorded."""

    offset: float = 0.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return time.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += seconds
        await asyncio.sleep(0)

    def timing(self, jitter: float = 0.5) -> Timing:
        return Timing(clock=self.clock, sleep=self.sleep, jitter=lambda: jitter)


def backoff(attempt: int, jitter: float = 0.5) -> float:
    """The wait after failed attempt `attempt` (BACKOFF_CAP is not reached in three)."""
    return BACKOFF_BASE * 2 ** (attempt - 1) * (0.5 + 0.5 * jitter)


@dataclass
class Engine:
    compiled: Compiled
    transport: str
    session: aiohttp.ClientSession
    env: dict[str, str]
    sleeps: SkippedSleeps = field(default_factory=SkippedSleeps)
    stats: CallStats = field(default_factory=CallStats)

    async def call(self, agent_name: str, body: Any = None, deadline: float = 30.0,
                   jitter: float = 0.5) -> dict[str, Any]:
        agent = self.compiled.agents[agent_name]
        client = OpenAICompatible(agent.provider, self.env, self.session, self.transport)  # type: ignore[arg-type]
        self.sleeps, self.stats = SkippedSleeps(), CallStats()
        try:
            return await call_agent(self.compiled, agent, client, body or {"name": "Alice"}, "rid-1", deadline,
                                    self.stats, timing=self.sleeps.timing(jitter))
        finally:
            await client.close()

    async def fails(self, agent_name: str, want: type[HTTPError], **kw: Any) -> HTTPError:
        with pytest.raises(want) as caught:
            await self.call(agent_name, **kw)
        text = repr(caught.value.message) + repr(caught.value.details)
        for secret in SECRETS:
            assert secret not in text
        return caught.value


@pytest.fixture(scope="module", params=["aiohttp", "sdk"])
async def engine(request: pytest.FixtureRequest, fake: FakeOpenAI, agents_config: Path) -> AsyncIterator[Engine]:
    async with aiohttp.ClientSession() as session:
        yield Engine(load_and_compile(str(agents_config)), request.param, session, agents_env(fake))


async def test_429_then_success_honours_retry_after(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Status(429, retry_after=0.3), Reply(data={"message": "ok"}))
    doc = await engine.call("greeter")
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2
    assert engine.sleeps.slept == [0.3]  # the Retry-After, not the backoff
    # A transport retry repeats the request; it is not a re-ask.
    assert fake.requests[1].messages == fake.requests[0].messages


async def test_an_absurd_retry_after_is_ignored(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Status(429, retry_after=3600), Reply(data={"message": "ok"}))
    await engine.call("greeter")
    assert engine.sleeps.slept == [backoff(1)]


def test_retry_after_ms_wins_over_retry_after() -> None:
    from multidict import CIMultiDict

    from aiwfd.providers.errors import retry_after

    assert retry_after(CIMultiDict({"Retry-After-Ms": "1500", "Retry-After": "9"})) == 1.5
    assert retry_after(CIMultiDict({"Retry-After-Ms": "soon", "Retry-After": "9"})) == 9.0
    assert retry_after(CIMultiDict({"Retry-After": "nan"})) is None
    assert retry_after(CIMultiDict({"Retry-After": "-1"})) is None
    assert retry_after(CIMultiDict()) is None


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Status(429, retry_after=20), Reply(data={"message": "ok"}))
    error = await engine.fails("greeter", RateLimited, deadline=5.0)
    assert error.headers == {"Retry-After": "20"}
    assert fake.calls == 1 and engine.sleeps.slept == []


async def test_5xx_every_time_is_upstream_error(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Status(500), Status(503), Status(502))
    error = await engine.fails("greeter", UpstreamError)
    assert (error.status, error.type) == (502, "upstream_error")
    assert fake.calls == 3
    assert engine.sleeps.slept == [backoff(1), backoff(2)]


@pytest.mark.parametrize("jitter", [0.0, 0.999])
async def test_the_backoff_jitters_over_its_upper_half(engine: Engine, fake: FakeOpenAI, jitter: float) -> None:
    fake.script(Status(500), Status(500), Status(500))
    await engine.fails("greeter", UpstreamError, jitter=jitter)
    assert engine.sleeps.slept == [backoff(1, jitter), backoff(2, jitter)]
    assert BACKOFF_BASE / 2 <= engine.sleeps.slept[0] < BACKOFF_BASE


async def test_5xx_then_success(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Status(500), Reply(data={"message": "ok"}))
    doc = await engine.call("twice")
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2


async def test_dropped_connection_is_retried(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Drop(), Reply(data={"message": "ok"}))
    doc = await engine.call("greeter")
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2
    assert engine.sleeps.slept == [backoff(1)]


async def test_a_hang_is_retried_then_upstream_timeout(engine: Engine, fake: FakeOpenAI) -> None:
    fake.script(Hang(5), Hang(5))
    error = await engine.fails("slow2", UpstreamTimeout)
    assert (error.status, error.type) == (504, "upstream_timeout")
    assert fake.calls == 2 and engine.sleeps.slept == [backoff(1)]
    assert fake.pending == 0


async def test_closed_port_is_unavailable(engine: Engine, fake: FakeOpenAI) -> None:
    error = await engine.fails("unreachable", Unavailable)
    assert (error.status, error.type) == (503, "unavailable")
    assert fake.calls == 0
    assert engine.stats.attempts == 3 and engine.sleeps.slept == [backoff(1), backoff(2)]


# --------------------------------------------------------------------------
# A provider answering 200 with something that is not a chat completion


def completion(content: Any = '{"message":"hi"}', usage: Any = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} if usage is None else usage,
            **extra}


@pytest.mark.parametrize("agent, answer", [
    pytest.param("twice", completion(usage={"prompt_tokens": 1e300, "completion_tokens": 1}), id="huge-token-count"),
    pytest.param("twice", completion(usage={"prompt_tokens": "many", "completion_tokens": 1}), id="text-token-count"),
    pytest.param("twice", completion(usage={"prompt_tokens": -3, "completion_tokens": 1}), id="negative-token-count"),
    pytest.param("twice", completion(usage=[1, 2]), id="usage-list"),
    pytest.param("twice", completion(content={"message": "hi"}), id="object-content"),
    pytest.param("chat", completion(content=[{"type": "text", "text": "hi"}]), id="plain-text-list-content"),
    pytest.param("twice", {"choices": "nope"}, id="choices-string"),
    pytest.param("twice", {"choices": [{"message": "nope"}]}, id="message-string"),
    pytest.param("twice", [1, 2], id="array"),
])
async def test_malformed_completion_is_upstream_error(engine: Engine, fake: FakeOpenAI, agent: str,
                                                      answer: Any) -> None:
    """Before the fix the SDK transport answered 500 to most of these, and
    both transports to the huge token count (orjson cannot encode it)."""
    attempts = 2 if agent == "twice" else 3
    fake.script(*[Status(200, body=answer)] * attempts)
    error = await engine.fails(agent, UpstreamError)
    assert (error.status, error.type) == (502, "upstream_error")
    assert fake.calls == attempts
    assert engine.sleeps.slept == [backoff(i) for i in range(1, attempts)]


async def test_a_malformed_answer_is_an_error_envelope_over_http(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(*[Status(200, body={"choices": "nope"})] * 2)
    status, headers, doc = await post(srv, "twice")
    assert_error(status, headers, doc, 502, "upstream_error")
    assert fake.calls == 2


# --------------------------------------------------------------------------
# The aiohttp transport sends what the SDK would


@pytest.mark.parametrize("org_env", [False, True], ids=["config", "environment"])
async def test_the_aiohttp_transport_resolves_the_settings_the_sdk_does(
    monkeypatch: pytest.MonkeyPatch, org_env: bool,
) -> None:
    """SPEC §1.3: the same base URL, key, organization/project headers and
    User-Agent as `openai.AsyncOpenAI` resolves from the same configuration
    (without its X-Stainless telemetry), resolved without importing the SDK;
    the SDK transport's client is that same configuration."""
    import openai

    from aiwfd.spec.config import Provider

    env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1/"}
    if org_env:
        p = Provider("corp", "openai", timeout=7.0)
        env |= {"OPENAI_ORG_ID": "org-env", "OPENAI_PROJECT_ID": "proj-env"}
    else:
        p = Provider("corp", "openai", organization="org-1", project="proj-1", timeout=7.0)
    for k in ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):  # what the SDK reads by itself
        monkeypatch.delenv(k, raising=False)
        if k in env:
            monkeypatch.setenv(k, env[k])
    reference = openai.AsyncOpenAI(api_key="sk-x", base_url=env["OPENAI_BASE_URL"],
                                   organization=p.organization, project=p.project, timeout=7.0)
    want = {k: v for k, v in reference.default_headers.items()
            if isinstance(v, str) and not k.lower().startswith("x-stainless-")} | reference.auth_headers
    async with aiohttp.ClientSession() as session:
        ours = OpenAICompatible(p, env, session, "aiohttp")
        sdk = OpenAICompatible(p, env, session, "sdk")
        try:
            assert ours.sdk is None and ours._headers == want
            assert ours._headers["OpenAI-Organization"] == ("org-env" if org_env else "org-1")
            assert ours._url == str(reference.base_url).rstrip("/") + "/chat/completions"
            assert sdk.sdk is not None
            client = sdk.sdk.client
            assert client.base_url == reference.base_url and client.timeout == 7.0 and client.max_retries == 0
            assert client.default_headers == reference.default_headers
            assert client.auth_headers == reference.auth_headers
            assert ours.signature == sdk.signature[:-1] + ("aiohttp",)
        finally:
            await ours.close()
            await sdk.close()
        assert ours.closed and sdk.closed and sdk.sdk.client.is_closed()


def test_no_key_sends_no_authorization() -> None:
    from aiwfd.providers.endpoints import Endpoint
    from aiwfd.spec.config import Provider

    p = Provider("keyless", "custom", base_url="http://127.0.0.1:9/v1")
    headers = Endpoint.of(p, os.environ).headers()
    assert "Authorization" not in headers and headers["Accept"] == "application/json"
