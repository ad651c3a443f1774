"""aiwfd.telemetry's parts: the OTLP bytes it writes, read back with the
reference protobuf bindings (opentelemetry-proto); the W3C trace context;
the samplers; the OTEL_* variables it refuses."""

from __future__ import annotations

import math
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

from aiwfd.errors import StartupError
from aiwfd.telemetry import otlp, settings
from aiwfd.telemetry.spans import CLIENT, SERVER, Link, Sampler, Span, Tracer, attach, detach, parse_traceparent
from aiwfd.testing.otlp_receiver import attributes_of

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = 0xB7AD6B7169203331


def decoded(spans: list[Span], resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    body = otlp.Batch(resource or {"service.name": "svc"}, "aiwfd", "1.2.3").request(otlp.encode(s) for s in spans)
    return ExportTraceServiceRequest.FromString(body)


def finished(tracer: Tracer, name: str, attributes: dict[str, Any], **kw: Any) -> Span:
    span = tracer.start_span(name, CLIENT, attributes, **kw)
    span.end()
    return span


def test_every_attribute_type_reads_back_as_written() -> None:
    attributes = {"s": "héllo ☃", "empty": "", "t": True, "f": False, "i": 42, "zero": 0, "neg": -7,
                  "big": 2**63 - 1, "min": -(2**63), "d": 0.2, "inf": math.inf, "strs": ["stop", "length"],
                  "ints": [1, -2, 3], "none": None, "b": b"\x00\xff"}
    span = finished(Tracer(Sampler(1.0, True), lambda s: None), "chat gpt-4o ☃", dict(attributes))
    got = decoded([span]).resource_spans[0].scope_spans[0].spans[0]
    want = {k: v for k, v in attributes.items() if v is not None}
    assert attributes_of(got.attributes) == want
    assert got.name == "chat gpt-4o ☃" and got.kind == trace_pb2.Span.SPAN_KIND_CLIENT


def test_the_envelope_ids_times_status_flags_and_links() -> None:
    tracer = Tracer(Sampler(1.0, True), lambda s: None)
    remote = Link(TRACE, PARENT, 1, "vendor=x")
    server = tracer.start_span("POST /agent/{name}", SERVER, {"http.route": "/agent/{name}"}, remote=remote)
    token = attach(server)
    try:
        child = tracer.start_span("chat m", CLIENT, {})
        child.set_error("invalid_output", "the answer is not an Out")
        child.end()
    finally:
        detach(token)
    server.end()
    job = finished(tracer, "job greeter", {}, root=True, links=(remote,))
    req = decoded([server, child, job], {"service.name": "svc", "n": 1})
    rs = req.resource_spans[0]
    assert attributes_of(rs.resource.attributes) == {"service.name": "svc", "n": 1}
    assert (rs.scope_spans[0].scope.name, rs.scope_spans[0].scope.version) == ("aiwfd", "1.2.3")
    s, c, j = rs.scope_spans[0].spans
    assert s.trace_id.hex() == f"{TRACE:032x}" and s.parent_span_id.hex() == f"{PARENT:016x}"
    assert s.trace_state == "vendor=x" and s.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert s.flags == 0x01 | otlp.HAS_IS_REMOTE | otlp.IS_REMOTE  # sampled, parent remote
    assert s.start_time_unix_nano == server.start_ns and s.end_time_unix_nano == server.end_ns
    assert s.end_time_unix_nano >= s.start_time_unix_nano > 1.7e18
    assert c.trace_id == s.trace_id and c.parent_span_id == s.span_id and c.trace_state == "vendor=x"
    assert c.flags == 0x01 | otlp.HAS_IS_REMOTE
    assert c.status.code == trace_pb2.Status.STATUS_CODE_ERROR and c.status.message == "the answer is not an Out"
    assert attributes_of(c.attributes) == {"error.type": "invalid_output"}
    assert s.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert j.trace_id != s.trace_id and not j.parent_span_id
    assert [(link.trace_id.hex(), link.span_id.hex(), link.trace_state) for link in j.links] == [
        (f"{TRACE:032x}", f"{PARENT:016x}", "vendor=x")]


def test_a_cached_attribute_keeps_its_type() -> None:
    # True == 1 == 1.0 as dict keys: the cache must not hand one's bytes to another.
    tracer = Tracer(Sampler(1.0, True), lambda s: None)
    values: list[Any] = [1, True, 1.0, "1", 1, [1], [True], [1], (1,), (True,), (1.0,), (1,)]
    spans = [finished(tracer, "x", {"a": v}) for v in values]
    got = [attributes_of(s.attributes)["a"] for s in decoded(spans).resource_spans[0].scope_spans[0].spans]
    # repr tells 1 from True from 1.0, inside a list too; an array comes back a list.
    assert [repr(v) for v in got] == [repr(list(v) if isinstance(v, tuple) else v) for v in values]


@pytest.mark.parametrize("header, ok", [
    (f"00-{TRACE:032x}-{PARENT:016x}-01", True),
    (f"  00-{TRACE:032x}-{PARENT:016x}-00 ", True),
    (f"01-{TRACE:032x}-{PARENT:016x}-01-future", True),   # a later version may add fields
    (f"00-{TRACE:032x}-{PARENT:016x}-01-extra", False),   # version 00 may not
    (f"ff-{TRACE:032x}-{PARENT:016x}-01", False),
    (f"00-{0:032x}-{PARENT:016x}-01", False),             # all-zero ids are invalid
    (f"00-{TRACE:032x}-{0:016x}-01", False),
    (f"00-{TRACE:032X}-{PARENT:016x}-01", False),         # uppercase is not W3C
    ("00-abc-def-01", False), ("", False), (None, False),
])
def test_traceparent(header: str | None, ok: bool) -> None:
    link = parse_traceparent(header, "k=v")
    assert (link is not None) == ok
    if link is not None:
        assert (link.trace_id, link.span_id, link.trace_state) == (TRACE, PARENT, "k=v")


def test_a_remote_parent_is_followed_only_by_the_parentbased_samplers() -> None:
    sampled, unsampled = Link(TRACE, PARENT, 1), Link(TRACE, PARENT, 0)
    assert Sampler(0.0, True).sample(TRACE, sampled) and not Sampler(1.0, True).sample(TRACE, unsampled)
    assert Sampler(1.0, False).sample(TRACE, unsampled) and not Sampler(0.0, False).sample(TRACE, sampled)
    # traceidratio keeps a trace by its id, so every instance keeps the same ones, about `ratio` of them.
    kept = sum(Sampler(0.25, False).sample(i * 0x9E3779B97F4A7C15 % 2**128, None) for i in range(4000))
    assert 800 < kept < 1200
    assert Sampler(0.25, False).sample(2**64 + 5, None) == Sampler(0.25, False).sample(5, None)


def test_an_unsampled_span_propagates_and_is_never_exported() -> None:
    out: list[Span] = []
    tracer = Tracer(Sampler(0.0, False), out.append)
    span = finished(tracer, "x", {})
    assert span.traceparent().endswith("-00") and not out
    on = Tracer(Sampler(1.0, False), out.append)
    span = finished(on, "y", {})
    assert span.traceparent() == f"00-{span.trace_id:032x}-{span.span_id:016x}-01" and out == [span]
    span.end()
    assert out == [span]  # ended once


ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"}


def test_the_variables_and_their_defaults() -> None:
    assert settings.from_env({}) is None
    assert settings.from_env({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}) is None
    s = settings.from_env({**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "service.name=a,deployment.environment=prod%20eu",
                           "OTEL_EXPORTER_OTLP_HEADERS": "x-token=a%3Db", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "k=v"})
    assert s is not None
    assert s.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert s.resource["service.name"] == "a" and s.resource["deployment.environment"] == "prod eu"
    assert s.headers == {"k": "v"}  # the per-signal variable wins
    assert (s.schedule_delay, s.max_queue, s.max_batch, s.export_timeout, s.timeout) == (5.0, 2048, 512, 30.0, 10.0)
    assert s.sampler == Sampler(1.0, True)
    s = settings.from_env({**ENDPOINT, "OTEL_SERVICE_NAME": "b", "OTEL_RESOURCE_ATTRIBUTES": "service.name=a",
                           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c.example/custom",
                           "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
                           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"})
    assert s is not None
    assert s.resource["service.name"] == "b" and s.endpoint == "https://c.example/custom"
    assert s.sampler == Sampler(0.1, False) and s.gzip and s.timeout == 2.5


@pytest.mark.parametrize("extra, message", [
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER 'sometimes' is not one of always_on"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
     "OTEL_TRACES_SAMPLER_ARG '1.5' is not a number from 0 to 1"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL 'grpc' is not supported"),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION 'zstd' is not gzip or none"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE '0' is not a whole number above 0"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "is not an http:// or https:// URL"),
    ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "OTEL_EXPORTER_OTLP_CERTIFICATE: "),
])
def test_a_bad_value_is_a_start_up_error_naming_it(extra: dict[str, str], message: str) -> None:
    with pytest.raises(StartupError) as e:
        settings.from_env({**ENDPOINT, **extra})
    assert message in str(e.value)


# --------------------------------------------------------------------------- review fixes

def test_strings_that_are_not_utf8_never_raise_and_are_valid_utf8_for_the_collector() -> None:
    # A lone surrogate: JSON's "\ud800" in captured messages, or a header byte
    # aiohttp could not decode. "surrogatepass" wrote bytes a collector's
    # decoder refuses (the whole export lost); a key or a tracestate raised.
    tracer = Tracer(Sampler(1.0, True), lambda s: None)
    span = finished(tracer, "chat m\udcff", {"gen_ai.input.messages": "x\ud800y", "k\udcff": "v", "s": "ok"})
    span.trace_state = "a=\udcff"
    span.set_error("e", "bad \udcfe")
    got = decoded([span]).resource_spans[0].scope_spans[0].spans[0]
    assert attributes_of(got.attributes) == {"gen_ai.input.messages": "x\ufffdy", "k\ufffd": "v", "s": "ok",
                                             "error.type": "e"}
    assert got.name == "chat m\ufffd" and got.trace_state == "a=\ufffd" and got.status.message == "bad \ufffd"


def test_values_int64_cannot_hold_maps_bytearrays_and_lists_of_other_types() -> None:
    tracer = Tracer(Sampler(1.0, True), lambda s: None)
    attributes: dict[str, Any] = {"huge": 2**64 + 5, "tiny": -(2**63) - 1, "map": {"a": 1, "b": ["x"]},
                                  "ba": bytearray(b"\x01")}
    got = decoded([finished(tracer, "x", dict(attributes))]).resource_spans[0].scope_spans[0].spans[0]
    assert attributes_of(got.attributes) == {"huge": str(2**64 + 5), "tiny": str(-(2**63) - 1),
                                             "map": {"a": 1, "b": ["x"]}, "ba": b"\x01"}
    # [1] == [True] == [1.0] as cache keys: each keeps its items' type.
    values: list[Any] = [[1], [True], [1.0], [1]]
    spans = [finished(tracer, "x", {"l": v}) for v in values]
    got_l = [attributes_of(s.attributes)["l"] for s in decoded(spans).resource_spans[0].scope_spans[0].spans]
    assert [[type(i) for i in v] for v in got_l] == [[type(i) for i in v] for v in values]


@pytest.mark.parametrize("state, want", [
    ("k=v", "k=v"), (" a=1 , ,b=2", "a=1,b=2"), ("t@sys=x", "t@sys=x"),
    ("a=\udcff\udcfe", ""),            # undecodable bytes: not W3C, never propagated
    ("a=é", ""), ("A=1", ""), ("a=1,a=2", ""), ("novalue", ""),
    (",".join(f"k{i}=v" for i in range(33)), ""),   # more than 32 members
])
def test_tracestate_is_validated(state: str, want: str) -> None:
    link = parse_traceparent(f"00-{TRACE:032x}-{PARENT:016x}-01", state)
    assert link is not None and link.trace_state == want


def test_a_long_tracestate_loses_its_long_members_first() -> None:
    long = "big=" + "x" * 200
    rest = [f"k{i}=" + "v" * 40 for i in range(12)]
    link = parse_traceparent(f"00-{TRACE:032x}-{PARENT:016x}-01", ",".join([long, *rest]))
    assert link is not None and len(link.trace_state) <= 512
    assert "big=" not in link.trace_state and link.trace_state.startswith("k0=")


def test_several_tracestate_headers_are_one_list() -> None:
    from multidict import CIMultiDict

    from aiwfd import telemetry
    headers = CIMultiDict([("traceparent", f"00-{TRACE:032x}-{PARENT:016x}-01"), ("tracestate", "a=1"),
                           ("tracestate", "b=2")])
    link = telemetry.extract(headers)
    assert link is not None and link.trace_state == "a=1,b=2"


def test_a_second_detach_is_harmless() -> None:
    tracer = Tracer(Sampler(1.0, True), lambda s: None)
    token = attach(tracer.start_span("x", SERVER, {}))
    detach(token)
    detach(token)


@pytest.mark.parametrize("extra, message", [
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL 'grpc' is not supported"),
    ({"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "br"}, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION 'br' is not gzip"),
    ({"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/nonexistent/ca.pem"}, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: "),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT 'collector:4318/v1/traces' is"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "grpc://u:secret@c:4317?t=1"},
     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT 'grpc://c:4317' is not"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1"}, "OTEL_EXPORTER_OTLP_ENDPOINT 'http://[::1/v1/traces' is not"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT 'http://c:99999/v1/traces'"),
    ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1024", "OTEL_BSP_MAX_QUEUE_SIZE": "512"},
     "OTEL_BSP_MAX_EXPORT_BATCH_SIZE 1024 is more than OTEL_BSP_MAX_QUEUE_SIZE 512"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "x-token=a%0D%0Ab"}, "OTEL_EXPORTER_OTLP_HEADERS has a header that cannot be sent"),
    ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x token=a"},
     "OTEL_EXPORTER_OTLP_TRACES_HEADERS has a header that cannot be sent: 'x token'"),
])
def test_a_start_up_error_names_the_variable_that_was_set(extra: dict[str, str], message: str) -> None:
    with pytest.raises(StartupError) as e:
        settings.from_env({**ENDPOINT, **extra})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_sampler_arg_is_the_ratio_samplers_only_and_a_small_queue_makes_small_batches() -> None:
    s = settings.from_env({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_always_on",
                           "OTEL_TRACES_SAMPLER_ARG": "endpoint=http://jaeger:5778", "OTEL_BSP_MAX_QUEUE_SIZE": "100",
                           "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "250", "OTEL_EXPORTER_OTLP_TIMEOUT": "9000"})
    assert s is not None and s.sampler == Sampler(1.0, True)
    assert (s.max_queue, s.max_batch, s.timeout) == (100, 100, 0.25)


# --------------------------------------------------------------------------- the exporter

def exporter_for(url: str, **kw: Any) -> Any:
    import dataclasses

    from aiwfd.telemetry.export import Exporter
    s = settings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url})
    assert s is not None
    return Exporter(dataclasses.replace(s, **kw))


