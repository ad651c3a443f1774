"""The OpenAI-compatible API of SPEC §10.2 with the official clients (issue 17).

`/v1/models` and `/v1/chat/completions` of a real in-process server, driven
by the `openai` Python SDK and by the `openai` npm package under node
(tests/node/openai_client.mjs; skipped when tests/node/node_modules is not
installed), the fake model over real HTTP. What the SDKs see is compared with
what `POST /agent/{name}` answers for the same fake answer; errors must come
out as the SDKs' own exceptions. The snippets of docs/api.md's
"OpenAI-compatible API" section run here too, against config.example.yaml
served with --mock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import openai
import pytest
from openai import AsyncOpenAI

from aiwfd.testing.fakeopenai import DEFAULT_TEXT, FakeOpenAI, Hold, InvalidJSON, Reply, Status, Violate
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.metrics import delta
from tests.conftest import REPO

FRONTEND, REPORTS = "frontend-key", "reports-key"
NODE_DIR = REPO / "tests" / "node"
NODE = shutil.which("node")
NODE_READY = NODE is not None and (NODE_DIR / "node_modules" / "openai").is_dir()
API_MD = REPO / "docs" / "api.md"

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
    lang?: string
  Two:
    name: string
    age: int
  Out:
    message: string
assistants:
  greeter:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 3
  two:
    use: fake
    model: gpt-4o-mini
    input_type: Two
    output_type: Out
  texter:
    use: fake
    model: gpt-4o-mini
    input_type: In
  counter:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: int
  once:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    limits: {requests: 1/min}
"""
AGENTS = ["counter", "greeter", "once", "texter", "two"]


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FAKE_KEY="sk-fake", FRONTEND_KEY=FRONTEND, REPORTS_KEY=REPORTS)


@pytest.fixture(scope="module")
async def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcess]:
    path = write_config(tmp_path_factory.mktemp("openai"), CONFIG.replace("@FAKE_URL@", fake.base_url))
    async with serve(path, env=env(fake)) as s:
        yield s


@pytest.fixture
async def srv(server: InProcess, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> AsyncIterator[InProcess]:
    fake.reset()
    fake.latency = 0.0
    yield server
    assert not [r for r in caplog.records if r.name == "aiwfd" and r.levelno >= logging.ERROR]  # no bug met


def sdk(srv: InProcess, key: str = FRONTEND) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=srv.url("/v1"), api_key=key, max_retries=0)


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


async def native(srv: InProcess, agent: str, body: dict[str, Any]) -> dict[str, Any]:
    """What POST /agent/{name} answers (the reference the chat answers are compared with)."""
    async with srv.session.post(srv.url(f"/agent/{agent}"), json=body, headers={"X-API-Key": FRONTEND}) as r:
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


def usage_of(trace: dict[str, Any]) -> dict[str, int]:
    u = trace["usage"]
    return {"prompt_tokens": u["prompt"], "completion_tokens": u["completion"], "total_tokens": u["total"]}


# --------------------------------------------------------------------------- /v1/models


async def test_models_lists_the_agents(srv: InProcess) -> None:
    before = int(time.time())
    async with sdk(srv) as client:
        page = await client.models.list()
        again = await client.models.list()
    assert [m.id for m in page.data] == AGENTS
    for m in page.data:
        assert m.object == "model" and m.owned_by == "aiwfd"
        assert isinstance(m.created, int) and before - 3600 < m.created <= time.time()
    assert [m.created for m in again.data] == [m.created for m in page.data]  # the snapshot's, not the request's
    async with srv.session.get(srv.url("/v1/models"), headers={"Authorization": f"Bearer {FRONTEND}"}) as r:
        doc = await r.json()
        assert r.headers["X-Request-ID"]
    assert set(doc) == {"object", "data"} and doc["object"] == "list"
    assert set(doc["data"][0]) == {"id", "object", "created", "owned_by"}


