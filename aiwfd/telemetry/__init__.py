"""OpenTelemetry traces (SPEC §11.2), off unless an OTLP endpoint is set.

    telemetry.start(env)          # the daemon, at start: True when tracing is on
    if telemetry.TRACER is not None: ...   # every hook: one global read when off
    await telemetry.stop()

Off (no `OTEL_EXPORTER_OTLP_ENDPOINT` / `_TRACES_ENDPOINT`), every hook is
one read of `TRACER`, and neither the exporter nor anything of OpenTelemetry
is imported.
On, spans are recorded by aiwfd.telemetry.spans, written as OTLP protobuf by
aiwfd.telemetry.otlp and POSTed in batches from the event loop by
aiwfd.telemetry.export; the OTEL_* variables keep their standard meanings
(aiwfd.telemetry.settings).

Why not the OpenTelemetry SDK: measured here (BENCHMARKS.md, OpenTelemetry
tracing), its three spans of a call cost ~60 µs and its exporter's protobuf
encoding ~80 µs more, in a thread that contends with the loop for the GIL:
tracing on ran at 0.56× the requests/s of off, and the budget for 0.8× is
~65 µs per call in all. aiwfd records only its own spans, so a tracer of
~150 lines does the job; nothing else in the process needs the global
OpenTelemetry API.

The spans, from the outside in (SPEC §11.2):

    SERVER   {METHOD} {route}           the middleware (aiwfd.http.middlewares)
    INTERNAL invoke_agent {agent}       one agent call (aiwfd.engine.call_agent)
    CLIENT   chat {model}               one model call: re-asks, retries, fallbacks
                                        (aiwfd.engine); current while the provider is
                                        called, so its request carries `traceparent`
                                        (aiwfd.providers.openai_compatible)
    INTERNAL job {agent}                a job's run: a trace of its own, linked to the
                                        request that submitted it (aiwfd.http.job_runner)

Attribute names follow the OpenTelemetry GenAI and HTTP semantic
conventions. Prompts and answers are recorded only with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping

from aiwfd.telemetry.spans import (CLIENT, INTERNAL, SERVER, Link, Span, Tracer, attach, current, detach,
                                   parse_traceparent)

if TYPE_CHECKING:
    from aiwfd.telemetry.export import Exporter

__all__ = ["CAPTURE_CONTENT", "CLIENT", "INTERNAL", "SERVER", "TRACER", "attach", "detach", "extract", "inject",
           "root_span", "start", "stop", "trace_id", "traceparent"]

logger = logging.getLogger("aiwfd")

# None: tracing is off (the only thing a hook reads then).
TRACER: Tracer | None = None
CAPTURE_CONTENT = False
_exporter: Exporter | None = None


def start(env: Mapping[str, str]) -> bool:
    """Turn tracing on when the environment asks for it (StartupError naming
    the variable for a bad value). In the running loop: its exporter is a task."""
    global TRACER, CAPTURE_CONTENT, _exporter
    from aiwfd.telemetry import settings

    s = settings.from_env(env)
    if s is None:
        return False
    from aiwfd.telemetry.export import Exporter  # aiohttp's client: loaded by then anyway

    _exporter = Exporter(s)
    _exporter.start()
    TRACER = Tracer(s.sampler, _exporter.add)
    CAPTURE_CONTENT = s.capture_content
    logger.info("exporting traces to %s", settings.redacted(s.endpoint))
    return True


async def stop() -> None:
    """Export what is queued (1.5 s at most: a collector that is down must not
    hold up the shutdown) and turn tracing off."""
    global TRACER, _exporter
    exporter, _exporter, TRACER = _exporter, None, None
    if exporter is not None and not await exporter.close(1.5):
        logger.warning("the trace exporter did not flush in time; the last spans may be lost")


def extract(headers: Mapping[str, str]) -> Link | None:
    """The remote parent of an incoming W3C `traceparent`; None without (or a malformed one).
    Several `tracestate` headers are one list (W3C Trace Context §3.3.1)."""
    value = headers.get("traceparent")
    if not value:
        return None
    getall = getattr(headers, "getall", None)
    state = ",".join(getall("tracestate", ())) if getall is not None else headers.get("tracestate")
    return parse_traceparent(value, state)


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`headers` with the current span's `traceparent` (and `tracestate`)."""
    span = current()
    if span is not None:
        headers["traceparent"] = span.traceparent()
        if span.trace_state:
            headers["tracestate"] = span.trace_state
    return headers


def traceparent() -> str | None:
    """The current span's W3C `traceparent` (a job keeps its submitter's, to
    link its own trace to it); None when tracing is off or nothing is current."""
    if TRACER is None:
        return None
    span = current()
    return span.traceparent() if span is not None else None


def root_span(name: str, attributes: dict[str, Any], link: str | None = None) -> tuple[Span, object]:
    """A span that starts a trace of its own (a job's run), linked to the
    span whose `traceparent` is `link`, made current."""
    assert TRACER is not None
    parent = parse_traceparent(link)
    span = TRACER.start_span(name, INTERNAL, attributes, root=True, links=(parent,) if parent else ())
    return span, attach(span)


def trace_id(span: Span) -> str | None:
    """The span's trace id as 32 hex digits, for the request log; None when not sampled."""
    return f"{span.trace_id:032x}" if span.sampled else None
