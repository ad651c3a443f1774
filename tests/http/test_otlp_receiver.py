"""aiwfd.testing.otlp_receiver against the real OpenTelemetry SDK and its OTLP/HTTP exporter.

Each test has its own TracerProvider (never the global one). The exporter
is synchronous (requests): every export, flush and shutdown runs in a
thread, so this loop keeps serving the receiver meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest

from aiwfd.testing.otlp_receiver import OTLPReceiver, Span

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode


class Recording(SpanExporter):
    """Wraps an exporter, keeping each export's result."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.results: list[SpanExportResult] = []

    def export(self, spans: Any) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


@contextmanager
def provider(exporter: SpanExporter, simple: bool = False) -> Iterator[TracerProvider]:
    tp = TracerProvider(resource=Resource.create({"service.name": "otlp-selftest", "deployment.environment": "test"}))
    tp.add_span_processor(SimpleSpanProcessor(exporter) if simple
                          else BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    try:
        yield tp
    finally:
        tp.shutdown()


async def flush(tp: TracerProvider) -> None:
    assert await asyncio.to_thread(tp.force_flush, 10_000)


def hexid(span: ReadableSpan | trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


async def test_round_trip_names_kinds_parents_attributes_links() -> None:
    async with OTLPReceiver() as rx:
        exporter = Recording(OTLPSpanExporter(endpoint=rx.endpoint + "/v1/traces", timeout=5))
        with provider(exporter) as tp:
            tracer = tp.get_tracer("aiwfd.selftest", "1.0")
            with tracer.start_as_current_span("enqueue", kind=SpanKind.PRODUCER) as other:
                pass
            with tracer.start_as_current_span("POST /agent/{name}", kind=SpanKind.SERVER, links=[Link(other.get_span_context())],
                                              attributes={"http.request.method": "POST",
                                                          "http.response.status_code": 200}) as server:
                with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT) as client:
                    client.set_attributes({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 12,
                                           "temperature": 0.5, "stream": False, "stop": ["a", "b"],
                                           "choices": [1, 2]})
                    client.add_event("retry", {"attempt": 2})
                with tracer.start_as_current_span("validate") as internal:
                    internal.set_status(Status(StatusCode.ERROR, "schema mismatch"))
                server.set_status(Status(StatusCode.OK))
            await flush(tp)
        assert exporter.results == [SpanExportResult.SUCCESS]

        spans = await rx.wait_for(4)
        assert len(spans) == 4, rx.tree()
        assert rx.exports[-1].content_type == "application/x-protobuf" and rx.exports[-1].answered == 200

        tid, sid = hexid(server)
        root = rx.named("POST /agent/{name}")[0]
        assert (root.trace_id, root.span_id, root.parent_span_id) == (tid, sid, "")
        assert root.is_root and root.kind == "SERVER" and root.status == "OK"
        assert root.attributes == {"http.request.method": "POST", "http.response.status_code": 200}
        assert root.links == [hexid(other)]
        assert root.resource["service.name"] == "otlp-selftest"
        assert root.resource["deployment.environment"] == "test"
        assert root.resource["telemetry.sdk.name"] == "opentelemetry"
        assert root.scope == "aiwfd.selftest"
        assert root.end_ns >= root.start_ns > 0 and root.duration >= 0

        kids = rx.children(root)
        assert [(s.name, s.kind) for s in kids] == [("chat gpt-4o", "CLIENT"), ("validate", "INTERNAL")], rx.tree(tid)
        chat, validate = kids
        assert chat.parent_span_id == sid and rx.parent(chat) is root
        assert chat.attributes == {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 12,
                                   "temperature": 0.5, "stream": False, "stop": ["a", "b"], "choices": [1, 2]}
        assert type(chat.attributes["gen_ai.usage.input_tokens"]) is int
        assert type(chat.attributes["temperature"]) is float and type(chat.attributes["stream"]) is bool
        assert chat.events == [("retry", {"attempt": 2})]
        assert chat.status == "UNSET"
        assert (validate.status, validate.status_message) == ("ERROR", "schema mismatch")
        assert rx.children(chat) == [] and rx.children(validate) == []

        assert [s.name for s in rx.trace(tid)] == ["POST /agent/{name}", "chat gpt-4o", "validate"]
        producer = rx.named("enqueue")[0]
        assert producer.kind == "PRODUCER" and producer.is_root and producer.trace_id != tid
        assert rx.trace_ids() == [producer.trace_id, tid]

        tree = rx.tree(tid)
        assert tree.splitlines()[0] == f"trace {tid} (3 spans)"
        assert f"  POST /agent/{{name}} [SERVER OK] {sid} links=['{producer.span_id}']" in tree
        assert "    chat gpt-4o [CLIENT] " in tree
        assert "    validate [INTERNAL ERROR 'schema mismatch'] " in tree
        assert rx.tree().count("trace ") == 2


async def test_base_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """rx.endpoint is what OTEL_EXPORTER_OTLP_ENDPOINT takes: the exporter adds /v1/traces."""
    async with OTLPReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)

        def produce() -> None:
            with provider(OTLPSpanExporter(timeout=5), simple=True) as tp:
                tracer = tp.get_tracer("t")
                with tracer.start_as_current_span("outer", kind=SpanKind.SERVER):
                    with tracer.start_as_current_span("inner"):
                        pass

        await asyncio.to_thread(produce)  # SimpleSpanProcessor exports in span.end(): off the loop
        await rx.wait_for(lambda spans: any(s.name == "outer" for s in spans))
        assert rx.traces_url == rx.endpoint + "/v1/traces"
        assert [e.path for e in rx.exports] == ["/v1/traces", "/v1/traces"]   # one export per span
        outer, = rx.named("outer")
        assert [s.name for s in rx.children(outer)] == ["inner"]


