"""Calling an agent over HTTP (SPEC §1, §1.4, §2, §3): the greeter end to end,
what reaches the model, the re-ask loop, and 500 concurrent requests.

One in-process aiwfd (real socket, real middleware) and one FakeOpenAI serve
the whole module; the fake's script and records are reset before each test.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, AsyncIterator

import aiohttp
import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, InvalidJSON, Reply, Violate
from aiwfd.testing.fakeopenai import _completion_tokens, _dumps, _prompt_tokens
from tests.conftest import agents_env
from aiwfd.testing.inprocess import InProcess, serve

GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?(s|ms|µs|us|ns))$|^0s$")
TRACE_KEYS = {"step_name", "usage", "attempts", "duration", "model", "request_id"}


@pytest.fixture(scope="module")
async def srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake)) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


async def post(srv: InProcess, agent: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    async with srv.session.post(srv.url(f"/agent/{agent}"), json=body, **kw) as r:
        return r.status, dict(r.headers), await r.json()


def usage_of(request_body: dict[str, Any], content: str) -> tuple[int, int]:
    """The usage the fake reported for one answer (its own token formula)."""
    return _prompt_tokens(request_body), _completion_tokens(content)


# --------------------------------------------------------------------------
# 1. The greeter end to end, /health, /agents


async def test_greeter_end_to_end(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hello, Alice!"}))
    status, headers, doc = await post(srv, "greeter", {"name": "Alice"})
    assert status == 200, doc
    assert set(doc) == {"data", "trace"}
    assert doc["data"] == {"message": "Hello, Alice!"}
    trace = doc["trace"]
    assert set(trace) == TRACE_KEYS
    assert trace["step_name"] == "greeter"
    assert trace["attempts"] == 1
    assert trace["model"] == "gpt-4o-mini"
    assert GO_DURATION.match(trace["duration"]), trace["duration"]
    assert trace["request_id"] == headers["X-Request-ID"]
    prompt, completion = usage_of(fake.last.body, _dumps({"message": "Hello, Alice!"}))
    assert trace["usage"] == {"prompt": prompt, "completion": completion, "total": prompt + completion}
    assert fake.calls == 1
    assert headers["Content-Type"].startswith("application/json")


async def test_health(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/health")) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["status"] == "ok"
    assert r.headers["X-Request-ID"]


async def test_agents_listing(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/agents")) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    names = [a["name"] for a in doc["agents"]]
    assert names == sorted(names)
    assert set(names) == set(srv.server.runtime.snapshot.compiled.agents)
    for a in doc["agents"]:
        assert a["endpoint"] == f"/agent/{a['name']}"
    greeter = next(a for a in doc["agents"] if a["name"] == "greeter")
    assert greeter["model"] == "gpt-4o-mini"


# --------------------------------------------------------------------------
# 2. What reaches the model


async def test_messages_and_defaults(srv: InProcess, fake: FakeOpenAI) -> None:
    body = {"name": "Zoë \"Z\" O'Neil", "language": "fr"}
    status, _, doc = await post(srv, "greeter", body)
    assert status == 200, doc
    sent = fake.last.body
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == [
        {"role": "system", "content": "Generate a friendly greeting"},
        {"role": "user", "content": json.dumps(body, separators=(",", ":"), ensure_ascii=False)},
    ]
    assert sent["max_tokens"] == 2000
    assert sent["temperature"] == 0.7
    assert "stream" not in sent or sent["stream"] is False


async def test_max_tokens_and_temperature_overrides(srv: InProcess, fake: FakeOpenAI) -> None:
    status, _, doc = await post(srv, "tuned", {"name": "Bob"})
    assert status == 200, doc
    assert fake.last.body["max_tokens"] == 500
    assert fake.last.body["temperature"] == 0.2
    assert fake.last.body["model"] == "gpt-4o"
    assert fake.last.messages[0] == {"role": "system", "content": "Be brief"}


async def test_strict_response_format(srv: InProcess, fake: FakeOpenAI) -> None:
    await post(srv, "greeter", {"name": "Alice"})
    rf = fake.last.body["response_format"]
    assert rf == srv.server.runtime.snapshot.compiled.agents["greeter"].response_format
    assert rf["type"] == "json_schema"
    js = rf["json_schema"]
    assert js["strict"] is True
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", js["name"])
    schema = js["schema"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["message", "mood"]  # optional fields too
    assert schema["properties"]["message"] == {"type": "string"}
    mood = schema["properties"]["mood"]
    assert {"type": "null"} in mood["anyOf"]
    assert {"type": "string", "enum": ["happy", "calm"]} in mood["anyOf"]


@pytest.mark.parametrize("agent, answer, data, inner", [
    ("color", {"value": "green"}, "green", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("tags", {"value": ["a", "b"]}, ["a", "b"], {"type": "array", "items": {"type": "string"}}),
])
async def test_non_object_output_is_wrapped_and_unwrapped(srv: InProcess, fake: FakeOpenAI, agent: str,
                                                         answer: Any, data: Any, inner: Any) -> None:
    fake.script(Reply(data=answer))
    status, _, doc = await post(srv, agent, {"name": "Alice"})
    assert status == 200, doc
    assert doc["data"] == data
    schema = fake.last.schema
    assert schema is not None
    value = schema["properties"]["value"]
    if "$ref" in value:  # a named type travels in $defs
        value = schema["$defs"][value["$ref"].rsplit("/", 1)[1]]
    assert value == inner
    assert schema["required"] == ["value"] and schema["additionalProperties"] is False
    assert list(schema["properties"]) == ["value"]
    assert fake.last.body["response_format"]["json_schema"]["strict"] is True


async def test_no_output_type_means_plain_text(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(content="Bonjour Alice, {not json}"))
    status, _, doc = await post(srv, "chat", {"name": "Alice"})
    assert status == 200, doc
    assert doc["data"] == "Bonjour Alice, {not json}"
    assert "response_format" not in fake.last.body
    assert doc["trace"]["attempts"] == 1


async def test_optional_nulls_are_dropped(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "hi", "mood": None}))
    status, _, doc = await post(srv, "greeter", {"name": "Alice"})
    assert status == 200, doc
    assert doc["data"] == {"message": "hi"}
    fake.script(Reply(data={"message": "hi", "mood": "calm"}))
    status, _, doc = await post(srv, "greeter", {"name": "Alice"})
    assert doc["data"] == {"message": "hi", "mood": "calm"}


# --------------------------------------------------------------------------
# 3. Re-ask


async def test_reask_after_invalid_answer(srv: InProcess, fake: FakeOpenAI) -> None:
    bad, good = {"message": 12345}, {"message": "Hello, Alice!"}
    fake.script(Violate(data=bad), Reply(data=good))
    status, _, doc = await post(srv, "greeter", {"name": "Alice"})
    assert status == 200, doc
    assert doc["data"] == good
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2
    p1, c1 = usage_of(fake.requests[0].body, _dumps(bad))
    p2, c2 = usage_of(fake.requests[1].body, _dumps(good))
    assert doc["trace"]["usage"] == {"prompt": p1 + p2, "completion": c1 + c2, "total": p1 + p2 + c1 + c2}
    first, second = fake.requests[0].messages, fake.requests[1].messages
    assert second[: len(first)] == first  # same conversation
    assert second[len(first)] == {"role": "assistant", "content": _dumps(bad)}
    last = second[-1]
    assert last["role"] == "user" and last is not second[len(first)]
    assert "message" in last["content"]  # the failing path is quoted
    assert "expected a string" in last["content"]
    assert fake.requests[1].body["response_format"] == fake.requests[0].body["response_format"]


async def test_reask_after_invalid_json(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(InvalidJSON(), Reply(data={"message": "ok"}))
    status, _, doc = await post(srv, "greeter", {"name": "Alice"})
    assert status == 200, doc
    assert doc["data"] == {"message": "ok"}
    assert doc["trace"]["attempts"] == 2
    assert fake.calls == 2
    assert fake.requests[1].messages[-2] == {"role": "assistant", "content": InvalidJSON().content}
    assert "JSON" in fake.requests[1].messages[-1]["content"]


@pytest.mark.parametrize("agent, max_attempts", [("greeter", 3), ("twice", 2)])
async def test_never_valid_is_invalid_output(srv: InProcess, fake: FakeOpenAI, agent: str, max_attempts: int) -> None:
    fake.script(*[Violate(data={"message": 100 + i}) for i in range(max_attempts)])
    status, headers, doc = await post(srv, agent, {"name": "Alice"})
    assert status == 502, doc
    assert doc["error"]["type"] == "invalid_output"
    assert doc["error"]["details"] == [{"path": "message", "message": "expected a string, got an integer"}]
    assert doc["request_id"] == headers["X-Request-ID"]
    assert fake.calls == max_attempts
    assert fake.pending == 0
    # Every re-ask carries the whole conversation so far.
    assert len(fake.requests[-1].messages) == 2 + 2 * (max_attempts - 1)
    assert fake.requests[-1].messages[-2]["content"] == _dumps({"message": 100 + max_attempts - 2})


async def test_invalid_output_details_list_every_error(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(*[Violate(data={"message": 7, "extra": "x"})] * 3)
    status, _, doc = await post(srv, "greeter", {"name": "Alice"})
    assert status == 502
    paths = sorted(d["path"] for d in doc["error"]["details"])
    assert paths == ["extra", "message"]
    assert all(set(d) == {"path", "message"} for d in doc["error"]["details"])


# --------------------------------------------------------------------------
# 10. Concurrency


async def test_500_concurrent_requests(srv: InProcess, fake: FakeOpenAI) -> None:
    """500 requests at once all succeed, and aiwfd has them in flight at the provider together.

    The fake listens with asyncio's default backlog of 128, so 500 new
    connections to it at once overflow its accept queue and the kernel delays
    the rest by a SYN retransmit (about 1 s). The first burst therefore warms
    aiwfd's keep-alive pool to the fake; the second is the one measured.
    """
    fake.latency = 0.3
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(i: int) -> tuple[int, Any]:
                async with session.post(srv.url("/agent/greeter"), json={"name": f"user{i}"}) as r:
                    return r.status, await r.json()

            for burst in range(2):
                fake.reset()
                results = await asyncio.gather(*(one(i) for i in range(500)))
                assert [s for s, _ in results] == [200] * 500
                assert all(doc["trace"]["attempts"] == 1 for _, doc in results)
                assert len({doc["trace"]["request_id"] for _, doc in results}) == 500
                assert fake.calls == 500
    finally:
        fake.latency = 0.0
    assert fake.max_inflight >= 400, fake.max_inflight
