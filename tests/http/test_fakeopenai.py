"""The fake OpenAI server, exercised through the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest

from aiwfd.testing.fakeopenai import (
    Drop,
    FakeOpenAI,
    Hang,
    Hold,
    InvalidJSON,
    Reply,
    Status,
    Stream,
    Violate,
    sample_for_schema,
    violating_sample,
)

FAKE_MODULE = "aiwfd.testing.fakeopenai"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You greet people."},
    {"role": "user", "content": '{"name":"Alice"}'},
]

GREETING = {
    "type": "object",
    "properties": {"message": {"type": "string", "minLength": 1}},
    "required": ["message"],
    "additionalProperties": False,
}

NESTED: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "Tag": {"type": "string", "enum": ["red", "green", "blue"]},
        "Node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer", "minimum": 10, "maximum": 20},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                "parent": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
            },
            "required": ["value", "children", "parent"],
            "additionalProperties": False,
        },
        "Address": {
            "type": "object",
            "properties": {
                "host": {"type": "string", "format": "hostname"},
                "v4": {"type": "string", "format": "ipv4"},
                "v6": {"type": "string", "format": "ipv6"},
                "site": {"type": "string", "format": "uri"},
            },
            "required": ["host", "v4", "v6", "site"],
            "additionalProperties": False,
        },
    },
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "email": {"type": "string", "format": "email"},
        "created": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "code": {"type": "string", "minLength": 12, "maxLength": 12},
        "short": {"type": "string", "maxLength": 3},
        "nickname": {"anyOf": [{"type": "string", "minLength": 2}, {"type": "null"}]},
        "kind": {"const": "person"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 2, "maxItems": 3, "uniqueItems": True},
        "scores": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "ratio": {"type": "number", "multipleOf": 0.1, "minimum": 0.25},
        "count": {"type": "integer", "exclusiveMinimum": 41},
        "even": {"type": "integer", "multipleOf": 2, "minimum": 7},
        "active": {"type": "boolean"},
        "nothing": {"type": "null"},
        "maybe": {"type": ["string", "null"]},
        "tree": {"$ref": "#/$defs/Node"},
        "address": {"$ref": "#/$defs/Address"},
        "both": {"allOf": [
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Tag"}}, "required": ["a"]},
            {"properties": {"extra": {"type": "integer"}}, "required": ["extra"]},
        ]},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 2},
        "labels": {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
    },
    "required": ["id", "email", "created", "day", "code", "short", "nickname", "kind", "tags", "scores", "ratio",
                 "count", "even", "active", "nothing", "maybe", "tree", "address", "both", "pair", "labels"],
    "additionalProperties": False,
}


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def response_format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "output", "strict": True, "schema": schema}}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
    yield sdk
    await sdk.close()


async def test_default_text_answer_is_realistic(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    completion = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["content-type"].startswith("application/json")
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-test"
    assert completion.choices[0].message.content == "Hello from the fake model"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    text_len = sum(len(m["content"]) for m in MESSAGES)
    assert usage.prompt_tokens == text_len // 4 + 1
    assert usage.completion_tokens == len("Hello from the fake model") // 4 + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert fake.calls == 1 and len(fake.requests) == 1
    record = fake.requests[0]
    assert record.body["model"] == "gpt-test" and record.messages == MESSAGES
    assert record.headers["authorization"] == "Bearer sk-test"
    assert record.time <= time.monotonic()


@pytest.mark.parametrize("schema", [GREETING, NESTED], ids=["greeting", "nested"])
async def test_default_json_answer_satisfies_schema(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, schema: dict[str, Any]
) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, response_format=response_format(schema)
    )
    content = completion.choices[0].message.content
    assert content is not None
    data = json.loads(content)
    assert list(validator(schema).iter_errors(data)) == []
    assert fake.last.schema == schema


def test_sample_covers_keywords() -> None:
    data = sample_for_schema(NESTED)
    assert list(validator(NESTED).iter_errors(data)) == []
    assert data["nickname"] is not None  # anyOf: first non-null branch
    leaf = {"value": 10, "children": [], "parent": None}  # recursion stops at minimal instances
    assert data["tree"] == {"value": 10, "children": [leaf], "parent": leaf}
    assert data["kind"] == "person" and len(set(data["tags"])) == len(data["tags"]) >= 2


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "enum": ["a", "b"]},
        {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
        {"type": "integer", "minimum": -5, "maximum": -2},
        {"type": "number", "maximum": -10},
        {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        {"type": "object", "properties": {"value": {"type": "string", "format": "date"}}, "required": ["value"]},
    ],
)
def test_sample_simple_schemas(schema: dict[str, Any]) -> None:
    assert list(validator(schema).iter_errors(sample_for_schema(schema))) == []


@pytest.mark.parametrize("schema", [GREETING, NESTED, {"type": "string"}, {"type": "array"}])
def test_violating_sample_violates(schema: dict[str, Any]) -> None:
    assert list(validator(schema).iter_errors(violating_sample(schema))) != []


async def test_scripted_replies_in_order_then_default(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(data={"message": "scripted"}), Reply(content="raw text", finish_reason="length"))
    fake.script(InvalidJSON(), Violate())
    assert fake.pending == 4
    contents = []
    reasons = []
    for _ in range(5):
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, response_format=response_format(GREETING)
        )
        contents.append(completion.choices[0].message.content)
        reasons.append(completion.choices[0].finish_reason)
    assert json.loads(contents[0]) == {"message": "scripted"}
    assert contents[1] == "raw text" and reasons[1] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(contents[2])
    assert list(validator(GREETING).iter_errors(json.loads(contents[3]))) != []
    assert list(validator(GREETING).iter_errors(json.loads(contents[4]))) == []
    assert fake.pending == 0 and fake.calls == 5


async def test_rate_limit_surfaces_with_retry_after(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Status(429, retry_after=2))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2"
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["x-request-id"].startswith("req_")


async def test_server_error_and_custom_body(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    body = {"error": {"message": "boom", "type": "server_error", "code": "oops"}}
    fake.script(Status(500), Status(503, body=body, retry_after=0.5))
    with pytest.raises(openai.InternalServerError) as first:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert first.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as second:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert second.value.status_code == 503 and second.value.code == "oops"
    assert second.value.response.headers["retry-after"] == "0.5"


async def test_hang_times_out_and_is_cancelled(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Hang(30))
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    await asyncio.wait_for(fake.idle.wait(), 5)
    assert fake.disconnects == 1 and fake.inflight == 0
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from the fake model"


async def test_hold_answers_only_once_released(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    gate = asyncio.Event()
    fake.script(Hold(gate, Reply(content="released")), Hold(gate))
    first = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    second = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    await fake.wait_calls(2)
    assert fake.inflight == 2 and not first.done() and not second.done()
    gate.set()
    assert (await first).choices[0].message.content == "released"
    assert (await second).choices[0].message.content == "Hello from the fake model"  # the default answer


async def test_drop_is_a_connection_error(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Drop())
    with pytest.raises(openai.APIConnectionError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert not isinstance(caught.value, openai.APITimeoutError)
    assert fake.disconnects == 0


async def test_api_key_required_when_configured() -> None:
    async with FakeOpenAI(api_key="sk-right") as server:
        wrong = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
        right = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await right.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await wrong.close()
        await right.close()


async def test_stream_with_usage(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        response_format=response_format(GREETING),
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = [chunk async for chunk in raw.parse()]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    content = "".join(pieces)
    assert list(validator(GREETING).iter_errors(json.loads(content))) == []
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(content) // 4 + 1
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert len({c.id for c in chunks}) == 1


async def test_stream_without_usage_and_scripted_reply(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(content="abcdefghijklmnop"))
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abcdefghijklmnop"


async def test_stream_pause_and_release(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Stream(content="abcdefgh", chunks=4, pause_after=2, pause=30))
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = stream.__aiter__()
    received = [await chunks.__anext__() for _ in range(3)]  # role + 2 pieces arrive before the pause
    assert "".join(c.choices[0].delta.content or "" for c in received) == "abcd"
    await asyncio.wait_for(fake.paused.wait(), 5)
    fake.release()
    received += [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in received) == "abcdefgh"
    assert received[-1].choices[0].finish_reason == "stop"
    assert not fake.paused.is_set() and fake.disconnects == 0


async def test_stream_disconnect_during_pause(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Stream(content="abcdefgh", chunks=4, pause_after=1, pause=30))
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = stream.__aiter__()
    await chunks.__anext__()
    await asyncio.wait_for(fake.paused.wait(), 5)
    await stream.close()
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    await asyncio.wait_for(fake.idle.wait(), 5)
    assert fake.disconnects == 1


async def test_max_inflight_with_latency(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.latency = 0.2
    results = await asyncio.gather(
        *(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(20))
    )
    assert len(results) == 20
    assert fake.max_inflight == 20 and fake.inflight == 0 and fake.calls == 20


async def test_wait_calls_and_reset(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Hang(30), Reply(content="never used"))
    task = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    await fake.wait_calls(1)
    assert fake.inflight == 1 and fake.requests[0].messages == MESSAGES
    fake.reset()
    assert fake.calls == 0 and fake.requests == [] and fake.pending == 0 and fake.max_inflight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.idle.wait(), 5)


async def test_models_endpoint(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data][:1] == ["gpt-4o-mini"]


async def test_exit_with_hung_handler_is_quick() -> None:
    server = FakeOpenAI()
    await server.start()
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    server.script(Hang(60))
    task = asyncio.create_task(sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    await server.wait_calls(1)
    started = time.monotonic()
    await server.close()
    assert time.monotonic() - started < 2
    with pytest.raises(openai.APIConnectionError):
        await task
    assert server.disconnects == 0
    await sdk.close()


@pytest.mark.parametrize("extra", [[], ["--uvloop"]], ids=["asyncio", "uvloop"])
async def test_subprocess_mode(extra: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", FAKE_MODULE, "--port", "0", "--latency-ms", "10", *extra,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        word, port = line.split()
        assert word == "LISTENING" and int(port) > 0
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, response_format=response_format(GREETING)
        )
        assert list(validator(GREETING).iter_errors(json.loads(completion.choices[0].message.content or ""))) == []
        await sdk.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _pieces(client: openai.AsyncOpenAI, model: str, **kwargs: Any) -> list[str]:
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
    return [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]


async def test_stream_in_pieces_of_chunk_chars(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.script(Stream(content="abcdefghij", chunk_chars=4), Stream(content="abcdefghij"))
    assert await _pieces(client, "gpt-4o-mini") == ["abcd", "efgh", "ij"]
    assert await _pieces(client, "gpt-4o-mini") == ["abc", "def", "gh", "ij"]  # unchanged without it


async def test_answers_per_model_streamed_in_chunk_chars() -> None:
    answer = '{"message":"Zoë \\"quoted\\" ✓"}'
    async with FakeOpenAI(answers={"bench-model": answer}, chunk_chars=5) as fake:
        sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
        try:
            pieces = await _pieces(sdk, "bench-model", response_format=response_format(GREETING),
                                   stream_options={"include_usage": True})
            assert "".join(pieces) == answer and all(len(p) == 5 for p in pieces[:-1])
            plain = await sdk.chat.completions.create(model="bench-model", messages=MESSAGES)
            assert plain.choices[0].message.content == answer
            # other models keep the schema sample
            other = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert other.choices[0].message.content == fake.text
        finally:
            await sdk.close()


async def test_subprocess_answer_and_chunk_chars(tmp_path: Any) -> None:
    path = tmp_path / "answer.json"
    path.write_text('{"message":"from a file"}', encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", FAKE_MODULE, "--port", "0", "--answer", f"m1={path}", "--chunk-chars", "4",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int((await asyncio.wait_for(proc.stdout.readline(), 10)).split()[1])
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
        try:
            pieces = await _pieces(sdk, "m1")
            assert "".join(pieces) == '{"message":"from a file"}' and pieces[:2] == ['{"me', 'ssag']
        finally:
            await sdk.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
