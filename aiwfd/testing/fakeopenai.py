"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

In-process::

    async with FakeOpenAI() as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test")
        fake.script(Status(429, retry_after=1), Reply(data={"message": "hi"}))
        ...

As a separate process (prints ``LISTENING <port>`` once, serves until SIGTERM)::

    python -m aiwfd.testing.fakeopenai --port 0 --latency-ms 200 [--uvloop]
        [--answer MODEL=PATH ...] [--chunk-chars N]

``--answer`` makes the content of PATH the default answer to requests for
MODEL (streamed or not); ``--chunk-chars`` streams default answers in pieces of
N characters, as a model streams tokens (the benchmark of ``/stream``).

Without a scripted behaviour a request gets the default answer: a sample that
satisfies the request's ``response_format`` JSON schema, or plain text.
Depends only on aiohttp and the standard library (not on the rest of aiwfd),
so that it stands for any OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Union

from aiohttp import web

__all__ = [
    "DEFAULT_TEXT",
    "Drop",
    "FakeOpenAI",
    "Hang",
    "Hold",
    "InvalidJSON",
    "RecordedRequest",
    "Reply",
    "Status",
    "Stream",
    "Violate",
    "sample_for_schema",
    "violating_sample",
]

DEFAULT_TEXT = "Hello from the fake model"
JSON_OBJECT_TEXT = '{"text":"Hello from the fake model"}'


# --------------------------------------------------------------------------
# Behaviours


@dataclass(frozen=True)
class Reply:
    """Answer 200 with ``content`` (raw), or ``data`` JSON-dumped, or the default."""

    content: str | None = None
    data: object = None
    delay: float = 0.0
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Status:
    """Answer an HTTP error in OpenAI's shape; ``body`` replaces the whole body."""

    code: int
    retry_after: float | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Hang:
    """Sleep ``seconds`` (cancellable) and then give the default answer."""

    seconds: float


@dataclass(frozen=True)
class Hold:
    """Hold the request until the test sets ``gate``, then answer as ``then``
    (the default answer when None).

    For a test that needs a call in flight while something else happens (a
    reload, a drain, a probe): it waits on ``fake.wait_calls(n)`` to know the
    call arrived and sets ``gate`` when it is done, instead of picking a reply
    delay it hopes is long enough. A connection the client drops meanwhile
    cancels the hold (``fake.disconnects``).
    """

    gate: asyncio.Event
    then: Behaviour | None = None


@dataclass(frozen=True)
class InvalidJSON:
    """Answer content that does not parse as JSON."""

    content: str = 'Sure! Here is the JSON you asked for: {"message": '


@dataclass(frozen=True)
class Violate:
    """Answer JSON that parses but violates the requested schema.

    ``data`` given: that value is sent. Otherwise one is derived from the
    request's schema (see :func:`violating_sample`), e.g. ``{"message": 12345}``.
    """

    data: object = None


