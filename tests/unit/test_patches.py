"""`spec.patches.PatchParser` against jiter, over many generated answers (issue 14, SPEC §7.4).

After every piece, the shipped applier (examples/python/patch.py) run over
every op so far must equal jiter's partial parse of the text so far, with the
optional nulls dropped as `result` drops them, except while a number is
being written (jiter shows `10` of what becomes `1001`; a patch waits for the
number's end). At the end it equals the answer's `result.data`.

The answers are written by this file's own serializer, so that it knows where
every number is, and so that it can write what json.dumps never does: `\\/`,
ASCII as `\\u0041`, surrogate pairs as escapes, exponents, whitespace
anywhere between tokens.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jiter
import orjson
import pytest

from aiwfd.spec.patches import PatchParser, pointer_token
from aiwfd.spec.typedsl import AnyT, Array, Bool, Field, Int, Map, Node, Num, Obj, Ref, Str, drop_nulls
from tests.conftest import example_applier

apply = example_applier()

DEFS: dict[str, Node] = {
    "Tag": Obj((Field("name", Str()), Field("weight", Num(), optional=True))),
    "Item": Obj((
        Field("title", Str()),
        Field("note", Str(), optional=True),
        Field("count", Int()),
        Field("score", Num(), optional=True),
        Field("ok", Bool()),
        Field("tags", Array(Ref("Tag"))),
        Field("extra", AnyT(), optional=True),
        Field("attrs", Map(Str(), Ref("Tag")), optional=True),
    )),
    "Out": Obj((
        Field("items", Array(Ref("Item"))),
        Field("summary", Ref("Tag"), optional=True),
        Field("grid", Array(Array(Int()))),
        Field("deep", Obj((Field("a", Obj((Field("b", Str(), optional=True), Field("c", AnyT())))),)),
              optional=True),
    )),
}
OUT = Ref("Out")

# Characters strings are made of: ASCII, what needs escaping, 2-, 3- and 4-byte UTF-8.
CHARS = list("abcdefghij KLMNOP0123456789.,:;{}[]") + ['"', "\\", "/", "~", "\n", "\t", "\r", "\b", "\f",
                                                  "\x01", "\x1f", "é", "ß", "€", "中", "文", "😀", "🎉", "\u2028"]


def gen_string(rng: random.Random) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.choice((0, 1, 3, 8, 20, 60))))


def gen_number(rng: random.Random, integer: bool) -> int | float:
    if integer:
        return rng.choice((0, 7, -3, 1001, 123456789, -98765432101234, 2 ** 63 - 1))
    return rng.choice((0.5, -1.25, 3.0, 1e-7, 6.02e23, -2.5e-3, 12345.678))


def gen_any(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return gen_number(rng, rng.random() < 0.5)
    if kind in (3, 4):
        return gen_string(rng)
    if kind == 5:
        return [gen_any(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {gen_string(rng)[:6] + str(i): gen_any(rng, depth + 1) for i in range(rng.randrange(4))}


def gen(rng: random.Random, node: Node) -> Any:
    if isinstance(node, Ref):
        return gen(rng, DEFS[node.key])
    if isinstance(node, Obj):
        out: dict[str, Any] = {}
        for f in node.fields:
            if f.optional:
                roll = rng.random()
                if roll < 0.3:
                    continue  # absent
                if roll < 0.6:
                    out[f.name] = None  # strict mode's null: dropped in patches and result
                    continue
            out[f.name] = gen(rng, f.type)
        if rng.random() < 0.1:
            out["unknown/~key"] = rng.choice((None, [None, 1], {"x": None}))  # not in the type: kept
        return out
    if isinstance(node, Array):
        return [gen(rng, node.item) for _ in range(rng.choice((0, 1, 2, 4)))]
    if isinstance(node, Map):
        return {gen_string(rng)[:8] + str(i): gen(rng, node.value) for i in range(rng.randrange(3))}
    if isinstance(node, Str):
        return gen_string(rng)
    if isinstance(node, Int):
        return gen_number(rng, True)
    if isinstance(node, Num):
        return gen_number(rng, False)
    if isinstance(node, Bool):
        return rng.random() < 0.5
    return gen_any(rng, 0)


class Writer:
    """JSON text of a value, written in a random one of its many spellings; `numbers`
    holds the (start, end) of every number in it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.parts: list[str] = []
        self.size = 0
        self.numbers: list[tuple[int, int]] = []
        self.spaced = rng.random() < 0.5

    def put(self, s: str) -> None:
        self.parts.append(s)
        self.size += len(s)

    def ws(self) -> None:
        if self.spaced and self.rng.random() < 0.4:
            self.put(self.rng.choice((" ", "\n  ", "\t", "\r\n", "  ")))

    def string(self, s: str) -> None:
        out = ['"']
        for c in s:
            code = ord(c)
            roll = self.rng.random()
            if c in '"\\':
                out.append("\\" + c)
            elif c == "/" and roll < 0.5:
                out.append("\\/")
            elif code < 0x20:
                short = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}.get(c)
                out.append(short if short and roll < 0.7 else f"\\u{code:04x}")
            elif code > 0xFFFF and roll < 0.5:  # a surrogate pair, as ensure_ascii writes it
                v = code - 0x10000
                out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04X}")
            elif roll < 0.15:
                out.append(f"\\u{code:04x}" if code <= 0xFFFF else c)
            else:
                out.append(c)
        out.append('"')
        self.put("".join(out))

    def number(self, v: int | float) -> None:
        if isinstance(v, float) and self.rng.random() < 0.5:
            text = f"{v:e}".replace("e", self.rng.choice("eE"))  # 1.250000e+00 and the like
        else:
            text = json.dumps(v)
        self.numbers.append((self.size, self.size + len(text)))
        self.put(text)

    def value(self, v: Any) -> None:
        self.ws()
        if isinstance(v, dict):
            self.put("{")
            for i, (k, x) in enumerate(v.items()):
                if i:
                    self.ws()
                    self.put(",")
                self.ws()
                self.string(k)
                self.ws()
                self.put(":")
                self.value(x)
            self.ws()
            self.put("}")
        elif isinstance(v, list):
            self.put("[")
            for i, x in enumerate(v):
                if i:
                    self.ws()
                    self.put(",")
                self.value(x)
            self.ws()
            self.put("]")
        elif isinstance(v, str):
            self.string(v)
        elif v is None or isinstance(v, bool):
            self.put(json.dumps(v))
        else:
            self.number(v)
        self.ws()

    def text(self) -> str:
        return "".join(self.parts)


