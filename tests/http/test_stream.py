"""POST /agent/{name}/stream (SPEC §7.4): server-sent events against the fake
model in streaming mode (`chat.completion.chunk` events, usage in the last
chunk), on both transports (the shared aiohttp session and the SDK).

One FakeOpenAI for the module; one in-process aiwfd per transport, with
API_KEY set and keep-alive comments every KEEPALIVE seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
import pytest

from aiwfd import engine
from aiwfd.settings import DEFAULT_SSE_KEEPALIVE, Settings, add_arguments, from_args
from aiwfd.http.stream import TASK_PREFIX
from aiwfd.testing.fakeopenai import Drop, FakeOpenAI, Reply, Status, Stream, Violate, _dumps
from aiwfd.testing.inprocess import InProcess, fake_env, serve
from aiwfd.testing.metrics import delta
from tests.conftest import CONFIGS, example_applier

CONFIG = CONFIGS / "sb_agents.yaml"
KEY = "sb-stream-key"
AUTH = {"X-API-Key": KEY}
KEEPALIVE = 0.2
TRACE_KEYS = {"step_name", "usage", "attempts", "duration", "model", "request_id"}
apply = example_applier()


@pytest.fixture(scope="module", params=["aiohttp", "sdk"])
async def srv(request: pytest.FixtureRequest, fake: FakeOpenAI) -> AsyncIterator[InProcess]:
    env = fake_env(fake, API_KEY=KEY, AIWF_TRANSPORT=request.param)
    async with serve(CONFIG, env=env, sse_keepalive=KEEPALIVE) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


# --------------------------------------------------------------------------
# A small event-stream client


@dataclass
class Event:
    name: str
    data: Any
    at: float


class Events:
    """Reads server-sent events from a response, one at a time; comments are kept aside."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[tuple[str, float]] = []
        self.raw_lines: list[bytes] = []

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next event; None at the end of the stream."""
        name, data = "message", []
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), timeout)
            if not line:
                assert not data, "the stream ended inside an event"
                return None
            self.raw_lines.append(line)
            line = line.rstrip(b"\n")
            if not line:
                if data:
                    return Event(name, json.loads("\n".join(data)), time.monotonic())
                continue
            if line.startswith(b":"):
                self.comments.append((line.decode(), time.monotonic()))
                continue
            field, _, value = line.decode().partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)

    async def rest(self, timeout: float = 10.0) -> list[Event]:
        out = []
        while (ev := await self.next(timeout)) is not None:
            out.append(ev)
        return out


async def stream_all(srv: InProcess, agent: str, body: Any) -> tuple[aiohttp.ClientResponse, list[Event]]:
    async with srv.session.post(srv.url(f"/agent/{agent}/stream"), json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        events = await Events(r).rest()
    return r, events


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events]


def check_order(events: list[Event]) -> None:
    """start, then deltas/patches/retries, then exactly one terminal event, last."""
    assert events[0].name == "start"
    assert events[-1].name in ("result", "error")
    middle = names(events[1:-1])
    assert set(middle) <= {"delta", "patch", "retry"}, middle
    for i, e in enumerate(events[1:-1], 1):
        if e.name == "patch":  # a patch always follows the delta it parses, and changes something
            assert events[i - 1].name == "delta" and e.data


def attempt_texts(events: list[Event]) -> list[str]:
    """The deltas joined, one text per attempt (a retry starts the next)."""
    texts = [""]
    for e in events:
        if e.name == "delta":
            texts[-1] += e.data["text"]
        elif e.name == "retry":
            texts.append("")
    return texts


def attempt_docs(events: list[Event]) -> list[list[Any]]:
    """Per attempt, the document after each of its patches; every attempt starts from null."""
    docs: list[list[Any]] = [[]]
    doc: Any = None
    for e in events:
        if e.name == "patch":
            doc = apply(doc, e.data)
            docs[-1].append(json.loads(json.dumps(doc)))
        elif e.name == "retry":
            docs.append([])
            doc = None
    return docs


# --------------------------------------------------------------------------
# 1. Events in order; the first delta before the model has finished


async def test_events_in_order_and_first_delta_before_the_model_finished(srv: InProcess, fake: FakeOpenAI) -> None:
    answer = {"message": "Hello, Alice! Nice to meet you.", "mood": "happy"}
    fake.script(Stream(data=answer, chunks=6, pause_after=1, pause=10))
    async with srv.session.post(srv.url("/agent/greeter/stream"), json={"name": "Alice"}, headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        rid = r.headers["X-Request-ID"]
        events = Events(r)
        start = await events.next()
        assert start is not None and start.name == "start"
        assert start.data == {"request_id": rid, "agent": "greeter", "model": "gpt-4o-mini"}
        first = await events.next()
        assert first is not None and first.name == "delta" and first.data["text"]
        # The model is paused mid-answer: this delta reached us before it finished.
        assert fake.paused.is_set()
        assert fake.inflight == 1
        fake.release()
        rest = await events.rest()
    all_events = [start, first, *rest]
    check_order(all_events)
    deltas = [e for e in all_events if e.name == "delta"]
    assert len(deltas) == 6
    content = _dumps(answer)
    assert "".join(d.data["text"] for d in deltas) == content
    [docs] = attempt_docs(all_events)
    assert docs and all(isinstance(d, dict) for d in docs)
    assert docs[-1] == answer
    # Each patch makes the parse of a longer prefix: message grows, never shrinks.
    msgs = [d.get("message", "") for d in docs]
    assert all(answer["message"].startswith(m) for m in msgs) and msgs == sorted(msgs, key=len)
    assert [e.data[0]["op"] for e in all_events if e.name == "patch"][0] == "add"
    result = all_events[-1]
    assert result.name == "result" and set(result.data) == {"data", "trace"}
    assert result.data["data"] == answer
    trace = result.data["trace"]
    assert set(trace) == TRACE_KEYS
    assert trace["attempts"] == 1 and trace["request_id"] == rid and trace["step_name"] == "greeter"
    # What reached the model: the plain call's payload, streamed, with usage in the last chunk.
    sent = fake.last.body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["response_format"]["json_schema"]["strict"] is True
    # The same data and trace as the plain call (the fake's usage is a function of the request).
    fake.script(Reply(data=answer))
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Alice"}, headers=AUTH) as r:
        plain = await r.json()
    assert plain["data"] == result.data["data"]
    assert set(plain["trace"]) == set(trace)
    assert plain["trace"]["usage"] == trace["usage"] and trace["usage"]["total"] > 0
    assert {k: v for k, v in fake.requests[-1].body.items()} == {
        k: v for k, v in sent.items() if k not in ("stream", "stream_options")}


async def test_optional_nulls_dropped_and_wrapped_outputs_unwrapped(srv: InProcess, fake: FakeOpenAI) -> None:
    # Strict mode sends optional fields as null: dropped, in patches and in the result.
    fake.script(Stream(data={"message": "Hi", "mood": None}, chunks=len('{"message":"Hi","mood":null}')))
    _, events = await stream_all(srv, "greeter", {"name": "Bo"})
    assert events[-1].data["data"] == {"message": "Hi"}
    [docs] = attempt_docs(events)
    assert docs[-1] == {"message": "Hi"} and all("mood" not in d for d in docs)
    assert all("mood" not in json.dumps(e.data) for e in events if e.name == "patch")
    # A non-object output travels as {"value": …}: unwrapped, and no patches (objects only).
    fake.script(Stream(data={"value": ["a", "b", "c"]}, chunks=4))
    _, events = await stream_all(srv, "tags", {"name": "Bo"})
    check_order(events)
    assert events[-1].name == "result" and events[-1].data["data"] == ["a", "b", "c"]
    assert "patch" not in names(events) and names(events).count("delta") == 4
    # Plain text: the deltas are the text, `data` is the string.
    fake.script(Stream(content="Hello there, Bo. How are you?", chunks=3))
    _, events = await stream_all(srv, "chat", {"name": "Bo"})
    assert names(events) == ["start", "delta", "delta", "delta", "result"]
    assert events[-1].data["data"] == "Hello there, Bo. How are you?"


# --------------------------------------------------------------------------
# 2. Validation failure mid-stream


async def test_invalid_then_valid_output_sends_retry_then_result(srv: InProcess, fake: FakeOpenAI) -> None:
    bad, good = {"message": 12345}, {"message": "Hello, Cy"}
    fake.script(Stream(data=bad, chunks=3), Stream(data=good, chunks=3))
    r, events = await stream_all(srv, "greeter", {"name": "Cy"})
    check_order(events)
    assert names(events).count("retry") == 1
    i = names(events).index("retry")
    retry = events[i].data
    assert retry["attempt"] == 2
    assert retry["errors"] and retry["errors"][0]["path"] == "message"
    # Before the retry, the first attempt's output; after it, the second's.
    assert attempt_texts(events) == [_dumps(bad), _dumps(good)]
    assert "delta" in names(events[i + 1:])
    assert events[-1].name == "result"
    assert events[-1].data["data"] == good
    # Each attempt's patches start from null and build that attempt's answer.
    first, second = attempt_docs(events)
    assert first[-1] == bad and second[-1] == good
    patches = [e for e in events[i + 1:] if e.name == "patch"]
    assert patches[0].data[0]["op"] == "add" and patches[0].data[0]["path"] == ""
    assert events[-1].data["trace"]["attempts"] == 2
    # The re-ask quoted the errors, in the same conversation.
    second = fake.requests[-1].messages
    assert second[-2] == {"role": "assistant", "content": _dumps(bad)}
    assert "message" in second[-1]["content"] and second[-1]["role"] == "user"
    # usage sums both attempts
    usage = events[-1].data["trace"]["usage"]
    assert usage["total"] == usage["prompt"] + usage["completion"]
    assert usage["prompt"] > sum(len(m["content"]) for m in fake.requests[0].messages) // 4


async def test_always_invalid_ends_with_an_invalid_output_error_event(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Violate(), Violate())
    async with srv.session.post(srv.url("/agent/twice/stream"), json={"name": "Di"}, headers=AUTH) as r:
        assert r.status == 200
        rid = r.headers["X-Request-ID"]
        events = await Events(r).rest()
        assert r.content.at_eof()
    check_order(events)
    assert names(events).count("retry") == 1
    err = events[-1]
    assert err.name == "error"
    assert set(err.data) == {"error", "request_id"} and err.data["request_id"] == rid
    assert err.data["error"]["type"] == "invalid_output"
    assert err.data["error"]["details"] and err.data["error"]["message"]
    assert fake.calls == 2
    line = srv.log_lines()[-1]
    assert "POST /agent/twice/stream" in line and "status=200" in line
    assert "attempts=2" in line and "error=invalid_output" in line


# --------------------------------------------------------------------------
# 3. Errors before the stream starts; provider failures after it started


async def test_a_stream_cut_after_output_sends_retry(srv: InProcess, fake: FakeOpenAI) -> None:
    # The first attempt sends a piece, then stalls past the agent's 0.5 s
    # timeout: a transport failure after output reached the client, so a
    # `retry` tells it to discard that output; the second attempt answers.
    fake.script(Stream(data={"message": "stalled"}, chunks=4, pause_after=1, pause=30),
                Stream(data={"message": "Second try"}, chunks=2))
    r, events = await stream_all(srv, "hasty", {"name": "Lu"})
    check_order(events)
    i = names(events).index("retry")
    assert names(events)[:2] == ["start", "delta"]
    assert events[i].data == {"attempt": 2, "errors": [
        {"path": "", "message": "the model provider did not answer in time"}]}
    assert attempt_texts(events)[1] == _dumps({"message": "Second try"})
    assert events[-1].data["data"] == {"message": "Second try"}
    # The stalled attempt's patches are discarded with it: the next ones start from null.
    first, second = attempt_docs(events)
    assert first == [{}] and second[-1] == {"message": "Second try"}  # `{"mess` of the stalled one
    after = [e for e in events[i + 1:] if e.name == "patch"]
    assert after[0].data[0]["op"] == "add" and after[0].data[0]["path"] == ""
    assert events[-1].data["trace"]["attempts"] == 2
    assert fake.disconnects == 1  # the stalled upstream request was closed


@pytest.mark.parametrize("path", ["/agent/greeter/stream", "/agent/greeter/batch"])
async def test_errors_before_the_model_is_called_are_plain_json(srv: InProcess, fake: FakeOpenAI, path: str) -> None:
    ok_body = {"name": "Ed"} if path.endswith("stream") else {"inputs": [{"name": "Ed"}]}
    cases: list[tuple[str, dict[str, str], Any, int, str]] = [
        (path, {}, ok_body, 401, "unauthorized"),
        (path.replace("greeter", "greeterr"), AUTH, ok_body, 404, "not_found"),
        (path, {**AUTH, "Content-Type": "application/json"}, b'{"name": ', 400, "invalid_json"),
        (path, {**AUTH, "Content-Type": "application/json"}, b"[1, 2]", 400, "invalid_json"),
        (path, {**AUTH, "Content-Type": "text/plain"}, b'{"name": "Ed"}', 415, "unsupported_media_type"),
    ]
    if path.endswith("stream"):
        cases.append((path, AUTH, {"name": ""}, 422, "invalid_input"))
    else:
        cases.append((path, AUTH, {"name": "Ed"}, 422, "invalid_input"))  # no `inputs`
    for url, headers, body, status, kind in cases:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with srv.session.post(srv.url(url), headers=headers, **kw) as r:
            assert r.status == status, (url, status, await r.text())
            assert r.headers["Content-Type"].startswith("application/json")
            doc = await r.json()
        assert doc["error"]["type"] == kind
        assert doc["request_id"] == r.headers["X-Request-ID"]
    assert fake.calls == 0


async def test_provider_failure_after_the_stream_started_is_an_error_event(srv: InProcess, fake: FakeOpenAI,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The retries' backoff is not what is shown here (tests/http/test_providers.py
    # checks it with a fake clock): 10 ms instead of 0.25 s, doubled per retry.
    monkeypatch.setattr(engine, "BACKOFF_BASE", 0.01)
    # 500 on every attempt: the transport retries spend the budget, then an error event.
    fake.script(Status(500), Status(500), Status(500))
    r, events = await stream_all(srv, "greeter", {"name": "Flo"})
    assert names(events) == ["start", "error"]  # no output reached the client: nothing to discard
    assert events[-1].data["error"]["type"] == "upstream_error"
    assert fake.calls == 3
    assert "attempts=3" in srv.log_lines()[-1] and "error=upstream_error" in srv.log_lines()[-1]
    # The connection dropped on every attempt.
    fake.reset()
    fake.script(Drop(), Drop(), Drop())
    r, events = await stream_all(srv, "greeter", {"name": "Flo"})
    assert names(events) == ["start", "error"]
    assert events[-1].data["error"]["type"] == "unavailable"
    # A transient failure before any output: retried, no retry event, result with attempts 2.
    fake.reset()
    fake.script(Status(503), Stream(data={"message": "Back"}, chunks=2))
    r, events = await stream_all(srv, "greeter", {"name": "Flo"})
    assert "retry" not in names(events)
    assert events[-1].name == "result" and events[-1].data["trace"]["attempts"] == 2
    # A client error of the provider (400) is not retried.
    fake.reset()
    fake.script(Status(400))
    r, events = await stream_all(srv, "greeter", {"name": "Flo"})
    assert events[-1].data["error"]["type"] == "upstream_error" and fake.calls == 1


# --------------------------------------------------------------------------
# 4. A client that disconnects cancels the model call, and leaves no task behind


async def test_client_disconnect_cancels_the_model_call(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Stream(data={"message": "You will never see the end of this"}, chunks=4, pause_after=1, pause=30))
    lines_before = len(srv.log_lines())
    r = await srv.session.post(srv.url("/agent/greeter/stream"), json={"name": "Gus"}, headers=AUTH)
    rid = r.headers["X-Request-ID"]
    events = Events(r)
    assert (await events.next()).name == "start"  # type: ignore[union-attr]
    assert (await events.next()).name == "delta"  # type: ignore[union-attr]
    assert fake.paused.is_set()
    ours = [t for t in asyncio.all_tasks() if t.get_name() == TASK_PREFIX + rid]
    assert len(ours) == 1  # the model call runs in its own named task
    r.close()  # the client goes away while the model is still answering
    t0 = time.monotonic()
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    # Seen within the keep-alive/poll interval, not at the end of the model's 30 s pause.
    assert time.monotonic() - t0 < 3
    assert fake.disconnects == 1
    rt = srv.server.runtime
    assert rt is not None
    await asyncio.wait_for(rt.idle.wait(), 5)
    assert not rt.inflight_tasks
    assert ours[0].done() and ours[0].cancelled()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]
    await asyncio.wait_for(fake.idle.wait(), 5)
    lines = srv.log_lines()[lines_before:]
    assert any(f"request_id={rid}" in line and "error=client_disconnected" in line for line in lines), lines
    fake.release()


# --------------------------------------------------------------------------
# 5. Keep-alive comments


async def test_keep_alive_comments_while_the_model_is_silent(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Stream(data={"message": "Slow but sure"}, chunks=3, pause_after=1, pause=0.9))  # 4.5 intervals
    async with srv.session.post(srv.url("/agent/greeter/stream"), json={"name": "Hal"}, headers=AUTH) as r:
        events = Events(r)
        got = await events.rest()
    assert got[-1].name == "result"
    comments = events.comments
    assert len(comments) >= 3, comments
    assert all(text == ": keep-alive" for text, _ in comments)
    gaps = [b[1] - a[1] for a, b in zip(comments, comments[1:])]
    assert all(g > KEEPALIVE * 0.6 for g in gaps), gaps
    assert b": keep-alive\n" in events.raw_lines and b"\n" in events.raw_lines


def test_keep_alive_interval_setting() -> None:
    import argparse

    assert Settings().sse_keepalive == DEFAULT_SSE_KEEPALIVE == 15.0
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert from_args(args, {"AIWF_SSE_KEEPALIVE": "0.5"}).sse_keepalive == 0.5
    assert from_args(args, {}).sse_keepalive == 15.0
    from aiwfd.errors import StartupError

    for bad in ("0", "-1", "soon"):
        with pytest.raises(StartupError, match="AIWF_SSE_KEEPALIVE"):
            from_args(args, {"AIWF_SSE_KEEPALIVE": bad})


# --------------------------------------------------------------------------
# 7. Metrics and the request log


async def test_stream_counts_in_metrics_and_the_request_log(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    fake.script(Stream(data={"message": "Counted"}, chunks=2))
    r, events = await stream_all(srv, "greeter", {"name": "Ivy"})
    usage = events[-1].data["trace"]["usage"]
    line = srv.log_lines()[-1]
    assert re.search(r" POST /agent/greeter/stream - \S+ status=200 request_id=\S+ client=api-key-1 attempts=1 tokens=%d$"
                     % usage["total"], line), line
    fake.script(Violate(), Violate())
    await stream_all(srv, "twice", {"name": "Ivy"})
    after = await srv.scrape()

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    route = "/agent/{name}/stream"
    assert d("aiwfd_http_requests_total", route=route, method="POST", status="200") == 2
    assert d("aiwfd_http_request_duration_seconds_count", route=route) == 2
    assert d("aiwfd_agent_calls_total", agent="greeter", outcome="ok", client="api-key-1") == 1
    assert d("aiwfd_agent_calls_total", agent="twice", outcome="invalid_output", client="api-key-1") == 1
    assert d("aiwfd_agent_attempts_total", agent="greeter") == 1
    assert d("aiwfd_agent_attempts_total", agent="twice") == 2
    assert d("aiwfd_tokens_total", agent="greeter", model="gpt-4o-mini", kind="prompt") == usage["prompt"]
    assert d("aiwfd_tokens_total", agent="greeter", model="gpt-4o-mini", kind="completion") == usage["completion"]
    assert d("aiwfd_upstream_duration_seconds_count", agent="greeter", provider="openai") == 1


# --------------------------------------------------------------------------
# The mock provider streams too; the upstream event-stream reader


async def test_mock_provider_streams_its_sample() -> None:
    async with serve(CONFIG, mock=True) as s:
        async with s.session.post(s.url("/agent/greeter"), json={"name": "Jo"}) as r:
            plain = await r.json()
        _, events = await stream_all(s, "greeter", {"name": "Jo"})
    check_order(events)
    assert names(events).count("delta") >= 2
    assert events[-1].data["data"] == plain["data"]
    assert events[-1].data["trace"]["usage"] == plain["trace"]["usage"]


async def test_shutdown_timeout_ends_a_running_stream_with_an_error_event(fake: FakeOpenAI) -> None:
    # SIGTERM's drain waits --shutdown-timeout for running requests, then
    # answers 503 to what is left: a stream's headers are gone, so it gets
    # an `unavailable` error event and a clean end instead.
    fake.script(Stream(data={"message": "Too slow"}, chunks=4, pause_after=1, pause=30))
    async with serve(CONFIG, env=fake_env(fake), shutdown_timeout=0.3) as s:
        async with s.session.post(s.url("/agent/greeter/stream"), json={"name": "Kim"}) as r:
            events = Events(r)
            assert (await events.next()).name == "start"  # type: ignore[union-attr]
            assert (await events.next()).name == "delta"  # type: ignore[union-attr]
            drain = asyncio.get_running_loop().create_task(s.server.drain())
            rest = await events.rest()
            assert r.content.at_eof()
        await asyncio.wait_for(drain, 5)
        assert rest[-1].name == "error" and rest[-1].data["error"]["type"] == "unavailable"
        await asyncio.wait_for(fake.disconnected.wait(), 5)  # the model call was cancelled too
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]
        assert "error=unavailable" in s.log_lines()[-1]
    fake.release()
