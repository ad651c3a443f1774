"""Spans: what aiwfd records of a request, a call or a job, and the W3C trace context.

    span = tracer.start_span("chat gpt-4o", CLIENT, {"gen_ai.request.model": "gpt-4o"})
    token = attach(span)            # current: its children and `traceparent` see it
    ...
    detach(token); span.set_attribute("gen_ai.usage.output_tokens", 12); span.end()

A span is a slotted record; `end()` hands a sampled one to the tracer's sink
(the exporter, aiwfd.telemetry.export). The current span is one ContextVar,
so asyncio tasks inherit it. Sampling is decided where a trace enters aiwfd
(a request, a job) with the OTEL_TRACES_SAMPLER meanings; a child follows
its local parent, as the SDK's `parentbased_*` samplers do.
"""

from __future__ import annotations

import re
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from random import getrandbits
from typing import Any, Callable

__all__ = ["CLIENT", "INTERNAL", "SERVER", "Link", "Sampler", "Span", "Tracer", "attach", "current", "detach",
           "parse_traceparent"]

# Span.SpanKind of the OTLP protocol.
INTERNAL, SERVER, CLIENT = 1, 2, 3
# Status.StatusCode.
ERROR = 2
SAMPLED = 0x01

_current: ContextVar[Span | None] = ContextVar("aiwfd_span", default=None)

# W3C Trace Context, level 1 (§3.2): version 00 is exactly this; a later
# version may append fields after a dash, and ff is never valid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE_MAX = 512       # characters propagated at least (§3.3.1.5); beyond, long members go first
_TRACESTATE_MEMBERS = 32
# A list-member (§3.3.1.3): a key (simple or tenant@system) '=' a value of
# printable ASCII but ',' and '=', not ending in a space.
_MEMBER = re.compile(r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
                     r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


@dataclass(frozen=True)
class Link:
    """A span context outside the current trace: a remote parent, or what a job's run links to."""

    trace_id: int
    span_id: int
    flags: int
    trace_state: str = ""


def parse_traceparent(value: str | None, state: str | None = None) -> Link | None:
    """The context of a `traceparent` (and `tracestate`) header; None when absent or invalid."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace, 16) or not int(span, 16):
        return None
    return Link(int(trace, 16), int(span, 16), int(flags, 16) & SAMPLED, _tracestate(state) if state else "")


def _tracestate(state: str) -> str:
    """A `tracestate` fit to pass on: "" when it is not valid W3C (it is not
    propagated then: a client's odd bytes must reach neither the provider's
    request nor the collector); within 32 members and 512 characters, the
    members over 128 characters dropped first, then from the right (§3.3.1.5)."""
    members = [m.strip() for m in state.split(",")]
    members = [m for m in members if m]  # empty members are allowed, and dropped
    if len(members) > _TRACESTATE_MEMBERS or not all(_MEMBER.fullmatch(m) for m in members):
        return ""
    if len({m.partition("=")[0] for m in members}) != len(members):  # a key may appear once
        return ""
    out = ",".join(members)
    if len(out) > _TRACESTATE_MAX:
        members = [m for m in members if len(m) <= 128]
        while len(",".join(members)) > _TRACESTATE_MAX:
            members.pop()
        out = ",".join(members)
    return out


class Span:
    """One operation; its attributes are OpenTelemetry semantic-convention names."""

    __slots__ = ("name", "kind", "trace_id", "span_id", "parent_id", "remote_parent", "trace_state", "flags",
                 "start_ns", "end_ns", "attributes", "status", "message", "links", "_sink")

    def __init__(self, name: str, kind: int, trace_id: int, parent_id: int, flags: int, trace_state: str,
                 attributes: dict[str, Any], sink: Callable[[Span], None] | None, remote_parent: bool = False,
                 links: tuple[Link, ...] = ()) -> None:
        self.name, self.kind, self.attributes = name, kind, attributes
        self.trace_id, self.parent_id, self.flags, self.trace_state = trace_id, parent_id, flags, trace_state
        self.span_id = getrandbits(64) or 1
        self.remote_parent, self.links = remote_parent, links
        self.status, self.message = 0, ""
        self.start_ns, self.end_ns = time.time_ns(), 0
        self._sink = sink if flags & SAMPLED else None  # not sampled: propagated, never exported

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_error(self, error_type: str, message: str | None = None) -> None:
        self.attributes["error.type"] = error_type
        self.status, self.message = ERROR, message or ""

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"

    def end(self) -> None:
        if self.end_ns:
            return
        self.end_ns = time.time_ns()
        if self._sink is not None:
            self._sink(self)


@dataclass(frozen=True)
class Sampler:
    """OTEL_TRACES_SAMPLER: `ratio` of new traces kept (by trace id, as
    TraceIdRatioBased does, so every instance keeps the same ones), and
    whether a remote parent's decision is followed (the `parentbased_*` ones)."""

    ratio: float
    parent_based: bool

    def sample(self, trace_id: int, remote: Link | None) -> bool:
        if remote is not None and self.parent_based:
            return bool(remote.flags & SAMPLED)
        if self.ratio >= 1.0:
            return True
        return (trace_id & 0xFFFF_FFFF_FFFF_FFFF) < round(self.ratio * 2**64)


class Tracer:
    """Starts spans; finished sampled ones go to `sink`."""

    def __init__(self, sampler: Sampler, sink: Callable[[Span], None]) -> None:
        self.sampler, self._sink = sampler, sink

    def start_span(self, name: str, kind: int, attributes: dict[str, Any], *, remote: Link | None = None,
                   root: bool = False, links: tuple[Link, ...] = ()) -> Span:
        """A child of the current span; of `remote` (an incoming traceparent)
        when given; the first span of a new trace when `root` or nothing is current."""
        parent = None if root or remote is not None else _current.get()
        if parent is not None:
            return Span(name, kind, parent.trace_id, parent.span_id, parent.flags, parent.trace_state,
                        attributes, self._sink, links=links)
        trace_id = remote.trace_id if remote is not None else (getrandbits(128) or 1)
        flags = SAMPLED if self.sampler.sample(trace_id, remote) else 0
        if remote is not None:
            return Span(name, kind, trace_id, remote.span_id, flags, remote.trace_state, attributes, self._sink,
                        remote_parent=True, links=links)
        return Span(name, kind, trace_id, 0, flags, "", attributes, self._sink, links=links)


def current() -> Span | None:
    return _current.get()


def attach(span: Span) -> Token[Span | None]:
    return _current.set(span)


def detach(token: object) -> None:
    """Undo `attach`; the token is typed `object` for the hooks, which carry it opaquely."""
    try:
        _current.reset(token)  # type: ignore[arg-type]
    except ValueError:  # made in another context (a task that copied it): nothing of ours to undo there
        pass
    except RuntimeError:  # already used (a second detach): undone already
        pass

