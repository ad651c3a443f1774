"""Model providers: every network provider is configured through the `openai` SDK.

One `AsyncOpenAI` per provider holds the key, base URL, organization/project
headers and timeout, for the life of a config snapshot, and every failure is
raised as the SDK's exception class. The non-streaming call goes either
through the SDK (`transport="sdk"`) or as one POST on the process's shared
aiohttp session built from that client's resolved settings
(`transport="aiohttp"`, the default: the SDK's per-call machinery costs more
CPU than the rest of a request; BENCHMARKS.md has the numbers).

The streaming call (`stream`, SPEC §7.4) sends `stream: true` with
`stream_options.include_usage` by the same transport: over the shared session,
or through the SDK's `with_streaming_response` (the SDK builds and sends the
request and raises its status errors; the body is read as raw bytes). Either
way the server-sent events are read by one strict reader (`StreamReader`), so
both transports answer the same `ChatResult` and raise the same SDK
exceptions, and the per-chunk cost is an orjson parse rather than a pydantic
model per chunk.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Mapping, Protocol

import aiohttp
import openai
import orjson

try:  # the SDK moved to httpx2; older releases use httpx
    import httpx2 as _httpx  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installed SDK
    import httpx as _httpx  # type: ignore[no-redef]

from aiwfd.spec.config import Provider
from aiwfd.errors import StartupError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover
    from async_timeout import timeout as _timeout

Transport = Literal["aiohttp", "sdk"]

DEFAULT_TIMEOUT = 60.0
PUBLIC_BASE_URLS = {"openai": "https://api.openai.com/v1", "grok": "https://api.x.ai/v1"}
KEY_VARS = {"openai": "OPENAI_API_KEY", "grok": "GROK_API_KEY"}
BASE_URL_VARS = {"openai": "OPENAI_BASE_URL", "grok": "GROK_BASE_URL"}
# The SDK's telemetry headers describe the SDK's own call path; a direct POST
# sends the identifying ones only.
_DROPPED_HEADERS = ("x-stainless-",)


@dataclass(frozen=True)
class ChatResult:
    content: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str | None
    finish_reason: str | None
    refusal: str | None = None


OnDelta = Callable[[str], Awaitable[None]]


class ModelClient(Protocol):
    name: str

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult: ...

    async def stream(self, payload: dict[str, Any], timeout: float, agent: Any, on_delta: OnDelta) -> ChatResult:
        """The same call streamed: `on_delta` gets each piece of the answer's text as it arrives."""
        ...

    async def close(self) -> None: ...


def key_var(provider: Provider) -> str | None:
    """The environment variable holding the provider's key (None: no key)."""
    if provider.kind in KEY_VARS:
        return KEY_VARS[provider.kind]
    return provider.api_key_env


