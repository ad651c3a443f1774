"""OpenTelemetry traces (SPEC §11.2), off unless an OTLP endpoint is set.

    telemetry.start(env)          # the daemon, at start: True when tracing is on
    if telemetry.TRACER is not None: ...   # every hook: one global read when off
    await telemetry.stop()

Off (no `OTEL_EXPORTER_OTLP_ENDPOINT` / `_TRACES_ENDPOINT`), nothing of
OpenTelemetry is imported, not even its API: every hook below is one read
of `TRACER`. On, the SDK exports over OTLP/HTTP from its batch processor's
thread, so a collector that is slow or down never holds up a request (spans
beyond the queue are dropped).

The spans, from the outside in (SPEC §11.2):

    SERVER   {METHOD} {route}           the middleware (aiwfd.http.middlewares)
    INTERNAL invoke_agent {agent}       one agent call (aiwfd.engine.call_agent)
    CLIENT   chat {model}               one model call: re-asks, retries, fallbacks
                                        (aiwfd.engine); its context is current while
                                        the provider is called, so the request carries
                                        `traceparent` (aiwfd.providers.openai_compatible)
    INTERNAL job {agent}                a job's run: a trace of its own (aiwfd.http.job_runner)

Attribute names follow the OpenTelemetry GenAI and HTTP semantic
conventions. Prompts and answers are recorded only with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping

from aiwfd import __version__
from aiwfd.errors import StartupError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = ["CAPTURE_CONTENT", "TRACER", "attach", "detach", "extract", "inject", "start", "traceparent", "stop", "trace_id"]

logger = logging.getLogger("aiwfd")

# None: tracing is off (the only thing a hook reads then).
TRACER: Tracer | None = None
CAPTURE_CONTENT = False
_provider: TracerProvider | None = None

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def configured(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(v, "").strip() for v in ENDPOINT_VARS)


def start(env: Mapping[str, str]) -> bool:
    """Turn tracing on when the environment asks for it; StartupError (one
    line naming the extra) when it does and the SDK is not installed."""
    global TRACER, CAPTURE_CONTENT, _provider, _api
    if not configured(env):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        var = next(v for v in ENDPOINT_VARS if env.get(v, "").strip())
        raise StartupError(f"{var} is set but the OpenTelemetry SDK is not installed ({e.name or e}): "
                           "pip install 'aiwfd[otel]'") from None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not traces:
        traces = env["OTEL_EXPORTER_OTLP_ENDPOINT"].strip().rstrip("/") + "/v1/traces"
    if not traces.startswith(("http://", "https://")):
        raise StartupError(f"the OTLP traces endpoint {traces!r} is not an http:// or https:// URL "
                           "(aiwfd exports OTLP over HTTP)")
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "").strip() or "aiwfd",
                                "service.version": __version__})
    provider = TracerProvider(sampler=_sampler(env), resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces, headers=_headers(env)),
                                                   **_batch_options(env)))
    _provider = provider
    _api = _API()
    TRACER = provider.get_tracer("aiwfd", __version__)
    CAPTURE_CONTENT = env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower() == "true"
    logger.info("exporting traces to %s", _redacted(traces))
    return True


async def stop() -> None:
    """Export what is queued (1.5 s at most: a collector that is down must not
    hold up the shutdown) and turn tracing off."""
    global TRACER, _provider
    provider, _provider, TRACER = _provider, None, None
    if provider is None:
        return
    # Both in a daemon thread of their own: an export may be waiting out a
    # stuck collector, and neither the loop's executor (which the loop's close
    # joins) nor the interpreter's exit must wait for it.
    loop = asyncio.get_running_loop()
    flushed = loop.create_future()

    def done() -> None:
        if not flushed.done():
            flushed.set_result(None)

    def flush_then_shut_down() -> None:
        try:
            provider.force_flush(1000)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(done)
            provider.shutdown()

    threading.Thread(target=flush_then_shut_down, name="aiwfd-otel-stop", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(flushed), 1.5)
    except asyncio.TimeoutError:
        logger.warning("the trace exporter did not flush in time; the last spans may be lost")


class _API:
    """The OpenTelemetry API the hooks call, bound once by `start`: a hook runs
    on every request, and an import statement in it would be a module lookup
    per call."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.extract, self.inject = propagate.extract, propagate.inject
        self.attach, self.detach, self.Context = context.attach, context.detach, context.Context
        self.set_span_in_context = trace.set_span_in_context
        self.SpanKind, self.Status, self.error = SpanKind, Status, StatusCode.ERROR


