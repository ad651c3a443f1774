"""`POST /mcp`: the agents as Model Context Protocol tools (SPEC §10.1).

JSON-RPC 2.0 over MCP's Streamable HTTP transport, as a stateless server
(revisions 2025-06-18 and 2025-11-25): every POST holds one JSON-RPC message
and is answered on its own, with `application/json` (never an SSE stream, never
an `Mcp-Session-Id`); `GET /mcp` is 405 (the catch-all route), which tells a
client there is no server-to-client stream.

    initialize                 the revision (the client's when we speak it, else our latest),
                               serverInfo, capabilities {tools: {listChanged: false}}
    notifications/*            202, no body (as is a JSON-RPC response from the client)
    ping                       {}
    tools/list                 every agent of the current config the client may call
    tools/call                 the agent, run as POST /agent/{name} runs it

Before any of that the request goes through what every agent route checks:
the credentials (401 with `WWW-Authenticate`, which is how an MCP client learns
it needs a token), the media type, encoding and size, `100 Continue`, the body
timeout: those are HTTP errors with the §3.1 body. Then:

- a body that is not JSON: HTTP 400 with JSON-RPC error -32700; not one JSON-RPC
  message (a batch: batching left MCP in 2025-06-18): 400 with -32600; an
  `MCP-Protocol-Version` header we do not speak: 400 with -32600 (MCP requires
  the 400; `mcp` 2.x's `server/discover` probe of revision 2026-07-28 ends
  here, and the client falls back to `initialize`, as it does on -32601 for a
  probe without the header);
- an unknown method: -32601, unknown tool or malformed params: -32602 (200);
- a tool call that fails (invalid arguments, a 403, a 429 of §8.2, a provider
  error) is a *result* with `isError: true` whose text is the §3.1 error body
  the plain call would have answered.

A tool call counts in the metrics as a call of its agent
(`aiwfd_agent_calls_total{agent, outcome, client}`); the request log line is
the middleware's, with the call's attempts and tokens.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from aiwfd import __version__
from aiwfd.auth.clients import Client
from aiwfd.engine import CallStats, call_agent, compact_json
from aiwfd.errors import Forbidden, HTTPError, InvalidJSON, error_body
from aiwfd.http import access, quota, views
from aiwfd.http.body import IDENTITY, inflate, read_raw
from aiwfd.http.keys import ANSWER_ERROR, CLIENT, REQUEST_ID, RUNTIME, STATS
from aiwfd.http.middlewares import http_error
from aiwfd.http.runtime import Runtime, Snapshot
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.spec.config import did_you_mean
from aiwfd.spec.jsonparse import parse_object

# The handshake revisions we speak, oldest first; the last is offered to a client asking for another.
PROTOCOL_VERSIONS = ("2025-06-18", "2025-11-25")
LATEST = PROTOCOL_VERSIONS[-1]
VERSION_HEADER = "MCP-Protocol-Version"

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602

SERVER_INFO = {"name": "aiwfd", "version": __version__}
CAPABILITIES = {"tools": {"listChanged": False}}
INSTRUCTIONS = ("Each tool is a typed agent: its arguments are validated against inputSchema and its "
                "answer against outputSchema before it is returned.")
TRACE_META = "aiwfd/trace"

_JSON_HEADERS = {"Content-Type": "application/json"}


class RpcError(Exception):
    """A JSON-RPC error answer: `status` is the HTTP status it goes out with."""

    def __init__(self, code: int, message: str, rid: Any = None, status: int = 200) -> None:
        super().__init__(message)
        self.code, self.message, self.rid, self.status = code, message, rid, status


def _answer(doc: dict[str, Any], status: int = 200) -> web.Response:
    try:
        body = orjson.dumps(doc)
    except TypeError:  # an integer past 64 bits (the request parser allows them): compact_json copes
        body = compact_json(doc).encode()
    return web.Response(body=body, status=status, headers=_JSON_HEADERS)


def _error(e: RpcError) -> web.Response:
    return _answer({"jsonrpc": "2.0", "id": e.rid, "error": {"code": e.code, "message": e.message}}, e.status)


async def handler(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    async with rt.lease() as snap:
        client = request[CLIENT] = await access.authenticate(request, snap)
        coding = _check_headers(request, snap)
        await views.send_continue(request)
        raw = await read_raw(request, snap.max_body, rt.settings.body_timeout)
        if coding != IDENTITY:
            raw = inflate(raw, coding, snap.max_body)
        try:
            msg = _message(raw)
            _check_version(request, msg)
            if "method" not in msg or "id" not in msg:
                # A notification (initialized, cancelled: nothing to do, stateless) or a client's
                # response (we never ask anything): accepted, no body (Streamable HTTP).
                return web.Response(status=202)
            rid = msg["id"]
            result = await _dispatch(request, rt, snap, client, msg["method"], msg.get("params") or {}, rid)
        except RpcError as e:
            return _error(e)
        return _answer({"jsonrpc": "2.0", "id": rid, "result": result})


def _check_headers(request: web.Request, snap: Snapshot) -> str:
    """Media type, encoding, declared size (as views.prepare), and the Origin, before the body is invited."""
    coding = views.check_body_headers(request, snap)
    _check_origin(request, snap)
    return coding


def _check_origin(request: web.Request, snap: Snapshot) -> None:
    """Streamable HTTP: a browser's `Origin` must be one we accept: this server's own,
    or one `server.cors` allows (SPEC §7.3). Desktop and SDK clients send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if origin.rstrip("/").lower() == access.resource_url(request).lower():
        return
    if snap.cors is not None and snap.cors.allow_origin(origin) is not None:
        return
    raise Forbidden("this Origin may not use /mcp (allow it in server.cors)")


