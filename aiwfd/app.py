"""The application factory: routes and middleware around a Runtime."""

from __future__ import annotations

from aiohttp import web

from aiwfd import middlewares, views
from aiwfd.keys import RUNTIME
from aiwfd.runtime import Runtime


def create_app(runtime: Runtime) -> web.Application:
    # Body size is enforced per request by the views (the limit can change on
    # reload), so aiohttp's own limit is only a backstop.
    app = web.Application(middlewares=[middlewares.core], client_max_size=1024**3)
    app[RUNTIME] = runtime
    app.router.add_get("/health", views.health, allow_head=True)
    app.router.add_get("/agents", views.agents)
    app.router.add_post("/agent/{name}", views.call)
    return app