_api: _API | None = None


def extract(headers: Mapping[str, str]) -> Context:
    """The context of an incoming W3C `traceparent` (an empty one without)."""
    assert _api is not None
    return _api.extract(headers)


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`headers` with the current span's `traceparent` (and `tracestate`)."""
    assert _api is not None
    _api.inject(headers)
    return headers


def traceparent() -> str | None:
    """The current span's W3C `traceparent` (a job keeps its submitter's, to
    link its own trace to it); None when tracing is off or nothing is current."""
    if TRACER is None:
        return None
    return inject({}).get("traceparent")


def root_span(name: str, attributes: Mapping[str, Any]) -> tuple[Span, object]:
    """A span that starts a trace of its own (a job's run), made current."""
    assert TRACER is not None and _api is not None
    span = TRACER.start_span(name, context=_api.Context(), kind=kind("INTERNAL"), attributes=attributes)
    return span, attach(span)


def attach(span: Span) -> object:
    """Make `span` current (for its children and for `inject`); `detach` the token after."""
    assert _api is not None
    return _api.attach(_api.set_span_in_context(span))


def detach(token: object) -> None:
    assert _api is not None
    _api.detach(token)  # type: ignore[arg-type]


def trace_id(span: Span) -> str | None:
    """The span's trace id as 32 hex digits, for the request log; None when not sampled."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None


def kind(name: str) -> Any:
    assert _api is not None
    return getattr(_api.SpanKind, name)


def set_error(span: Span, error_type: str, message: str | None = None) -> None:
    assert _api is not None
    span.set_attribute("error.type", error_type)
    span.set_status(_api.Status(_api.error, message))


def _sampler(env: Mapping[str, str]) -> Any:
    """OTEL_TRACES_SAMPLER / _ARG, read from aiwfd's environment (which includes
    the .env file) rather than the process's, as the SDK would."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise StartupError(f"OTEL_TRACES_SAMPLER_ARG {arg!r} is not a number from 0 to 1") from None
    samplers = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise StartupError(f"OTEL_TRACES_SAMPLER {name!r} is not one of {', '.join(samplers)}")
    return samplers[name]


_BSP = {"OTEL_BSP_SCHEDULE_DELAY": "schedule_delay_millis", "OTEL_BSP_MAX_QUEUE_SIZE": "max_queue_size",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "max_export_batch_size", "OTEL_BSP_EXPORT_TIMEOUT": "export_timeout_millis"}


def _batch_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The batch processor's OTEL_BSP_* settings, from aiwfd's environment (the .env file too)."""
    out = {}
    for var, arg in _BSP.items():
        raw = env.get(var, "").strip()
        if not raw:
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise StartupError(f"{var} {raw!r} is not a whole number above 0")
        out[arg] = int(raw)
    return out


def _headers(env: Mapping[str, str]) -> dict[str, str] | None:
    """OTEL_EXPORTER_OTLP_(TRACES_)HEADERS: `k=v,k2=v2` (URL-encoded values)."""
    from urllib.parse import unquote

    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    out = {}
    for part in raw.split(","):
        k, sep, v = part.partition("=")
        if sep and k.strip():
            out[k.strip()] = unquote(v.strip())
    return out or None


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}{':' + str(u.port) if u.port else ''}{u.path}"