async def test_models_lists_only_what_the_client_may_call(srv: InProcess) -> None:
    async with sdk(srv, REPORTS) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["texter"]
        with pytest.raises(openai.PermissionDeniedError) as e:
            await client.chat.completions.create(model="greeter", messages=user("Ann"))
    assert e.value.status_code == 403 and e.value.code == "forbidden"


async def test_models_retrieve_is_one_entry_of_the_list(srv: InProcess) -> None:
    async with sdk(srv) as client:
        listed = {m.id: m for m in (await client.models.list()).data}
        one = await client.models.retrieve("greeter")
        assert one.model_dump() == listed["greeter"].model_dump()
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("greter")
    assert e.value.code == "not_found" and "did you mean 'greeter'" in str(e.value.message)
    async with sdk(srv, REPORTS) as client:
        assert (await client.models.retrieve("texter")).id == "texter"
        with pytest.raises(openai.NotFoundError):  # not in its list: not there for it
            await client.models.retrieve("greeter")


async def test_an_unknown_v1_path_answers_in_openais_shape(srv: InProcess) -> None:
    async with sdk(srv) as client:
        with pytest.raises(openai.NotFoundError) as e:
            await client.get("/embeddings", cast_to=object)
    assert e.value.code == "not_found" and e.value.type == "invalid_request_error"
    async with srv.session.get(srv.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {FRONTEND}"}) as r:
        doc = await r.json()
        assert r.status == 405 and r.headers["Allow"] == "POST"
    assert doc["error"]["code"] == "method_not_allowed" and set(doc["error"]) == {"message", "type", "param", "code"}
    async with srv.session.get(srv.url("/agentz")) as r:  # elsewhere: the §3.1 shape
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found"


async def test_models_needs_the_key(srv: InProcess) -> None:
    async with sdk(srv, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError) as e:
            await client.models.list()
    assert e.value.status_code == 401 and e.value.code == "unauthorized"
    assert e.value.response.headers["WWW-Authenticate"].startswith("Bearer")


# --------------------------------------------------------------------------- chat completions


async def test_create_answers_the_validated_output(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hello, Alice!"}), Reply(data={"message": "Hello, Alice!"}))
    ref = await native(srv, "greeter", {"name": "Alice"})
    sent_natively = fake.last.body
    async with sdk(srv) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="greeter", temperature=1.7, max_tokens=3, tools=[],
            messages=[{"role": "system", "content": "You are a pirate."},
                      {"role": "user", "content": "an earlier turn"},
                      {"role": "assistant", "content": "ignored"},
                      {"role": "user", "content": json.dumps({"name": "Alice"})}])
    done = raw.parse()
    rid = raw.headers["X-Request-ID"]
    assert done.id == f"chatcmpl-{rid}"
    assert done.object == "chat.completion" and done.model == "greeter"
    assert abs(done.created - time.time()) < 60
    [choice] = done.choices
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.message.content == '{"message":"Hello, Alice!"}'
    assert json.loads(choice.message.content) == ref["data"]
    assert done.usage is not None and done.usage.model_dump(exclude_none=True) == usage_of(ref["trace"])
    # The agent's settings stand: the model got what POST /agent/greeter sends, nothing of the chat request.
    assert fake.last.body == sent_natively


async def test_plain_text_for_one_string_field(srv: InProcess, fake: FakeOpenAI) -> None:
    async with sdk(srv) as client:
        fake.script(Reply(data={"message": "Hi Bob"}))
        done = await client.chat.completions.create(model="greeter", messages=user("Bob"))
        assert done.choices[0].message.content == '{"message":"Hi Bob"}'
        assert fake.last.messages[-1]["content"] == '{"name":"Bob"}'
        # Text parts are joined; a JSON object is still taken as JSON.
        await client.chat.completions.create(model="greeter", messages=user(
            [{"type": "text", "text": "Bo"}, {"type": "text", "text": "b Smith"}]))
        assert fake.last.messages[-1]["content"] == '{"name":"Bob Smith"}'
        await client.chat.completions.create(model="greeter", messages=user('{"name": "Al", "lang": "fr"}'))
        assert fake.last.messages[-1]["content"] == '{"name":"Al","lang":"fr"}'
        # Two required fields: plain text is not an input.
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="two", messages=user("Bob"))
    assert e.value.code == "invalid_json" and "JSON object of Two" in e.value.message


