"""A real OTLP/HTTP traces receiver for tests, decoding with `opentelemetry-proto`.

    async with OTLPReceiver() as rx:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ... a request to aiwfd ...
        spans = await rx.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans))
        root = rx.named("POST /agent/{name}")[0]
        assert [c.name for c in rx.children(root)] == [...], rx.tree(root.trace_id)

Listens on 127.0.0.1, on a port the kernel picks (bound before the server
starts, so there is no race for it), and answers `POST /v1/traces` as an
OpenTelemetry collector does: an `application/x-protobuf` body (plain, or
`Content-Encoding: gzip` / `deflate`, which aiohttp undoes) holding an
`ExportTraceServiceRequest`, decoded by the reference protobuf bindings (the
`opentelemetry-proto` package), answered 200 with an empty `ExportTraceServiceResponse`. What an
exporter sends is read by code that is not the exporter's.

Every span received is recorded as a `Span`, with plain Python values: ids
as lowercase hex, the kind and status as their short names ("SERVER",
"ERROR"), attributes as str/int/float/bool/bytes/list/dict. Every request,
answered or not, is recorded as an `Export`.

`fail(status)` answers the next requests with `status` (their spans are not
recorded: a collector that refused them does not have them), `hang()` reads
them and never answers (until `ok()`, `fail()` or the receiver closes, then
a 503): what a down or stuck collector looks like to an exporter. `ok()`
goes back to accepting.

Other paths are a 404, other methods a 405, another content type a 415
(OTLP/JSON is not decoded here), a body that is not the message a 400.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from aiohttp import web

from aiwfd.testing.processes import serve_loopback
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["Export", "OTLPReceiver", "Span", "attributes_of", "value_of"]

PROTOBUF = "application/x-protobuf"
# What aiohttp decompresses before the handler reads the body (or fails the read on).
_DECODED = frozenset({"identity", "gzip", "deflate", "br", "zstd"})

Predicate = Union[int, Callable[[list["Span"]], bool]]


@dataclass
class Span:
    """One span as received."""

    name: str
    kind: str                            # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER", "UNSPECIFIED"
    trace_id: str                        # 32 hex digits
    span_id: str                         # 16 hex digits
    parent_span_id: str                  # "" for a root
    attributes: dict[str, Any]
    status: str = "UNSET"                # "UNSET", "OK", "ERROR"
    status_message: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)   # (trace_id, span_id)
    resource: dict[str, Any] = field(default_factory=dict)       # e.g. {"service.name": "aiwfd", ...}
    scope: str = ""                      # the instrumentation scope's name
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0
    trace_state: str = ""

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id

    @property
    def duration(self) -> float:
        """In seconds."""
        return (self.end_ns - self.start_ns) / 1e9


@dataclass
class Export:
    """One request to the receiver, whatever became of it."""

    path: str
    content_type: str | None
    content_encoding: str | None
    answered: int | None                 # the status sent back; None while hung
    spans: int = 0                       # how many spans it carried (0 if not decoded)
    received_at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict)


def value_of(v: AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value (None if unset)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes_of(v.kvlist_value.values)
    return getattr(v, which)


def attributes_of(kvs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in kvs}


def _short(full: str, prefix: str) -> str:
    return full[len(prefix):] if full.startswith(prefix) else full


def _spans_of(req: ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in req.resource_spans:
        resource = attributes_of(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    name=s.name,
                    kind=_short(trace_pb2.Span.SpanKind.Name(s.kind), "SPAN_KIND_"),
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(),
                    attributes=attributes_of(s.attributes),
                    status=_short(trace_pb2.Status.StatusCode.Name(s.status.code), "STATUS_CODE_"),
                    status_message=s.status.message,
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    resource=resource,
                    scope=ss.scope.name,
                    events=[(e.name, attributes_of(e.attributes)) for e in s.events],
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    trace_state=s.trace_state,
                ))
    return out


class OTLPReceiver:
    def __init__(self, path: str = "/v1/traces") -> None:
        self.path = path
        self.spans: list[Span] = []
        self.exports: list[Export] = []
        self._failing: int | None = None
        self._hanging = False
        self._arrived = asyncio.Event()     # set whenever a request was recorded
        self._release = asyncio.Event()     # set to let hung requests go
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (exporters add /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        """The full URL, for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or an exporter's endpoint=."""
        return self.endpoint + self.path

    # -- behaviour -------------------------------------------------------

    def fail(self, status: int = 503) -> None:
        """Answer every request `status` from now on (until `ok()`); its spans are dropped.

        Requests hung so far are let go (answered 503)."""
        self._failing = status
        self._hanging = False
        self._release.set()

    def hang(self) -> None:
        """Read every request from now on and never answer it (until `ok()`, `fail()` or close)."""
        self._failing = None
        self._hanging = True
        if self._release.is_set():       # ok() let the last ones go: a new gate
            self._release = asyncio.Event()

    def ok(self) -> None:
        """Accept again; requests hung so far are answered 503 (their spans dropped)."""
        self._failing = None
        self._hanging = False
        self._release.set()

    def clear(self) -> None:
        """Forget the spans and requests received so far."""
        self.spans.clear()
        self.exports.clear()

    # -- queries ---------------------------------------------------------

    def trace(self, trace_id: str) -> list[Span]:
        """The spans of one trace, by start time."""
        return sorted((s for s in self.spans if s.trace_id == trace_id), key=lambda s: s.start_ns)

    def children(self, span: Span) -> list[Span]:
        """The spans whose parent is `span`, by start time."""
        return sorted((s for s in self.spans if s.trace_id == span.trace_id and s.parent_span_id == span.span_id),
                      key=lambda s: s.start_ns)

    def parent(self, span: Span) -> Span | None:
        for s in self.spans:
            if s.trace_id == span.trace_id and s.span_id == span.parent_span_id:
                return s
        return None

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def trace_ids(self) -> list[str]:
        """Every trace id received, in order of first arrival."""
        return list(dict.fromkeys(s.trace_id for s in self.spans))

    def tree(self, trace_id: str | None = None) -> str:
        """One trace (or all of them) as an indented outline, for assertion messages."""
        ids = [trace_id] if trace_id is not None else self.trace_ids()
        lines: list[str] = []
        for tid in ids:
            spans = self.trace(tid)
            lines.append(f"trace {tid} ({len(spans)} spans)")
            present = {s.span_id for s in spans}

            def walk(s: Span, depth: int) -> None:
                status = f" {s.status}" + (f" {s.status_message!r}" if s.status_message else "") \
                    if s.status != "UNSET" else ""
                links = f" links={[sid for _, sid in s.links]}" if s.links else ""
                lines.append(f"{'  ' * (depth + 1)}{s.name} [{s.kind}{status}] {s.span_id}{links} {s.attributes}")
                for c in self.children(s):
                    walk(c, depth + 1)

            for s in spans:
                if s.is_root:
                    walk(s, 0)
            for s in spans:
                if not s.is_root and s.parent_span_id not in present:
                    lines.append(f"  (parent {s.parent_span_id} not received)")
                    walk(s, 1)
        return "\n".join(lines) if lines else "(no spans)"

    async def wait_for(self, until: Predicate, timeout: float = 10.0) -> list[Span]:
        """Until `until` spans have arrived, or `until(spans)` holds (woken by arrivals, not a poll)."""
        def done() -> bool:
            return len(self.spans) >= until if isinstance(until, int) else until(self.spans)

        async def wait() -> None:
            while not done():
                self._arrived.clear()
                await self._arrived.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{until!r} not met within {timeout}s; {len(self.exports)} requests, "
                               f"{len(self.spans)} spans:\n{self.tree()}") from None
        return self.spans

    async def wait_for_exports(self, count: int, timeout: float = 10.0) -> list[Export]:
        """Until `count` requests have arrived, answered or not (a failed or hung one too)."""
        async def wait() -> None:
            while len(self.exports) < count:
                self._arrived.clear()
                await self._arrived.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{count} requests not received within {timeout}s; "
                               f"got {len(self.exports)}") from None
        return self.exports

    # -- server ----------------------------------------------------------

    def _record(self, export: Export, spans: Sequence[Span] = ()) -> None:
        self.exports.append(export)
        self.spans.extend(spans)
        self._arrived.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ctype = request.headers.get("content-type")
        encoding = request.headers.get("content-encoding")
        export = Export(path=request.path, content_type=ctype, content_encoding=encoding, answered=None,
                        headers=dict(request.headers))
        try:
            body = await request.read()  # aiohttp undoes gzip and deflate (br, zstd: if their modules are installed)
        except web.RequestPayloadError as e:
            export.answered = 400
            self._record(export)
            resp = web.Response(status=400, text=f"{e}\n")
            resp.force_close()  # aiohttp drops the connection after a body it could not decode
            return resp
        if request.path != self.path:
            export.answered = 404
        elif request.method != "POST":
            export.answered = 405
        elif (ctype or "").split(";")[0].strip().lower() != PROTOBUF:
            export.answered = 415
        if export.answered is not None:
            self._record(export)
            return web.Response(status=export.answered, text=f"{export.answered}\n")

        if self._hanging:
            release = self._release
            self._record(export)
            await release.wait()
            export.answered = 503
            return web.Response(status=503, text="released\n")
        if self._failing is not None:
            export.answered = self._failing
            self._record(export)
            return web.Response(status=self._failing, text=f"{self._failing}\n")

        try:
            if (encoding or "identity").strip().lower() not in _DECODED:
                raise ValueError(f"unsupported Content-Encoding {encoding!r}")
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            spans = _spans_of(req)
        except (DecodeError, ValueError) as e:
            export.answered = 400
            self._record(export)
            return web.Response(status=400, text=f"{type(e).__name__}: {e}\n")
        export.answered = 200
        export.spans = len(spans)
        self._record(export, spans)
        return web.Response(status=200, body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_loopback(app)

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OTLPReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
