"""The `mock` provider: no network, answers with a schema-valid sample.

The sample is built from the output type itself (not from the strict schema
the model would see), so it also satisfies the lengths, bounds and formats
that only the validation schema enforces.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from aiwfd.spec import typedsl
from aiwfd.providers.base import ChatResult, OnDelta
from aiwfd.spec.typedsl import Node

# A streamed mock answer comes in this many pieces.
STREAM_PIECES = 4

FORMAT_SAMPLES = {
    "email": "user@example.com",
    "uri": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "date-time": "2025-01-01T12:00:00Z",
    "date": "2025-01-01",
    "uuid": "123e4567-e89b-42d3-a456-426614174000",
}


def sample(node: Node, defs: Mapping[str, Node], depth: int = 0) -> Any:
    """A value valid for `node`; recursion stops by choosing empty arrays/optionals."""
    if isinstance(node, typedsl.Str):
        if node.format:
            return FORMAT_SAMPLES[node.format]
        text = "sample text"
        lo = node.min_len or 0
        hi = node.max_len if node.max_len is not None else max(lo, len(text))
        if len(text) < lo:
            text = (text + " ") * (lo // len(text) + 1)
        return text[: max(lo, min(hi, len(text)))]
    if isinstance(node, typedsl.Int):
        return _pick(node.minimum, node.maximum, 1)
    if isinstance(node, typedsl.Num):
        return _pick(node.minimum, node.maximum, 0.5)
    if isinstance(node, typedsl.Bool):
        return True
    if isinstance(node, typedsl.AnyT):
        return "any value"
    if isinstance(node, typedsl.Enum):
        return node.values[0]
    if isinstance(node, typedsl.Array):
        n = node.min_items or 0
        if depth < 3 and (node.max_items is None or node.max_items >= 1):
            n = max(n, 1)
        return [sample(node.item, defs, depth + 1) for _ in range(n)]
    if isinstance(node, typedsl.Map):
        if depth >= 3:
            return {}
        key = sample(node.key, defs, depth + 1)
        return {key if isinstance(key, str) else "key": sample(node.value, defs, depth + 1)}
    if isinstance(node, typedsl.Ref):
        return sample(defs[node.key], defs, depth + 1)
    out = {}
    for f in node.fields:
        if f.optional and depth >= 2:
            continue
        out[f.name] = sample(f.type, defs, depth + 1)
    return out


def _pick(lo: Any, hi: Any, default: Any) -> Any:
    if lo is not None and hi is not None:
        return lo if default < lo or default > hi else default
    if lo is not None:
        return max(lo, default)
    if hi is not None:
        return min(hi, default)
    return default


class MockClient:
    """Answers every call at once, as a model that always gets it right would."""

    name = "mock"

    def __init__(self, defs: Mapping[str, Node]) -> None:
        self._defs = defs
        self._cache: dict[str, str] = {}

    async def complete(self, payload: dict[str, Any], timeout: float, agent: Any) -> ChatResult:
        content = self._cache.get(agent.name)
        if content is None:
            node = agent.assistant.output_type
            if node is None:
                content = f"This is a mock answer from aiwfd's agent {agent.name!r}."
            else:
                value = sample(node, self._defs)
                content = orjson.dumps({"value": value} if agent.wrapped else value).decode()
            self._cache[agent.name] = content
        prompt = sum(len(str(m.get("content", ""))) for m in payload["messages"]) // 4 + 1
        return ChatResult(content, prompt, len(content) // 4 + 1, agent.assistant.model, "stop")

    async def stream(self, payload: dict[str, Any], timeout: float, agent: Any, on_delta: OnDelta) -> ChatResult:
        """The same answer, handed to `on_delta` in a few pieces (SPEC §7.4)."""
        result = await self.complete(payload, timeout, agent)
        content = result.content or ""
        size = max(1, -(-len(content) // STREAM_PIECES))
        for i in range(0, len(content), size):
            await on_delta(content[i:i + size])
        return result

    async def close(self) -> None:
        return None
