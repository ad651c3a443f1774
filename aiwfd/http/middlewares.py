"""The one cross-cutting middleware: request id, error shape, drain, request log,
CORS (aiwfd.http.cors) and metrics (aiwfd.http.metrics).

It is a single layer on purpose: every middleware layer costs a coroutine
frame per request, and these concerns share the same timing and request id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from aiwfd.engine import CallStats
from aiwfd.errors import (
    HTTPError, InternalError, InvalidJSON, MethodNotAllowed, NotFound, PayloadTooLarge,
    RequestTimeout, Unavailable, UnsupportedMediaType, error_body,
)
from aiwfd.http.keys import REQUEST_ID, RUNTIME, STATS, STREAM_ERROR
from aiwfd.http.protocol import CONTINUED

logger = logging.getLogger("aiwfd")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    # A random per-process prefix and a counter: unique across instances, and
    # far cheaper than uuid4 on the hot path.
    return f"{_ID_PREFIX}{next(_ids):08x}"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: HTTPError, request_id: str) -> web.Response:
    resp = json_response(error_body(err, request_id), err.status, err.headers or None)
    if isinstance(err, (PayloadTooLarge, RequestTimeout)):
        # The rest of the body is unread: the connection cannot be reused.
        resp.force_close()
    return resp


_AIOHTTP_ERRORS: dict[int, type[HTTPError]] = {
    400: InvalidJSON, 404: NotFound, 405: MethodNotAllowed, 408: RequestTimeout,
    413: PayloadTooLarge, 415: UnsupportedMediaType, 503: Unavailable,
}


def from_aiohttp(e: web.HTTPException) -> HTTPError:
    """aiohttp's own 404/405/413… in our error shape (the router raises them)."""
    cls = _AIOHTTP_ERRORS.get(e.status, InternalError)
    headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    message = None
    if cls is MethodNotAllowed and headers:
        message = f"method not allowed; use {headers['Allow']}"
    elif cls is NotFound:
        message = "no such path; agents are at POST /agent/{name}"
    return cls(message, headers=headers)


@web.middleware
async def core(request: web.Request, handler: Handler) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    started = time.monotonic()
    rid = request.headers.get("X-Request-ID")
    if rid is None or not _SANE_ID.match(rid):
        rid = new_request_id()
    request[REQUEST_ID] = rid
    task = asyncio.current_task()
    assert task is not None
    rt.inflight_tasks.add(task)
    rt.idle.clear()
    error_type = None
    cors = rt.snapshot.cors
    try:
        try:
            # An allowed CORS preflight is answered here, for any path (aiwfd.http.cors).
            resp = cors.preflight(request) if cors is not None and request.method == "OPTIONS" else None
            if resp is None:
                resp = await handler(request)
        except HTTPError as e:
            resp, error_type = error_response(e, rid), e.type
        except web.HTTPException as e:
            err = from_aiohttp(e)
            resp, error_type = error_response(err, rid), err.type
        except asyncio.CancelledError:
            if not rt.aborting:
                raise
            # The shutdown timeout passed: answer instead of dropping the connection.
            if sys.version_info >= (3, 11):
                task.uncancel()
            err = Unavailable("the server is shutting down; retry on another instance")
            resp, error_type = error_response(err, rid), err.type
        except Exception:
            logger.exception("internal error (request_id=%s)", rid, extra={"request_id": rid})
            err = InternalError(f"internal error; the server log has the details under request id {rid}")
            resp, error_type = error_response(err, rid), err.type
    finally:
        rt.inflight_tasks.discard(task)
        if not rt.inflight_tasks:
            rt.idle.set()
    if not resp.prepared:
        resp.headers["X-Request-ID"] = rid
        if rt.draining:
            resp.force_close()
        elif request.get(CONTINUED) is False:
            # Refused before `100 Continue`: the client holds its body back,
            # so the connection cannot carry a next request.
            resp.force_close()
        if cors is not None:
            cors.apply(request, resp)
    elif error_type is None:
        # A streamed answer (aiwfd.http.stream) that ended with an `error` event.
        error_type = request.get(STREAM_ERROR)
    stats: CallStats | None = request.get(STATS)
    elapsed = time.monotonic() - started
    rt.request_log.write(
        request.method, request.path, elapsed, resp.status, rid,
        stats.attempts if stats else None, stats.total_tokens if stats else None, error_type,
    )
    rt.metrics.record(request, resp.status, elapsed, error_type)
    return resp