async def test_outputs_that_are_not_objects(srv: InProcess, fake: FakeOpenAI) -> None:
    async with sdk(srv) as client:
        done = await client.chat.completions.create(model="texter", messages=user("Tex"))
        assert done.choices[0].message.content == DEFAULT_TEXT  # the text itself, not JSON
        fake.script(Reply(data={"value": 42}))
        done = await client.chat.completions.create(model="counter", messages=user("Cnt"))
        assert done.choices[0].message.content == "42"


async def test_stream_chunks_are_the_validated_answer(srv: InProcess, fake: FakeOpenAI) -> None:
    long = "Hello, " + "Carol " * 20
    fake.script(Reply(data={"message": long}), Reply(data={"message": long}))
    ref = await native(srv, "greeter", {"name": "Carol"})
    async with sdk(srv) as client:
        stream = await client.chat.completions.create(
            model="greeter", messages=user(json.dumps({"name": "Carol"})), stream=True,
            stream_options={"include_usage": True})
        got = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "greeter" for c in got)
    assert len({c.id for c in got}) == 1 and got[0].id.startswith("chatcmpl-")
    *content_chunks, last = got
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(exclude_none=True) == usage_of(ref["trace"])
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert len(content_chunks) > 3  # in pieces
    assert json.loads(text) == ref["data"] and text == json.dumps(ref["data"], separators=(",", ":"))


async def test_stream_without_usage_and_raw_events(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hi"}))
    body = {"model": "greeter", "messages": user("Dee"), "stream": True}
    async with srv.session.post(srv.url("/v1/chat/completions"), json=body,
                                headers={"Authorization": f"Bearer {FRONTEND}"}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and raw.endswith("data: [DONE]\n\n")
    docs = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all("usage" not in d and len(d["choices"]) == 1 for d in docs)
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in docs) == '{"message":"Hi"}'


async def test_a_reask_shows_only_in_usage(srv: InProcess, fake: FakeOpenAI) -> None:
    good = Reply(data={"message": "Hello, Re"})
    fake.script(Violate(), good)
    ref = await native(srv, "greeter", {"name": "Re"})
    assert ref["trace"]["attempts"] == 2
    fake.script(good)
    single = await native(srv, "greeter", {"name": "Re"})
    async with sdk(srv) as client:
        fake.script(Violate(), good)
        done = await client.chat.completions.create(model="greeter", messages=user("Re"))
        assert done.choices[0].message.content == '{"message":"Hello, Re"}'
        assert done.usage is not None and done.usage.model_dump(exclude_none=True) == usage_of(ref["trace"])
        assert done.usage.total_tokens > single["trace"]["usage"]["total"]
        # Streaming: the invalid answer never reaches the client.
        fake.script(InvalidJSON(), good)
        stream = await client.chat.completions.create(model="greeter", messages=user("Re"), stream=True,
                                                      stream_options={"include_usage": True})
        got = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == '{"message":"Hello, Re"}'
    assert got[-1].usage is not None and got[-1].usage.total_tokens > single["trace"]["usage"]["total"]
    assert fake.pending == 0


async def test_invalid_input_is_422_naming_the_field(srv: InProcess, fake: FakeOpenAI) -> None:
    async with sdk(srv) as client:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await client.chat.completions.create(model="two", messages=user(json.dumps({"name": "Dan"})))
        err = e.value
        assert err.status_code == 422 and err.code == "invalid_input" and err.param == "age"
        assert "age" in err.message and "required" in err.message
        assert err.body == {"message": err.body["message"], "type": "invalid_request_error",  # type: ignore[index]
                            "param": "age", "code": "invalid_input"}
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await client.chat.completions.create(model="two", messages=user(json.dumps({"name": 1, "age": 2})),
                                                 stream=True)
        assert e.value.param == "name"
        # A chat request the API cannot read: 422 naming its part.
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await client.chat.completions.create(model="greeter", messages=[{"role": "system", "content": "x"}])
        assert e.value.param == "messages"
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await client.chat.completions.create(model="greeter", messages=user(
                [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]))
        assert e.value.param == "messages[0].content[0]"
    assert fake.calls == 0


async def test_unknown_model_is_not_found(srv: InProcess) -> None:
    async with sdk(srv) as client:
        with pytest.raises(openai.NotFoundError) as e:
            await client.chat.completions.create(model="greeterr", messages=user("x"))
    assert e.value.code == "not_found" and "greeterr" in e.value.message and "greeter" in e.value.message


async def test_wrong_key_is_an_authentication_error(srv: InProcess, fake: FakeOpenAI) -> None:
    async with sdk(srv, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError) as e:
            await client.chat.completions.create(model="greeter", messages=user("x"))
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="greeter", messages=user("x"), stream=True)
    assert e.value.code == "unauthorized" and e.value.type == "invalid_request_error"
    assert fake.calls == 0


