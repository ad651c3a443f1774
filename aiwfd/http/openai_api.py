"""`GET /v1/models`, `GET /v1/models/{model}` and `POST /v1/chat/completions`:
the OpenAI-compatible API (SPEC §10.2).

Every agent is a "model". A chat completion is one call of the agent named
by `model`, made exactly as `POST /agent/{name}` makes it (auth, allowlist,
limits, validation, re-ask, deadline, trace, request log, metrics):

    input    the last `user` message's content (a string, or text parts
             joined), parsed as a JSON object; plain text when the input
             type has exactly one required string field, which receives it
    answer   a `chat.completion`: `message.content` is the validated output
             as compact JSON (the text itself for an agent without output
             type), `usage` the summed usage of every attempt, `id`
             `chatcmpl-<request id>`

The agent's own settings stand: every other field of the request
(temperature, tools, response_format, n, …) is ignored.

`stream: true` answers `chat.completion.chunk` events of the *validated*
answer: the agent is called as a plain call (re-asks happen before the first
chunk), then a chunk with the role, the content in pieces, a chunk with
`finish_reason: "stop"`, a usage chunk (`choices: []`) when
`stream_options.include_usage`, and `data: [DONE]`. A call still running
after `Settings.sse_keepalive` seconds starts the 200 and sends `: keep-alive`
comments meanwhile (a proxy's read timeout); an error after that is the
event `data: {"error": {…}}`, which the SDKs raise as an APIError. Before it,
an error is an ordinary answer with its status.

Errors are in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with the status of SPEC §3.1 and `code` its type, so that the SDKs
raise their usual exceptions (401 AuthenticationError, 404 NotFoundError,
422 UnprocessableEntityError, 429 RateLimitError…). The core middleware would
render the §3.1 shape: these handlers answer their errors themselves, and
hand the error type to the request log and metrics through `ANSWER_ERROR`
(an answer already prepared, as a stream's is).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import Any, Awaitable, Callable, Coroutine

import orjson
from aiohttp import web

from aiwfd.auth.clients import Client
from aiwfd.engine import CallStats, call_agent, compact_json
from aiwfd.errors import (
    Forbidden, HTTPError, InvalidInput, InvalidJSON, NotFound, PayloadTooLarge, RequestTimeout,
)
from aiwfd.http import access, quota, views
from aiwfd.http.body import read_json
from aiwfd.http.keys import AGENT, CLIENT, REQUEST_ID, RUNTIME, STATS, ANSWER_ERROR
from aiwfd.http.middlewares import http_error, json_response
from aiwfd.http.runtime import Runtime, Snapshot
from aiwfd.spec.config import did_you_mean
from aiwfd.spec.compiler import CompiledAgent
from aiwfd.spec.jsonparse import parse_object

CHAT_ROUTE = "/v1/chat/completions"
TASK_PREFIX = "aiwfd-chat:"
# Characters of the answer per content chunk of a streamed completion.
PIECE = 32
# How often a stream waiting on its call checks that the client is still there.
DISCONNECT_POLL = 1.0
CLIENT_GONE = "client_disconnected"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
# How many validation errors an error message quotes.
QUOTED = 10


# ---------------------------------------------------------------- errors

def openai_error(err: HTTPError) -> dict[str, Any]:
    """An HTTPError in OpenAI's shape: `code` is the §3.1 type; `param` the first
    failing field; the message quotes the details (the SDKs show only the message)."""
    message, param = err.message, None
    located = [d for d in err.details if isinstance(d, dict) and "message" in d and "path" in d]
    if located:
        param = str(located[0]["path"]) or None
        message += ": " + "; ".join(f"{d['path'] or '(root)'}: {d['message']}" for d in located[:QUOTED])
        if len(located) > QUOTED:
            message += f"; and {len(located) - QUOTED} more"
    return {"error": {"message": message,
                      "type": "invalid_request_error" if err.status < 500 else "server_error",
                      "param": param, "code": err.type}}


async def error_response(request: web.Request, err: HTTPError) -> web.StreamResponse:
    """The answer to `err`, sent here (prepared) so that the middleware logs and
    counts its type (`ANSWER_ERROR`) without rendering the §3.1 shape over it."""
    resp = json_response(openai_error(err), err.status, err.headers or None)
    if isinstance(err, (PayloadTooLarge, RequestTimeout)):
        resp.force_close()  # the rest of the body is unread
    request[ANSWER_ERROR] = err.type
    with contextlib.suppress(ConnectionError):
        await resp.prepare(request)
        await resp.write_eof()
    return resp


Handler = Callable[[web.Request, Runtime, Snapshot], Awaitable[web.StreamResponse]]


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    try:
        async with rt.lease() as snap:
            return await handler(request, rt, snap)
    except (Exception, asyncio.CancelledError) as e:
        # http_error raises again a cancellation that must not be answered.
        return await error_response(request, http_error(e, rt, request[REQUEST_ID]))


# ---------------------------------------------------------------- /v1/models

# Per snapshot: when it was first listed (its "created") and the whole list.
_listings: weakref.WeakKeyDictionary[Snapshot, tuple[int, bytes]] = weakref.WeakKeyDictionary()


def _listing(created: int, names: Any) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "aiwfd"} for name in names]})


def _cached_listing(snap: Snapshot) -> tuple[int, bytes]:
    cached = _listings.get(snap)
    if cached is None:
        created = int(time.time())
        cached = _listings[snap] = (created, _listing(created, sorted(snap.compiled.agents)))
    return cached


def _created(snap: Snapshot) -> int:
    """The snapshot's `created`: the same in GET /v1/models and GET /v1/models/{model}, whichever came first."""
    return _cached_listing(snap)[0]


