"""`POST /agent/{name}/stream` (SPEC §7.4): one agent call answered as server-sent events.

Everything found before the model is called (auth, unknown agent, media type,
body, input schema) is an ordinary JSON error with its status, exactly as for
`POST /agent/{name}` (the same `views.prepare`/`read_json`/`check_input`).
Then the answer is `200 text/event-stream`:

    event: start     {"request_id", "agent", "model"}
    event: delta     {"text"}      the next piece of the model's raw output
    event: patch     [op, …]       how the output parsed so far changed (object outputs only)
    event: retry     {"attempt", "errors"}   discard the output so far
    event: result    {"data", "trace"}       as the plain call; the stream ends
    event: error     {"error": {…}, "request_id"}   terminal, the §3.1 shape

and a `: keep-alive` comment every `Settings.sse_keepalive` seconds (env
`AIWF_SSE_KEEPALIVE`, default 15).

The attempts are `agent.call_agent`'s, with this module's `EventWriter` as
its listener: the same re-asks, transport retries, deadline, usage sum and
`trace`. A `retry` event always follows an answer that failed validation; after
a transport failure it is sent only when that attempt's output had already
reached the client (otherwise there is nothing to discard).

`patch` is what `spec.patches.PatchParser` makes of the delta before it:
JSON Pointer ops (`add`, `replace`, `append` to a string) that, applied in
order to `null`, give the output parsed so far, with the optional nulls
dropped as in `result`. The parser reads each delta once, so a stream's bytes
and CPU grow linearly with the answer; a `retry` starts a new one (the client
starts again from `null`). No patch follows a delta that changed nothing.

The model call runs in a child task named `aiwfd-stream:<request id>` while
the handler waits on it, writes the keep-alives and watches the connection
(aiohttp does not cancel handlers when a client goes away): a client that
disconnects, seen at the next write or within `DISCONNECT_POLL` seconds,
cancels that task, which closes the upstream request; the handler waits for
it to finish, so no task outlives the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import orjson
from aiohttp import web

from aiwfd.http import quota, views
from aiwfd.engine import CallStats, call_agent
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.spec.patches import PatchParser
from aiwfd.errors import HTTPError, InvalidOutput, error_body
from aiwfd.http.keys import CLIENT, REQUEST_ID, RUNTIME, STATS, ANSWER_ERROR
from aiwfd.http.middlewares import http_error
from aiwfd.http.runtime import Runtime, Snapshot

logger = logging.getLogger("aiwfd")

TASK_PREFIX = "aiwfd-stream:"
# How often a silent stream checks that its client is still connected.
DISCONNECT_POLL = 1.0
# The outcome a stream whose client went away is logged and counted with.
CLIENT_GONE = "client_disconnected"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied answers by default; events must go out as they come.
    "X-Accel-Buffering": "no",
}

def dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # an integer over 64 bits (the JSON parser allows them)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def event(name: str, data: Any) -> bytes:
    """One server-sent event; compact JSON has no newline, so one `data` line."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class EventWriter:
    """The `call_agent` listener that writes deltas, patches and retries as events."""

    def __init__(self, resp: web.StreamResponse, compiled: Compiled, agent: CompiledAgent,
                 request_id: str) -> None:
        self.resp = resp
        self.request_id = request_id
        self.compiled = compiled
        self.agent = agent
        # `patch` is for object outputs: not plain text, not a wrapped {"value": …}.
        self.objects = agent.output_validator is not None and not agent.wrapped
        self.parser = self._parser()
        self.sent = False  # some output of the current attempt reached the client

    def _parser(self) -> PatchParser | None:
        if not self.objects:
            return None
        return PatchParser(self.agent.assistant.output_type, self.compiled.config.types)

    async def send(self, name: str, data: Any) -> None:
        await self.resp.write(event(name, data))

    async def keepalive(self) -> None:
        await self.resp.write(KEEPALIVE)

    async def delta(self, text: str) -> None:
        self.sent = True
        out = event("delta", {"text": text})
        if self.parser is not None:
            try:
                ops = self.parser.feed(text)
            except Exception:
                # A bug in the parser must not cost the answer: logged like any
                # other, the attempt goes on without patches, `result` still comes.
                self.parser = None
                rid = self.request_id
                logger.exception("internal error turning a delta into patches (request_id=%s)", rid,
                                 extra={"request_id": rid})
            else:
                if ops:
                    out += event("patch", ops)
        await self.resp.write(out)

    async def retry(self, attempt: int, failure: HTTPError) -> None:
        if isinstance(failure, InvalidOutput) or self.sent:
            errors = failure.details if isinstance(failure, InvalidOutput) else [
                {"path": "", "message": failure.message}]
            await self.send("retry", {"attempt": attempt, "errors": errors})
        self.parser, self.sent = self._parser(), False


