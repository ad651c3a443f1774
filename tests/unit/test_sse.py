"""The event-stream reader both transports feed (aiwfd.providers.sse), on its own."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aiwfd.providers.errors import BadAnswer, Unreachable
from aiwfd.providers.sse import Downstream, StreamReader


async def feed_all(chunks: list[bytes]) -> tuple[StreamReader, list[str]]:
    got: list[str] = []

    async def on_delta(text: str) -> None:
        got.append(text)

    reader = StreamReader("http://x/v1/chat/completions", on_delta)
    for c in chunks:
        if await reader.feed(c):
            break
    else:
        reader.eof()
    return reader, got


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content is not None else {},
                                 "finish_reason": finish}]
    doc: dict[str, Any] = {"object": "chat.completion.chunk", "model": "m", "choices": choices}
    if usage:
        doc["usage"] = usage
    return doc


async def test_upstream_event_stream_reader() -> None:
    body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in (
        chunk("He"), chunk("llo"), chunk(finish="stop"),
        chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))) + "data: [DONE]\r\n\r\n"
    raw = (": a comment\n\n" + body).encode()
    # Split everywhere, also between the CR and the LF of a line end.
    for size in (1, 2, 7, len(raw)):
        reader, got = await feed_all([raw[i:i + size] for i in range(0, len(raw), size)])
        result = reader.result()
        assert "".join(got) == "Hello" and result.content == "Hello"
        assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (3, 2, "stop")
    # Multi-line data, CR-only line ends.
    raw = b'data: {"choices": [{"delta": {"content": "x"},\rdata: "finish_reason": "stop"}]}\r\rdata: [DONE]\r\r'
    reader, got = await feed_all([raw])
    assert got == ["x"] and reader.result().finish_reason == "stop"
    # An error event and an unreadable chunk are bad answers (retried).
    with pytest.raises(BadAnswer, match="overloaded"):
        await feed_all([b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'])
    for bad in (b"data: {not json\n\n", b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
                b'data: {"choices": [], "usage": {"prompt_tokens": "abc"}}\n\n', b"data: [1]\n\n"):
        with pytest.raises(BadAnswer):
            await feed_all([bad])
    # A body cut before the answer finished is a connection error (retried), not an answer.
    with pytest.raises(Unreachable):
        await feed_all([f"data: {json.dumps(chunk('Hel'))}\n\n".encode()])
    # No [DONE] but a finish reason: complete.
    reader, got = await feed_all([f"data: {json.dumps(chunk('ok', 'stop'))}\n\n".encode()])
    assert reader.result().content == "ok"


async def test_a_failing_on_delta_is_not_a_provider_error() -> None:
    """The client went away: the transport re-raises the original, never a ProviderError."""
    gone = ConnectionResetError("client gone")

    async def on_delta(text: str) -> None:
        raise gone

    reader = StreamReader("http://x/v1/chat/completions", on_delta)
    with pytest.raises(Downstream) as caught:
        await reader.feed(f"data: {json.dumps(chunk('Hel'))}\n\n".encode())
    assert caught.value.error is gone
