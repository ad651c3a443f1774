"""`GET /docs`: Swagger UI for `/openapi.json`, from a Python package's bundled
assets (no CDN: it works offline).

The assets come from the `swagger-ui-bundle-v2` distribution (import name
`swagger_ui_bundle`, Swagger UI 5: the first major version that renders
OpenAPI 3.1; `swagger-ui-bundle` 1.1.0 ships Swagger UI 4.15, which refuses
a 3.1 document). Each asset is its own GET route under `/docs/`, served from
the package directory with aiohttp's FileResponse (ETag, Last-Modified,
Range). The page and its start-up script use relative URLs, so the docs also
work behind a reverse proxy that mounts aiwfd under a prefix; the page's
Content-Security-Policy allows nothing but this origin, so a CDN reference
could not even load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")
INIT_JS = "aiwfd-docs.js"

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aiwfd API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="docs/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/aiwfd-docs.js"></script>
</body>
</html>
"""

INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: new URL("openapi.json", document.baseURI).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    docExpansion: "list",
    displayOperationId: true,
    defaultModelsExpandDepth: 0
  });
});
"""

# Swagger UI styles elements inline and draws icons as data: URIs.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'self'")


def asset_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # imported only by the server

    return Path(str(swagger_ui_path))


def add_routes(app: web.Application) -> None:
    root = asset_dir()
    page = PAGE.encode()
    init = INIT.encode()

    async def docs_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    async def init_js(request: web.Request) -> web.Response:
        return web.Response(body=init, content_type="text/javascript", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.router.add_get("/docs", docs_page)
    app.router.add_get(f"/docs/{INIT_JS}", init_js)
    for name in ASSETS:
        path = root / name
        if not path.is_file():  # pragma: no cover - a broken install
            raise RuntimeError(f"Swagger UI asset missing: {path}")
        app.router.add_get(f"/docs/{name}", _file_handler(path))


def _file_handler(path: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    return serve
