"""Typed keys for state kept on the aiohttp application and on requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from aiwfd.auth.clients import Client
    from aiwfd.engine import CallStats
    from aiwfd.http.runtime import Runtime
    from aiwfd.spec.compiler import CompiledAgent

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
# Per-request values (aiohttp requests are mappings; a RequestKey spares the
# NotAppKeyWarning that aiohttp 3.14 gives a plain string key).
REQUEST_ID: web.RequestKey[str] = web.RequestKey("aiwfd.request_id", str)
STATS: web.RequestKey[CallStats] = web.RequestKey("aiwfd.stats")
# The CompiledAgent a request is for, once it is known to exist (for metrics).
AGENT: web.RequestKey[CompiledAgent] = web.RequestKey("aiwfd.agent")
# Who is calling (aiwfd.http.access), once the credentials checked out: the log's client=.
CLIENT: web.RequestKey[Client] = web.RequestKey("aiwfd.client")
# The RateLimit-Policy and RateLimit headers of the call (aiwfd.http.quota), for the on_prepare hook.
RATE_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("aiwfd.rate_headers", dict)
# The error type of an answer whose status does not carry it, for the request log and
# metrics: a stream that ended with an `error` event after its 200 (aiwfd.http.stream), an
# MCP tool call's error result (aiwfd.http.mcp), an OpenAI-shaped error (aiwfd.http.openai_api).
ANSWER_ERROR: web.RequestKey[str] = web.RequestKey("aiwfd.answer_error", str)
# The name of the catch-all route (aiwfd.http.views.no_route): metrics count it as unmatched.
NO_ROUTE = "aiwfd.no_route"


def route_template(request: web.Request) -> str | None:
    """The template of the route that answers `request` ("/agent/{name}"), for
    metrics and traces: bounded, unlike the path; None for the catch-all."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None and resource.name != NO_ROUTE else None
