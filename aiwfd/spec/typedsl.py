"""The type language of the agents file: parse expressions, emit JSON Schema.

This module is pure: strings and plain data in, frozen nodes and dicts out.
`config.py` reads the YAML and reports errors with file, line and key; here a
malformed expression raises `TypeSyntaxError` with just the problem.

    parse("string(1..100)")      -> Str(min_len=1, max_len=100)
    schema(Str(1, 100))          -> {"type": "string", "minLength": 1, "maxLength": 100}
    strict_schema(node)          -> the variant OpenAI's strict mode accepts (SPEC §1.4)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# string(<format>) and the JSON Schema format it stands for.
STRING_FORMATS: dict[str, str] = {
    "email": "email",
    "url": "uri",
    "uri": "uri",
    "hostname": "hostname",
    "ipv4": "ipv4",
    "ipv6": "ipv6",
}
# Scalar words that are strings with a format.
FORMAT_WORDS: dict[str, str] = {"datetime": "date-time", "date": "date", "uuid": "uuid"}
BUILTIN_WORDS = frozenset(
    {"string", "int", "number", "bool", "any", "enum", "map"} | set(FORMAT_WORDS)
)

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TypeSyntaxError(ValueError):
    """A type expression is malformed or refers to something that does not exist."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Str:
    min_len: int | None = None
    max_len: int | None = None
    format: str | None = None


@dataclass(frozen=True)
class Int:
    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True)
class Num:
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Bool:
    pass


@dataclass(frozen=True)
class AnyT:
    pass


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class Array:
    item: "Node"
    min_items: int | None = None
    max_items: int | None = None


@dataclass(frozen=True)
class Map:
    key: "Node"
    value: "Node"


@dataclass(frozen=True)
class Ref:
    """A reference, already resolved to its key in the global `$defs`."""

    key: str


@dataclass(frozen=True)
class Field:
    name: str
    type: "Node"
    optional: bool = False


@dataclass(frozen=True)
class Obj:
    fields: tuple[Field, ...]


Node = Union[Str, Int, Num, Bool, AnyT, Enum, Array, Map, Ref, Obj]

# Resolves a reference as written (`alias` is None for local names) to a $defs key.
Resolver = Callable[[Union[str, None], str], str]


