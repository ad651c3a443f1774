"""Every error aiwfd raises, and the one place an HTTP error body is rendered.

    AiwfdError
    ├── ConfigError            the agents file is invalid (holds every Problem found)
    ├── StartupError           the daemon cannot start: invalid environment (key not set, env file missing)
    │   ├── RetryableStartupError  … for a reason that may pass on retry (port in use, cannot write artifacts)
    │   └── UsageError             … because a flag or setting variable is malformed or out of range
    └── HTTPError              answered to a client; knows its status and `type`
        ├── InvalidJSON            400 invalid_json
        ├── InvalidRequest         400 invalid_request
        ├── Unauthorized           401 unauthorized
        ├── Forbidden              403 forbidden
        ├── NotFound               404 not_found
        ├── MethodNotAllowed       405 method_not_allowed
        ├── RequestTimeout         408 request_timeout
        ├── Conflict               409 conflict
        ├── PayloadTooLarge        413 payload_too_large
        ├── URITooLong             414 uri_too_long
        ├── UnsupportedMediaType   415 unsupported_media_type
        ├── HeadersTooLarge        431 headers_too_large
        ├── InvalidInput           422 invalid_input
        ├── IdempotencyKeyReused   422 idempotency_key_reused
        ├── RateLimited            429 rate_limited
        ├── UpstreamError          502 upstream_error
        ├── InvalidOutput          502 invalid_output
        ├── Unavailable            503 unavailable
        ├── UpstreamTimeout        504 upstream_timeout
        └── InternalError          500 internal_error

Deep code raises; `cli.py` turns ConfigError/StartupError into an exit code (the
kind of StartupError decides which: SPEC §5) and
the HTTP middleware turns HTTPError into a response via `error_body`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence


class AiwfdError(Exception):
    """Base of every error aiwfd raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an agents file, located as precisely as we can."""

    file: str
    line: int | None
    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.path}:" if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}:{key} {self.message}{hint}"


class ConfigError(AiwfdError):
    """The agents file (or a file it imports) is invalid; `problems` lists all."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class StartupError(AiwfdError):
    """The daemon cannot start; the message is the one line the user sees.

    This kind is final: the same environment fails the same way, so a
    supervisor must not restart into it (exit 1).
    """


class RetryableStartupError(StartupError):
    """The daemon cannot start now, but may on retry: the port is taken, the
    address is not up yet, the artifacts directory is not writable (exit 3)."""


class UsageError(StartupError):
    """A flag or setting variable is malformed or out of range (exit 2).

    A StartupError too: whatever catches "cannot start" catches it, and the
    command line gives it its own code.
    """


class HTTPError(AiwfdError):
    """An error answered to the client with a fixed status and `type`."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[Any] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = list(details)
        self.headers = dict(headers or {})
        super().__init__(self.message)


class InvalidJSON(HTTPError):
    status, type, default_message = 400, "invalid_json", "request body is not a JSON object"


class InvalidRequest(HTTPError):
    status, type, default_message = 400, "invalid_request", "malformed HTTP request"


class Unauthorized(HTTPError):
    status, type, default_message = 401, "unauthorized", "missing or invalid API key"


class Forbidden(HTTPError):
    status, type, default_message = 403, "forbidden", "this client may not call this agent"


class NotFound(HTTPError):
    status, type, default_message = 404, "not_found", "not found"


# The 404 of a path no route has: the router's, the catch-all route's and the parser's.
NO_SUCH_PATH = "no such path; agents are at POST /agent/{name}"


class MethodNotAllowed(HTTPError):
    status, type, default_message = 405, "method_not_allowed", "method not allowed"


class RequestTimeout(HTTPError):
    status, type, default_message = 408, "request_timeout", "the request body did not arrive in time"


class Conflict(HTTPError):
    status, type, default_message = 409, "conflict", "the request conflicts with one still running"


class PayloadTooLarge(HTTPError):
    status, type, default_message = 413, "payload_too_large", "request body too large"


class URITooLong(HTTPError):
    status, type, default_message = 414, "uri_too_long", "the request line is too long"


class HeadersTooLarge(HTTPError):
    status, type, default_message = 431, "headers_too_large", "the request headers are too large"


class UnsupportedMediaType(HTTPError):
    status, type, default_message = (
        415,
        "unsupported_media_type",
        "Content-Type must be application/json",
    )


class InvalidInput(HTTPError):
    status, type, default_message = 422, "invalid_input", "request body does not match the input type"


class IdempotencyKeyReused(HTTPError):
    status, type, default_message = (
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request body",
    )


class RateLimited(HTTPError):
    status, type, default_message = 429, "rate_limited", "the model provider is rate limiting requests"


class UpstreamError(HTTPError):
    status, type, default_message = 502, "upstream_error", "the model provider returned an error"


class InvalidOutput(HTTPError):
    status, type, default_message = (
        502,
        "invalid_output",
        "the model's answer did not match the output type",
    )


class Unavailable(HTTPError):
    status, type, default_message = 503, "unavailable", "service unavailable"


class UpstreamTimeout(HTTPError):
    status, type, default_message = 504, "upstream_timeout", "the model provider timed out"


class InternalError(HTTPError):
    status, type, default_message = 500, "internal_error", "internal error"


def error_body(err: HTTPError, request_id: str) -> dict[str, Any]:
    """The one JSON shape of every error answered to a client (SPEC §3.1)."""
    return {
        "error": {"type": err.type, "message": err.message, "details": err.details},
        "request_id": request_id,
    }
