"""What every request goes through: the `core` middleware (request id, error
shape, in-flight count, request log, metrics) and the `on_prepare` hook (the
headers of every answer: request id, `Connection: close`, CORS).

The middleware is a single layer on purpose: every middleware layer costs a
coroutine frame per request, and these concerns share the same timing and
request id. The headers are set in the `on_response_prepare` hook because it
fires for every answer, a streamed one included, just before its head goes out.
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

from aiwfd import telemetry
from aiwfd.engine import CallStats
from aiwfd.errors import (
    NO_SUCH_PATH, HTTPError, InternalError, InvalidJSON, MethodNotAllowed, NotFound, PayloadTooLarge,
    RequestTimeout, Unavailable, UnsupportedMediaType, error_body,
)
from aiwfd.auth.clients import ANONYMOUS
from aiwfd.http.keys import CLIENT, RATE_HEADERS, REQUEST_ID, RUNTIME, STATS, ANSWER_ERROR, route_template
from aiwfd.http.protocol import CONTINUED
from aiwfd.http.runtime import Phase, Runtime

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
    """aiohttp's own 404/405/413… in our error shape (raised by aiohttp below our routes,
    e.g. a static file; the catch-all route answers unknown paths itself)."""
    cls = _AIOHTTP_ERRORS.get(e.status, InternalError)
    headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    message = None
    if cls is MethodNotAllowed and headers:
        message = f"method not allowed; use {headers['Allow']}"
    elif cls is NotFound:
        message = NO_SUCH_PATH
    return cls(message, headers=headers)


def http_error(e: BaseException, runtime: Runtime, request_id: str) -> HTTPError:
    """The error a request is answered with for an exception its handler raised:
    rendered as JSON by `core`, or as the `error` event of a stream whose 200
    is gone (aiwfd.http.stream). Raises again what must not be answered
    (a cancellation other than the shutdown timeout's). Call it from an
    `except` block: a bug is logged with its traceback."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, web.HTTPException):
        return from_aiohttp(e)
    if isinstance(e, asyncio.CancelledError):
        if runtime.phase is not Phase.ABORTING:
            raise e
        # The shutdown timeout passed (server.drain): answer instead of dropping the connection.
        task = asyncio.current_task()
        if task is not None and sys.version_info >= (3, 11):
            task.uncancel()
        return Unavailable("the server is shutting down; retry on another instance")
    logger.exception("internal error (request_id=%s)", request_id, extra={"request_id": request_id})
    return InternalError(f"internal error; the server log has the details under request id {request_id}")


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
    span = token = None
    if telemetry.TRACER is not None:
        span, token = _server_span(telemetry.TRACER, request)
    try:
        try:
            # An allowed CORS preflight is answered here, for any path (aiwfd.http.cors).
            cors = rt.snapshot.cors
            resp: web.StreamResponse | None = (
                cors.preflight(request) if cors is not None and request.method == "OPTIONS" else None)
            if resp is None:
                resp = await handler(request)
        except (Exception, asyncio.CancelledError) as e:
            err = http_error(e, rt, rid)
            resp, error_type = error_response(err, rid), err.type
    except BaseException:
        # Only a bug in the error path itself gets here: the span must not stay current or open.
        if span is not None:
            _end_server_span(span, token, 500, "internal_error")
        raise
    finally:
        rt.inflight_tasks.discard(task)
        if not rt.inflight_tasks:
            rt.idle.set()
    if error_type is None:
        # An answer that carries its error in the body (a stream's `error` event, an MCP error result).
        error_type = request.get(ANSWER_ERROR)
    stats: CallStats | None = request.get(STATS)
    elapsed = time.monotonic() - started
    client = request.get(CLIENT)
    trace_id = None
    if span is not None:
        trace_id = _end_server_span(span, token, resp.status, error_type)
    rt.request_log.write(
        request.method, request.path, elapsed, resp.status, rid,
        stats.attempts if stats else None, stats.total_tokens if stats else None, error_type,
        # Client names are config names or a JWT's client claim: no credential.
        client.name if client is not None and client is not ANONYMOUS else None,
        trace_id,
    )
    rt.metrics.record(request, resp.status, elapsed, error_type)
    return resp


def _server_span(tracer: Any, request: web.Request) -> tuple[Any, object]:
    """The SERVER span of a request (SPEC §11.2), current for the handler; an
    incoming `traceparent` continues its trace."""
    route = route_template(request)
    method = request.method
    attributes: dict[str, Any] = {"http.request.method": method, "url.path": request.path}
    if route is not None:
        attributes["http.route"] = route
    span = tracer.start_span(f"{method} {route}" if route else method, telemetry.SERVER, attributes,
                             remote=telemetry.extract(request.headers))
    return span, telemetry.attach(span)


def _end_server_span(span: Any, token: object, status: int, error_type: str | None) -> str | None:
    telemetry.detach(token)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_error(error_type or str(status))
    elif error_type:
        span.set_attribute("error.type", error_type)
    span.end()
    return telemetry.trace_id(span)


def on_prepare(runtime: Runtime) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The headers every answer gets, JSON or streamed (`app.on_response_prepare`
    fires for both, just before the head goes out): the request id, `Connection:
    close` while draining or when the body was never invited, CORS."""

    serving = Phase.SERVING  # it runs for every answer: the fewest lookups it can

    async def prepare(request: web.Request, resp: web.StreamResponse) -> None:
        h = resp.headers
        try:
            h["X-Request-ID"] = request[REQUEST_ID]
        except KeyError:  # aiohttp answered before the middleware ran (an Expect it refused)
            pass
        # Keep-alive connections end politely while draining; and one refused
        # before `100 Continue` cannot carry a next request (the client holds
        # its body back; CONTINUED is only ever False under an Expect header).
        # aiohttp has chosen the Connection header by now: set it too.
        if runtime.phase is not serving or ("Expect" in request.headers and request.get(CONTINUED) is False):
            resp.force_close()
            h["Connection"] = "close"
        rate = request.get(RATE_HEADERS)
        if rate:  # an agent call with request limits (aiwfd.http.quota)
            h.update(rate)
        # The policy current when the answer goes out (a reload may have changed it).
        cors = runtime.snapshot.cors
        if cors is not None:
            cors.apply(request, resp)

    return prepare
