"""Model providers: every network provider is configured through the `openai` SDK.

One `AsyncOpenAI` per provider holds the key, base URL, organization/project
headers and timeout, for the life of a config snapshot, and every failure is
raised as the SDK's exception class. The non-streaming call goes either
through the SDK (`transport="sdk"`) or as one POST on the process's shared
aiohttp session built from that client's resolved settings
(`transport="aiohttp"`, the default: the SDK's per-call machinery costs more
CPU than the rest of a request; BENCHMARKS.md has the numbers).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol

import aiohttp
import openai
import orjson

try:  # the SDK moved to httpx2; older releases use httpx
    import httpx2 as _httpx  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installed SDK
    import httpx as _httpx  # type: ignore[no-redef]

from aiwfd.config import Provider
from aiwfd.errors import StartupError

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


class ModelClient(Protocol):
    name: str

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult: ...

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


class OpenAICompatible:
    """A provider speaking OpenAI's chat-completions API."""

    def __init__(self, provider: Provider, env: Mapping[str, str], session: aiohttp.ClientSession | None,
                 transport: Transport = "aiohttp") -> None:
        base_url, key = resolved(provider, env)
        self.name = provider.name
        self.transport: Transport = transport if session is not None else "sdk"
        self.client = openai.AsyncOpenAI(
            api_key=key or "unused",
            base_url=base_url,
            organization=provider.organization,
            project=provider.project,
            timeout=provider.timeout or DEFAULT_TIMEOUT,
            max_retries=0,  # aiwfd retries itself, so that `attempts` is exact
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

    async def close(self) -> None:
        await self.client.close()


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
