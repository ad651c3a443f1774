"""Providers and transport failures (SPEC §1.3, §2, §3.1), through both transports.

Every test runs twice: with the provider call sent over aiwfd's shared aiohttp
session (the default) and through the openai SDK (`AIWF_TRANSPORT=sdk`). The
SDK's own retries are off, so the fake's call count is exactly
`trace.attempts` (or the agent's `max_attempts` when every attempt fails).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from tests.conftest import LOCAL_API_KEY, agents_env
from aiwfd.testing.fakeopenai import Drop, FakeOpenAI, Hang, Reply, Status
from aiwfd.testing.inprocess import InProcess, serve

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


async def test_429_then_success_honours_retry_after(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(429, retry_after=0.3), Reply(data={"message": "ok"}))
    status, _, doc = await post(srv, "greeter")
    assert status == 200, doc
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2
    gap = fake.requests[1].time - fake.requests[0].time
    assert gap >= 0.3, gap
    # A transport retry repeats the request; it is not a re-ask.
    assert fake.requests[1].messages == fake.requests[0].messages


async def test_429_every_time_is_rate_limited(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(*[Status(429, retry_after=0)] * 3)
    status, headers, doc = await post(srv, "greeter")
    assert_error(status, headers, doc, 429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    assert fake.calls == 3


async def test_5xx_every_time_is_upstream_error(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(500), Status(503), Status(502))
    status, headers, doc = await post(srv, "greeter")
    assert_error(status, headers, doc, 502, "upstream_error")
    assert fake.calls == 3


async def test_5xx_then_success(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(500), Reply(data={"message": "ok"}))
    status, _, doc = await post(srv, "twice")
    assert status == 200, doc
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2


async def test_4xx_is_not_retried(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(400))
    status, headers, doc = await post(srv, "greeter")
    assert_error(status, headers, doc, 502, "upstream_error")
    assert fake.calls == 1


async def test_dropped_connection_is_retried(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Drop(), Reply(data={"message": "ok"}))
    status, _, doc = await post(srv, "greeter")
    assert status == 200, doc
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2


@pytest.mark.parametrize("agent, attempts", [("slow", 1), ("slow2", 2)])
async def test_hang_is_upstream_timeout(srv: InProcess, fake: FakeOpenAI, agent: str, attempts: int) -> None:
    fake.script(*[Hang(5)] * attempts)
    status, headers, doc = await post(srv, agent)
    assert_error(status, headers, doc, 504, "upstream_timeout")
    assert fake.calls == attempts
    assert fake.pending == 0


async def test_closed_port_is_unavailable(srv: InProcess, fake: FakeOpenAI) -> None:
    status, headers, doc = await post(srv, "unreachable")
    assert_error(status, headers, doc, 503, "unavailable")
    assert fake.calls == 0


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
async def test_malformed_completion_is_upstream_error(srv: InProcess, fake: FakeOpenAI, agent: str,
                                                      answer: Any) -> None:
    """Before the fix the SDK transport answered 500 to most of these, and
    both transports to the huge token count (orjson cannot encode it)."""
    attempts = 2 if agent == "twice" else 3
    fake.script(*[Status(200, body=answer)] * attempts)
    status, headers, doc = await post(srv, agent)
    assert_error(status, headers, doc, 502, "upstream_error")
    assert fake.calls == attempts


async def test_sane_usage_is_summed_as_integers(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(200, body=completion(usage={"prompt_tokens": 7, "completion_tokens": 5.0})))
    status, _, doc = await post(srv, "greeter")
    assert status == 200, doc
    assert doc["trace"]["usage"] == {"prompt": 7, "completion": 5, "total": 12}
    assert type(doc["trace"]["usage"]["completion"]) is int


# --------------------------------------------------------------------------
# The SDK client behind the aiohttp transport


async def test_the_sdk_client_resolves_the_same_settings_without_a_network_stack() -> None:
    """Over the shared session the SDK client gets no network stack of its own
    (no SSL context, no connection pool) but resolves every setting as the SDK's
    default client does, and refuses to send rather than bypass the session."""
    import aiohttp

    from aiwfd.spec.config import Provider
    from aiwfd.providers.llm import OpenAICompatible

    p = Provider("corp", "openai", organization="org-1", project="proj-1", timeout=7.0)
    env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    async with aiohttp.ClientSession() as session:
        ours = OpenAICompatible(p, env, session, "aiohttp")
        sdk = OpenAICompatible(p, env, session, "sdk")
        try:
            a, b = ours.client, sdk.client
            assert a.base_url == b.base_url and a.timeout == b.timeout == 7.0
            assert a.auth_headers == b.auth_headers == {"Authorization": "Bearer sk-x"}
            assert a.default_headers == b.default_headers
            assert a.default_headers["OpenAI-Organization"] == "org-1"
            assert ours._headers == sdk._headers
            with pytest.raises(RuntimeError, match="AIWF_TRANSPORT=aiohttp"):
                await ours.client.models.list()
        finally:
            await ours.close()
            await sdk.close()
