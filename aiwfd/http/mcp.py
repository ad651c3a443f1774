"""`POST /mcp`: the Model Context Protocol (SPEC §10.1). Being written (issue 17)."""

from __future__ import annotations

from aiohttp import web

from aiwfd.errors import NotFound


async def handler(request: web.Request) -> web.StreamResponse:
    raise NotFound("MCP is not available yet")
