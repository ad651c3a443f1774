"""Request handlers: /health, /agents, /openapi.json, GET /agent/{name}/schema and POST /agent/{name}."""

from __future__ import annotations

import asyncio
import hmac
import sys
from typing import Any

from aiohttp import web

from aiwfd import __version__
from aiwfd.agent import CallStats, call_agent
from aiwfd.compiler import CompiledAgent
from aiwfd.config import did_you_mean
from aiwfd.errors import (
    InvalidInput, NotFound, PayloadTooLarge, RequestTimeout, Unauthorized, Unavailable,
    UnsupportedMediaType,
)
from aiwfd.jsonparse import check_charset, parse_object
from aiwfd.keys import AGENT, REQUEST_ID, RUNTIME, STATS
from aiwfd.middlewares import json_response
from aiwfd.runtime import Runtime, Snapshot

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover
    from async_timeout import timeout as _timeout


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ok", "version": __version__,
                          "agents": len(rt.snapshot.compiled.agents)})


async def agents(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].snapshot.agents_json
    return web.Response(body=body, content_type="application/json")


async def openapi(request: web.Request) -> web.Response:
    """`GET /openapi.json`: built once per load (runtime.Snapshot.openapi_json)."""
    body = request.app[RUNTIME].snapshot.openapi_json
    return web.Response(body=body, content_type="application/json")


async def agent_schema(request: web.Request) -> web.Response:
    """`GET /agent/{name}/schema`: `{"input", "output"}`, no auth (like /agents, which lists them too)."""
    snap = request.app[RUNTIME].snapshot
    name = request.match_info["name"]
    body = snap.agent_schema_json(name)
    if body is None:
        hint = did_you_mean(name, snap.compiled.agents) if len(name) <= 64 else None
        raise NotFound(f"unknown agent {name[:64]!r}" + (f"; {hint}" if hint else ""))
    return web.Response(body=body, content_type="application/json")


async def begin(request: web.Request) -> tuple[Runtime, Snapshot, CompiledAgent, dict[str, Any]]:
    """What every agent endpoint does first: take the current snapshot, check
    the key, the agent and the media type, read the body. The caller releases
    the snapshot (`rt.release(snap)`) once it has answered."""
    rt = request.app[RUNTIME]
    if rt.closing:
        # The drain is over: a model call started now could not finish.
        raise Unavailable("the server is shutting down; retry on another instance")
    snap = rt.acquire()
    try:
        agent = await prepare(request, snap)
        body = await read_json(request, snap.max_body, rt.settings.body_timeout)
    except BaseException:
        rt.release(snap)
        raise
    return rt, snap, agent, body


async def call(request: web.Request) -> web.Response:
    rt, snap, agent, body = await begin(request)
    try:
        check_input(agent, body)
        stats = request[STATS] = CallStats()
        result = await call_agent(snap.compiled, agent, snap.client(agent), body,
                                  request[REQUEST_ID], rt.settings.deadline, stats)
        return json_response(result)
    finally:
        rt.release(snap)


async def prepare(request: web.Request, snap: Snapshot) -> CompiledAgent:
    """Auth, then the agent, then the media type: all before the body is read."""
    check_auth(request, snap.api_keys)
    name = request.match_info["name"]
    agent = snap.compiled.agents.get(name)
    if agent is None:
        hint = did_you_mean(name, snap.compiled.agents) if len(name) <= 64 else None
        raise NotFound(f"unknown agent {name[:64]!r}" + (f"; {hint}" if hint else ""))
    request[AGENT] = agent
    if "Content-Type" in request.headers:
        ctype = request.content_type
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise UnsupportedMediaType(f"Content-Type {ctype[:60]!r} is not JSON; send application/json")
        check_charset(request.charset)
    return agent


def check_auth(request: web.Request, keys: tuple[bytes, ...]) -> None:
    if not keys:
        return
    given = request.headers.get("X-API-Key")
    if given is None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
    if not given:
        raise Unauthorized("missing API key: send X-API-Key or Authorization: Bearer",
                           headers={"WWW-Authenticate": "Bearer"})
    # Headers arrive as latin-1/surrogate-escaped text; compare the bytes the
    # client sent, against every key, in constant time.
    raw = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(raw, key)
    if not ok:
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: web.Request, limit: int, timeout: float) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit}")
    if length is not None and request.content.is_eof():
        # The whole body came with the headers (the usual case): nothing can
        # stall, so skip arming a timer.
        return parse_object(await request.content.read())
    try:
        async with _timeout(timeout):
            if length is not None:
                raw = await request.content.readexactly(length) if length else b""
            else:
                raw = await _read_limited(request, limit)
    except asyncio.IncompleteReadError:
        raise RequestTimeout("the request body ended before Content-Length bytes arrived") from None
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g}s") from None
    return parse_object(raw)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_input(agent: CompiledAgent, body: dict[str, Any]) -> None:
    errors = agent.input_validator.errors(body)
    if errors:
        raise InvalidInput(f"request body does not match {agent.assistant.input_type_name or 'the input type'}",
                           details=errors)
