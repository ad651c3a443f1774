"""Strict JSON parsing of request bodies: anything doubtful is a 400, never a 500.

Rejected: invalid UTF-8, a charset other than UTF-8, NaN/Infinity, numbers
that overflow to infinity (1e400), duplicate keys, nesting deeper than 64,
integers longer than 4,300 digits, and any top level but an object.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from aiwfd.errors import InvalidJSON

MAX_DEPTH = 64
MAX_INT_DIGITS = 4300
_UTF8 = frozenset({"utf-8", "utf8"})
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"integer longer than {MAX_INT_DIGITS} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


_decoder = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_constant=_no_constants,
    parse_float=_finite_float,
    parse_int=_bounded_int,
)


def dump_compact(value: Any) -> bytes:
    """`value` as compact JSON. What the parser accepts it writes back: orjson
    stops at 64-bit integers, which a body may exceed (up to MAX_INT_DIGITS),
    so those are written by the stdlib (rare, and slower)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def check_charset(charset: str | None) -> None:
    if charset is not None and charset.lower() not in _UTF8:
        raise InvalidJSON(f"unsupported charset {charset[:40]!r}: send UTF-8")


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or InvalidJSON saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJSON(f"body is not valid UTF-8 (byte {e.start})") from None
    # Cheap guard first: a body with fewer brackets than the limit cannot be too deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise InvalidJSON(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value, end = _decoder.raw_decode(text, _skip_ws(text, 0))
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise InvalidJSON(f"body is not valid JSON: {e}") from None
    if _skip_ws(text, end) != len(text):
        raise InvalidJSON("body is not valid JSON: extra data after the value")
    if not isinstance(value, dict):
        raise InvalidJSON(f"body must be a JSON object, not {json_kind(value)}")
    # "\ud800" alone decodes to a string no UTF-8 encoder accepts; refuse it here
    # rather than fail later when the body is sent to the model.
    if _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        raise InvalidJSON("body is not valid JSON: a \\u escape is an unpaired surrogate")
    return value


def _encodable(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


def _depth(text: str) -> int:
    """Deepest bracket nesting, ignoring brackets inside strings."""
    depth = deepest = 0
    in_str = escaped = False
    for c in text:
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif c in "]}":
            depth -= 1
    return deepest


def json_kind(v: Any, integers: bool = False) -> str:
    """What a parsed JSON value is, for messages: "an array", "null", …

    `integers`: tell "an integer" from "a number" (for a type error whose
    schema asked for one of them).
    """
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if integers and isinstance(v, int):
        return "an integer"
    return "a number"
