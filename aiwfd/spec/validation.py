"""Validators built once per load: JSON Schema 2020-12 with formats enforced.

Errors come out as `{"path": "address.city", "message": "…"}`, the `details`
shape of SPEC §3.1, with unknown and missing fields reported at the field.

jsonschema is the authority, but walking a schema costs it ~100 µs for a
ten-field body, which is most of a request's CPU. The type language is small,
so each type also compiles to a plain Python predicate (`compile_check`); it
decides "valid" on the hot path and jsonschema only explains what is wrong.
The test suite checks that both always agree.

jsonschema itself is imported on first need (a body that fails, a format the
fast patterns do not decide, an untrusted schema): its import is ~50 ms of a
start that needs none of it (BENCHMARKS.md, start-up).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    import jsonschema
    from jsonschema import FormatChecker

from aiwfd.spec import typedsl  # noqa: E402
from aiwfd.spec.config import did_you_mean  # noqa: E402
from aiwfd.spec.jsonparse import json_kind  # noqa: E402
from aiwfd.spec.typedsl import Node  # noqa: E402

Check = Callable[[Any], bool]

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def _import_jsonschema() -> None:
    # jsonschema imports rfc3987_syntax when it is installed (its format-nongpl
    # extra pulls it in) only for IRI formats we never emit, and that module
    # builds a grammar at import: seven seconds on a 2-core machine. URIs are
    # checked with rfc3986-validator instead.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
    import jsonschema  # noqa: F401


@functools.cache
def format_checker() -> FormatChecker:
    _import_jsonschema()
    from jsonschema import FormatChecker

    # jsonschema's own email check only looks for an "@"; an address needs a
    # local part and a dotted domain to be worth handing to a model.
    checker = FormatChecker(["date", "date-time", "hostname", "ipv4", "ipv6", "uri", "uuid"])

    @checker.checks("email")
    def is_email(instance: object) -> bool:
        return not isinstance(instance, str) or bool(_EMAIL_RE.fullmatch(instance))

    return checker


def __getattr__(name: str) -> Any:
    # `FORMAT_CHECKER` (the tests' reference) without importing jsonschema at import.
    if name == "FORMAT_CHECKER":
        return format_checker()
    raise AttributeError(name)

# The common well-formed case of a format, accepted without FORMAT_CHECKER's
# per-call overhead (3–20 µs each). Each pattern accepts only strings the
# checker accepts too; anything else is still decided by the checker, so the
# verdict is always jsonschema's (the test suite checks both ways).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_DAY = r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_URI_CHAR = r"[A-Za-z0-9._~!$&'()*+,;=:@-]"
_FAST_FORMATS: dict[str, re.Pattern[str]] = {
    "date": re.compile(_DAY),
    "date-time": re.compile(_DAY + r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
                           r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"),
    "uuid": re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"),
    "ipv4": re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}"),
    "hostname": re.compile(rf"(?=[^\n]{{1,253}}\Z)(?:{_LABEL}\.)*{_LABEL}"),
    "uri": re.compile(rf"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~-]+(?::[0-9]*)?(?:/{_URI_CHAR}*)*"
                      rf"(?:\?(?:{_URI_CHAR}|[/?])*)?(?:#(?:{_URI_CHAR}|[/?])*)?"),
}


def _format_check(fmt: str) -> Check:
    """`format_checker().conforms(v, fmt)` for a string `v`, with the fast path above."""

    def conforms(v: Any, fmt: str) -> bool:
        return format_checker().conforms(v, fmt)

    if fmt == "email":
        email = _EMAIL_RE.fullmatch
        return lambda v: email(v) is not None
    fast = _FAST_FORMATS.get(fmt)
    if fast is None:
        return lambda v: conforms(v, fmt)
    match = fast.fullmatch
    return lambda v: match(v) is not None or conforms(v, fmt)


class Validator:
    """One compiled schema; `errors()` is empty when the instance is valid."""

    __slots__ = ("schema", "_v", "is_valid")

    def __init__(self, schema: dict[str, Any], check: Check | None = None, *, trusted: bool = False) -> None:
        # Checking against the 2020-12 metaschema costs jsonschema ~10 ms per
        # schema; the compiler's output is `trusted` (the test suite runs
        # check_schema on every compiled schema), anything else is checked.
        self.schema = schema
        self._v: jsonschema.protocols.Validator | None = None
        if not trusted:
            type(self._jsonschema()).check_schema(schema)
        self.is_valid: Check = check or self._jsonschema_is_valid

    def _jsonschema(self) -> jsonschema.protocols.Validator:
        if self._v is None:
            _import_jsonschema()
            from jsonschema import Draft202012Validator

            self._v = Draft202012Validator(self.schema, format_checker=format_checker())
        return self._v

    def _jsonschema_is_valid(self, instance: Any) -> bool:
        return self._jsonschema().is_valid(instance)

    def errors(self, instance: Any, limit: int = 20) -> list[dict[str, str]]:
        if self.is_valid(instance):
            return []
        out: dict[tuple[str, str], dict[str, str]] = {}
        for err in sorted(self._jsonschema().iter_errors(instance), key=_order):
            for d in _details(err):
                out.setdefault((d["path"], d["message"]), d)
            if len(out) >= limit:
                break
        if not out:  # the fast check and jsonschema disagree: trust jsonschema
            return []
        return list(out.values())[:limit]


def compile_check(node: Node, defs: Mapping[str, Node], cache: dict[str, Check] | None = None) -> Check:
    """A predicate equal to validating against `typedsl.schema(node)`.

    `cache` (one per `defs`) shares the predicates of named types between calls.
    """
    compiled: dict[str, Check] = {} if cache is None else cache

    def ref(key: str) -> Check:
        if key in compiled:  # already built (shared cache): no indirection
            return compiled[key]
        def check(v: Any) -> bool:
            return compiled[key](v)
        return check

    def build(n: Node) -> Check:
        if isinstance(n, typedsl.Str):
            lo, hi = n.min_len, n.max_len
            fmt_ok = _format_check(n.format) if n.format is not None else None
            if lo is None and hi is None:
                if fmt_ok is not None:
                    return lambda v: type(v) is str and fmt_ok(v)
                return lambda v: type(v) is str
            lo_, hi_ = lo or 0, hi if hi is not None else float("inf")
            if fmt_ok is not None:
                return lambda v: type(v) is str and lo_ <= len(v) <= hi_ and fmt_ok(v)
            return lambda v: type(v) is str and lo_ <= len(v) <= hi_
        if isinstance(n, (typedsl.Int, typedsl.Num)):
            # Open ends as infinities: one chained comparison instead of four tests.
            lo_n = n.minimum if n.minimum is not None else -math.inf
            hi_n = n.maximum if n.maximum is not None else math.inf
            if isinstance(n, typedsl.Int):
                def check_int(v: Any) -> bool:
                    t = type(v)  # bool is excluded by `type`
                    if t is not int and not (t is float and v.is_integer()):
                        return False
                    return lo_n <= v <= hi_n
                return check_int
            def check_num(v: Any) -> bool:
                t = type(v)
                return (t is int or t is float) and lo_n <= v <= hi_n
            return check_num
        if isinstance(n, typedsl.Bool):
            return lambda v: type(v) is bool
        if isinstance(n, typedsl.AnyT):
            return lambda v: True
        if isinstance(n, typedsl.Enum):
            values = frozenset(n.values)
            return lambda v: type(v) is str and v in values
        if isinstance(n, typedsl.Array):
            item, lo, hi = build(n.item), n.min_items, n.max_items
            def check_array(v: Any) -> bool:
                if type(v) is not list:
                    return False
                if (lo is not None and len(v) < lo) or (hi is not None and len(v) > hi):
                    return False
                for x in v:
                    if not item(x):
                        return False
                return True
            return check_array
        if isinstance(n, typedsl.Map):
            key, value = build(n.key), build(n.value)
            return lambda v: type(v) is dict and all(key(k) and value(x) for k, x in v.items())
        if isinstance(n, typedsl.Ref):
            return ref(n.key)
        fields = {f.name: build(f.type) for f in n.fields}
        required = frozenset(f.name for f in n.fields if not f.optional)
        known = frozenset(fields)
        def check_obj(v: Any) -> bool:
            if type(v) is not dict:
                return False
            keys = v.keys()
            if not (keys >= required and keys <= known):
                return False
            for name, x in v.items():
                if not fields[name](x):
                    return False
            return True
        return check_obj

    root = build(node)
    for key in typedsl.closure([node], dict(defs)):
        if key not in compiled:
            compiled[key] = build(defs[key])
    return root


def _order(err: jsonschema.ValidationError) -> tuple:
    return tuple(str(p) for p in err.absolute_path)


def _details(err: jsonschema.ValidationError) -> Iterable[dict[str, str]]:
    path = list(err.absolute_path)
    # Read once, as Any: jsonschema types them with an `Unset` that a raised
    # error never holds.
    value: Any = err.validator_value
    schema: Any = err.schema
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [r for r in value if r not in err.instance]
        for name in missing:
            yield {"path": format_path(path + [name]), "message": "required field is missing"}
        return
    if err.validator == "additionalProperties" and err.validator_value is False and isinstance(err.instance, dict):
        known = list(schema.get("properties", {}))
        for name in err.instance:
            if name in known:
                continue
            close = did_you_mean(name, known)
            hint = f" ({close})" if close else ""
            yield {"path": format_path(path + [name]), "message": f"unknown field{hint}"}
        return
    yield {"path": format_path(path), "message": _message(err)}


def _message(err: jsonschema.ValidationError) -> str:
    v: Any = err.validator
    val: Any = err.validator_value
    if v == "format":
        return f"is not a valid {val}"
    if v == "type":
        return f"expected {_article(val)}, got {json_kind(err.instance, integers=True)}"
    if v == "enum":
        return "must be one of: " + ", ".join(str(x) for x in val)
    if v == "minLength":
        return f"must be at least {val} characters long"
    if v == "maxLength":
        return f"must be at most {val} characters long"
    if v == "minimum":
        return f"must be ≥ {val}"
    if v == "maximum":
        return f"must be ≤ {val}"
    if v == "minItems":
        return f"must have at least {val} items"
    if v == "maxItems":
        return f"must have at most {val} items"
    return err.message


def _article(t: Any) -> str:
    if isinstance(t, list):
        return " or ".join(_article(x) for x in t)
    return {"integer": "an integer", "object": "an object", "array": "an array"}.get(t, f"a {t}")


def format_path(parts: list[Any]) -> str:
    """`["items", 0, "name"]` → `items[0].name`; the root is `""`."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out
