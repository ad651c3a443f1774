"""OTLP protobuf, written by hand: the bytes of one span, and of one export.

    body = Batch(resource, "aiwfd", version).request([encode(span) for span in done])

Only the messages aiwfd sends, from opentelemetry-proto's
`collector/trace/v1/trace_service.proto`:

    ExportTraceServiceRequest  1 resource_spans
    ResourceSpans              1 resource   2 scope_spans
    Resource                   1 attributes
    ScopeSpans                 1 scope      2 spans
    InstrumentationScope       1 name       2 version
    Span                       1 trace_id   2 span_id     3 trace_state  4 parent_span_id
                               5 name       6 kind        7 start (fixed64)  8 end (fixed64)
                               9 attributes 13 links      15 status      16 flags (fixed32)
    Span.Link                  1 trace_id   2 span_id     3 trace_state  6 flags (fixed32)
    Status                     2 message    3 code
    KeyValue                   1 key        2 value
    AnyValue                   1 string     2 bool        3 int          4 double   5 array   6 kvlist   7 bytes
    ArrayValue                 1 values
    KeyValueList               1 values

Why not the protobuf classes: building a message object per span and
serialising it (what the OpenTelemetry SDK's exporter does) costs ~28 µs a
span here, more than a whole uninstrumented call's share of the budget; this
costs a few. The test suite decodes what this writes with the reference
bindings (opentelemetry-proto). An attribute is written once per distinct
(key, value) and then copied, because most values repeat (routes, models,
agent names, status codes).
"""

from __future__ import annotations

import re
from struct import Struct
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from aiwfd.telemetry.spans import Span

__all__ = ["Batch", "encode", "key_value"]

_U64 = Struct("<Q").pack
_U32 = Struct("<I").pack
_F64 = Struct("<d").pack
_CACHE_MAX = 8192

# Span.flags: the W3C trace flags, and whether the parent's remoteness is known / is remote.
HAS_IS_REMOTE = 0x100
IS_REMOTE = 0x200


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    """A protobuf `string`: valid UTF-8 or the collector refuses the whole
    export. A lone surrogate (JSON's "\\ud800", a header's undecodable byte
    as aiohttp gives it) becomes U+FFFD."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


_INT64 = range(-(2**63), 2**63)


def _any(value: Any) -> bytes:
    """An AnyValue. None never gets here (an attribute set to None is left out)."""
    if isinstance(value, str):
        return _field(b"\x0a", _utf8(value))
    if isinstance(value, bool):  # before int: a bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        if value not in _INT64:  # an int64 would wrap it: its digits instead
            return _field(b"\x0a", str(value).encode())
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _F64(value)
    if isinstance(value, (list, tuple)):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any(v)) for v in value if v is not None))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Mapping):  # KeyValueList
        return _field(b"\x32", b"".join(_field(b"\x0a", key_value(str(k), v))
                                         for k, v in value.items() if v is not None))
    return _field(b"\x0a", _utf8(str(value)))


_kv_cache: dict[tuple[str, type, Any], bytes] = {}


def key_value(key: str, value: Any) -> bytes:
    """A KeyValue message's bytes."""
    return _field(b"\x0a", _utf8(key)) + _field(b"\x12", _any(value))


def _attributes(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """Repeated KeyValue fields (`tag`), uncached: the resource's, once."""
    return b"".join(_field(tag, key_value(k, v)) for k, v in attributes.items() if v is not None)


# Values that differ on every span: written each time, never cached.
_UNIQUE = frozenset({"gen_ai.response.id", "aiwfd.job.id", "gen_ai.input.messages", "gen_ai.output.messages"})


def _span_attributes(attributes: Mapping[str, Any]) -> bytes:
    """Span.attributes: each (key, value) written once, then copied."""
    out = []
    cache = _kv_cache
    for k, v in attributes.items():
        if v is None:
            continue
        if k in _UNIQUE:
            out.append(_field(b"\x4a", key_value(k, v)))
            continue
        cls = v.__class__
        # The type is in the key: True == 1 == 1.0 as dict keys. A list or a
        # tuple is looked up as a tuple (the finish reasons: the same few every
        # time), with its items' types too: [1] == [True] == [1.0], (1,) == (True,).
        ck = (k, cls, v) if cls is not list and cls is not tuple else (k, cls, (tuple(v), tuple(map(type, v))))
        try:
            b = cache.get(ck)
        except TypeError:  # a list of lists: not worth a key
            out.append(_field(b"\x4a", key_value(k, v)))
            continue
        if b is None:
            b = _field(b"\x4a", key_value(k, v))
            if len(cache) >= _CACHE_MAX:  # many distinct values must not grow it for ever
                cache.clear()
            cache[ck] = b
        out.append(b)
    return b"".join(out)


_names: dict[tuple[str, int], bytes] = {}
_FLAGS = {f: b"\x85\x01" + _U32(f) for f in (HAS_IS_REMOTE, HAS_IS_REMOTE | 1, HAS_IS_REMOTE | IS_REMOTE,
                                              HAS_IS_REMOTE | IS_REMOTE | 1)}


def encode(span: Span) -> bytes:
    """One finished span: the bytes of a `Span` message."""
    head = b"\x0a\x10" + span.trace_id.to_bytes(16, "big") + b"\x12\x08" + span.span_id.to_bytes(8, "big")
    if span.trace_state:
        head += _field(b"\x1a", _utf8(span.trace_state))
    if span.parent_id:
        head += b"\x22\x08" + span.parent_id.to_bytes(8, "big")
    name = _names.get((span.name, span.kind))
    if name is None:
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        name = _names[(span.name, span.kind)] = (
            _field(b"\x2a", _utf8(span.name)) + b"\x30" + _varint(span.kind))
    out = [head, name, b"\x39", _U64(span.start_ns), b"\x41", _U64(span.end_ns), _span_attributes(span.attributes)]
    for link in span.links:
        body = b"\x0a\x10" + link.trace_id.to_bytes(16, "big") + b"\x12\x08" + link.span_id.to_bytes(8, "big")
        if link.trace_state:
            body += _field(b"\x1a", _utf8(link.trace_state))
        out.append(_field(b"\x6a", body + b"\x35" + _U32(link.flags | HAS_IS_REMOTE | IS_REMOTE)))
    if span.status:
        status = _field(b"\x12", _utf8(span.message)) if span.message else b""
        out.append(_field(b"\x7a", status + b"\x18" + _varint(span.status)))
    flags = span.flags | HAS_IS_REMOTE | (IS_REMOTE if span.remote_parent else 0)
    out.append(_FLAGS.get(flags) or b"\x85\x01" + _U32(flags))
    return b"".join(out)


class Batch:
    """The envelope of every export: one resource, one instrumentation scope."""

    def __init__(self, resource: Mapping[str, Any], scope: str, version: str) -> None:
        self._resource = _field(b"\x0a", _attributes(b"\x0a", resource))
        self._scope = _field(b"\x0a", _field(b"\x0a", _utf8(scope)) + _field(b"\x12", _utf8(version)))

    def request(self, spans: Iterable[bytes]) -> bytes:
        """An `ExportTraceServiceRequest` of `spans` (each from `encode`)."""
        scope_spans = _field(b"\x12", self._scope + b"".join(_field(b"\x12", s) for s in spans))
        return _field(b"\x0a", self._resource + scope_spans)
