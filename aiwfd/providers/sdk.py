"""Calls through the openai SDK (`AIWF_TRANSPORT=sdk`): the reference transport.

Imported only when that transport is chosen: the SDK's import builds ~650
pydantic models (~1 s here). The SDK sends the request and raises its own
errors; the answer is read raw, by the same strict readers as the aiohttp
path. `sdk_errors` is the one place the SDK's (and httpx's) failures become
the providers' errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator

import openai

from aiwfd.providers.base import ChatResult
from aiwfd.providers.completion import read_completion
from aiwfd.providers.endpoints import Endpoint
from aiwfd.providers.errors import BadAnswer, ProviderTimeout, StatusError, Unreachable, retry_after
from aiwfd.compat import timeout as _timeout
from aiwfd.providers.sse import StreamReader

try:  # the SDK moved to httpx2; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed SDK
    import httpx  # type: ignore[no-redef, import-not-found]


@contextlib.contextmanager
def sdk_errors(url: str) -> Iterator[None]:
    """The SDK's failures (and httpx's, while a streamed body is read), as the providers' errors."""
    try:
        yield
    except openai.APITimeoutError:  # before its base class, APIConnectionError
        raise ProviderTimeout(f"POST {url}: no answer in time") from None
    except openai.APIConnectionError as e:
        raise Unreachable(f"POST {url}: {e}") from None
    except openai.APIStatusError as e:
        raise StatusError(str(e)[:2000], e.status_code, retry_after(e.response.headers), e.body) from None
    except openai.APIError as e:
        raise BadAnswer(str(e)[:2000], e.body) from None
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise ProviderTimeout(f"POST {url}: no complete answer in time") from None
    except (httpx.TransportError, httpx.StreamError) as e:
        raise Unreachable(f"POST {url}: connection error: {e}") from None


class SDKCalls:
    """One provider's `AsyncOpenAI`, configured from the same Endpoint as the aiohttp transport."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.url = endpoint.url
        self.client = openai.AsyncOpenAI(
            api_key=endpoint.key or "unused",
            base_url=endpoint.base_url,
            organization=endpoint.organization,
            project=endpoint.project,
            timeout=timeout,
            max_retries=0,  # aiwfd retries itself, so that `attempts` is exact
        )
        # No key: the SDK insists on one, so its header is left out per call.
        self._extra_headers = None if endpoint.key else {"Authorization": openai.Omit()}

    async def complete(self, payload: dict[str, Any], timeout: float) -> ChatResult:
        with sdk_errors(self.url):
            raw = await self.client.chat.completions.with_raw_response.create(
                **payload, timeout=timeout, extra_headers=self._extra_headers
            )
            body = raw.content
        return read_completion(body)

    async def stream(self, body: dict[str, Any], timeout: float, reader: StreamReader) -> None:
        with sdk_errors(self.url):
            async with _timeout(timeout):
                async with self.client.chat.completions.with_streaming_response.create(
                    **body, timeout=timeout, extra_headers=self._extra_headers
                ) as raw:
                    async for chunk in raw.iter_bytes():
                        if await reader.feed(chunk):
                            return
        reader.eof()

    async def close(self) -> None:
        await self.client.close()
