"""What a model call can fail with, whatever carried it.

Each transport maps its own failures onto this tree in one place
(`openai_compatible.aiohttp_errors`, `sdk.sdk_errors`), as httpx maps
httpcore's; the engine classifies these and nothing below them.

    ProviderError
    ├── ProviderTimeout   no complete answer within the call's timeout
    ├── Unreachable       no connection, or it broke before the answer was complete
    ├── StatusError       an HTTP error status (.status, .retry_after in seconds)
    └── BadAnswer         an answer that is not a chat completion, or an error event in a stream
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

# A Retry-After beyond this is not honoured: the call backs off as usual.
MAX_RETRY_AFTER = 60.0


class ProviderError(Exception):
    """A model call failed; the message is for logs, never for clients."""


class ProviderTimeout(ProviderError):
    pass


class Unreachable(ProviderError):
    pass


class StatusError(ProviderError):
    def __init__(self, message: str, status: int, retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body


class BadAnswer(ProviderError):
    def __init__(self, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.body = body


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asked to wait (`retry-after-ms`, else `retry-after`), if sane.

    `headers` must look names up case-insensitively, as aiohttp's and httpx's do.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if 0 <= seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


def status_error(status: int, headers: Mapping[str, str], body: bytes) -> StatusError:
    """The error for an HTTP error answer, with the provider's own `error` object when it sent one."""
    try:
        data: Any = orjson.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace")
    err = data.get("error", data) if isinstance(data, dict) else data
    return StatusError(f"Error code: {status} - {data}"[:2000], status, retry_after(headers), err)
