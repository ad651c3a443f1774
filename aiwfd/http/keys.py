"""Typed keys for state kept on the aiohttp application and on requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from aiwfd.http.runtime import Runtime

RUNTIME: web.AppKey["Runtime"] = web.AppKey("runtime")
# Per-request values (aiohttp requests are mappings).
REQUEST_ID = "aiwfd.request_id"
STATS = "aiwfd.stats"
# The CompiledAgent a request is for, once it is known to exist (for metrics).
AGENT = "aiwfd.engine"
# The error type a streamed answer ended with, after its 200 went out (aiwfd.http.stream),
# for the request log and metrics.
STREAM_ERROR = "aiwfd.stream_error"
# The name of the catch-all route (aiwfd.http.views.no_route): metrics count it as unmatched.
NO_ROUTE = "aiwfd.no_route"
