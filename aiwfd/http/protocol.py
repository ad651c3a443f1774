"""One HTTP connection: aiohttp's RequestHandler with a header timeout and JSON parser errors.

Two things aiohttp's protocol does not do, and a daemon facing clients must:

* **A request head has a deadline** (`--header-timeout`, SPEC §3.1). aiohttp
  only closes an idle keep-alive connection; a client that sends its headers a
  byte a second, or opens a connection and sends nothing, keeps a file
  descriptor for as long as it likes, and a few hundred of them exhaust the
  process's descriptors (accept() fails with EMFILE for everyone). The timer
  starts when the connection opens, and again at the first byte of each next
  request; it is cancelled when the parser has the whole head.
* **What the parser rejects is answered like every other error**: the JSON
  shape of SPEC §3.1, the right status (431, 413, 414, 405, 404), an
  `X-Request-ID`, a request-log line, and nothing quoted back (aiohttp's
  text/plain page quotes the offending bytes: an `X-API-Key` with a stray NUL
  was echoed whole).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod, BadStatusLine, ContentLengthError, HttpProcessingError, InvalidHeader, InvalidURLError,
    LineTooLong, TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from aiwfd.errors import (
    NO_SUCH_PATH, HeadersTooLarge, HTTPError, InternalError, InvalidRequest, MethodNotAllowed, NotFound,
    PayloadTooLarge, RequestTimeout, URITooLong, error_body,
)

logger = logging.getLogger("aiwfd")

# A request's flag (aiwfd.http.views.send_continue): False while it expects
# `100 Continue` and has not been sent one, True once sent.
CONTINUED: web.RequestKey[bool] = web.RequestKey("aiwfd.continued", bool)
# Called once per request the protocol answers itself: (status, request id, error type).
Report = Callable[[int, str, str], None]
NewId = Callable[[], str]

# The methods routes answer: the `Allow` of a method the parser rejects, whose
# path is not known (OPTIONS is only a CORS preflight, not a method to offer).
ALLOW = "GET, HEAD, POST"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parser_error(exc: HttpProcessingError, head: bytes, line_end: int | None, max_line: int) -> HTTPError:
    """aiohttp's parser exceptions as aiwfd's errors, in this one place.

    `head` is the start of the rejected request as received, `line_end` the
    offset of its first LF (None: not received yet); the answers never quote
    either. The class decides where it can; otherwise only the parser's fixed
    reason (the text before its first colon) is read, never the request bytes
    it quotes after it, so a header cannot steer the mapping.
    """
    text = exc.message if isinstance(exc.message, str) else ""
    reason = text.split(":", 1)[0].lower()
    if isinstance(exc, LineTooLong):
        if line_end is None or line_end > max_line:
            return URITooLong("the request line is over 8 KiB")
        return HeadersTooLarge("a request header line is over 8 KiB")
    if isinstance(exc, BadHttpMethod):
        method = head.split(b" ", 1)[0]
        if b" " in head and _TOKEN.fullmatch(method):
            return MethodNotAllowed(f"method not allowed; use {ALLOW}", headers={"Allow": ALLOW})
        return InvalidRequest("this is not an HTTP/1.x request" + (" (TLS sent to a plain HTTP port?)"
                                                                  if head[:1] == b"\x16" else ""))
    if isinstance(exc, InvalidURLError):
        return NotFound(NO_SUCH_PATH)
    if isinstance(exc, (TransferEncodingError, ContentLengthError)):
        return InvalidRequest("malformed chunked body or Content-Length")
    if isinstance(exc, BadStatusLine):
        return InvalidRequest("malformed request line; expected METHOD /path HTTP/1.1 and CRLF line ends")
    if isinstance(exc, InvalidHeader):
        return InvalidRequest("malformed request header (a control character, or an invalid name)")
    if reason.startswith("too many headers"):
        return HeadersTooLarge("too many request headers")
    if reason.startswith("content-length overflow"):
        return PayloadTooLarge("the declared Content-Length is over the limit")
    if reason.startswith("missing 'host'"):
        return InvalidRequest("an HTTP/1.1 request needs a Host header")
    if "content-length" in reason:
        return InvalidRequest("malformed Content-Length header")
    if "transfer-encoding" in reason or "chunk" in reason:
        return InvalidRequest("malformed Transfer-Encoding or chunked body")
    if "header" in reason:
        return InvalidRequest("malformed request header (a control character, or an invalid name)")
    return InvalidRequest("malformed HTTP request")


def raw_response(err: HTTPError, request_id: str) -> bytes:
    """An error as bytes for the wire, for a connection with no request to answer through."""
    body = orjson.dumps(error_body(err, request_id))
    return (f"HTTP/1.1 {err.status} {err.type.replace('_', ' ').title()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-ID: {request_id}\r\nConnection: close\r\n\r\n").encode() + body


class Connection(RequestHandler):
    __slots__ = ("_header_timeout", "_new_id", "_report", "_head_timer", "_heads_seen",
                 "_head", "_head_len", "_line_end")

    def __init__(self, manager: web.Server, *, header_timeout: float, new_id: NewId, report: Report,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._new_id = new_id
        self._report = report
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_seen = 0
        # The first bytes of the head being received, its length so far and
        # where its request line ends: what parser_error needs to tell 405
        # from 400, and 414 from 431.
        self._head = b""
        self._head_len = 0
        self._line_end: int | None = None

    # ------------------------------------------------------------ header timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._reset_head()
        self._arm_head_timer()

    def _reset_head(self) -> None:
        self._head = b""
        self._head_len = 0
        self._line_end = None

    def _arm_head_timer(self) -> None:
        self._heads_seen = self._request_count
        if self._header_timeout > 0:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_expired)

    def _track(self, data: bytes) -> None:
        if self._line_end is None:
            if len(self._head) < 64:
                self._head += data[:64]
            i = data.find(b"\n")
            if i >= 0:
                self._line_end = self._head_len + i
            self._head_len += len(data)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:  # a head is being received against the clock
            self._track(data)
            super().data_received(data)
            if self._request_count != self._heads_seen:
                self._head_timer.cancel()
                self._head_timer = None
            return
        waiter = self._waiter
        if waiter is None or waiter.done() or self._messages:
            # A handler runs, an answer is being written, or aiohttp lingers
            # over a body the handler left unread: these bytes are not (yet) a
            # head to time. (Bytes of a pipelined head arriving now are
            # classified, if malformed, without their own first bytes.)
            queued = len(self._messages)
            super().data_received(data)
            self._fail_running_body(queued)
            return
        # start() is idle: the first bytes of the next request on a kept-alive connection.
        self._reset_head()
        self._track(data)
        seen = self._request_count
        super().data_received(data)
        if self._request_count == seen and not self._force_close and self.transport is not None:
            self._arm_head_timer()
            # aiohttp's keep-alive timer must not cut a head that has begun
            # before the header timeout gives it its full time.
            self._next_keepalive_close_time = max(self._next_keepalive_close_time,
                                                  self._loop.time() + self._header_timeout)

    def _fail_running_body(self, queued: int) -> None:
        """A body that turned out malformed in a later packet fails its reader at once.

        aiohttp queues the parser's error as the next message and leaves the
        running handler's body waiting for bytes that will never come: it would
        end in a 408 after --body-timeout, and the queued error would be a
        second answer. The body's reader gets the error instead (a 400 from
        aiwfd.http.body), and the connection closes once it is answered.
        """
        request = self._current_request
        if request is None or len(self._messages) <= queued or request.content.is_eof():
            return
        message, _payload = self._messages[-1]
        if isinstance(message, _ErrInfo):
            self._messages.pop()
            request.content.set_exception(RequestPayloadError("malformed request body"))
            self.close()

    def _head_expired(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if (self._request_count != self._heads_seen or self.transport is None
                or waiter is None or waiter.done()):
            return  # the head arrived, or start() is not waiting for one (nothing to interrupt)
        if self._head:
            # Part of a head arrived: say why the connection ends.
            rid = self._new_id()
            err = RequestTimeout(f"the request head did not arrive within {self._header_timeout:g}s")
            self.transport.write(raw_response(err, rid))
            self._report(err.status, rid, err.type)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        if request.get(CONTINUED) is False and request.content.total_bytes == 0 \
                and not request.content.is_eof():
            # Refused before `100 Continue` and the client held its body back:
            # aiohttp's lingering read would wait 10 s for it. Nothing is unread
            # in the socket, so close now (the answer is flushed first). A client
            # that sent its body anyway gets the lingering read, which lets it
            # finish sending and read the answer.
            self.force_close()
        return answered

    # ------------------------------------------------------------ errors

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Answer what the parser rejected (or a bug that escaped the app) as JSON."""
        rid = self._new_id()
        if isinstance(exc, HttpProcessingError):
            err = parser_error(exc, self._head, self._line_end, self.max_line_size)
            logger.debug("rejected a malformed HTTP request (%s, request_id=%s)", type(exc).__name__, rid)
        else:
            logger.error("internal error (request_id=%s)", rid, exc_info=exc, extra={"request_id": rid})
            err = InternalError(f"internal error; the server log has the details under request id {rid}")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        resp = web.Response(body=orjson.dumps(error_body(err, rid)), status=err.status,
                            content_type="application/json", headers={"X-Request-ID": rid, **err.headers})
        resp.force_close()
        self._report(err.status, rid, err.type)
        return resp


class ConnectionFactory:
    """What the listener calls for each accepted socket: a `Connection` of `server`."""

    def __init__(self, server: web.Server, *, header_timeout: float, new_id: NewId, report: Report) -> None:
        self._server = server
        self._header_timeout = header_timeout
        self._new_id = new_id
        self._report = report
        # The handler arguments the runner was given (keep-alive timeout, no
        # auto-decompression): aiohttp keeps them on the server.
        self._kwargs: dict[str, Any] = dict(server._kwargs)

    def __call__(self) -> Connection:
        return Connection(self._server, header_timeout=self._header_timeout, new_id=self._new_id,
                          report=self._report, loop=asyncio.get_running_loop(), **self._kwargs)