@dataclass(frozen=True)
class Stream:
    """Streamed answer (for ``"stream": true`` requests) in ``chunks`` pieces,
    or in pieces of ``chunk_chars`` characters when that is set (the last one
    shorter), written as fast as the client reads.

    ``content``/``data`` as in :class:`Reply` (default answer when both are
    None). With ``pause_after=k`` the server stops after k content pieces, sets
    ``fake.paused`` and waits ``pause`` seconds or until ``fake.release()``.
    A non-streaming request that meets a Stream gets its content as a plain reply.
    """

    content: str | None = None
    data: object = None
    chunks: int = 4
    pause_after: int | None = None
    pause: float = 10.0
    delay: float = 0.0
    chunk_chars: int | None = None


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering (client: connection error)."""


Behaviour = Union[Reply, Status, Hang, Hold, InvalidJSON, Violate, Stream, Drop]


@dataclass(frozen=True)
class RecordedRequest:
    """One chat-completions request: parsed body, lower-cased headers, monotonic time."""

    body: dict[str, Any]
    headers: dict[str, str]
    time: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def schema(self) -> dict[str, Any] | None:
        return _schema_of(self.body)


# --------------------------------------------------------------------------
# Schema samples

_FORMATS: dict[str, str] = {
    "date-time": "2024-01-15T10:30:00Z",
    "date": "2024-01-15",
    "time": "10:30:00Z",
    "duration": "P1D",
    "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "iri-reference": "https://example.com/",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}

_MAX_REF_DEPTH = 32


class _Sampler:
    """Builds a value that satisfies a JSON schema (the common keywords)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.stack: list[str] = []

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported: {ref!r}")
        node = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def deref(self, schema: Any) -> Any:
        """Follow a top-level ``$ref`` chain (siblings of $ref win)."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < _MAX_REF_DEPTH:
            target = self.resolve(schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **siblings} if isinstance(target, dict) and siblings else target
            seen += 1
        return schema

    def sample(self, schema: Any, minimal: bool = False, index: int = 0) -> Any:
        if schema is True or schema is None:
            return "sample"
        if schema is False:
            raise ValueError("the schema `false` has no instances")
        if "$ref" in schema:
            ref = schema["$ref"]
            if len(self.stack) >= _MAX_REF_DEPTH:
                raise ValueError(f"$ref recursion too deep at {ref!r}")
            recursive = ref in self.stack
            self.stack.append(ref)
            try:
                target = self.resolve(ref)
                siblings = {k: v for k, v in schema.items() if k != "$ref"}
                if siblings and isinstance(target, dict):
                    target = {**target, **siblings}
                return self.sample(target, minimal or recursive, index)
            finally:
                self.stack.pop()
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            return options[index % len(options)]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.sample(self._pick(schema[key], minimal), minimal, index)
        if "allOf" in schema:
            return self.sample(self._merge(schema), minimal, index)

        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            kind = "null" if (minimal and "null" in kind) or not non_null else non_null[0]
        if kind is None:
            kind = self._infer(schema)
        if kind == "object":
            return self._object(schema, minimal, index)
        if kind == "array":
            return self._array(schema, minimal, index)
        if kind == "string":
            return self._string(schema, index)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer", index)
        if kind == "boolean":
            return index % 2 == 0
        if kind == "null":
            return None
        return "sample"

    def _pick(self, branches: list[Any], minimal: bool) -> Any:
        nulls = [b for b in branches if isinstance(b, dict) and b.get("type") == "null"]
        others = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
        if minimal and nulls:
            return nulls[0]
        if minimal:
            # Prefer a branch that does not recurse into a $ref being expanded.
            for branch in others:
                if not (isinstance(branch, dict) and branch.get("$ref") in self.stack):
                    return branch
        return others[0] if others else branches[0]

    def _merge(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self.deref(part)
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                else:
                    merged.setdefault(key, value)
        return merged

    @staticmethod
    def _infer(schema: dict[str, Any]) -> str | None:
        if {"properties", "required", "additionalProperties"} & schema.keys():
            return "object"
        if {"items", "prefixItems", "minItems", "maxItems"} & schema.keys():
            return "array"
        if {"minLength", "maxLength", "format", "pattern"} & schema.keys():
            return "string"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"} & schema.keys():
            return "number"
        return None

    def _object(self, schema: dict[str, Any], minimal: bool, index: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required: list[str] = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if minimal and name not in required:
                continue
            out[name] = self.sample(sub, minimal, index)
        for name in required:
            if name not in out:
                out[name] = self.sample(extra if isinstance(extra, dict) else True, minimal, index)
        n = 0
        while len(out) < schema.get("minProperties", 0) and extra is not False:
            out.setdefault(f"extra{n}", self.sample(extra if isinstance(extra, dict) else True, minimal, n))
            n += 1
        return out

    def _array(self, schema: dict[str, Any], minimal: bool, index: int) -> list[Any]:
        prefix: list[Any] = schema.get("prefixItems") or []
        items = schema.get("items", True)
        count = schema.get("minItems", 0) if minimal else max(schema.get("minItems", 0), 1)
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        if items is False:
            count = min(count, len(prefix))
        out = [self.sample(prefix[i], minimal, i) for i in range(min(count, len(prefix)))]
        out += [self.sample(items, minimal, i) for i in range(len(out), count)]
        return out

    @staticmethod
    def _string(schema: dict[str, Any], index: int) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        text = "sample" + (str(index) if index else "")
        low = schema.get("minLength", 0)
        if len(text) < low:
            text += "x" * (low - len(text))
        if "maxLength" in schema:
            text = text[: schema["maxLength"]]
        return text

    def types_of(self, schema: Any, depth: int = 0) -> set[str]:
        """JSON types a schema allows (empty set: anything)."""
        schema = self.deref(schema)
        if not isinstance(schema, dict) or depth > _MAX_REF_DEPTH:
            return set()
        if "type" in schema:
            kind = schema["type"]
            return set(kind) if isinstance(kind, list) else {kind}
        if "const" in schema:
            return {_json_type(schema["const"])}
        if "enum" in schema:
            return {_json_type(v) for v in schema["enum"]}
        for key in ("anyOf", "oneOf"):
            if key in schema:
                found: set[str] = set()
                for branch in schema[key]:
                    types = self.types_of(branch, depth + 1)
                    if not types:
                        return set()
                    found |= types
                return found
        for part in schema.get("allOf", []):
            types = self.types_of(part, depth + 1)
            if types:
                return types
        inferred = self._infer(schema)
        return {inferred} if inferred else set()


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _number(schema: dict[str, Any], integer: bool, index: int) -> int | float:
    low: float | None = None
    high: float | None = None
    low_excl = high_excl = False
    if isinstance(schema.get("minimum"), (int, float)):
        low = schema["minimum"]
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        if low is None or schema["exclusiveMinimum"] >= low:
            low, low_excl = schema["exclusiveMinimum"], True
    if isinstance(schema.get("maximum"), (int, float)):
        high = schema["maximum"]
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema["exclusiveMaximum"], bool):
        if high is None or schema["exclusiveMaximum"] <= high:
            high, high_excl = schema["exclusiveMaximum"], True
    step = schema.get("multipleOf")

    if integer:
        lo = -math.inf if low is None else (math.floor(low) + 1 if low_excl else math.ceil(low))
        hi = math.inf if high is None else (math.ceil(high) - 1 if high_excl else math.floor(high))
        if step:
            k = math.ceil(lo / step) if lo != -math.inf else 1
            return int(k * step)
        value = 1 + index
        if value < lo:
            value = int(lo) + index if lo + index <= hi else int(lo)
        if value > hi:
            value = int(hi)
        return int(value)

    if step:
        start = math.ceil(low / step) if low is not None else 1
        for k in range(start, start + 20):
            value = k * step
            ok_low = low is None or (value > low if low_excl else value >= low)
            if ok_low and value / step == int(value / step):
                return value
        return start * step
    if low is not None and high is not None:
        return (low + high) / 2
    if low is not None:
        return low + 1.5
    if high is not None:
        return high - 1.5
    return 1.5 + index


def sample_for_schema(schema: dict[str, Any]) -> Any:
    """A deterministic value that satisfies ``schema`` (common keywords only)."""
    return _Sampler(schema).sample(schema)


def violating_sample(schema: dict[str, Any]) -> Any:
    """A deterministic value that parses as JSON but does not satisfy ``schema``.

    For an object with properties: a valid sample whose first property has a
    wrong type; otherwise a value of the wrong type.
    """
    sampler = _Sampler(schema)
    root = sampler.deref(schema)
    if not isinstance(root, dict):
        return {"unexpected": True}
    if sampler.types_of(root) in ({"object"}, set()) and "properties" in root:
        value = sampler.sample(root)
        for name, sub in (root.get("properties") or {}).items():
            wrong = _wrong_value(sampler.types_of(sub))
            if wrong is not _NO_WRONG:
                value[name] = wrong
                return value
        if root.get("required"):
            return {}
    wrong = _wrong_value(sampler.types_of(root))
    return None if wrong is _NO_WRONG else wrong


_NO_WRONG = object()


def _wrong_value(allowed: set[str]) -> object:
    if not allowed:
        return _NO_WRONG
    candidates: list[tuple[set[str], object]] = [
        ({"integer", "number"}, 12345),
        ({"string"}, "wrong type"),
        ({"boolean"}, True),
        ({"array"}, [1]),
        ({"object"}, {"unexpected": 1}),
    ]
    for types, value in candidates:
        if not types & allowed:
            return value
    return _NO_WRONG


def _schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]
    return None


# --------------------------------------------------------------------------
# Server


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return chars // 4 + 1


def _completion_tokens(content: str) -> int:
    return len(content) // 4 + 1


def _new_id() -> str:
    return os.urandom(12).hex()


_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("server_error", "timeout", "Request timed out."),
    409: ("invalid_request_error", "conflict", "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
    504: ("server_error", "timeout", "Gateway timeout."),
}


class FakeOpenAI:
    """Fake ``/v1/chat/completions`` + ``/v1/models`` server on 127.0.0.1.

    ``requests``/``calls`` cover chat-completion requests whose body parsed
    (``/v1/models`` is not counted); ``inflight``/``max_inflight`` count every
    chat request from arrival to answer. Events are bound to the loop that
    first waits on them: use one instance per event loop.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        record: bool = True,
        api_key: str | None = None,
        text: str = DEFAULT_TEXT,
        answers: dict[str, str] | None = None,
        chunk_chars: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency  # seconds, applied to default answers
        self.record = record
        self.api_key = api_key  # when set, other keys get 401
        self.text = text  # default answer without response_format
        self.answers = dict(answers or {})  # model -> default answer, whatever the request asks
        self.chunk_chars = chunk_chars  # piece size of streamed default answers (None: a few pieces)
        self.requests: list[RecordedRequest] = []
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.disconnects = 0
        self.paused = asyncio.Event()  # set while a Stream is paused
        self.disconnected = asyncio.Event()  # set when a client went away mid-request
        self.idle = asyncio.Event()  # set while no chat request is in flight
        self.idle.set()
        self._queue: deque[Behaviour] = deque()
        self._release = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._dropping: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._content_cache: dict[str, str] = {}
        self._body_cache: dict[tuple[str, str, str], bytes] = {}

    # -- lifecycle ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=1024)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        self._release.set()
        for task in list(self._tasks):
            task.cancel()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        for _, fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- test controls -----------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each chat request pops one (default answer when empty)."""
        self._queue.extend(behaviours)

    @property
    def pending(self) -> int:
        """Scripted behaviours not yet used."""
        return len(self._queue)

    def release(self) -> None:
        """End the current Stream pause early."""
        self._release.set()

    def reset(self) -> None:
        """Clear the script, the records and the counters (settings are kept)."""
        self._queue.clear()
        self.requests.clear()
        self.calls = 0
        self.max_inflight = self.inflight
        self.disconnects = 0
        self.disconnected.clear()

    async def wait_calls(self, n: int, timeout: float = 5.0) -> None:
        """Wait until ``n`` chat requests have been received (body read, recorded)."""
        if self.calls >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if (n, fut) in self._waiters:
                self._waiters.remove((n, fut))

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    # -- handlers ----------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(body=_MODELS_BODY, content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.inflight += 1
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight
        self.idle.clear()
        try:
            if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return self._error(401, None)
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                return self._error(400, {"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": None, "code": None}})
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return self._error(400, {"error": {"message": "Missing required parameter: 'messages'.", "type": "invalid_request_error", "param": "messages", "code": "missing_required_parameter"}})
            if self.record:
                headers = {k.lower(): v for k, v in request.headers.items()}
                self.requests.append(RecordedRequest(body, headers, time.monotonic()))
            self.calls += 1
            if self._waiters:
                self._wake()
            behaviour = self._queue.popleft() if self._queue else None
            return await self._answer(request, body, behaviour)
        except asyncio.CancelledError:
            if not self._closing and task not in self._dropping:
                self._note_disconnect()
            raise
        finally:
            self._dropping.discard(task)
            self._tasks.discard(task)
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    def _wake(self) -> None:
        for n, fut in self._waiters:
            if self.calls >= n and not fut.done():
                fut.set_result(None)

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def _answer(self, request: web.Request, body: dict[str, Any], behaviour: Behaviour | None) -> web.StreamResponse:
        stream = body.get("stream") is True
        finish = "stop"
        while isinstance(behaviour, Hold):
            await behaviour.gate.wait()
            behaviour = behaviour.then
        if behaviour is None:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            content = self._default_content(body)
        elif isinstance(behaviour, Status):
            return self._status(behaviour)
        elif isinstance(behaviour, Drop):
            task = asyncio.current_task()
            assert task is not None
            self._dropping.add(task)
            if request.transport is not None:
                request.transport.abort()
            await asyncio.sleep(3600)  # cancelled by connection_lost
            raise AssertionError("unreachable")
        elif isinstance(behaviour, Hang):
            await asyncio.sleep(behaviour.seconds)
            content = self._default_content(body)
        elif isinstance(behaviour, InvalidJSON):
            content = behaviour.content
        elif isinstance(behaviour, Violate):
            data = behaviour.data
            if data is None:
                schema = _schema_of(body)
                data = violating_sample(schema) if schema is not None else {}
            content = _dumps(data)
        elif isinstance(behaviour, Stream):
            if behaviour.delay > 0:
                await asyncio.sleep(behaviour.delay)
            content = self._content_of(body, behaviour.content, behaviour.data)
            if stream:
                return await self._stream(request, body, content, behaviour)
        else:  # Reply
            if behaviour.delay > 0:
                await asyncio.sleep(behaviour.delay)
            content = self._content_of(body, behaviour.content, behaviour.data)
            finish = behaviour.finish_reason
        if stream:
            spec = Stream(content=content, chunks=_default_chunks(content), chunk_chars=self.chunk_chars)
            return await self._stream(request, body, content, spec, finish)
        return web.Response(body=self._completion(body, content, finish), headers=_headers("application/json"))

    def _content_of(self, body: dict[str, Any], content: str | None, data: object) -> str:
        if content is not None:
            return content
        if data is not None:
            return _dumps(data)
        return self._default_content(body)

    def _default_content(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if isinstance(model, str) and model in self.answers:
            return self.answers[model]
        fmt = body.get("response_format")
        if not isinstance(fmt, dict):
            return self.text
        if fmt.get("type") == "json_object":
            return JSON_OBJECT_TEXT
        schema = _schema_of(body)
        if schema is None:
            return self.text
        key = _dumps(schema)
        cached = self._content_cache.get(key)
        if cached is None:
            cached = _dumps(sample_for_schema(schema))
            if len(self._content_cache) > 256:
                self._content_cache.clear()
            self._content_cache[key] = cached
        return cached

    def _completion(self, body: dict[str, Any], content: str, finish: str) -> bytes:
        model = body.get("model")
        model = model if isinstance(model, str) else "gpt-4o-mini"
        key = (model, content, finish)
        middle = self._body_cache.get(key)
        if middle is None:
            middle = (
                ',"model":' + _dumps(model) + ',"choices":[{"index":0,"message":{"role":"assistant","content":'
                + _dumps(content) + ',"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":'
                + _dumps(finish) + "}],"
            ).encode()
            if len(self._body_cache) > 256:
                self._body_cache.clear()
            self._body_cache[key] = middle
        prompt = _prompt_tokens(body)
        completion = _completion_tokens(content)
        return b"".join((
            b'{"id":"chatcmpl-', _new_id().encode(), b'","object":"chat.completion","created":',
            b"%d" % int(time.time()), middle,
            b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},' % (prompt, completion, prompt + completion),
            b'"service_tier":"default","system_fingerprint":"fp_fake"}',
        ))

    def _status(self, behaviour: Status) -> web.Response:
        response = self._error(behaviour.code, behaviour.body)
        if behaviour.retry_after is not None:
            seconds = behaviour.retry_after
            response.headers["Retry-After"] = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
        return response

    @staticmethod
    def _error(code: int, body: dict[str, Any] | None) -> web.Response:
        if body is None:
            kind, err_code, message = _ERROR_KINDS.get(code, ("server_error" if code >= 500 else "invalid_request_error", None, f"HTTP {code}"))
            body = {"error": {"message": message, "type": kind, "param": None, "code": err_code}}
        return web.Response(status=code, body=_dumps(body).encode(), headers=_headers("application/json"))

    async def _stream(
        self, request: web.Request, body: dict[str, Any], content: str, spec: Stream, finish: str = "stop"
    ) -> web.StreamResponse:
        model = body.get("model") if isinstance(body.get("model"), str) else "gpt-4o-mini"
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        base: dict[str, Any] = {
            "id": "chatcmpl-" + _new_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            chunk = {**base, "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            return b"data: " + _dumps(chunk).encode() + b"\n\n"

        def delta(d: dict[str, Any], reason: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}]

        # A content piece's event is the same bytes as event(delta({"content": piece})),
        # built from a prefix and a suffix: a 64 KB answer in 4-character pieces is
        # 16k events, and the fake must not be what a benchmark of streaming measures.
        head, _, tail = event(delta({"content": ""})).partition(b'"content":""')
        head += b'"content":'

        def piece_event(piece: str) -> bytes:
            return head + _dumps(piece).encode() + tail

        response = web.StreamResponse(headers=_headers("text/event-stream; charset=utf-8"))
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        pieces = _split(content, spec.chunks) if spec.chunk_chars is None else _slices(content, spec.chunk_chars)
        try:
            await response.write(event(delta({"role": "assistant", "content": "", "refusal": None})))
            for i, piece in enumerate(pieces):
                if spec.pause_after == i:
                    await self._pause(spec.pause)
                await response.write(piece_event(piece))
            if spec.pause_after is not None and spec.pause_after >= len(pieces):
                await self._pause(spec.pause)
            await response.write(event(delta({}, finish)))
            if include_usage:
                prompt = _prompt_tokens(body)
                completion = _completion_tokens(content)
                usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                await response.write(event([], usage))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            if not self._closing:
                self._note_disconnect()
        return response

    async def _pause(self, seconds: float) -> None:
        self._release.clear()
        self.paused.set()
        try:
            await asyncio.wait_for(self._release.wait(), seconds)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
            pass
        finally:
            self.paused.clear()


_MODELS_BODY = _dumps({
    "object": "list",
    "data": [
        {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake"}
        for model in ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
    ],
}).encode()


def _headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "x-request-id": "req_" + _new_id(),
        "openai-version": "2020-10-01",
        "openai-processing-ms": "1",
    }


def _default_chunks(content: str) -> int:
    return max(1, min(8, len(content) // 4))


def _split(content: str, chunks: int) -> list[str]:
    """Split into at most ``chunks`` non-empty pieces of near-equal size."""
    if not content:
        return []
    n = max(1, min(chunks, len(content)))
    size, extra = divmod(len(content), n)
    pieces: list[str] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(content[start:end])
        start = end
    return pieces


def _slices(content: str, size: int) -> list[str]:
    """Pieces of ``size`` characters (the last one shorter)."""
    size = max(1, size)
    return [content[i:i + size] for i in range(0, len(content), size)]


# --------------------------------------------------------------------------
# Command line


async def _serve(args: argparse.Namespace) -> None:
    answers: dict[str, str] = {}
    for item in args.answer:
        model, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            answers[model] = f.read()
    fake = FakeOpenAI(host=args.host, port=args.port, latency=args.latency_ms / 1000, record=args.record,
                      answers=answers, chunk_chars=args.chunk_chars)
    await fake.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {fake.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible chat-completions server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--record", action="store_true", help="keep request records (memory grows)")
    parser.add_argument("--answer", action="append", default=[], metavar="MODEL=PATH",
                        help="answer the content of PATH to requests for MODEL (repeatable)")
    parser.add_argument("--chunk-chars", type=int, default=None, metavar="N",
                        help="stream default answers in pieces of N characters")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
