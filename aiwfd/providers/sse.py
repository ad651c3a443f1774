"""The chat-completions event stream (`chat.completion.chunk` events), read strictly.

Both transports feed the raw body to one `StreamReader`, so they answer the
same `ChatResult` and fail the same way, and a chunk costs an orjson parse
rather than a pydantic model.
"""

from __future__ import annotations

import re

import orjson

from aiwfd.providers.base import ChatResult, OnDelta
from aiwfd.providers.completion import UNREADABLE, count, text
from aiwfd.providers.errors import BadAnswer, Unreachable

_LINE_END = re.compile(rb"\r\n|\r|\n")
MAX_LINE = 16 * 1024 * 1024


class Downstream(Exception):
    """`on_delta` failed: not a provider failure; the transport re-raises `.error` as it is."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class StreamReader:
    """Server-sent events as the WHATWG spec reads them (LF, CRLF or CR line
    ends, multi-line `data`, comments), each `data` one chunk parsed as
    strictly as `read_completion` reads a whole answer: an unreadable chunk or
    an `error` event is BadAnswer; a body that ends before the answer did is
    Unreachable (the connection broke)."""

    def __init__(self, url: str, on_delta: OnDelta) -> None:
        self.url = url
        self.on_delta = on_delta
        self._pending = b""
        self._data: list[bytes] = []
        self._event = b""
        self._content: list[str] = []
        self._refusal: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.model: str | None = None
        self.response_id: str | None = None
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
        if len(self._pending) > MAX_LINE:
            self._invalid(b"an event stream line over 16 MiB")
        return False

    def eof(self) -> None:
        """The body ended: fine after `[DONE]` or a finish reason, else the stream was cut."""
        # An event without its closing blank line is dropped, as the SSE spec says.
        if not self.done and self.finish_reason is None:
            raise Unreachable(f"POST {self.url}: the event stream ended before the answer was complete")

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
                raise BadAnswer(str(message or "the provider sent an error event")[:500], err)
            choices = doc.get("choices")
            piece = None
            if choices:
                choice = choices[0]
                delta = choice.get("delta") or {}
                piece = text(delta.get("content"))
                refusal = text(delta.get("refusal"))
                if refusal:
                    self._refusal.append(refusal)
                reason = choice.get("finish_reason")
                if reason is not None:
                    self.finish_reason = str(reason)
            usage = doc.get("usage")
            if usage:
                self.prompt_tokens = count(usage.get("prompt_tokens"))
                self.completion_tokens = count(usage.get("completion_tokens"))
            model = doc.get("model")
            if isinstance(model, str):
                self.model = model
            if self.response_id is None and isinstance(doc.get("id"), str):
                self.response_id = doc["id"]
        except UNREADABLE:
            self._invalid(data)
        if piece:
            self._content.append(piece)
            try:
                await self.on_delta(piece)
            except Exception as e:
                raise Downstream(e) from e
        return False

    def _invalid(self, data: bytes) -> None:
        raise BadAnswer("the provider's event stream is not a chat completion stream", data[:2000]) from None

    def result(self) -> ChatResult:
        return ChatResult(
            content="".join(self._content) if self._content else None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            model=self.model,
            finish_reason=self.finish_reason,
            refusal="".join(self._refusal) or None,
            response_id=self.response_id,
        )