async def test_limits_are_a_rate_limit_error(srv: InProcess) -> None:
    async with sdk(srv) as client:
        await client.chat.completions.create(model="once", messages=user("1"))
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model="once", messages=user("2"))
    err = e.value
    assert err.code == "rate_limited" and "requests" in err.message
    assert int(err.response.headers["Retry-After"]) >= 1 and "RateLimit-Policy" in err.response.headers


async def test_provider_failure_is_a_server_error(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Status(400))
    async with sdk(srv) as client:
        with pytest.raises(openai.InternalServerError) as e:
            await client.chat.completions.create(model="two", messages=user('{"name": "a", "age": 1}'))
    assert e.value.status_code == 502 and e.value.code == "upstream_error" and e.value.type == "server_error"


async def test_errors_before_the_handler_parsed_anything(srv: InProcess) -> None:
    """Body, media type, size, Expect: OpenAI's shape, with the request id."""
    auth = {"Authorization": f"Bearer {FRONTEND}"}
    url = srv.url("/v1/chat/completions")
    cases = [
        (dict(data=b"{nope", headers={**auth, "Content-Type": "application/json"}), 400, "invalid_json"),
        (dict(data=b"{}", headers={**auth, "Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (dict(data=b"x" * (2 << 20), headers={**auth, "Content-Type": "application/json"}), 413,
         "payload_too_large"),
        (dict(json={"model": "greeter"}, headers={"X-API-Key": "no"}, expect100=True), 401, "unauthorized"),
    ]
    for kwargs, status, code in cases:
        async with srv.session.post(url, **kwargs) as r:  # type: ignore[arg-type]
            assert r.status == status, (code, await r.text())
            doc = await r.json()
            assert r.headers["X-Request-ID"]
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
        assert doc["error"]["code"] == code
    async with srv.session.post(url, json={"messages": user("x")}, headers=auth) as r:
        assert r.status == 422 and (await r.json())["error"]["param"] == "model"


async def test_request_log_and_metrics(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    async with sdk(srv) as client:
        fake.script(Violate(), Reply(data={"message": "m"}))
        await client.chat.completions.create(model="greeter", messages=user("Log"))
        stream = await client.chat.completions.create(model="greeter", messages=user("Log"), stream=True)
        [_ async for _ in stream]
        with pytest.raises(openai.UnprocessableEntityError):
            await client.chat.completions.create(model="two", messages=user("{}"))
    after = await srv.scrape()
    calls = "aiwfd_agent_calls_total"
    assert delta(before, after, calls, agent="greeter", outcome="ok", client="frontend") == 2
    assert delta(before, after, calls, agent="two", outcome="invalid_input", client="frontend") == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="greeter") == 3
    assert delta(before, after, "aiwfd_http_requests_total", route="/v1/chat/completions", method="POST",
                 status="200") == 2
    lines = [line for line in srv.log_lines() if "/v1/chat/completions" in line][-3:]
    assert re.search(r"status=200 .*client=frontend attempts=2 tokens=\d+", lines[0]), lines[0]
    assert re.search(r"status=200 .*attempts=1 tokens=\d+$", lines[1]), lines[1]
    assert re.search(r"status=422 .*error=invalid_input", lines[2]), lines[2]


async def test_stream_keepalive_then_error_event(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A call longer than the keep-alive interval starts the 200; an error after it is an
    `{"error"}` event, which the SDK raises; a success after it is the usual chunks."""
    fake.reset()
    path = write_config(tmp_path, CONFIG.replace("@FAKE_URL@", fake.base_url))
    async with serve(path, env=env(fake), sse_keepalive=0.2) as srv:
        gate = asyncio.Event()
        fake.script(Hold(gate, Status(400)))
        body = {"model": "greeter", "messages": user("Slow"), "stream": True}
        async with srv.session.post(srv.url("/v1/chat/completions"), json=body,
                                    headers={"X-API-Key": FRONTEND}) as r:
            assert r.status == 200
            assert await r.content.readuntil(b"\n\n") == b": keep-alive\n\n"
            gate.set()
            rest = (await r.read()).decode()
        error = json.loads(rest.split("data: ", 1)[1])
        assert error["error"]["code"] == "upstream_error" and "[DONE]" not in rest
        assert "error=upstream_error" in srv.log_lines()[-1]
        async with sdk(srv) as client:
            gate = asyncio.Event()
            fake.script(Hold(gate, Status(400)))
            # create() returns on the 200, which starts only after a keep-alive
            # interval: the call has outlasted one; then the model answers.
            stream = await client.chat.completions.create(model="greeter", messages=user("Slow"), stream=True)
            gate.set()
            with pytest.raises(openai.APIError) as e:
                [_ async for _ in stream]
            assert e.value.code == "upstream_error"
            gate = asyncio.Event()
            fake.script(Hold(gate, Reply(data={"message": "late"})))
            stream = await client.chat.completions.create(model="greeter", messages=user("Slow"), stream=True)
            gate.set()
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text == '{"message":"late"}'


async def test_a_client_gone_cancels_the_call(srv: InProcess, fake: FakeOpenAI) -> None:
    """A streaming client that goes away while the agent runs cancels the model call."""
    gate = asyncio.Event()
    fake.script(Hold(gate))
    body = {"model": "greeter", "messages": user("Gone"), "stream": True}
    request = asyncio.ensure_future(srv.session.post(srv.url("/v1/chat/completions"), json=body,
                                                     headers={"X-API-Key": FRONTEND}))
    await fake.wait_calls(1)
    request.cancel()  # the client closes its connection
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    for _ in range(50):
        if "error=client_disconnected" in srv.log_lines()[-1]:
            break
        await asyncio.sleep(0.05)
    assert "POST /v1/chat/completions" in srv.log_lines()[-1] and "error=client_disconnected" in srv.log_lines()[-1]
    gate.set()


@pytest.mark.system  # a load test: the inner loop has test_http_agent's 500 concurrent calls
async def test_500_concurrent_completions(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.latency = 0.3
    started = time.monotonic()
    async with sdk(srv) as client:
        done = await asyncio.gather(*(
            client.chat.completions.create(model="greeter", messages=user(f"n{i}")) for i in range(500)))
    elapsed = time.monotonic() - started
    assert all(json.loads(d.choices[0].message.content or "")["message"] for d in done)
    assert len({d.id for d in done}) == 500
    assert fake.calls == 500 and fake.max_inflight > 100, (fake.max_inflight, elapsed)


# --------------------------------------------------------------------------- the npm package


@pytest.mark.skipif(not NODE_READY, reason="node or tests/node/node_modules (npm ci in tests/node) is missing")
async def test_node_sdk(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hello, Alice!"}), Reply(data={"message": "Hi Bob"}),
                Reply(data={"message": "Hey Carol, " + "x" * 60}))
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / "openai_client.mjs"), srv.url("/v1"), FRONTEND, cwd=NODE_DIR,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    got = json.loads(out)
    assert [m["id"] for m in got["models"]] == AGENTS
    assert all(m["object"] == "model" and m["owned_by"] == "aiwfd" for m in got["models"])
    create = got["create"]
    assert create["object"] == "chat.completion" and create["id"].startswith("chatcmpl-")
    assert create["choices"][0]["message"]["content"] == '{"message":"Hello, Alice!"}'
    assert create["usage"]["total_tokens"] == create["usage"]["prompt_tokens"] + create["usage"]["completion_tokens"]
    assert got["plain"]["choices"][0]["message"]["content"] == '{"message":"Hi Bob"}'
    chunks = got["stream"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) \
        == json.dumps({"message": "Hey Carol, " + "x" * 60}, separators=(",", ":"))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    invalid = got["invalid"]
    assert invalid["isAPIError"] and invalid["status"] == 422 and invalid["error"] == "UnprocessableEntityError"
    assert "age" in invalid["message"] and invalid["param"] == "age" and invalid["code"] == "invalid_input"
    assert got["unknown"]["error"] == "NotFoundError" and got["unknown"]["status"] == 404
    for name in ("unauthorized", "unauthorizedModels"):
        assert got[name]["error"] == "AuthenticationError" and got[name]["status"] == 401, got[name]


# --------------------------------------------------------------------------- the guide's snippets


def guide_blocks(lang: str) -> list[str]:
    text = API_MD.read_text(encoding="utf-8")
    start = text.find("\n## OpenAI-compatible API\n")
    if start == -1:
        pytest.fail("docs/api.md has no '## OpenAI-compatible API' section")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end == -1 else text[start:end]
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```$", section, re.M | re.S)]


GUIDE_URL = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
async def example() -> AsyncIterator[InProcess]:
    """config.example.yaml with --mock and API_KEY=k1, as docs/api.md's examples assume."""
    async with serve(REPO / "config.example.yaml", env={"API_KEY": "k1"}, mock=True) as s:
        yield s


async def run_snippet(cmd: list[str], cwd: Path, code: str, example: InProcess) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    out, err = await asyncio.wait_for(proc.communicate(code.replace(GUIDE_URL, example.base).encode()), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


async def test_guide_python_snippets(example: InProcess) -> None:
    blocks = guide_blocks("python")
    assert blocks and all(GUIDE_URL in b for b in blocks)
    for code in blocks:
        out = await run_snippet([sys.executable, "-"], REPO, code, example)
        assert "greeter" in out and "tokens:" in out and "422 name" in out, out


@pytest.mark.skipif(not NODE_READY, reason="node or tests/node/node_modules (npm ci in tests/node) is missing")
async def test_guide_javascript_snippets(example: InProcess, tmp_path: Path) -> None:
    blocks = guide_blocks("js")
    assert blocks and all(GUIDE_URL in b for b in blocks)
    assert NODE is not None
    for i, code in enumerate(blocks):
        # An ES module next to tests/node's node_modules, where `import OpenAI from "openai"` resolves.
        script = NODE_DIR / f".guide-snippet-{os.getpid()}-{i}.mjs"
        script.write_text(code.replace(GUIDE_URL, example.base), encoding="utf-8")
        try:
            out = await run_snippet([NODE, str(script)], NODE_DIR, "", example)
        finally:
            script.unlink()
        assert "greeter" in out and "422 name" in out, out