@pytest.mark.parametrize("compression,encoding", [(Compression.Gzip, "gzip"), (Compression.Deflate, "deflate")])
async def test_compressed(compression: Compression, encoding: str) -> None:
    async with OTLPReceiver() as rx:
        with provider(OTLPSpanExporter(endpoint=rx.traces_url, timeout=5, compression=compression)) as tp:
            with tp.get_tracer("t").start_as_current_span("zipped", attributes={"n": 1}):
                pass
            await flush(tp)
        spans = await rx.wait_for(1)
        assert [(s.name, s.attributes) for s in spans] == [("zipped", {"n": 1})]
        assert rx.exports[0].content_encoding == encoding and rx.exports[0].answered == 200


async def test_fail_then_ok() -> None:
    async with OTLPReceiver() as rx:
        rx.fail(503)
        exporter = Recording(OTLPSpanExporter(endpoint=rx.traces_url, timeout=0.5))
        with provider(exporter) as tp:
            with tp.get_tracer("t").start_as_current_span("dropped"):
                pass
            t0 = time.monotonic()
            await flush(tp)
            assert time.monotonic() - t0 < 3
            assert exporter.results == [SpanExportResult.FAILURE]
            assert rx.spans == [] and [e.answered for e in rx.exports] == [503]

            rx.ok()
            with tp.get_tracer("t").start_as_current_span("kept"):
                pass
            await flush(tp)
        assert exporter.results[-1] == SpanExportResult.SUCCESS
        assert [s.name for s in await rx.wait_for(1)] == ["kept"]


async def test_hang_then_ok() -> None:
    """A stuck collector costs the exporter its own timeout, then the next export goes through."""
    async with OTLPReceiver() as rx:
        rx.hang()
        exporter = Recording(OTLPSpanExporter(endpoint=rx.traces_url, timeout=0.5))
        with provider(exporter) as tp:
            with tp.get_tracer("t").start_as_current_span("stuck"):
                pass
            t0 = time.monotonic()
            await flush(tp)
            elapsed = time.monotonic() - t0
            assert 0.4 < elapsed < 3, elapsed
            assert exporter.results == [SpanExportResult.FAILURE]
            await rx.wait_for_exports(1)
            assert rx.spans == [] and rx.exports[0].answered in (None, 503)   # None while hung

            rx.ok()
            with tp.get_tracer("t").start_as_current_span("through"):
                pass
            await flush(tp)
        assert exporter.results[-1] == SpanExportResult.SUCCESS
        assert [s.name for s in await rx.wait_for(1)] == ["through"]