def _message(raw: bytes) -> dict[str, Any]:
    """The one JSON-RPC message of the body, checked for form; RpcError (HTTP 400) if it is none."""
    head = raw.lstrip(b" \t\r\n")[:1]
    if head == b"[":
        raise RpcError(INVALID_REQUEST, "JSON-RPC batches are not supported (MCP 2025-06-18 removed them): "
                       "send one message per POST", status=400)
    try:
        msg = parse_object(raw)
    except InvalidJSON as e:
        if head == b"{" or not raw.strip():
            raise RpcError(PARSE_ERROR, f"Parse error: {e.message}", status=400) from None
        raise RpcError(INVALID_REQUEST, "a JSON-RPC message is a JSON object", status=400) from None
    rid = msg.get("id")
    if "id" in msg and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise RpcError(INVALID_REQUEST, "a JSON-RPC request's id is a string or an integer", status=400)
    if msg.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'not a JSON-RPC 2.0 message: "jsonrpc" must be "2.0"', rid, 400)
    if "method" in msg:
        if not isinstance(msg["method"], str):
            raise RpcError(INVALID_REQUEST, '"method" must be a string', rid, 400)
        params = msg.get("params")
        if params is not None and not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, '"params" must be an object', rid, 400)
    elif "id" not in msg or ("result" not in msg and "error" not in msg):
        raise RpcError(INVALID_REQUEST, "not a JSON-RPC request, notification or response", rid, 400)
    return msg


def _check_version(request: web.Request, msg: dict[str, Any]) -> None:
    """An `MCP-Protocol-Version` we do not speak is a 400 (MCP 2025-06-18 "Protocol Version
    Header"); none means the client did not send it, which we take as our own. `initialize`
    is the negotiation: its header, if any, is not checked."""
    version = request.headers.get(VERSION_HEADER)
    if version is None or version in PROTOCOL_VERSIONS or msg.get("method") == "initialize":
        return
    raise RpcError(INVALID_REQUEST, f"Bad Request: unsupported {VERSION_HEADER} {version[:40]!r}; this server "
                   f"speaks {', '.join(PROTOCOL_VERSIONS)} (initialize to agree on one)", msg.get("id"), 400)


async def _dispatch(request: web.Request, rt: Runtime, snap: Snapshot, client: Client, method: str,
                    params: dict[str, Any], rid: Any) -> dict[str, Any]:
    if method == "tools/call":
        return await _call(request, rt, snap, client, params, rid)
    if method == "tools/list":
        return {"tools": [tool for name, tool in _tools(snap.compiled).items() if _allowed(request, snap, client, name)]}
    if method == "ping":
        return {}
    if method == "initialize":
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in PROTOCOL_VERSIONS else LATEST,
                "capabilities": CAPABILITIES, "serverInfo": SERVER_INFO, "instructions": INSTRUCTIONS}
    raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method[:100]}", rid)


# -------------------------------------------------------------------- tools/list

# The tools of the last few configs (a reload compiles a new one), built on first use.
_tool_cache: list[tuple[Compiled, dict[str, dict[str, Any]]]] = []


