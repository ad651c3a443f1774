"""The request log (one line per request, SPEC §3.2) and the daemon's own messages.

    2025-11-06T19:00:00Z POST /agent/greeter - 1.2s status=200 request_id=… attempts=1 tokens=40

Lines go straight to stderr (journald under systemd). The path is escaped so
that a client cannot forge a line, and bodies, keys and model output are
never written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

logger = logging.getLogger("aiwfd")


def go_duration(seconds: float) -> str:
    """A duration written the way Go prints one: 850µs, 850ms, 1.234s, 2m3.5s."""
    if seconds < 0.001:
        return f"{round(seconds * 1e6)}µs"
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{secs}"
    if m:
        return f"{m}m{secs}"
    return secs


_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f\\\"]")


def escape(text: str) -> str:
    """Control characters, spaces, quotes and backslashes as \\xNN."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Throttle:
    """Lets a line through at most once per `every` seconds: an outage that fails
    every call is one log line a minute, not one per call (a counter counts them all)."""

    __slots__ = ("every", "_last")

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


class _Clock:
    """The UTC timestamp of the current second, formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        t = time.time()
        s = int(t)
        if s != self._second:
            self._second = s
            self._text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s))
        return self._text


_clock = _Clock()


class RequestLog:
    """Writes one access-log line per request, text or JSON."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr

    def write(self, method: str, path: str, seconds: float, status: int, request_id: str,
              attempts: int | None = None, tokens: int | None = None, error: str | None = None,
              client: str | None = None, trace_id: str | None = None) -> None:
        if self.fmt == "json":
            doc: dict[str, Any] = {
                "time": _clock.now(), "method": method, "path": path,
                "duration": go_duration(seconds), "duration_ms": round(seconds * 1000, 3),
                "status": status, "request_id": request_id,
            }
            if client is not None:
                doc["client"] = client
            if attempts is not None:
                doc["attempts"] = attempts
                doc["tokens"] = tokens
            if error:
                doc["error"] = error
            if trace_id is not None:
                doc["trace_id"] = trace_id
            # json.dumps escapes control characters in the path by itself.
            line = json.dumps(doc, ensure_ascii=True)
        else:
            line = (f"{_clock.now()} {method} {escape(path)} - {go_duration(seconds)} "
                    f"status={status} request_id={request_id}")
            if client is not None:  # a token's claim: anything the issuer let the user choose
                line += f" client={escape(client)}"
            if attempts is not None:
                line += f" attempts={attempts} tokens={tokens}"
            if error:
                line += f" error={error}"
            if trace_id is not None:
                line += f" trace_id={trace_id}"
        try:
            self.stream.write(line + "\n")
        except (OSError, ValueError):  # stderr closed: never fail a request over a log line
            pass


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        msg = f"{ts} {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            doc["request_id"] = request_id
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True)


if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:  # subscriptable at run time only from Python 3.11
    _LoggerAdapter = logging.LoggerAdapter


class ProtocolErrorLogger(_LoggerAdapter):
    """aiohttp's connection logger, minus the request bytes its messages quote.

    aiohttp answers a malformed request (bad Content-Length, a control
    character in a header) itself and logs the parser's message, which
    quotes the offending bytes: an `X-API-Key` with a stray \x01 would put
    the key in the log. Those become one line naming the error class; any
    other exception keeps its traceback.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def _protocol_error(self, kw: dict[str, Any]) -> BaseException | None:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = kw.get("exc_info")
        if not isinstance(exc, BaseException):
            exc = sys.exc_info()[1]
        return exc if isinstance(exc, HttpProcessingError) else None

    def exception(self, msg: Any, *args: Any, **kw: Any) -> None:
        exc = self._protocol_error(kw)
        if exc is None:
            self.logger.exception(msg, *args, **kw)
        else:
            self.logger.warning("rejected a malformed HTTP request (%s)", type(exc).__name__)

    def debug(self, msg: Any, *args: Any, **kw: Any) -> None:
        exc = self._protocol_error(kw)
        if exc is None:
            self.logger.debug(msg, *args, **kw)
        else:
            self.logger.debug("rejected a malformed HTTP request (%s)", type(exc).__name__)


def setup(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