def resolved(provider: Provider, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(base_url, api_key) from the config and the environment; raises when the key is missing."""
    var = key_var(provider)
    key = env.get(var) if var else None
    if var and not key:
        raise StartupError(f"{var} not set (needed by provider {provider.name!r})")
    if provider.kind in BASE_URL_VARS:
        base_url = env.get(BASE_URL_VARS[provider.kind]) or PUBLIC_BASE_URLS[provider.kind]
    else:
        assert provider.base_url
        base_url = provider.base_url
    return base_url, key


def signature(provider: Provider, env: Mapping[str, str], session: aiohttp.ClientSession | None,
              transport: Transport) -> tuple[Any, ...]:
    """What an OpenAICompatible client of `provider` would be built from (raises like `resolved`)."""
    return (provider, *resolved(provider, env), id(session), transport)


class _SessionOnly(_httpx.AsyncBaseTransport):
    """The SDK client's transport when calls go over the shared aiohttp session."""

    async def handle_async_request(self, request: Any) -> Any:
        raise RuntimeError(f"{request.method} {request.url}: with AIWF_TRANSPORT=aiohttp, aiwfd sends "
                           "model calls over its own aiohttp session, not through the SDK client")


class OpenAICompatible:
    """A provider speaking OpenAI's chat-completions API."""

    def __init__(self, provider: Provider, env: Mapping[str, str], session: aiohttp.ClientSession | None,
                 transport: Transport = "aiohttp") -> None:
        # Everything the client is built from: a reload whose provider has the
        # same signature keeps this client (and its pooled connections).
        self.signature = signature(provider, env, session, transport)
        _, base_url, key, _, _ = self.signature
        self.name = provider.name
        self.transport: Transport = transport if session is not None else "sdk"
        self.client = openai.AsyncOpenAI(
            api_key=key or "unused",
            base_url=base_url,
            organization=provider.organization,
            project=provider.project,
            timeout=provider.timeout or DEFAULT_TIMEOUT,
            max_retries=0,  # aiwfd retries itself, so that `attempts` is exact
            # Over the shared session the SDK client only resolves settings and
            # never sends: give it no network stack of its own. Its default one
            # builds an SSL context with the CA bundle and, the first time,
            # imports httpcore and trio: ~130 ms of start-up, 30-50 ms a reload.
            http_client=None if self.transport == "sdk" else openai.DefaultAsyncHttpxClient(
                transport=_SessionOnly()),
        )
        self._session = session
        self._url = str(self.client.base_url).rstrip("/") + "/chat/completions"
        headers = {k: v for k, v in self.client.default_headers.items()
                   if isinstance(v, str) and not k.lower().startswith(_DROPPED_HEADERS)}
        if key:
            headers.update(self.client.auth_headers)
        else:
            headers.pop("Authorization", None)
        self._headers = headers
        self._no_key_headers = None if key else {"Authorization": openai.Omit()}

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult:
        if self.transport == "sdk":
            return await self._complete_sdk(payload, timeout)
        return await self._complete_aiohttp(payload, timeout)

    async def _complete_sdk(self, payload: dict[str, Any], timeout: float) -> ChatResult:
        # The raw response, read by the same strict reader as the aiohttp path:
        # the SDK's parsed models keep whatever types the provider sent, and a
        # token count of "abc" must be an unreadable answer (502), not a 500.
        raw = await self.client.chat.completions.with_raw_response.create(
            **payload, timeout=timeout, extra_headers=self._no_key_headers
        )
        return read_completion(self._url, raw.status_code, raw.content)

    async def _complete_aiohttp(self, payload: dict[str, Any], timeout: float) -> ChatResult:
        assert self._session is not None
        try:
            async with self._session.post(
                self._url, data=orjson.dumps(payload), headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                body = await r.read()
                status = r.status
                if status >= 400:
                    raise status_error(self._url, status, dict(r.headers), body)
        except asyncio.TimeoutError:
            raise openai.APITimeoutError(request=_httpx.Request("POST", self._url)) from None
        except aiohttp.ClientError as e:
            raise openai.APIConnectionError(message=f"Connection error: {e}",
                                            request=_httpx.Request("POST", self._url)) from None
        return read_completion(self._url, status, body)

    async def stream(self, payload: dict[str, Any], timeout: float, agent: Any, on_delta: OnDelta) -> ChatResult:
        """`payload` streamed; `timeout` bounds the whole answer (the time `on_delta` takes included).

        An exception raised by `on_delta` (the client went away) propagates as
        it is and closes the upstream request; every provider failure is one of
        the SDK's exception classes.
        """
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        reader = StreamReader(self._url, on_delta)
        try:
            async with _timeout(timeout):
                if self.transport == "sdk":
                    await self._stream_sdk(body, timeout, reader)
                else:
                    await self._stream_aiohttp(body, timeout, reader)
        except _Downstream as e:
            raise e.error from None
        except asyncio.TimeoutError:
            raise openai.APITimeoutError(request=_httpx.Request("POST", self._url)) from None
        except aiohttp.ClientError as e:
            raise openai.APIConnectionError(message=f"Connection error: {e}",
                                            request=_httpx.Request("POST", self._url)) from None
        except _httpx.TimeoutException:
            raise openai.APITimeoutError(request=_httpx.Request("POST", self._url)) from None
        except (_httpx.TransportError, _httpx.StreamError) as e:
            raise openai.APIConnectionError(message=f"Connection error: {e}",
                                            request=_httpx.Request("POST", self._url)) from None
        return reader.result()

    async def _stream_aiohttp(self, body: dict[str, Any], timeout: float, reader: "StreamReader") -> None:
        assert self._session is not None
        headers = {**self._headers, "Accept": "text/event-stream"}
        async with self._session.post(
            self._url, data=orjson.dumps(body), headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            if r.status >= 400:
                raise status_error(self._url, r.status, dict(r.headers), await r.read())
            reader.status = r.status
            async for chunk in r.content.iter_any():
                if await reader.feed(chunk):
                    await _drain(r)
                    return
        reader.eof()

    async def _stream_sdk(self, body: dict[str, Any], timeout: float, reader: "StreamReader") -> None:
        # The SDK sends the request and raises its status errors; the events
        # are read raw, by the same reader as the aiohttp path.
        async with self.client.chat.completions.with_streaming_response.create(
            **body, timeout=timeout, extra_headers=self._no_key_headers
        ) as raw:
            reader.status = raw.status_code
            async for chunk in raw.iter_bytes():
                if await reader.feed(chunk):
                    return
        reader.eof()

    async def close(self) -> None:
        await self.client.close()


async def _drain(r: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` (the chunked body's end), so that the
    connection goes back to the pool instead of being closed."""
    try:
        async with _timeout(1.0):
            await r.content.read()
    except (asyncio.TimeoutError, aiohttp.ClientError):
        pass  # the connection is closed instead of reused; the answer is complete


class _Downstream(Exception):
    """`on_delta` failed: not a provider failure, re-raised as the original."""

    def __init__(self, error: Exception) -> None:
        self.error = error


_LINE_END = re.compile(rb"\r\n|\r|\n")


class StreamReader:
    """Reads a chat-completions event stream (`chat.completion.chunk` events).

    Server-sent events as the WHATWG spec reads them (LF, CRLF or CR line
    ends, multi-line `data`, comments), each `data` one chunk parsed as
    strictly as `read_completion` reads a whole answer: an unreadable chunk is
    the SDK's APIResponseValidationError, an `error` event its APIError.
    """

    def __init__(self, url: str, on_delta: OnDelta) -> None:
        self.url = url
        self.on_delta = on_delta
        self.status = 200
        self._pending = b""
        self._data: list[bytes] = []
        self._event = b""
        self._content: list[str] = []
        self._refusal: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.done = False

    async def feed(self, chunk: bytes) -> bool:
        """Read `chunk`; True once the stream's `[DONE]` arrived."""
        buf = self._pending + chunk
        start = 0
        for m in _LINE_END.finditer(buf):
            if m.group() == b"\r" and m.end() == len(buf):
                break  # maybe the first half of a CRLF: wait for the next chunk
            line = buf[start:m.start()]
            start = m.end()
            if not line:
                if self._data:
                    data, event = b"\n".join(self._data), self._event
                    self._data, self._event = [], b""
                    if await self._dispatch(data, event):
                        self.done = True
                        return True
                continue
            if line[:1] == b":":
                continue  # a comment (keep-alive)
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
        self._pending = buf[start:]
        if len(self._pending) > 16 * 1024 * 1024:
            self._invalid(b"an event stream line over 16 MiB")
        return False

    def eof(self) -> None:
        """The body ended: fine after `[DONE]` or a finish reason, else the stream was cut."""
        # An event without its closing blank line is dropped, as the SSE spec says.
        if not self.done and self.finish_reason is None:
            raise openai.APIConnectionError(message="the event stream ended before the answer was complete",
                                            request=_httpx.Request("POST", self.url))

    async def _dispatch(self, data: bytes, event: bytes) -> bool:
        if data == b"[DONE]":
            return True
        try:
            doc = orjson.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            if doc.get("error") is not None or event == b"error":
                err = doc.get("error", doc)
                message = err.get("message") if isinstance(err, dict) else None
                raise openai.APIError(message=str(message or "the provider sent an error event")[:500],
                                      request=_httpx.Request("POST", self.url), body=err)
            choices = doc.get("choices")
            text = None
            if choices:
                choice = choices[0]
                delta = choice.get("delta") or {}
                text = _text(delta.get("content"))
                refusal = _text(delta.get("refusal"))
                if refusal:
                    self._refusal.append(refusal)
                reason = choice.get("finish_reason")
                if reason is not None:
                    self.finish_reason = str(reason)
            usage = doc.get("usage")
            if usage:
                self.prompt_tokens = _count(usage.get("prompt_tokens"))
                self.completion_tokens = _count(usage.get("completion_tokens"))
            model = doc.get("model")
            if isinstance(model, str):
                self.model = model
        except openai.APIError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError):
            self._invalid(data)
        if text:
            self._content.append(text)
            try:
                await self.on_delta(text)
            except Exception as e:
                raise _Downstream(e) from e
        return False

    def _invalid(self, data: bytes) -> None:
        raise openai.APIResponseValidationError(
            response=_httpx.Response(self.status, content=data[:2000], request=_httpx.Request("POST", self.url)),
            body=data[:2000], message="the provider's event stream is not a chat completion stream",
        ) from None

    def result(self) -> ChatResult:
        return ChatResult(
            content="".join(self._content) if self._content else None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            model=self.model,
            finish_reason=self.finish_reason,
            refusal="".join(self._refusal) or None,
        )


_MAX_COUNT = 2**53 - 1


def _count(value: Any) -> int:
    """A token count: absent is 0; anything but a sane non-negative integer is unreadable."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"token count {value!r:.40} is not a non-negative integer")
    return value


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("message content is not a string")


def read_completion(url: str, status: int, body: bytes) -> ChatResult:
    """A chat completion's answer, or the SDK's APIResponseValidationError when it is not one."""
    try:
        doc = orjson.loads(body)
        choice = doc["choices"][0] if doc.get("choices") else None
        message = choice["message"] if choice else {}
        usage = doc.get("usage") or {}
        finish_reason = choice.get("finish_reason") if choice else None
        refusal = message.get("refusal")
        model = doc.get("model")
        return ChatResult(
            content=_text(message.get("content")),
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            model=model if isinstance(model, str) else None,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            refusal=str(refusal) if refusal else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError):
        raise openai.APIResponseValidationError(
            response=_httpx.Response(status, content=body, request=_httpx.Request("POST", url)),
            body=body, message="the provider's answer is not a chat completion",
        ) from None


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(url: str, status: int, headers: dict[str, str], body: bytes) -> openai.APIStatusError:
    """The exception the SDK raises for this status (the same classes, the same fields)."""
    try:
        data: Any = orjson.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace")
    err = data.get("error", data) if isinstance(data, dict) else data
    cls = _STATUS_ERRORS.get(status) or (openai.InternalServerError if status >= 500 else openai.APIStatusError)
    response = _httpx.Response(status, headers=headers, content=body, request=_httpx.Request("POST", url))
    return cls(f"Error code: {status} - {data}", response=response, body=err)


def transport_from_env(env: Mapping[str, str] = os.environ) -> Transport:
    value = env.get("AIWF_TRANSPORT", "aiohttp")
    return "sdk" if value == "sdk" else "aiohttp"
