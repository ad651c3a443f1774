"""A provider speaking OpenAI's chat-completions API, over the process's shared
aiohttp session (`AIWF_TRANSPORT=aiohttp`, the default: the SDK's per-call
machinery costs more CPU than the rest of a request; BENCHMARKS.md) or through
the openai SDK (`AIWF_TRANSPORT=sdk`, aiwfd.providers.sdk, imported only then).

Both send the same request (aiwfd.providers.endpoints resolves it as the SDK
would), read the answer with the same strict readers (read_completion,
StreamReader) and fail with aiwfd.providers.errors; each maps its transport's
own failures in one place (`aiohttp_errors` here, `sdk_errors` there).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import aiohttp
import orjson
import yarl

from aiwfd import telemetry
from aiwfd.providers.base import DEFAULT_TIMEOUT, ChatResult, OnDelta, Transport
from aiwfd.providers.completion import read_completion
from aiwfd.providers.endpoints import Endpoint, signature
from aiwfd.providers.errors import ProviderTimeout, Unreachable, status_error
from aiwfd.providers.sse import Downstream, StreamReader
from aiwfd.compat import timeout as _timeout
from aiwfd.spec.config import Provider

if TYPE_CHECKING:
    from aiwfd.providers.sdk import SDKCalls


@contextlib.contextmanager
def aiohttp_errors(url: str) -> Iterator[None]:
    """aiohttp's and asyncio's failures of a call to `url`, as the providers' errors."""
    try:
        yield
    except asyncio.TimeoutError:
        raise ProviderTimeout(f"POST {url}: no complete answer in time") from None
    except aiohttp.ClientError as e:
        raise Unreachable(f"POST {url}: connection error: {e}") from None


class OpenAICompatible:
    """One provider's client, for the life of the config snapshots whose signature it has."""

    def __init__(self, provider: Provider, env: Mapping[str, str], session: aiohttp.ClientSession | None,
                 transport: Transport = "aiohttp") -> None:
        # Everything the client is built from: a reload whose provider has the
        # same signature keeps this client (and its pooled connections).
        self.signature = signature(provider, env, session, transport)
        endpoint: Endpoint = self.signature[0]
        self.endpoint = endpoint
        self.name = provider.name
        self.transport: Transport = transport if session is not None else "sdk"
        self.closed = False
        self._session = session
        self._url = endpoint.url
        # Parsed once, by the parser aiohttp sends with: a base URL it cannot
        # use ("http://[::1") fails the start or the reload, not every call.
        self._target = yarl.URL(self._url)
        self._headers = endpoint.headers()
        self._stream_headers = {**self._headers, "Accept": "text/event-stream"}
        self.sdk: SDKCalls | None = None
        if self.transport == "sdk":
            from aiwfd.providers.sdk import SDKCalls

            self.sdk = SDKCalls(endpoint, provider.timeout or DEFAULT_TIMEOUT)

    @property
    def address(self) -> tuple[str | None, int | None]:
        """The provider's host and port (traces: server.address, server.port)."""
        return self._target.host, self._target.port

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult:
        if self.sdk is not None:
            return await self.sdk.complete(payload, timeout)
        assert self._session is not None
        headers = self._headers if telemetry.TRACER is None else telemetry.inject(dict(self._headers))
        with aiohttp_errors(self._url):
            async with self._session.post(
                self._target, data=orjson.dumps(payload), headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                body = await r.read()
                if r.status >= 400:
                    raise status_error(r.status, r.headers, body)
        return read_completion(body)

    async def stream(self, payload: dict[str, Any], timeout: float, agent: Any, on_delta: OnDelta) -> ChatResult:
        """`payload` streamed; `timeout` bounds the whole answer (the time `on_delta` takes included).

        An exception raised by `on_delta` (the client went away) propagates as
        it is and closes the upstream request.
        """
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        reader = StreamReader(self._url, on_delta)
        try:
            if self.sdk is not None:
                await self.sdk.stream(body, timeout, reader)
            else:
                with aiohttp_errors(self._url):
                    async with _timeout(timeout):
                        await self._stream_aiohttp(body, timeout, reader)
        except Downstream as e:
            raise e.error from None
        return reader.result()

    async def _stream_aiohttp(self, body: dict[str, Any], timeout: float, reader: StreamReader) -> None:
        assert self._session is not None
        headers = self._stream_headers if telemetry.TRACER is None else telemetry.inject(dict(self._stream_headers))
        async with self._session.post(
            self._target, data=orjson.dumps(body), headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            if r.status >= 400:
                raise status_error(r.status, r.headers, await r.read())
            async for chunk in r.content.iter_any():
                if await reader.feed(chunk):
                    await _drain(r)
                    return
        reader.eof()

    async def close(self) -> None:
        self.closed = True
        if self.sdk is not None:
            await self.sdk.close()


async def _drain(r: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` (the chunked body's end), so that the
    connection goes back to the pool instead of being closed."""
    try:
        async with _timeout(1.0):
            await r.content.read()
    except (asyncio.TimeoutError, aiohttp.ClientError):
        pass  # the connection is closed instead of reused; the answer is complete