# --------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over one expression; positions are only for messages."""

    def __init__(self, text: str, resolve: Resolver) -> None:
        self.text = text
        self.pos = 0
        self.resolve = resolve

    def fail(self, message: str, hint: str | None = None) -> TypeSyntaxError:
        return TypeSyntaxError(f"invalid type {self.text!r}: {message}", hint)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self, s: str) -> bool:
        self.skip_ws()
        return self.text.startswith(s, self.pos)

    def eat(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.eat(s):
            found = self.text[self.pos :] or "end of expression"
            raise self.fail(f"expected {s!r} at {found!r}")

    def name(self) -> str:
        self.skip_ws()
        m = NAME_RE.match(self.text, self.pos)
        if not m:
            found = self.text[self.pos :] or "end of expression"
            raise self.fail(f"expected a type name at {found!r}")
        self.pos = m.end()
        return m.group()

    def until(self, stops: str) -> str:
        """Raw text up to one of `stops` (for range bounds and enum values)."""
        start = self.pos
        depth = 0
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "(":
                depth += 1
            elif c == ")" and depth:
                depth -= 1
            elif c in stops and not depth:
                break
            self.pos += 1
        return self.text[start : self.pos].strip()

    # expr := base ('[]' ('(' bounds ')')?)*
    def parse(self) -> Node:
        node = self.expr()
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.fail(f"unexpected {self.text[self.pos:]!r}")
        return node

    def expr(self) -> Node:
        node = self.base()
        while self.eat("[]"):
            lo = hi = None
            if self.eat("("):
                lo, hi = self.array_bounds()
            node = Array(node, lo, hi)
        return node

    def base(self) -> Node:
        self.skip_ws()
        if self.eat("$"):
            first = self.name()
            if self.text.startswith(".", self.pos):
                self.pos += 1
                return Ref(self.resolve(first, self.name()))
            return Ref(self.resolve(None, first))
        word = self.name()
        if word == "string":
            return self.string_args()
        if word in ("int", "number"):
            return self.numeric(word)
        if word in FORMAT_WORDS:
            return Str(format=FORMAT_WORDS[word])
        if word == "bool":
            return Bool()
        if word == "any":
            return AnyT()
        if word == "enum":
            return self.enum()
        if word == "map":
            return self.map()
        if word in ("boolean", "integer", "float", "str", "object", "list", "array"):
            hint = {"boolean": "bool", "integer": "int", "float": "number", "str": "string",
                    "object": "a mapping of fields or map(string, T)", "list": "T[]",
                    "array": "T[]"}[word]
            raise self.fail(f"unknown type {word!r}", f"did you mean {hint}?")
        return Ref(self.resolve(None, word))

    def string_args(self) -> Str:
        if not self.eat("("):
            return Str()
        inner = self.until(")")
        self.expect(")")
        if inner in STRING_FORMATS:
            return Str(format=STRING_FORMATS[inner])
        if ".." not in inner:
            n = self.integer(inner, "string length")
            return Str(n, n)
        lo, hi = self.range(inner, int, "string length")
        return Str(lo, hi)

    def numeric(self, word: str) -> Node:
        if not self.eat("("):
            return Int() if word == "int" else Num()
        inner = self.until(")")
        self.expect(")")
        if ".." not in inner:
            raise self.fail(f"{word}(…) takes a range such as {word}(0..10)")
        if word == "int":
            lo, hi = self.range(inner, int, "int bound")
            return Int(lo, hi)
        flo, fhi = self.range(inner, float, "number bound")
        return Num(flo, fhi)

    def integer(self, text: str, what: str) -> int:
        if not re.fullmatch(r"\d+", text):
            raise self.fail(f"{what} {text!r} is not a whole number")
        return int(text)

    def range(self, inner: str, kind: type, what: str) -> tuple[Any, Any]:
        lo_s, _, hi_s = (s.strip() for s in inner.partition(".."))
        if not lo_s and not hi_s:
            raise self.fail("a range needs at least one bound")
        lo = self.bound(lo_s, kind, what) if lo_s else None
        hi = self.bound(hi_s, kind, what) if hi_s else None
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(f"empty range: {lo} is greater than {hi}")
        if what == "string length" and lo is not None and lo < 0:
            raise self.fail("a length cannot be negative")
        return lo, hi

    def bound(self, text: str, kind: type, what: str) -> Any:
        pattern = r"-?\d+" if kind is int else r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?"
        if what == "string length":
            pattern = r"\d+"
        if not re.fullmatch(pattern, text):
            raise self.fail(f"{what} {text!r} is not a {'whole ' if kind is int else ''}number")
        # number(0..1) keeps whole bounds whole, so the schema says 0, not 0.0.
        value = int(text) if kind is int or re.fullmatch(r"-?\d+", text) else float(text)
        if kind is float and value in (float("inf"), float("-inf")):
            raise self.fail(f"{what} {text!r} is out of range")
        return value

    def array_bounds(self) -> tuple[int | None, int | None]:
        inner = self.until(")")
        self.expect(")")
        lo = hi = None
        for part in (p.strip() for p in inner.split(",")):
            key, sep, val = (s.strip() for s in part.partition(":"))
            if not sep or key not in ("min", "max"):
                raise self.fail(f"array bounds are written (min: N, max: N), not {part!r}")
            n = self.integer(val, f"array {key}")
            if key == "min":
                lo = n
            else:
                hi = n
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(f"empty range: min {lo} is greater than max {hi}")
        return lo, hi

    def enum(self) -> Enum:
        self.expect("(")
        inner = self.until(")")
        self.expect(")")
        values: list[str] = []
        for raw in self.enum_values(inner) if inner.strip() else ():
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
                raw = raw[1:-1]
            if not raw:
                raise self.fail("empty enum value")
            if raw in values:
                raise self.fail(f"duplicate enum value {raw!r}")
            values.append(raw)
        if not values:
            raise self.fail("enum() needs at least one value")
        return Enum(tuple(values))

    def enum_values(self, inner: str) -> list[str]:
        """Split at commas outside quotes: enum("in progress, late", done)."""
        parts, current, quote = [], "", None
        for c in inner:
            if quote:
                current += c
                if c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
                current += c
            elif c == ",":
                parts.append(current.strip())
                current = ""
            else:
                current += c
        if quote:
            raise self.fail("unterminated quote in enum(…)")
        parts.append(current.strip())
        return parts

    def map(self) -> Map:
        self.expect("(")
        key = self.expr()
        self.expect(",")
        value = self.expr()
        self.expect(")")
        if not isinstance(key, (Str, Enum)):
            raise self.fail("map keys must be string or enum(…): JSON object keys are strings")
        return Map(key, value)


class Parses:
    """The memo of `parse`: text -> (node, the (alias, name) -> key lookups the parse made).

    Nodes are frozen, so a hit can be shared by any number of configs. The
    owner (the daemon's `spec.compiler.Memo`) keeps it across reloads; a
    caller without one parses afresh.
    """

    MAX = 50_000

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Node, tuple[tuple[str | None, str, str], ...]]] = {}

    def __len__(self) -> int:
        return len(self.entries)