def jiter_view(text: str) -> Any:
    """What the old `partial` event showed for `text`: jiter's parse, optional nulls dropped."""
    try:
        value = jiter.from_json(text.encode("utf-8", "surrogatepass"), partial_mode="trailing-strings",
                                cache_mode="none")
    except ValueError:
        return None
    return drop_nulls(OUT, value, DEFS)


def expected_at(text: str, numbers: list[tuple[int, int]], end: int) -> Any:
    for start, stop in numbers:
        if start < end <= stop:  # a number still being written: left out until it ends
            return jiter_view(text[:start])
    return jiter_view(text[:end])


def pieces(rng: random.Random, text: str, mode: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        size = int(mode) if mode.isdigit() else rng.randint(1, 64)
        out.append(text[i:i + size])
        i += size
    return out


def string_chars(v: Any) -> int:
    """Characters of the strings in `v` (keys left out)."""
    if isinstance(v, str):
        return len(v)
    if isinstance(v, dict):
        return sum(string_chars(x) for x in v.values())
    if isinstance(v, list):
        return sum(string_chars(x) for x in v)
    return 0


def run(text: str, parts: list[str], numbers: list[tuple[int, int]]) -> tuple[Any, list[dict[str, Any]]]:
    parser = PatchParser(OUT, DEFS)
    doc: Any = None
    end = 0
    every: list[dict[str, Any]] = []
    for part in parts:
        end += len(part)
        # Through JSON, as a client gets them: no op may share state with the parser.
        sent = json.dumps(parser.feed(part))
        every += json.loads(sent)  # a copy: the applier builds the document out of `ops`
        ops = json.loads(sent)
        doc = apply(doc, ops)
        want = expected_at(text, numbers, end)  # jiter on the prefix: once for both checks
        assert doc == want, (text[:end], ops)
        assert json.dumps(doc) == json.dumps(want)  # 1 vs 1.0 vs True
    return doc, every


@pytest.mark.parametrize("mode", ["1", "2", "3", "4", "7", "16", "64", "mixed"])
def test_patches_equal_jiter_after_every_piece(mode: str) -> None:
    rng = random.Random(f"patches-{mode}")
    for _ in range(40 if mode in ("1", "2") else 80):
        value = gen(rng, OUT)
        w = Writer(rng)
        w.value(value)
        text = w.text()
        doc, every = run(text, pieces(rng, text, mode), w.numbers)
        final = drop_nulls(OUT, orjson.loads(text), DEFS)
        assert doc == final
        # Every string went out once: appended to, never sent again whole.
        assert sum(string_chars(op["value"]) for op in every) == string_chars(final)


def test_ops_of_one_piece_are_folded() -> None:
    p = PatchParser(OUT, DEFS)
    assert p.feed('{"items": [{"ti') == [{"op": "add", "path": "", "value": {"items": [{}]}}]
    assert p.feed('tle": "Hel') == [{"op": "add", "path": "/items/0/title", "value": "Hel"}]
    assert p.feed("lo") == [{"op": "append", "path": "/items/0/title", "value": "lo"}]
    assert p.feed('", "count": 10') == []  # the number has not ended
    assert p.feed('01, "note": null, "ok": tr') == [{"op": "add", "path": "/items/0/count", "value": 1001}]
    assert p.feed('ue}, {"title": "x"}, ') == [
        {"op": "add", "path": "/items/0/ok", "value": True},
        {"op": "add", "path": "/items/1", "value": {"title": "x"}},
    ]
    assert p.feed('{"attrs": {"a/b~c": {"name": "\\u00e9') == [
        {"op": "add", "path": "/items/2", "value": {"attrs": {"a/b~c": {"name": "é"}}}}]
    assert p.feed('!"}}}]}  ') == [{"op": "append", "path": "/items/2/attrs/a~1b~0c/name", "value": "!"}]
    assert p.feed("anything") == []


def test_a_key_seen_twice_is_a_replace() -> None:
    p = PatchParser(OUT, DEFS)
    assert p.feed('{"grid": [[1]], "summary": {"name": "a"}') == [
        {"op": "add", "path": "", "value": {"grid": [[1]], "summary": {"name": "a"}}}]
    assert p.feed(', "summary": {"name": "b"}') == [
        {"op": "replace", "path": "/summary", "value": {"name": "b"}}]
    # null replacing a value the client holds would need `remove`: the parser stops there.
    assert p.feed(', "summary": null') == [] and p.failed


def test_a_surrogate_pair_split_anywhere_is_held_until_whole() -> None:
    text = '{"grid": [], "summary": {"name": "a\\ud83d\\ude00b"}}'
    for cut in range(len(text) + 1):
        p = PatchParser(OUT, DEFS)
        doc = apply(None, p.feed(text[:cut]))
        doc = apply(doc, p.feed(text[cut:]))
        assert doc == {"grid": [], "summary": {"name": "a😀b"}}


@pytest.mark.parametrize("text", ['[1, 2]', '"text"', '{"items": [1 2]}', '{"a" 1}', '{"a": tru}',
                                  '{"a": "x\\q"}', '{"a": "\\ud83dx"}', '{"a": "\\ude00"}', '{"a": 01}',
                                  '{"a": "raw\ncontrol"}', '{"a": -}', '{"a": 1e999}'])
def test_text_that_stops_being_json_stops_the_patches(text: str) -> None:
    p = PatchParser(OUT, DEFS)
    ops = [op for c in text for op in p.feed(c)]
    assert p.failed, (text, ops)
    # What it sent before is still what jiter shows for the text up to there.
    assert all(op["op"] in ("add", "append") for op in ops)


def test_pointer_tokens() -> None:
    assert pointer_token("plain") == "plain"
    assert pointer_token("a/b~c") == "a~1b~0c"
    assert pointer_token("~1") == "~01"
