"""Typed keys for state kept on the aiohttp application and on requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from aiwfd.runtime import Runtime

RUNTIME: web.AppKey["Runtime"] = web.AppKey("runtime")
# Per-request values (aiohttp requests are mappings).
REQUEST_ID = "aiwfd.request_id"
STATS = "aiwfd.stats"