def parse(text: str, resolve: Resolver, memo: Parses | None = None) -> Node:
    """Parse one type expression; references are resolved through `resolve`.

    With a `memo`, parses are reused by text: a 200-agent file repeats
    `string`, `Lang` or `string(1..100)` hundreds of times, and a reload
    parses the same file again. A hit is used only when `resolve` answers
    every reference the expression made exactly as before, so a type renamed
    or redefined elsewhere is parsed (and reported) afresh.
    """
    if not isinstance(text, str) or not text.strip():
        raise TypeSyntaxError("empty type expression")
    entries = memo.entries if memo is not None else None
    hit = entries.get(text) if entries is not None else None
    if hit is not None:
        node, lookups = hit
        try:
            if all(resolve(alias, name) == key for alias, name, key in lookups):
                return node
        except TypeSyntaxError:
            pass  # parse again below, for the full error
    made: list[tuple[str | None, str, str]] = []

    def recording(alias: str | None, name: str) -> str:
        key = resolve(alias, name)
        made.append((alias, name, key))
        return key

    node = _Parser(text.strip(), recording if entries is not None else resolve).parse()
    if entries is not None:
        if len(entries) >= Parses.MAX:
            entries.clear()
        entries[text] = (node, tuple(made))
    return node


# --------------------------------------------------------------------------- schemas


def schema(node: Node) -> dict[str, Any]:
    """The validation JSON Schema of a node (references stay `$ref`s)."""
    if isinstance(node, Str):
        out: dict[str, Any] = {"type": "string"}
        if node.min_len is not None:
            out["minLength"] = node.min_len
        if node.max_len is not None:
            out["maxLength"] = node.max_len
        if node.format:
            out["format"] = node.format
        return out
    if isinstance(node, (Int, Num)):
        out = {"type": "integer" if isinstance(node, Int) else "number"}
        if node.minimum is not None:
            out["minimum"] = node.minimum
        if node.maximum is not None:
            out["maximum"] = node.maximum
        return out
    if isinstance(node, Bool):
        return {"type": "boolean"}
    if isinstance(node, AnyT):
        return {}
    if isinstance(node, Enum):
        return {"type": "string", "enum": list(node.values)}
    if isinstance(node, Array):
        out = {"type": "array", "items": schema(node.item)}
        if node.min_items is not None:
            out["minItems"] = node.min_items
        if node.max_items is not None:
            out["maxItems"] = node.max_items
        return out
    if isinstance(node, Map):
        out = {"type": "object", "additionalProperties": schema(node.value)}
        if node.key != Str():
            out["propertyNames"] = schema(node.key)
        return out
    if isinstance(node, Ref):
        return {"$ref": f"#/$defs/{node.key}"}
    out = {
        "type": "object",
        "properties": {f.name: schema(f.type) for f in node.fields},
        "additionalProperties": False,
    }
    required = [f.name for f in node.fields if not f.optional]
    if required:
        out["required"] = required
    return out


def _hint(node: Node) -> str | None:
    """A description telling the model a constraint strict mode cannot carry."""
    if isinstance(node, Str):
        parts = []
        if node.format:
            parts.append(f"format: {node.format}")
        if node.min_len is not None and node.min_len == node.max_len:
            parts.append(f"exactly {node.min_len} characters")
        elif node.min_len is not None or node.max_len is not None:
            parts.append(_between(node.min_len, node.max_len, "characters"))
        return "; ".join(parts) or None
    if isinstance(node, (Int, Num)) and (node.minimum is not None or node.maximum is not None):
        return _between(node.minimum, node.maximum, "")
    if isinstance(node, Array) and (node.min_items is not None or node.max_items is not None):
        return _between(node.min_items, node.max_items, "items")
    return None


