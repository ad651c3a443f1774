"""The application factory: routes and middleware around a Runtime."""

from __future__ import annotations

from aiohttp import web

from aiwfd.http import batch

from aiwfd.http import docs

from aiwfd.http import metrics

from aiwfd.http import middlewares

from aiwfd.http import stream

from aiwfd.http import views
from aiwfd.http.keys import NO_ROUTE, RUNTIME
from aiwfd.http.runtime import Runtime


def create_app(runtime: Runtime) -> web.Application:
    # Body size is enforced per request by the views (the limit can change on
    # reload), so aiohttp's own limit is only a backstop.
    app = web.Application(middlewares=[middlewares.core], client_max_size=1024**3)
    app[RUNTIME] = runtime
    runtime.metrics.configure(inflight=lambda: len(runtime.inflight_tasks), mock=runtime.settings.mock)
    app.router.add_get("/health", views.health, allow_head=True)
    app.router.add_get("/agents", views.agents)
    # 100 Continue is sent by the handlers once the headers pass (views.send_continue).
    app.router.add_post("/agent/{name}", views.call, expect_handler=views.no_continue)
    app.router.add_post("/agent/{name}/stream", stream.handler, expect_handler=views.no_continue)
    app.router.add_post("/agent/{name}/batch", batch.handler, expect_handler=views.no_continue)
    app.router.add_get("/agent/{name}/schema", views.agent_schema)
    app.router.add_get("/openapi.json", views.openapi)
    app.router.add_get("/metrics", metrics.handler)
    docs.add_routes(app)
    # Last: what no route above matched (404, or 405 with Allow).
    app.router.add_route("*", "/{tail:.*}", views.no_route, expect_handler=views.no_continue,
                         name=NO_ROUTE)
    return app