async def test_hang_is_released_by_ok_and_by_close() -> None:
    async with OTLPReceiver() as rx:
        rx.hang()
        async with aiohttp.ClientSession() as http:
            body = ExportTraceServiceRequest().SerializeToString()
            hdrs = {"Content-Type": "application/x-protobuf"}
            pending = asyncio.create_task(http.post(rx.traces_url, data=body, headers=hdrs))
            await rx.wait_for_exports(1)
            await asyncio.sleep(0.05)
            assert not pending.done()
            rx.ok()
            async with await asyncio.wait_for(pending, 5) as r:
                assert r.status == 503
            async with http.post(rx.traces_url, data=body, headers=hdrs) as r:
                assert r.status == 200

            rx.hang()
            pending = asyncio.create_task(http.post(rx.traces_url, data=body, headers=hdrs))
            await rx.wait_for_exports(3)
            t0 = time.monotonic()
            await rx.close()
            assert time.monotonic() - t0 < 2
            done, = await asyncio.wait_for(asyncio.gather(pending, return_exceptions=True), 5)
            # released with a 503, or cut off by the shutdown: either way, not accepted
            if isinstance(done, BaseException):
                assert isinstance(done, aiohttp.ClientError), done
            else:
                assert done.status == 503
                done.release()


async def test_protocol_errors_and_response_body() -> None:
    async with OTLPReceiver() as rx, aiohttp.ClientSession() as http:
        pb = {"Content-Type": "application/x-protobuf"}
        async with http.post(rx.traces_url, data=b"", headers=pb) as r:   # an empty request is valid
            assert r.status == 200 and r.content_type == "application/x-protobuf"
            resp = ExportTraceServiceResponse()
            resp.ParseFromString(await r.read())
            assert not resp.HasField("partial_success")
        async with http.post(rx.traces_url, data=b"\xff\xff\xff", headers=pb) as r:
            assert r.status == 400
        async with http.post(rx.traces_url, data=b"not gzip", headers={**pb, "Content-Encoding": "gzip"}) as r:
            assert r.status == 400
        async with http.post(rx.traces_url, data=b"", headers={**pb, "Content-Encoding": "compress"}) as r:
            assert r.status == 400
        async with http.post(rx.traces_url, json={"resourceSpans": []}) as r:
            assert r.status == 415
        async with http.get(rx.traces_url) as r:
            assert r.status == 405
        async with http.post(rx.endpoint + "/v1/metrics", data=b"", headers=pb) as r:
            assert r.status == 404
        assert [e.answered for e in rx.exports] == [200, 400, 400, 400, 415, 405, 404]
        assert rx.spans == []


async def test_wait_for_wakes_on_arrival_and_times_out() -> None:
    async with OTLPReceiver() as rx:
        with pytest.raises(TimeoutError, match="0 spans"):
            await rx.wait_for(1, timeout=0.05)

        with provider(OTLPSpanExporter(endpoint=rx.traces_url, timeout=5)) as tp:
            waiter = asyncio.create_task(rx.wait_for(lambda spans: [s.name for s in spans] == ["a", "b"]))
            await asyncio.sleep(0)
            assert not waiter.done()
            tracer = tp.get_tracer("t")
            with tracer.start_as_current_span("a"):
                pass
            await flush(tp)
            await asyncio.sleep(0.01)
            assert not waiter.done()
            with tracer.start_as_current_span("b"):
                pass
            await flush(tp)
            spans: list[Span] = await asyncio.wait_for(waiter, 5)
        assert [s.name for s in spans] == ["a", "b"]
        assert spans[0].trace_id != spans[1].trace_id
        with pytest.raises(TimeoutError, match="trace "):
            await rx.wait_for(3, timeout=0.05)
