"""`/v1/models` and `/v1/chat/completions`: the OpenAI-compatible API (SPEC §10.2). Being written (issue 17)."""

from __future__ import annotations

from aiohttp import web

from aiwfd.errors import NotFound


async def models(request: web.Request) -> web.StreamResponse:
    raise NotFound("the OpenAI-compatible API is not available yet")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raise NotFound("the OpenAI-compatible API is not available yet")