def _tools(compiled: Compiled) -> dict[str, dict[str, Any]]:
    for c, tools in _tool_cache:
        if c is compiled:
            return tools
    tools = {name: tool_of(agent) for name, agent in sorted(compiled.agents.items())}
    _tool_cache.insert(0, (compiled, tools))
    del _tool_cache[4:]
    return tools


def tool_of(agent: CompiledAgent) -> dict[str, Any]:
    """The MCP Tool of an agent (SPEC §10.1)."""
    a = agent.assistant
    tool: dict[str, Any] = {
        "name": agent.name,
        "description": a.description or f"{a.input_type_name or 'object'} → {a.output_type_name or 'text'}",
        "inputSchema": agent.input_schema,
    }
    schema = output_schema(agent)
    if schema is not None:
        tool["outputSchema"] = schema
    return tool


def output_schema(agent: CompiledAgent) -> dict[str, Any] | None:
    """The agent's output schema as MCP wants it: an object; any other type as `{"value": …}`.
    None for an agent without output type (its answer is text)."""
    schema = agent.output_schema
    if schema is None or not _wrapped(agent):
        return schema
    inner = {k: v for k, v in schema.items() if k not in ("$schema", "$defs")}
    out: dict[str, Any] = {}
    if "$schema" in schema:
        out["$schema"] = schema["$schema"]
    out.update({"type": "object", "properties": {"value": inner}, "required": ["value"],
                "additionalProperties": False})
    if "$defs" in schema:  # "#/$defs/…" references resolve from the root: the definitions stay there
        out["$defs"] = schema["$defs"]
    return out


def _wrapped(agent: CompiledAgent) -> bool:
    return agent.wrapped or (agent.output_schema or {}).get("type") != "object"


def _allowed(request: web.Request, snap: Snapshot, client: Client, name: str) -> bool:
    if client.agents is None and client.scopes is None:
        return True
    try:
        access.authorize(request, snap, client, name)
    except Forbidden:
        return False
    return True


# -------------------------------------------------------------------- tools/call


async def _call(request: web.Request, rt: Runtime, snap: Snapshot, client: Client, params: dict[str, Any],
                rid: Any) -> dict[str, Any]:
    name = params.get("name")
    if not isinstance(name, str):
        raise RpcError(INVALID_PARAMS, 'tools/call needs the tool\'s "name"', rid)
    agent = snap.compiled.agents.get(name)
    if agent is None:
        hint = did_you_mean(name, snap.compiled.agents) if len(name) <= 64 else None
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {name[:64]!r}" + (f"; {hint}" if hint else ""), rid)
    args = params.get("arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RpcError(INVALID_PARAMS, '"arguments" must be an object', rid)
    stats = CallStats()
    try:
        access.authorize(request, snap, client, agent.name)
        views.check_input(agent, args)
        request[STATS] = stats  # the log's attempts= and tokens=, as for POST /agent/{name}
        async with quota.admitted(request, rt, snap, client, agent):
            answer = await call_agent(snap.compiled, agent, snap.client(agent), args,
                                      request[REQUEST_ID], rt.settings.deadline, stats)
    except Exception as e:  # noqa: BLE001 - every failure of the call is the tool's error result
        err: HTTPError = http_error(e, rt, request[REQUEST_ID])
        rt.metrics.record_agent(agent, stats, err.status, err.type, client.label)
        request[ANSWER_ERROR] = err.type  # the log's error=: the HTTP status is 200 all the same
        # No structuredContent: the TypeScript SDK checks one against the tool's outputSchema
        # even on an error result, and the error body is not the agent's output.
        return {"content": [{"type": "text", "text": compact_json(error_body(err, request[REQUEST_ID]))}],
                "isError": True}
    rt.metrics.record_agent(agent, stats, 200, None, client.label)
    data = answer["data"]
    meta = {TRACE_META: answer["trace"]}
    if agent.output_schema is None:  # a text answer: the text itself, no structured content
        return {"content": [{"type": "text", "text": data}], "isError": False, "_meta": meta}
    structured = {"value": data} if _wrapped(agent) else data
    # The text block is the structured content serialized (MCP 2025-06-18 "Structured Content").
    return {"content": [{"type": "text", "text": compact_json(structured)}], "structuredContent": structured,
            "isError": False, "_meta": meta}