def test_close_in_another_loop_than_start_sends_what_is_queued() -> None:
    # An in-process server's tests: started in one loop, stopped in another.
    import asyncio

    from aiwfd.testing.otlp_receiver import OTLPReceiver
    tracer_box: list[Any] = []

    async def first() -> None:
        ex = exporter_for("http://127.0.0.1:9/v1/traces", schedule_delay=60.0)
        ex.start()
        tracer_box.append(ex)
        await asyncio.sleep(0)
        tracer = Tracer(Sampler(1.0, True), ex.add)
        finished(tracer, "in loop one", {})

    asyncio.run(first())
    ex = tracer_box[0]

    async def second() -> tuple[bool, list[str]]:
        import dataclasses
        async with OTLPReceiver() as rx:
            ex.settings = dataclasses.replace(ex.settings, endpoint=rx.traces_url)
            finished(Tracer(Sampler(1.0, True), ex.add), "in loop two", {})
            ok = await ex.close(5)
            return ok, [s.name for s in rx.spans]

    ok, names = asyncio.run(second())
    assert ok and names == ["in loop one", "in loop two"]


async def test_close_ends_a_retry_after_wait_and_sends_the_rest() -> None:
    import asyncio
    import time

    from aiohttp import web

    from aiwfd.testing.processes import serve_loopback
    bodies: list[int] = []

    async def collector(request: web.Request) -> web.Response:
        bodies.append(len(await request.read()))
        if len(bodies) == 1:
            return web.Response(status=503, headers={"Retry-After": "5"})
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collector)
    runner, port = await serve_loopback(app)
    try:
        ex = exporter_for(f"http://127.0.0.1:{port}/v1/traces", max_batch=1, schedule_delay=60.0)
        ex.start()
        tracer = Tracer(Sampler(1.0, True), ex.add)
        finished(tracer, "a", {})
        while not bodies:
            await asyncio.sleep(0.01)
        finished(tracer, "b", {})
        started = time.monotonic()
        assert await ex.close(3)
        assert time.monotonic() - started < 2
        assert len(bodies) == 2 and ex.exported == 1
    finally:
        await runner.cleanup()


async def test_a_span_that_ends_after_close_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    ex = exporter_for("http://127.0.0.1:9/v1/traces", max_queue=2, max_batch=1)
    ex.start()
    assert await ex.close(1)
    tracer = Tracer(Sampler(1.0, True), ex.add)
    for _ in range(5):
        finished(tracer, "late", {})
    assert not ex._queue and ex.dropped == 5
    assert "queue is full" not in caplog.text


async def test_an_export_task_that_dies_says_so(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    ex = exporter_for("http://127.0.0.1:9/v1/traces", ssl="not a context")  # TCPConnector refuses it
    ex.start()
    await asyncio.sleep(0.05)
    assert "the export task failed" in caplog.text
    finished(Tracer(Sampler(1.0, True), ex.add), "x", {})
    assert not ex._queue
    assert not await ex.close(1) or not ex._queue


def test_a_span_the_encoder_cannot_write_never_raises_into_the_request() -> None:
    ex = exporter_for("http://127.0.0.1:9/v1/traces")

    class Odd:
        def __str__(self) -> str:
            raise RuntimeError("no")

    finished(Tracer(Sampler(1.0, True), ex.add), "x", {"odd": Odd()})
    assert ex.dropped == 1 and not ex._queue
