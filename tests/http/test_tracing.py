"""OpenTelemetry traces (SPEC §11.2) as a collector receives them: a real
in-process server exporting over OTLP/HTTP to a real receiver in the test
(aiwfd.testing.otlp_receiver, decoding with opentelemetry-proto), the fake
model over real HTTP recording the `traceparent` it was sent.

Tracing is process-wide (aiwfd.telemetry), so each test runs its own server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, InvalidJSON, Reply
from aiwfd.testing.inprocess import InProcess, serve, write_config
from aiwfd.testing.otlp_receiver import OTLPReceiver, Span

CONFIG = """\
version: 0.3
providers:
  fake:
    base_url: @FAKE@
    api_key_env: FAKE_KEY
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
    max_tokens: 300
    temperature: 0.2
"""
PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{PARENT_TRACE}-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def rx() -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as r:
        yield r


def env(fake: FakeOpenAI, rx: OTLPReceiver, **extra: str) -> dict[str, str]:
    return {"FAKE_KEY": "k", "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "20",
            "OTEL_SERVICE_NAME": "aiwfd-test", **extra}


@pytest.fixture
async def srv(fake: FakeOpenAI, rx: OTLPReceiver, tmp_path: Path) -> AsyncIterator[InProcess]:
    fake.reset()
    async with serve(write_config(tmp_path, CONFIG.replace("@FAKE@", fake.base_url)), env=env(fake, rx)) as s:
        yield s


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_a_call_with_one_reask(srv: InProcess, fake: FakeOpenAI, rx: OTLPReceiver) -> None:
    fake.script(InvalidJSON(), Reply(data={"message": "hi"}))
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Ann"},
                                headers={"traceparent": PARENT}) as r:
        assert r.status == 200
    await rx.wait_for(4)
    spans = rx.trace(PARENT_TRACE)  # the caller's trace goes on
    server = one(spans, "POST /agent/{name}")
    assert server.kind == "SERVER" and server.parent_span_id == "b7ad6b7169203331"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/agent/{name}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "aiwfd-test"
    agent = one(spans, "invoke_agent greeter")
    assert agent.kind == "INTERNAL" and agent.parent_span_id == server.span_id
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.agent.name"] == "greeter"
    chats = sorted((s for s in spans if s.name == "chat gpt-4o-mini"), key=lambda s: s.start_ns)
    assert [c.attributes["aiwfd.attempt"] for c in chats] == [1, 2], rx.tree(PARENT_TRACE)
    assert all(c.kind == "CLIENT" and c.parent_span_id == agent.span_id for c in chats)
    first, second = chats
    assert first.attributes["error.type"] == "invalid_output" and first.status == "ERROR"
    assert "error.type" not in second.attributes and second.status != "ERROR"
    a = second.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["gen_ai.response.model"]
    assert a["gen_ai.request.max_tokens"] == 300 and a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.output.type"] == "json" and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.id"].startswith("chatcmpl-")
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == fake.port
    assert a["gen_ai.provider.name"] == "fake"
    # Prompts and answers are not recorded by default.
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output.messages")) for c in chats for k in c.attributes)
    # The provider was sent the CLIENT span of its own call.
    sent = [req.headers["traceparent"] for req in fake.requests]
    assert sent == [f"00-{PARENT_TRACE}-{c.span_id}-01" for c in chats]
    # The request log names the trace.
    assert srv.log_lines()[-1].endswith(f"trace_id={PARENT_TRACE}")


async def test_a_stream_and_a_batch(srv: InProcess, fake: FakeOpenAI, rx: OTLPReceiver) -> None:
    async with srv.session.post(srv.url("/agent/greeter/stream"), json={"name": "Ann"}) as r:
        assert r.status == 200 and "event: result" in await r.text()
    async with srv.session.post(srv.url("/agent/greeter/batch"),
                                json={"inputs": [{"name": "a"}, {"name": "b"}]}) as r:
        assert r.status == 200
    await rx.wait_for(lambda spans: sum(s.kind == "SERVER" for s in spans) == 2 and len(spans) >= 8)
    stream = one(rx.spans, "POST /agent/{name}/stream")
    kids = rx.children(stream)
    assert [k.name for k in kids] == ["invoke_agent greeter"], rx.tree(stream.trace_id)
    assert [c.name for c in rx.children(kids[0])] == ["chat gpt-4o-mini"]
    batch = one(rx.spans, "POST /agent/{name}/batch")
    agents = rx.children(batch)
    assert [k.name for k in agents] == ["invoke_agent greeter"] * 2, rx.tree(batch.trace_id)
    assert all(len(rx.children(k)) == 1 for k in agents)
    assert batch.trace_id != stream.trace_id  # no traceparent: each request a trace of its own


async def test_a_job_is_a_trace_of_its_own(srv: InProcess, rx: OTLPReceiver) -> None:
    async with srv.session.post(srv.url("/agent/greeter/jobs"), json={"name": "Ann"}) as r:
        assert r.status == 202
        job = await r.json()
    await rx.wait_for(lambda spans: any(s.name == "job greeter" for s in spans) and len(spans) >= 4)
    run = one(rx.spans, "job greeter")
    assert run.is_root and run.attributes["aiwfd.job.id"] == job["id"]
    assert run.attributes["aiwfd.job.status"] == "succeeded" and run.attributes["aiwfd.job.attempt"] == 1
    submit = one(rx.spans, "POST /agent/{name}/jobs")
    assert submit.trace_id != run.trace_id
    # Linked to the request that submitted it, through the job store.
    assert run.links == [(submit.trace_id, submit.span_id)]
    agent = rx.children(run)
    assert [a.name for a in agent] == ["invoke_agent greeter"], rx.tree(run.trace_id)


async def test_messages_are_recorded_only_when_asked(fake: FakeOpenAI, rx: OTLPReceiver, tmp_path: Path) -> None:
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE@", fake.base_url))
    async with serve(cfg, env=env(fake, rx, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")) as s:
        fake.script(Reply(data={"message": "secret answer"}))
        async with s.session.post(s.url("/agent/greeter"), json={"name": "Ann"}) as r:
            assert r.status == 200
        await rx.wait_for(3)
    chat = one(rx.spans, "chat gpt-4o-mini")
    assert 'Ann' in chat.attributes["gen_ai.input.messages"]
    assert "secret answer" in chat.attributes["gen_ai.output.messages"]
    assert "k" not in chat.attributes.values()


async def test_sampling_off_exports_nothing(fake: FakeOpenAI, rx: OTLPReceiver, tmp_path: Path) -> None:
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE@", fake.base_url))
    async with serve(cfg, env=env(fake, rx, OTEL_TRACES_SAMPLER="always_off")) as s:
        for _ in range(3):
            async with s.session.post(s.url("/agent/greeter"), json={"name": "Ann"}) as r:
                assert r.status == 200
        assert "trace_id=" not in s.log_lines()[-1]
        # The provider is still told the (unsampled) context, as W3C asks.
        flags = fake.requests[-1].headers["traceparent"].rsplit("-", 1)[1]
        assert int(flags, 16) & 1 == 0  # the sampled flag is off
    # The server stopped: its exporter flushed what it had, which is nothing.
    assert rx.spans == [] and rx.exports == []


@pytest.mark.parametrize("down", ["fail", "hang"])
async def test_a_collector_that_is_down_never_fails_or_holds_up_a_request(
        fake: FakeOpenAI, rx: OTLPReceiver, tmp_path: Path, down: str) -> None:
    fake.reset()
    if down == "fail":
        rx.fail(503)
    else:
        rx.hang()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE@", fake.base_url))
    async with serve(cfg, env=env(fake, rx, OTEL_BSP_EXPORT_TIMEOUT="500")) as s:
        statuses: list[int] = []
        started = time.monotonic()

        async def one_call() -> None:
            async with s.session.post(s.url("/agent/greeter"), json={"name": "Ann"}) as r:
                statuses.append(r.status)

        await asyncio.gather(*(one_call() for _ in range(50)))
        elapsed = time.monotonic() - started
        await rx.wait_for_exports(1)  # the exporter did try meanwhile
    assert statuses == [200] * 50
    # Not a timing assertion on the requests' speed: a generous bound against a
    # request that waited for the collector (a hang here would be 0.5 s or more each).
    assert elapsed < 10, elapsed


async def test_off_the_request_log_has_no_trace_id(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.reset()
    cfg = write_config(tmp_path, CONFIG.replace("@FAKE@", fake.base_url))
    env_: dict[str, Any] = {"FAKE_KEY": "k"}
    async with serve(cfg, env=env_) as s:
        async with s.session.post(s.url("/agent/greeter"), json={"name": "Ann"},
                                  headers={"traceparent": PARENT}) as r:
            assert r.status == 200
        assert "trace_id" not in s.log_lines()[-1]
        assert "traceparent" not in fake.requests[-1].headers


async def test_a_tracestate_that_is_not_w3c_never_fails_the_request(srv: InProcess, fake: FakeOpenAI,
                                                                    rx: OTLPReceiver) -> None:
    # Bytes aiohttp cannot decode reach the handler as lone surrogates: the
    # SERVER span's end raised on them (a 500 without a log line), or, sent
    # on, the collector refused the whole export. Not W3C: not propagated.
    from urllib.parse import urlsplit
    u = urlsplit(srv.url("/agent/greeter"))
    body = b'{"name": "Ann"}'
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(b"POST /agent/greeter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"traceparent: " + PARENT.encode() + b"\r\ntracestate: a=\xff\xfe\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    spans = await rx.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans))
    server = one(spans, "POST /agent/{name}")
    assert server.trace_id == PARENT_TRACE and server.trace_state == ""
    assert "tracestate" not in fake.requests[-1].headers
    # Several valid headers are one list, passed on.
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Ann"},
                                headers=[("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", "b=2")]) as r:
        assert r.status == 200
    assert fake.requests[-1].headers["tracestate"] == "a=1,b=2"
