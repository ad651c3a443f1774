"""SPEC §1.1: every type expression compiles to exactly the JSON Schema it names.

The expected schemas below are written by hand from the SPEC table, not copied
from the compiler's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from aiwfd.spec import typedsl
from aiwfd.spec.compiler import compile_config
from aiwfd.spec.config import load
from aiwfd.errors import ConfigError
from aiwfd.spec.typedsl import TypeSyntaxError

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Local names the table may refer to, and one imported name.
LOCAL = {"Address": "Address", "Node": "Node"}
IMPORTED = {("common", "Address"): "common.Address"}


def resolve(alias: str | None, name: str) -> str:
    if alias is None:
        if name in LOCAL:
            return LOCAL[name]
        raise TypeSyntaxError(f"unknown type {name!r}")
    if (alias, name) in IMPORTED:
        return IMPORTED[(alias, name)]
    raise TypeSyntaxError(f"unknown type '{alias}.{name}'")


def compile_expr(text: str) -> dict[str, Any]:
    return typedsl.schema(typedsl.parse(text, resolve))


S = {"type": "string"}
I = {"type": "integer"}
N = {"type": "number"}

TABLE: list[tuple[str, dict[str, Any]]] = [
    # text
    ("string", {"type": "string"}),
    ("string(1..100)", {"type": "string", "minLength": 1, "maxLength": 100}),
    ("string(10..)", {"type": "string", "minLength": 10}),
    ("string(..500)", {"type": "string", "maxLength": 500}),
    ("string(0..0)", {"type": "string", "minLength": 0, "maxLength": 0}),
    ("string( 3 .. 7 )", {"type": "string", "minLength": 3, "maxLength": 7}),
    ("string(2)", {"type": "string", "minLength": 2, "maxLength": 2}),
    # formats
    ("string(email)", {"type": "string", "format": "email"}),
    ("string(url)", {"type": "string", "format": "uri"}),
    ("string(uri)", {"type": "string", "format": "uri"}),
    ("string(hostname)", {"type": "string", "format": "hostname"}),
    ("string(ipv4)", {"type": "string", "format": "ipv4"}),
    ("string(ipv6)", {"type": "string", "format": "ipv6"}),
    ("datetime", {"type": "string", "format": "date-time"}),
    ("date", {"type": "string", "format": "date"}),
    ("uuid", {"type": "string", "format": "uuid"}),
    # integers, inclusive bounds
    ("int", {"type": "integer"}),
    ("int(0..150)", {"type": "integer", "minimum": 0, "maximum": 150}),
    ("int(1..)", {"type": "integer", "minimum": 1}),
    ("int(..10)", {"type": "integer", "maximum": 10}),
    ("int(-5..-1)", {"type": "integer", "minimum": -5, "maximum": -1}),
    # numbers
    ("number", {"type": "number"}),
    ("number(0..1)", {"type": "number", "minimum": 0, "maximum": 1}),
    ("number(0.0..1.0)", {"type": "number", "minimum": 0.0, "maximum": 1.0}),
    ("number(-1.5..2.25)", {"type": "number", "minimum": -1.5, "maximum": 2.25}),
    ("number(0.5..)", {"type": "number", "minimum": 0.5}),
    ("number(..99.9)", {"type": "number", "maximum": 99.9}),
    # the rest of the scalars
    ("bool", {"type": "boolean"}),
    ("any", {}),
    ("enum(a, b, c)", {"type": "string", "enum": ["a", "b", "c"]}),
    ("enum(draft)", {"type": "string", "enum": ["draft"]}),
    ("enum(en,fr , de)", {"type": "string", "enum": ["en", "fr", "de"]}),
    # arrays
    ("string[]", {"type": "array", "items": S}),
    ("int(1..5)[]", {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}}),
    ("string[](min:1, max:10)", {"type": "array", "items": S, "minItems": 1, "maxItems": 10}),
    ("string[](min: 1, max: 10)", {"type": "array", "items": S, "minItems": 1, "maxItems": 10}),
    ("int[](min:1)", {"type": "array", "items": I, "minItems": 1}),
    ("number[](max:3)", {"type": "array", "items": N, "maxItems": 3}),
    ("string[][]", {"type": "array", "items": {"type": "array", "items": S}}),
    ("enum(x, y)[](max:2)", {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 2}),
    # maps
    ("map(string, int)", {"type": "object", "additionalProperties": I}),
    ("map(string, any)", {"type": "object", "additionalProperties": {}}),
    ("map(string, string[])", {"type": "object", "additionalProperties": {"type": "array", "items": S}}),
    ("map(string, Address)", {"type": "object", "additionalProperties": {"$ref": "#/$defs/Address"}}),
    # references
    ("Address", {"$ref": "#/$defs/Address"}),
    ("$Address", {"$ref": "#/$defs/Address"}),
    ("Address[]", {"type": "array", "items": {"$ref": "#/$defs/Address"}}),
    ("$Address[](min:1)", {"type": "array", "items": {"$ref": "#/$defs/Address"}, "minItems": 1}),
    ("$common.Address", {"$ref": "#/$defs/common.Address"}),
    ("$common.Address[]", {"type": "array", "items": {"$ref": "#/$defs/common.Address"}}),
]


@pytest.mark.parametrize("expr,expected", TABLE, ids=[t[0] for t in TABLE])
def test_expression_compiles_to_the_schema_of_the_table(expr: str, expected: dict[str, Any]) -> None:
    got = compile_expr(expr)
    assert got == expected
    # 0 and 0.0 compare equal in Python: check the kind of every bound too.
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in expected:
            assert type(got[key]) is type(expected[key]), key
    Draft202012Validator.check_schema({"$schema": DIALECT, **got, "$defs": {"Address": {}, "Node": {},
                                                                          "common.Address": {}}})


BAD = [
    ("string(5..1)", "empty range"),
    ("int(a..b)", "not a whole number"),
    ("int(1.5..3)", "not a whole number"),
    ("int(5)", "range"),
    ("number(x..1)", "not a number"),
    ("number(1..0.5)", "empty range"),
    ("string(-1..3)", "not a whole number"),
    ("string(..)", "at least one bound"),
    ("string()", "not a whole number"),
    ("string(emial)", "not a whole number"),
    ("string(1..100", "expected ')'"),
    ("enum()", "at least one value"),
    ("enum(a, b, a)", "duplicate enum value 'a'"),
    ("enum(a, , b)", "empty enum value"),
    ("string[](min:5, max:2)", "empty range"),
    ("string[](len:3)", "array bounds"),
    ("string[](min:x)", "not a whole number"),
    ("map(int, string)", "map keys"),
    ("map(string)", "expected ','"),
    ("Missing", "unknown type 'Missing'"),
    ("$nope.Address", "unknown type 'nope.Address'"),
    ("integer", "unknown type 'integer'"),
    ("string extra", "unexpected"),
    ("string[", "unexpected"),
    ("", "empty type expression"),
]


@pytest.mark.parametrize("expr,fragment", BAD, ids=[b[0] or "<empty>" for b in BAD])
def test_malformed_expression_is_an_error(expr: str, fragment: str) -> None:
    with pytest.raises(TypeSyntaxError) as info:
        typedsl.parse(expr, resolve)
    assert fragment in info.value.message


def test_known_misspellings_get_a_hint() -> None:
    with pytest.raises(TypeSyntaxError) as info:
        typedsl.parse("integer", resolve)
    assert info.value.hint == "did you mean int?"
    with pytest.raises(TypeSyntaxError) as info:
        typedsl.parse("boolean[]", resolve)
    assert info.value.hint == "did you mean bool?"


# ------------------------------------------------------------------ through the loader


TYPES_FILE = """\
version: 0.3
imports:
  - as: common
    path: lib/common.yaml