def _may_call(request: web.Request, snap: Snapshot, client: Client, agent: str) -> bool:
    try:
        access.authorize(request, snap, client, agent)
    except Forbidden:
        return False
    return True


async def _models(request: web.Request, rt: Runtime, snap: Snapshot) -> web.StreamResponse:
    client = request[CLIENT] = await access.authenticate(request, snap)
    created, body = _cached_listing(snap)
    if client.agents is not None or client.scopes is not None:
        # Only the agents this client may call.
        body = _listing(created, [n for n in sorted(snap.compiled.agents) if _may_call(request, snap, client, n)])
    return web.Response(body=body, content_type="application/json")


async def models(request: web.Request) -> web.StreamResponse:
    """`GET /v1/models`: the agents, with the credentials of agent calls when auth is configured."""
    return await _answer(request, _models)


async def _model(request: web.Request, rt: Runtime, snap: Snapshot) -> web.StreamResponse:
    client = request[CLIENT] = await access.authenticate(request, snap)
    name = request.match_info["model"]
    if name not in snap.compiled.agents or not _may_call(request, snap, client, name):
        # As the listing: what it may not call is not there, and no hint names it.
        callable_ = [n for n in snap.compiled.agents if _may_call(request, snap, client, n)]
        hint = did_you_mean(name, callable_) if len(name) <= 64 and name not in snap.compiled.agents else None
        raise NotFound(f"unknown agent {name[:64]!r}" + (f"; {hint}" if hint else ""))
    created = _created(snap)
    return web.Response(body=orjson.dumps({"id": name, "object": "model", "created": created, "owned_by": "aiwfd"}),
                        content_type="application/json")


async def model(request: web.Request) -> web.StreamResponse:
    """`GET /v1/models/{model}`: one agent, as the SDKs' `models.retrieve` asks."""
    return await _answer(request, _model)


async def no_route(request: web.Request) -> web.StreamResponse:
    """The catch-all route: under `/v1/`, its 404 or 405 in OpenAI's shape (an
    OpenAI client reads the message there); elsewhere views.no_route's."""
    try:
        return await views.no_route(request)
    except HTTPError as err:
        if request.path != "/v1" and not request.path.startswith("/v1/"):
            raise
        return await error_response(request, err)