async def handler(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    async with rt.lease() as snap:
        agent, body = await views.begin(request, rt, snap)
        views.check_input(agent, body)
        stats = request[STATS] = CallStats()
        # A refusal (429) is a plain JSON answer: the stream has not started yet.
        async with quota.admitted(request, rt, snap, request[CLIENT], agent):
            return await _respond(request, rt, snap, agent, body, stats)


async def _respond(request: web.Request, rt: Runtime, snap: Snapshot, agent: CompiledAgent, body: Any,
                   stats: CallStats) -> web.StreamResponse:
    rid = request[REQUEST_ID]
    # The request id, CORS and `Connection: close` come from the on_prepare hook.
    resp = web.StreamResponse(headers=HEADERS)
    writer = EventWriter(resp, snap.compiled, agent, rid)
    error: str | None = None
    try:
        await resp.prepare(request)
        await _run(request, rt, snap, agent, body, stats, writer)
    except ConnectionError:  # a write found the client gone
        error = CLIENT_GONE
    except (Exception, asyncio.CancelledError) as e:
        # After the 200 went out, the middleware's JSON answer could not be
        # sent: the model's error, the shutdown timeout's 503 (server.drain)
        # or a bug ends the stream as an `error` event instead.
        err = http_error(e, rt, rid)
        error = err.type
        with contextlib.suppress(ConnectionError):
            await writer.send("error", error_body(err, rid))
    if error is not None:
        request[ANSWER_ERROR] = error
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def _run(request: web.Request, rt: Runtime, snap: Snapshot, agent: CompiledAgent, body: Any,
               stats: CallStats, writer: EventWriter) -> None:
    """Stream the call up to its `result` event; the error it ended with is raised."""
    rid = request[REQUEST_ID]
    await writer.send("start", {"request_id": rid, "agent": agent.name, "model": agent.assistant.model})
    call = asyncio.get_running_loop().create_task(
        call_agent(snap.compiled, agent, snap.client(agent), body, rid, rt.settings.deadline, stats, writer),
        name=TASK_PREFIX + rid,
    )
    try:
        await _watch(request, call, writer, rt.settings.sse_keepalive)
    finally:
        if not call.done():
            call.cancel()
            # Until it has unwound (the upstream request closed): no task outlives the request.
            await asyncio.wait((call,))
        if not call.cancelled():
            call.exception()  # retrieved here, whatever happens next
    await writer.send("result", call.result())


async def _watch(request: web.Request, call: asyncio.Task[Any], writer: EventWriter, keepalive: float) -> None:
    """Until `call` is done: a keep-alive comment every `keepalive` seconds, and a
    ConnectionResetError as soon as the client is seen gone."""
    loop = asyncio.get_running_loop()
    next_ping = loop.time() + keepalive
    while True:
        wait = min(DISCONNECT_POLL, max(0.0, next_ping - loop.time()))
        done, _ = await asyncio.wait((call,), timeout=wait)
        if done:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if loop.time() >= next_ping:
            await writer.keepalive()
            next_ping += keepalive
            if next_ping < loop.time():  # the write itself was slow: do not fire a burst
                next_ping = loop.time() + keepalive
