"""The application factory: the route table, the middleware and the hooks around a Runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from aiwfd.http import access, batch, docs, jobs, mcp, metrics, middlewares, openai_api, stream, views
from aiwfd.http.keys import NO_ROUTE, RUNTIME
from aiwfd.http.runtime import Runtime


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    # One request is one agent call: the metrics count it per agent. (A batch
    # counts one call per input itself: aiwfd.http.batch.)
    agent_call: bool = False
    # The route sends `100 Continue` itself once the headers pass its checks
    # (views.send_continue), so aiohttp must not invite the body first.
    own_continue: bool = False


# Every route of the API (SPEC §7); a GET answers HEAD too. /docs and its
# assets come from aiwfd.http.docs, then the catch-all (views.no_route; under /v1/ in
# OpenAI's shape, openai_api.no_route).
ROUTES = (
    Route("GET", "/health", views.health),
    Route("GET", "/health/ready", views.ready),
    Route("GET", access.RESOURCE_METADATA_PATH, access.protected_resource),
    Route("GET", "/agents", views.agents),
    Route("POST", "/agent/{name}", views.call, agent_call=True, own_continue=True),
    Route("POST", "/agent/{name}/stream", stream.handler, agent_call=True, own_continue=True),
    Route("POST", "/agent/{name}/batch", batch.handler, own_continue=True),
    Route("POST", "/agent/{name}/jobs", jobs.submit, own_continue=True),
    Route("GET", "/jobs", jobs.listing),
    Route("GET", "/jobs/{id}", jobs.get),
    Route("DELETE", "/jobs/{id}", jobs.cancel),
    # SPEC §10: the agents as MCP tools, and as OpenAI "models".
    Route("POST", "/mcp", mcp.handler, own_continue=True),
    Route("GET", "/v1/models", openai_api.models),
    Route("GET", "/v1/models/{model}", openai_api.model),
    Route("POST", "/v1/chat/completions", openai_api.chat_completions, own_continue=True),
    Route("GET", "/agent/{name}/schema", views.agent_schema),
    Route("GET", "/openapi.json", views.openapi),
    Route("GET", "/metrics", metrics.handler),
)


def create_app(runtime: Runtime) -> web.Application:
    """The application serving `runtime`; it closes the runtime's snapshots at
    cleanup, so an app made here stands alone (aiohttp's TestServer, say)."""
    # Body size is enforced per request by the views (the limit can change on
    # reload), so aiohttp's own limit is only a backstop.
    app = web.Application(middlewares=[middlewares.core], client_max_size=1024**3)
    app[RUNTIME] = runtime
    runtime.metrics.configure(inflight=lambda: len(runtime.inflight_tasks), mock=runtime.settings.mock,
                              agent_routes=frozenset(r.path for r in ROUTES if r.agent_call))
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler)
        else:
            app.router.add_route(r.method, r.path, r.handler,
                                 expect_handler=views.no_continue if r.own_continue else None)
    docs.add_routes(app)
    # Last: what no route above matched (404, or 405 with Allow).
    app.router.add_route("*", "/{tail:.*}", openai_api.no_route, expect_handler=views.no_continue,
                         name=NO_ROUTE)
    app.on_response_prepare.append(middlewares.on_prepare(runtime))

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await runtime.close()

    app.cleanup_ctx.append(runtime_ctx)
    return app