# ---------------------------------------------------------------- the input

def plain_text_field(agent: CompiledAgent) -> str | None:
    """The field plain text goes to: the input type's only required field, when it is a string."""
    if agent.assistant.input_type is None:
        return None
    schema = agent.input_schema
    required = schema.get("required")
    if not isinstance(required, list) or len(required) != 1:
        return None
    prop = (schema.get("properties") or {}).get(required[0])
    if isinstance(prop, dict) and isinstance(prop.get("$ref"), str) and prop["$ref"].startswith("#/$defs/"):
        prop = (schema.get("$defs") or {}).get(prop["$ref"][len("#/$defs/"):])
    return required[0] if isinstance(prop, dict) and prop.get("type") == "string" else None


def _bad_request(message: str, path: str) -> InvalidInput:
    return InvalidInput(f"invalid chat request: {message}", details=[{"path": path, "message": message}])


def user_content(body: dict[str, Any]) -> str:
    """The text of the last `user` message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("`messages` must be a non-empty array", "messages")
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            break
    else:
        raise _bad_request("there is no message with role `user`: it holds the agent's input", "messages")
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad_request("only text content parts are accepted", f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad_request("the content must be a string or an array of text parts", f"messages[{i}].content")


def agent_input(agent: CompiledAgent, text: str) -> dict[str, Any]:
    """The agent's input from the user message: a JSON object, or the plain text in the one string field."""
    field = plain_text_field(agent)
    if field is not None and not text.lstrip().startswith("{"):
        return {field: text}
    try:
        return parse_object(text.encode("utf-8"))
    except InvalidJSON as e:
        if field is not None:
            return {field: text}
        kind = agent.assistant.input_type_name or "its input type"
        raise InvalidJSON(f"the last user message must be a JSON object of {kind} for agent {agent.name!r} "
                          f"({e.message.replace('body ', 'it ', 1)})") from None


def check_input(agent: CompiledAgent, data: dict[str, Any]) -> None:
    errors = agent.input_validator.errors(data)
    if errors:
        kind = agent.assistant.input_type_name or "the input type"
        raise InvalidInput(f"the last user message does not match {kind}", details=errors)


# ---------------------------------------------------------------- the answer

def _usage(stats: CallStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.total_tokens}


def answer_text(agent: CompiledAgent, data: Any) -> str:
    """The validated output as the message content: compact JSON, or the text of an agent without output type."""
    if agent.output_validator is None and isinstance(data, str):
        return data
    return compact_json(data)


def completion(rid: str, agent: CompiledAgent, content: str, stats: CallStats) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + rid, "object": "chat.completion", "created": int(time.time()), "model": agent.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(stats),
    }


def chunks(rid: str, agent: CompiledAgent, content: str, stats: CallStats, include_usage: bool) -> bytes:
    """The whole streamed answer, `[DONE]` included."""
    head = {"id": "chatcmpl-" + rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": agent.name}
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
               **extra}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    out.extend(chunk({"content": content[i:i + PIECE]}) for i in range(0, len(content), PIECE))
    out.append(chunk({}, "stop"))
    if include_usage:
        out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": _usage(stats)}) + b"\n\n")
    out.append(DONE)
    return b"".join(out)


# ---------------------------------------------------------------- /v1/chat/completions

def _check_headers(request: web.Request, snap: Snapshot) -> str:
    """Media type, encoding and declared size, before the body is invited (as views.prepare)."""
    return views.check_body_headers(request, snap)


