"""What the engine asks of a model provider: the `ModelClient` protocol and its answer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Mapping, Protocol

Transport = Literal["aiohttp", "sdk"]

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class ChatResult:
    content: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str | None
    finish_reason: str | None
    refusal: str | None = None
    response_id: str | None = None  # the provider's completion id (traces: gen_ai.response.id)


OnDelta = Callable[[str], Awaitable[None]]


class ModelClient(Protocol):
    """A provider's client; every failure of a call is an `aiwfd.providers.errors.ProviderError`."""

    name: str

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult: ...

    async def stream(self, payload: dict[str, Any], timeout: float, agent: Any, on_delta: OnDelta) -> ChatResult:
        """The same call streamed: `on_delta` gets each piece of the answer's text as it arrives.

        An exception `on_delta` raises (the client went away) propagates as it is."""
        ...

    async def close(self) -> None: ...


def transport_from_env(env: Mapping[str, str] = os.environ) -> Transport:
    value = env.get("AIWF_TRANSPORT", "aiohttp")
    return "sdk" if value == "sdk" else "aiohttp"