types:
  Status: enum(draft, published)
  Node:
    name: string(1..50)
    children: Node[]
  Profile:
    name: string(1..100)
    nickname?: string(..30)
    status: Status
    home: $common.Address
    work?: common_alias
    tags: [string]
    scores: [int(0..10)]
    contacts:
      - kind: enum(email, phone)
        value: string
    position:
      lat: number(-90..90)
      lon: number(-180..180)
      label?: string
    tree: $Node
  common_alias: $common.Address
assistants:
  profiles:
    model: gpt-4o-mini
    input_type: Profile
    output_type: Status
"""

LIB_FILE = """\
types:
  Address:
    city: string(1..)
    zip?: string(5)
"""

ADDRESS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "zip": {"type": "string", "minLength": 5, "maxLength": 5},
    },
    "required": ["city"],
    "additionalProperties": False,
}
NODE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 50},
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
    },
    "required": ["name", "children"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d: Path = tmp_path_factory.mktemp("types")
    (d / "lib").mkdir()
    (d / "lib" / "common.yaml").write_text(LIB_FILE)
    (d / "agents.yaml").write_text(TYPES_FILE)
    return compile_config(load(d / "agents.yaml"))


def follow(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    """Resolve a local `#/$defs/…` reference inside a root schema."""
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~")]


def test_named_object_type_with_every_kind_of_field(compiled: Any) -> None:
    schema = compiled.type_schemas["Profile"]
    props = schema["properties"]
    assert schema["$schema"] == DIALECT
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    # optional fields ("?" suffix, name without it) are not required; all others are
    assert sorted(schema["required"]) == sorted(
        ["name", "status", "home", "tags", "scores", "contacts", "position", "tree"])
    assert "nickname" in props and "nickname?" not in props
    assert props["nickname"] == {"type": "string", "maxLength": 30}
    # Name / $Name: a $ref into $defs
    assert props["status"] == {"$ref": "#/$defs/Status"}
    assert props["tree"] == {"$ref": "#/$defs/Node"}
    # one-element list: an inline array
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["scores"] == {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}}
    assert props["contacts"] == {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"kind": {"type": "string", "enum": ["email", "phone"]}, "value": {"type": "string"}},
            "required": ["kind", "value"],
            "additionalProperties": False,
        },
    }
    # nested mapping: an inline object, closed, with its own required list
    assert props["position"] == {
        "type": "object",
        "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
            "label": {"type": "string"},
        },
        "required": ["lat", "lon"],
        "additionalProperties": False,
    }
    # $alias.Name: a $ref into the imported definitions, carried in $defs
    assert follow(schema, props["home"]["$ref"]) == ADDRESS
    alias_def = follow(schema, props["work"]["$ref"])
    assert follow(schema, alias_def["$ref"]) == ADDRESS
    # every $ref of the document resolves
    assert follow(schema, "#/$defs/Status") == {"type": "string", "enum": ["draft", "published"]}
    assert follow(schema, "#/$defs/Node") == NODE
    Draft202012Validator.check_schema(schema)


def test_recursive_type(compiled: Any) -> None:
    schema = compiled.type_schemas["Node"]
    assert {k: v for k, v in schema.items() if k not in ("$schema", "title", "$defs")} == NODE
    assert schema["$defs"]["Node"] == NODE
    v = Draft202012Validator(schema)
    assert v.is_valid({"name": "root", "children": [{"name": "a", "children": [{"name": "b", "children": []}]}]})
    assert not v.is_valid({"name": "root", "children": [{"name": "a", "children": [{"name": "", "children": []}]}]})
    assert not v.is_valid({"name": "root", "children": [{"name": "a"}]})


def test_named_non_object_type(compiled: Any) -> None:
    schema = compiled.type_schemas["Status"]
    assert {k: v for k, v in schema.items() if k not in ("$schema", "title")} == {
        "type": "string", "enum": ["draft", "published"]}
    assert "$defs" not in schema


def test_imported_type_is_in_the_type_library(compiled: Any) -> None:
    imported = [k for k in compiled.type_schemas if k not in ("Status", "Node", "Profile", "common_alias")]
    assert len(imported) == 1
    schema = compiled.type_schemas[imported[0]]
    assert {k: v for k, v in schema.items() if k not in ("$schema", "title")} == ADDRESS


def test_agent_input_schema_is_the_named_type(compiled: Any) -> None:
    agent = compiled.agents["profiles"]
    assert agent.input_schema["properties"] == compiled.type_schemas["Profile"]["properties"]
    assert agent.output_schema["enum"] == ["draft", "published"]


def test_inline_array_must_have_one_element(tmp_path: Path) -> None:
    f = tmp_path / "agents.yaml"
    f.write_text("types:\n  T:\n    tags: [string, int]\nassistants:\n  a:\n    model: m\n    input_type: T\n")
    with pytest.raises(ConfigError) as info:
        load(f)
    [p] = info.value.problems
    assert (p.line, p.path) == (3, "types.T.tags")
    assert "one-element list" in p.message


def test_enum_values_may_be_quoted_with_commas_inside() -> None:
    node = typedsl.parse('enum("in progress, late", done, \'on hold\')', lambda alias, name: name)
    assert typedsl.schema(node) == {"type": "string", "enum": ["in progress, late", "done", "on hold"]}
    with pytest.raises(typedsl.TypeSyntaxError, match="unterminated quote"):
        typedsl.parse('enum("a, b)', lambda alias, name: name)