async def _chat(request: web.Request, rt: Runtime, snap: Snapshot) -> web.StreamResponse:
    client = request[CLIENT] = await access.authenticate(request, snap)
    coding = _check_headers(request, snap)
    # The agent is named in the body: only auth, media type and size can be checked before it.
    await views.send_continue(request)
    body = await read_json(request, snap.max_body, rt.settings.body_timeout, coding)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise _bad_request("`model` must be the name of an agent (GET /v1/models lists them)", "model")
    agent = snap.compiled.agents.get(name)
    if agent is None:
        raise views.unknown_agent(name, snap)
    request[AGENT] = agent
    access.authorize(request, snap, client, agent.name)
    data = agent_input(agent, user_content(body))
    check_input(agent, data)
    stats = request[STATS] = CallStats()
    rid = request[REQUEST_ID]

    async def run() -> dict[str, Any]:
        async with quota.admitted(request, rt, snap, client, agent):
            return await call_agent(snap.compiled, agent, snap.client(agent), data, rid,
                                    rt.settings.deadline, stats)

    if body.get("stream") is not True:
        result = await run()
        return json_response(completion(rid, agent, answer_text(agent, result["data"]), stats))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return await _stream(request, rt, agent, run, stats, include_usage)


async def _stream(request: web.Request, rt: Runtime, agent: CompiledAgent,
                  run: Callable[[], Coroutine[Any, Any, dict[str, Any]]], stats: CallStats,
                  include_usage: bool) -> web.StreamResponse:
    rid = request[REQUEST_ID]
    loop = asyncio.get_running_loop()
    call = loop.create_task(run(), name=TASK_PREFIX + rid)
    # Started (200 and keep-alives) only when the call outlasts one keep-alive interval.
    resp = web.StreamResponse(headers=SSE_HEADERS)
    failure: HTTPError | None = None
    try:
        next_ping = loop.time() + rt.settings.sse_keepalive
        while not call.done():
            wait = min(DISCONNECT_POLL, max(0.0, next_ping - loop.time()))
            await asyncio.wait((call,), timeout=wait)
            if call.done():
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            if loop.time() >= next_ping:
                await resp.prepare(request)
                await resp.write(KEEPALIVE)
                next_ping = max(next_ping + rt.settings.sse_keepalive, loop.time())
    except ConnectionError:
        request[ANSWER_ERROR] = CLIENT_GONE
        return await _end(request, resp)
    except (Exception, asyncio.CancelledError) as e:
        if not resp.prepared:
            raise
        failure = http_error(e, rt, rid)  # the shutdown timeout's 503, or a bug
    finally:
        if not call.done():
            call.cancel()
            await asyncio.wait((call,))  # until the upstream request is closed
        if not call.cancelled():
            call.exception()  # retrieved here, whatever happens next
    if failure is None:
        if not resp.prepared:
            result = await call  # not started: a failed call is an ordinary error answer with its status
        else:
            try:
                result = await call
            except (Exception, asyncio.CancelledError) as e:
                failure = http_error(e, rt, rid)
    if failure is not None:
        # The 200 is gone: the error is an event (the SDKs raise it as an APIError).
        request[ANSWER_ERROR] = failure.type
        return await _end(request, resp, b"data: " + orjson.dumps(openai_error(failure)) + b"\n\n")
    content = answer_text(agent, result["data"])
    return await _end(request, resp, chunks(rid, agent, content, stats, include_usage))


async def _end(request: web.Request, resp: web.StreamResponse, data: bytes = b"") -> web.StreamResponse:
    """Write the rest of a streamed answer; a client gone meanwhile is logged as such."""
    try:
        await resp.prepare(request)
        if data:
            await resp.write(data)
        await resp.write_eof()
    except ConnectionError:
        request[ANSWER_ERROR] = CLIENT_GONE
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`: one call of the agent named by `model`."""
    resp = await _answer(request, _chat)
    agent = request.get(AGENT)
    rt = request.app[RUNTIME]
    if agent is not None and CHAT_ROUTE not in rt.metrics.agent_routes:
        # The route table does not count it as an agent call (app.ROUTES): counted here, once.
        client = request.get(CLIENT)
        rt.metrics.record_agent(agent, request.get(STATS), resp.status, request.get(ANSWER_ERROR),
                                client.label if client is not None else "anonymous")
    return resp
