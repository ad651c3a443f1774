"""Reading a chat completion strictly: what the provider sent must be one, else `BadAnswer`.

The SDK's parsed models keep whatever types the provider sent; a token count
of "abc" must be an unreadable answer (502), not a 500 further up.
"""

from __future__ import annotations

from typing import Any

import orjson

from aiwfd.providers.base import ChatResult
from aiwfd.providers.errors import BadAnswer

_MAX_COUNT = 2**53 - 1
# What a malformed document raises while it is read.
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


def count(value: Any) -> int:
    """A token count: absent is 0; anything but a sane non-negative integer is unreadable."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"token count {value!r:.40} is not a non-negative integer")
    return value


def text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("message content is not a string")


def read_completion(body: bytes) -> ChatResult:
    """A chat completion's answer, or BadAnswer when `body` is not one."""
    try:
        doc = orjson.loads(body)
        choice = doc["choices"][0] if doc.get("choices") else None
        message = choice["message"] if choice else {}
        usage = doc.get("usage") or {}
        finish_reason = choice.get("finish_reason") if choice else None
        refusal = message.get("refusal")
        model = doc.get("model")
        return ChatResult(
            content=text(message.get("content")),
            prompt_tokens=count(usage.get("prompt_tokens")),
            completion_tokens=count(usage.get("completion_tokens")),
            model=model if isinstance(model, str) else None,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            refusal=str(refusal) if refusal else None,
            response_id=doc["id"] if isinstance(doc.get("id"), str) else None,
        )
    except UNREADABLE:
        raise BadAnswer("the provider's answer is not a chat completion", body[:2000]) from None
