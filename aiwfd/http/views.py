"""Request handlers: /health, /agents, /openapi.json, GET /agent/{name}/schema and POST /agent/{name}."""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from aiwfd import __version__
from aiwfd.engine import CallStats, call_agent
from aiwfd.spec.compiler import CompiledAgent
from aiwfd.spec.config import did_you_mean
from aiwfd.http.body import check_length, content_encoding, read_json
from aiwfd.errors import (
    NO_SUCH_PATH, InvalidInput, MethodNotAllowed, NotFound, UnsupportedMediaType,
)
from aiwfd.spec.jsonparse import check_charset
from aiwfd.http import access, idempotency, quota
from aiwfd.http.keys import AGENT, CLIENT, REQUEST_ID, RUNTIME, STATS
from aiwfd.http.middlewares import json_response
from aiwfd.http.protocol import CONTINUED
from aiwfd.http.runtime import Phase, Runtime, Snapshot


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.phase is not Phase.SERVING:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ok", "version": __version__,
                          "agents": len(rt.snapshot.compiled.agents)})


async def ready(request: web.Request) -> web.Response:
    """`GET /health/ready` (SPEC §8.2): the config is loaded, the token issuer's keys
    are (with auth.jwt) and the store answers; else 503 with the reason."""
    rt = request.app[RUNTIME]
    reason = None
    snap = rt.snapshot
    if rt.phase is not Phase.SERVING:
        reason = "the server is shutting down"
    elif snap.verifier is not None and not snap.verifier.ready:
        reason = snap.verifier.reason or "the token issuer's keys are not loaded yet"
    else:
        reason = await rt.store_problem() or await rt.jobs_problem()
    if reason is not None:
        return json_response({"status": "unready", "reason": reason}, status=503)
    return json_response({"status": "ready", "store": rt.store.description if rt.store else "memory"})


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
        raise unknown_agent(name, snap)
    return web.Response(body=body, content_type="application/json")


def unknown_agent(name: str, snap: Snapshot) -> NotFound:
    """The 404 of an agent the current config does not have, with a hint when one is close."""
    hint = did_you_mean(name, snap.compiled.agents) if len(name) <= 64 else None
    return NotFound(f"unknown agent {name[:64]!r}" + (f"; {hint}" if hint else ""))


async def begin(request: web.Request, rt: Runtime, snap: Snapshot, *, idempotent: bool = False,
                check: Callable[[], None] | None = None) -> tuple[CompiledAgent, dict[str, Any]]:
    """What every agent endpoint does first, inside its `rt.lease()`: find the
    client, check the agent, the client's right to it and the media type (and,
    on the routes that take one, the Idempotency-Key's form), invite and read
    the body. `check`: the route's own header checks, made with these."""
    client = request[CLIENT] = await access.authenticate(request, snap)
    agent, coding = prepare(request, snap)
    access.authorize(request, snap, client, agent.name)
    if idempotent:
        idempotency.parse_key(request)  # a malformed key is a 400 before the body is invited
    if check is not None:
        check()
    await send_continue(request)
    body = await read_json(request, snap.max_body, rt.settings.body_timeout, coding)
    return agent, body


async def call(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    async with rt.lease() as snap:
        agent, body = await begin(request, rt, snap, idempotent=True)
        check_input(agent, body)

        async def run() -> web.Response:
            stats = request[STATS] = CallStats()
            async with quota.admitted(request, rt, snap, request[CLIENT], agent):
                result = await call_agent(snap.compiled, agent, snap.client(agent), body,
                                          request[REQUEST_ID], rt.settings.deadline, stats)
            return json_response(result)

        return await idempotency.guarded(request, rt, agent, body, run)


def prepare(request: web.Request, snap: Snapshot) -> tuple[CompiledAgent, str]:
    """The agent, the media type, the encoding and the declared size: all
    before the body is read (and before `100 Continue` invites it)."""
    name = request.match_info["name"]
    agent = snap.compiled.agents.get(name)
    if agent is None:
        raise unknown_agent(name, snap)
    request[AGENT] = agent
    return agent, check_body_headers(request, snap)


def check_body_headers(request: web.Request, snap: Snapshot) -> str:
    """The media type (JSON), its charset, the encoding and the declared size of
    a body, before it is invited; the content coding to undo."""
    if "Content-Type" in request.headers:
        ctype = request.content_type
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise UnsupportedMediaType(f"Content-Type {ctype[:60]!r} is not JSON; send application/json")
        check_charset(request.charset)
    coding = content_encoding(request)
    check_length(request, snap.max_body)
    return coding


async def send_continue(request: web.Request) -> None:
    """`100 Continue`, once the headers have passed every check (SPEC §3.1).

    The agent routes take `no_continue` as their expect handler, so aiohttp
    does not send it before the route's checks; other expectations are ignored
    (RFC 9110 §10.1.1 allows it) rather than refused.
    """
    if request.get(CONTINUED) is False:
        request[CONTINUED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response


async def no_continue(request: web.Request) -> None:
    """The expect handler of the agent routes and the catch-all: nothing is
    sent yet; the request is marked as waiting for `100 Continue`."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue" and request.version >= (1, 1) and not request.content.is_eof():
        request[CONTINUED] = False


async def no_route(request: web.Request) -> web.StreamResponse:
    """The catch-all route: 405 with `Allow` where another method fits the path, else 404.

    A route of its own (rather than the router's MatchInfoError) so that its
    expect handler is `no_continue`: aiohttp's default would invite the body
    of a request that is about to be refused.
    """
    allowed: set[str] = set()
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not own:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        allow = ", ".join(sorted(allowed))
        raise MethodNotAllowed(f"method not allowed; use {allow}", headers={"Allow": allow})
    raise NotFound(NO_SUCH_PATH)


def check_input(agent: CompiledAgent, body: dict[str, Any]) -> None:
    errors = agent.input_validator.errors(body)
    if errors:
        raise InvalidInput(f"request body does not match {agent.assistant.input_type_name or 'the input type'}",
                           details=errors)