def _between(lo: Any, hi: Any, unit: str) -> str:
    unit = f" {unit}" if unit else ""
    if lo is not None and hi is not None:
        return f"{lo} to {hi}{unit}"
    if lo is not None:
        return f"at least {lo}{unit}"
    return f"at most {hi}{unit}"


def strict_schema(node: Node) -> tuple[dict[str, Any], bool]:
    """The schema sent to the model, and whether strict mode can accept it.

    Every property is required, optional ones become `anyOf [T, null]`, every
    object is closed, and keywords strict mode rejects (lengths, bounds,
    formats) move into a `description` for the model; the validation schema
    still enforces them. `map` and `any` cannot be strict.
    """
    strict = True

    def walk(n: Node) -> dict[str, Any]:
        nonlocal strict
        if isinstance(n, Str):
            out: dict[str, Any] = {"type": "string"}
        elif isinstance(n, Int):
            out = {"type": "integer"}
        elif isinstance(n, Num):
            out = {"type": "number"}
        elif isinstance(n, Bool):
            out = {"type": "boolean"}
        elif isinstance(n, Enum):
            out = {"type": "string", "enum": list(n.values)}
        elif isinstance(n, Array):
            out = {"type": "array", "items": walk(n.item)}
        elif isinstance(n, Ref):
            return {"$ref": f"#/$defs/{n.key}"}
        elif isinstance(n, AnyT):
            strict = False
            return {}
        elif isinstance(n, Map):
            strict = False
            out = {"type": "object", "additionalProperties": walk(n.value)}
        else:
            props = {}
            for f in n.fields:
                t = walk(f.type)
                props[f.name] = {"anyOf": [t, {"type": "null"}]} if f.optional else t
            out = {
                "type": "object",
                "properties": props,
                "required": [f.name for f in n.fields],
                "additionalProperties": False,
            }
        hint = _hint(n)
        if hint:
            out["description"] = hint
        return out

    return walk(node), strict


# --------------------------------------------------------------------------- helpers


def refs(node: Node) -> Iterator[str]:
    """The `$defs` keys a node refers to directly."""
    if isinstance(node, Ref):
        yield node.key
    elif isinstance(node, Array):
        yield from refs(node.item)
    elif isinstance(node, Map):
        yield from refs(node.value)
    elif isinstance(node, Obj):
        for f in node.fields:
            yield from refs(f.type)


def closure(roots: Iterable[Node], defs: dict[str, Node]) -> list[str]:
    """Every `$defs` key reachable from `roots`, in first-seen order."""
    seen: dict[str, None] = {}
    stack = [k for r in roots for k in refs(r)]
    stack.reverse()
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen[key] = None
        stack.extend(reversed(list(refs(defs[key]))))
    return list(seen)


def deref(node: Node, defs: dict[str, Node]) -> Node:
    """Follow references to the node they stand for (cycles of bare refs excluded at load)."""
    seen = set()
    while isinstance(node, Ref):
        if node.key in seen:
            raise TypeSyntaxError(f"type {node.key!r} is defined only as itself")
        seen.add(node.key)
        node = defs[node.key]
    return node


def drop_nulls(node: Node, value: Any, defs: dict[str, Node]) -> Any:
    """Remove optional fields the model set to null (strict mode sends them)."""
    node = deref(node, defs)
    if isinstance(node, Obj) and isinstance(value, dict):
        out = {}
        by_name = {f.name: f for f in node.fields}
        for k, v in value.items():
            f = by_name.get(k)
            if f is None:
                out[k] = v
            elif v is None and f.optional:
                continue
            else:
                out[k] = drop_nulls(f.type, v, defs)
        return out
    if isinstance(node, Array) and isinstance(value, list):
        return [drop_nulls(node.item, v, defs) for v in value]
    if isinstance(node, Map) and isinstance(value, dict):
        return {k: drop_nulls(node.value, v, defs) for k, v in value.items()}
    return value
