"""SPEC §1.2 and §1.4: compiled schemas validate what they should, the fast
predicate agrees with jsonschema, and the schema sent to the model obeys
OpenAI's strict structured-output rules.
"""

from __future__ import annotations

import copy
import random
import re
import string as _string
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from jsonschema import Draft202012Validator

from aiwfd.spec import typedsl
from aiwfd.spec.compiler import Compiled, compile_config
from aiwfd.spec.config import load
from aiwfd.errors import ConfigError
from aiwfd.spec.validation import FORMAT_CHECKER, Validator, compile_check

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OWN_CONFIGS = ("content_api.yaml", "extraction.yaml", "with_imports.yaml")


def config_files() -> list[Path]:
    """Every loadable agents file in tests/configs (libraries without agents are imported, not loaded)."""
    out = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        try:
            load(path)
        except ConfigError:
            continue
        out.append(path)
    return out


_compiled: dict[Path, Compiled] = {}


def compiled_config(path: Path) -> Compiled:
    if path not in _compiled:
        _compiled[path] = compile_config(load(path))
    return _compiled[path]


def test_own_configs_load_and_compile_cleanly() -> None:
    found = {p.name for p in config_files()}
    for name in OWN_CONFIGS:
        assert name in found, f"{name} does not load"
        c = compiled_config(CONFIGS / name)
        assert c.warnings == ()
        assert 3 <= len(c.agents) <= 6
        assert all(a.response_format is not None and a.strict for a in c.agents.values())


def test_own_configs_have_no_colon_space_inside_an_expression() -> None:
    # YAML reads `string[](min: 1)` as a mapping; the files must write min:1.
    for name in OWN_CONFIGS + ("common/types.yaml",):
        for line in (CONFIGS / name).read_text().splitlines():
            value = line.split("#")[0].partition(": ")[2]
            assert not re.search(r"\((?:[^)]*): ", value), line


# ------------------------------------------------------------------ every schema is valid 2020-12


def all_schemas(c: Compiled) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, schema in c.type_schemas.items():
        yield f"types/{key}", schema
    for name, agent in c.agents.items():
        yield f"{name}.input", agent.input_schema
        if agent.output_schema is not None:
            yield f"{name}.output", agent.output_schema
            yield f"{name}.response_format", agent.response_format["json_schema"]["schema"]


@pytest.mark.parametrize("name", OWN_CONFIGS)
def test_every_compiled_schema_passes_check_schema(name: str) -> None:
    c = compiled_config(CONFIGS / name)
    n = 0
    for _, schema in all_schemas(c):
        Draft202012Validator.check_schema(schema)
        n += 1
    assert n >= len(c.type_schemas) + 3 * len(c.agents)


# ------------------------------------------------------------------ Validator: valid and invalid instances

PROFILE = """\
version: 0.3
types:
  Profile:
    id: uuid
    email: string(email)
    country: string(2)
    created_at: datetime
    birthday?: date
    homepage?: string(url)
    server?: string(hostname)
    ip4?: string(ipv4)
    ip6?: string(ipv6)
    age?: int(0..150)
    score?: number(0.0..1.0)
    tags?: string(1..20)[](min:1, max:3)
    prefs?: map(string, bool)
    address?:
      city: string(1..)
      zip?: string(..10)
assistants:
  profile:
    model: gpt-4o-mini
    input_type: Profile
"""

GOOD = {
    "id": "123e4567-e89b-12d3-a456-426614174000",
    "email": "ana.lopez@example.com",
    "country": "FR",
    "created_at": "2024-05-01T12:30:00Z",
}


@pytest.fixture(scope="module")
def profile_validator(tmp_path_factory: pytest.TempPathFactory) -> Validator:
    f = tmp_path_factory.mktemp("profile") / "agents.yaml"
    f.write_text(PROFILE)
    return compile_config(load(f)).agents["profile"].input_validator


VALID = [
    {},
    {"birthday": "1990-02-28", "homepage": "https://example.com/~ana?x=1", "server": "api.example.com",
     "ip4": "192.168.1.10", "ip6": "2001:db8::1", "age": 0, "score": 1.0, "tags": ["a", "b", "c"],
     "prefs": {"dark_mode": True, "any key at all": False}, "address": {"city": "Lyon"}},
    {"age": 150, "score": 0, "address": {"city": "Köln", "zip": "50667"}, "created_at": "2024-05-01T12:30:00.5+02:00"},
    {"age": 42.0},  # a whole float is an integer in JSON Schema
    {"country": "日本"},  # lengths count characters, not bytes
]


@pytest.mark.parametrize("extra", VALID)
def test_valid_instances_pass(profile_validator: Validator, extra: dict[str, Any]) -> None:
    assert profile_validator.errors({**GOOD, **extra}) == []


INVALID = [
    ({"email": "not-an-email"}, "email"),
    ({"email": "ana@localhost"}, "email"),
    ({"id": "123e4567e89b12d3a456"}, "id"),
    ({"id": "zzzzzzzz-e89b-12d3-a456-426614174000"}, "id"),
    ({"created_at": "2024-05-01 12:30"}, "created_at"),
    ({"created_at": "2024-05-01T12:30:00"}, "created_at"),  # RFC 3339 needs an offset
    ({"created_at": "2024-13-01T12:30:00Z"}, "created_at"),
    ({"birthday": "2023-02-29"}, "birthday"),
    ({"homepage": "not a url"}, "homepage"),
    ({"server": "bad_host!.com"}, "server"),
    ({"ip4": "256.1.1.1"}, "ip4"),
    ({"ip6": "1::2::3"}, "ip6"),
    ({"country": "FRA"}, "country"),
    ({"country": "F"}, "country"),
    ({"age": -1}, "age"),
    ({"age": 151}, "age"),
    ({"age": 1.5}, "age"),
    ({"age": True}, "age"),
    ({"age": "42"}, "age"),
    ({"score": 1.01}, "score"),
    ({"score": None}, "score"),
    ({"tags": []}, "tags"),
    ({"tags": ["a", "b", "c", "d"]}, "tags"),
    ({"tags": [""]}, "tags[0]"),
    ({"prefs": {"x": "yes"}}, "prefs.x"),
    ({"address": {"city": "Lyon", "zipcode": "1"}}, "address.zipcode"),
    ({"address": {}}, "address.city"),
    ({"nickname": "ana"}, "nickname"),  # unknown property
]


@pytest.mark.parametrize("change,path", INVALID, ids=[repr(c) for c, _ in INVALID])
def test_invalid_instances_fail_at_the_field(profile_validator: Validator, change: dict[str, Any], path: str) -> None:
    errors = profile_validator.errors({**GOOD, **change})
    assert errors, change
    assert path in [e["path"] for e in errors]


def test_missing_required_and_unknown_fields_are_named(profile_validator: Validator) -> None:
    body = {k: v for k, v in GOOD.items() if k != "email"} | {"emial": "a@b.co"}
    errors = profile_validator.errors(body)
    assert {"path": "email", "message": "required field is missing"} in errors
    unknown = [e for e in errors if e["path"] == "emial"]
    assert unknown and "unknown field" in unknown[0]["message"] and "'email'" in unknown[0]["message"]
    assert profile_validator.errors([GOOD]) != []
    assert profile_validator.errors(None) != []


# ------------------------------------------------------------------ differential: compile_check == jsonschema

VALID_FORMAT = {
    "email": ["ana.lopez@example.com", "x@mail.co.uk", "first+tag@sub.example.org"],
    "uri": ["https://example.com/a?b=1", "http://127.0.0.1:8080/", "urn:isbn:0451450523", "mailto:x@y.z"],
    "hostname": ["api.example.com", "localhost", "xn--bcher-kva.example"],
    "ipv4": ["192.168.0.1", "8.8.8.8", "0.0.0.0"],
    "ipv6": ["2001:db8::1", "::1", "fe80::1:2:3:4"],
    "date-time": ["2024-05-01T12:30:00Z", "2024-05-01T12:30:00.123+02:00", "1999-12-31T23:59:59-05:00"],
    "date": ["2024-02-29", "1999-12-31", "2000-01-01"],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000"],
}
BAD_STRINGS = [
    "", " ", "not an email", "a@b", "@example.com", "ana@", "2024-02-30", "2024-13-01", "12:00",
    "2024-05-01 12:30:00", "2024-05-01T12:30:00", "not-a-uuid", "123e4567e89b12d3a456426614174000",
    "http://", "http://exa mple.com", "300.1.1.1", "1.2.3", ":::", "1::2::3", "-bad-.com", "exa_mple.com",
    "x" * 300, "日本語テキスト", "null", "true", "0",
]
WRONG_TYPES: list[Any] = [None, True, False, 0, 1, -1, 1.0, 2.5, "1", "", [], [1], {}, {"a": 1}]
ALPHABET = _string.ascii_letters + _string.digits + " -_.éü日本🙂"


class Gen:
    """Random instances of a type: valid ones, and ones with one mutation."""

    def __init__(self, rng: random.Random, defs: dict[str, typedsl.Node]) -> None:
        self.rng = rng
        self.defs = defs

    def text(self, lo: int | None, hi: int | None) -> str:
        lo = lo or 0
        hi = hi if hi is not None else lo + 12
        n = self.rng.randint(lo, min(hi, lo + 25))
        return "".join(self.rng.choice(ALPHABET) for _ in range(n))

    def json_value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 2 or r < 0.6:
            return self.rng.choice(WRONG_TYPES + [self.text(0, 5)])
        if r < 0.8:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.text(1, 6): self.json_value(depth + 1) for _ in range(self.rng.randint(0, 3))}

    def valid(self, node: typedsl.Node, depth: int, path: tuple, sites: list) -> Any:
        if isinstance(node, typedsl.Ref):
            return self.valid(self.defs[node.key], depth, path, sites)
        sites.append((path, node))
        rng = self.rng
        if isinstance(node, typedsl.Str):
            if node.format:
                return rng.choice(VALID_FORMAT[node.format]) if node.format != "uuid" or rng.random() < 0.5 \
                    else str(uuid.UUID(int=rng.getrandbits(128), version=4))
            return self.text(node.min_len, node.max_len)
        if isinstance(node, typedsl.Int):
            lo = node.minimum if node.minimum is not None else -1000
            hi = node.maximum if node.maximum is not None else lo + 2000
            edge = rng.random()
            v = lo if edge < 0.15 else hi if edge < 0.3 else rng.randint(lo, hi)
            return float(v) if rng.random() < 0.1 else v
        if isinstance(node, typedsl.Num):
            lo = node.minimum if node.minimum is not None else -1e6
            hi = node.maximum if node.maximum is not None else lo + 2e6
            edge = rng.random()
            return lo if edge < 0.15 else hi if edge < 0.3 else (
                rng.randint(int(lo), int(hi)) if edge < 0.4 and int(lo) <= int(hi) and int(lo) >= lo
                else rng.uniform(lo, hi))
        if isinstance(node, typedsl.Bool):
            return rng.random() < 0.5
        if isinstance(node, typedsl.AnyT):
            return self.json_value()
        if isinstance(node, typedsl.Enum):
            return rng.choice(node.values)
        if isinstance(node, typedsl.Array):
            lo = node.min_items or 0
            hi = node.max_items if node.max_items is not None else lo + 3
            n = lo if depth > 3 else rng.randint(lo, min(hi, lo + 3))
            return [self.valid(node.item, depth + 1, path + (i,), sites) for i in range(n)]
        if isinstance(node, typedsl.Map):
            out = {}
            for _ in range(0 if depth > 3 else rng.randint(0, 3)):
                k = self.valid(node.key, depth + 1, path + ("<key>",), [])
                out[k] = self.valid(node.value, depth + 1, path + (k,), sites)
            return out
        assert isinstance(node, typedsl.Obj)
        out = {}
        for f in node.fields:
            if f.optional and (depth > 2 or rng.random() < 0.4):
                continue
            out[f.name] = self.valid(f.type, depth + 1, path + (f.name,), sites)
        return out

    def mutation(self, node: typedsl.Node, value: Any) -> Any:
        """A replacement for `value` that is often (not always) invalid for `node`."""
        rng = self.rng
        node = typedsl.deref(node, self.defs)
        r = rng.random()
        if r < 0.25:
            return copy.deepcopy(rng.choice(WRONG_TYPES))
        if isinstance(node, typedsl.Str):
            if node.format or r < 0.45:
                pool = BAD_STRINGS + [v for vs in VALID_FORMAT.values() for v in vs]
                return rng.choice(pool)
            if node.min_len and r < 0.7:
                return self.text(0, node.min_len - 1) if node.min_len > 0 else ""
            if node.max_len is not None:
                return self.text(node.max_len + 1, node.max_len + 3)
            return rng.choice([1, None, ["x"]])
        if isinstance(node, (typedsl.Int, typedsl.Num)):
            lo, hi = node.minimum, node.maximum
            options: list[Any] = [True, False, "3", 0.5, 1.0, 7.25, -3, 10**20, -1e300]
            if lo is not None:
                options += [lo - 1, lo - 0.001, lo, float(lo)]
            if hi is not None:
                options += [hi + 1, hi + 0.001, hi, float(hi)]
            return rng.choice(options)
        if isinstance(node, typedsl.Enum):
            v = rng.choice(node.values)
            return rng.choice([v.upper(), v + " ", v[:-1], "unknown", 0, None, [v]])
        if isinstance(node, typedsl.Bool):
            return rng.choice([0, 1, "true", None, 1.0])
        if isinstance(node, typedsl.Array) and isinstance(value, list):
            lo, hi = node.min_items, node.max_items
            if r < 0.5 and value:
                return value[:-1] if lo else value + value[:1]
            if hi is not None and r < 0.75:
                return [self.valid(node.item, 4, (), []) for _ in range(hi + 1)]
            return value + [rng.choice(WRONG_TYPES)]
        if isinstance(node, typedsl.Map) and isinstance(value, dict):
            key = rng.choice(["", "UNKNOWN", "low ", "k"])
            return {**value, key: rng.choice(WRONG_TYPES)}
        if isinstance(node, typedsl.Obj) and isinstance(value, dict):
            names = [f.name for f in node.fields]
            if r < 0.45 and value:
                k = rng.choice(list(value))
                return {x: v for x, v in value.items() if x != k}  # drop a field (required or not)
            if r < 0.6:
                optional = [f.name for f in node.fields if f.optional]
                if optional:
                    return {**value, rng.choice(optional): None}
            if r < 0.8 and names:
                k = rng.choice(names)
                return {**value, k + "s": 1}  # a misspelt, unknown field
            return {**value, "extra": rng.choice(WRONG_TYPES)}
        return rng.choice(WRONG_TYPES)

    def mutated(self, node: typedsl.Node) -> Any:
        sites: list = []
        value = self.valid(node, 0, (), sites)
        path, site = self.rng.choice(sites)
        if not path:
            return self.mutation(site, value)
        parent = value
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = self.mutation(site, parent[path[-1]])
        return value


def differential_roots(c: Compiled) -> Iterator[tuple[str, typedsl.Node]]:
    for key in c.config.types:
        yield key, typedsl.Ref(key)
    for name, agent in c.agents.items():
        a = agent.assistant
        if a.input_type is not None:
            yield f"{name}.input", a.input_type
        if a.output_type is not None:
            yield f"{name}.output", a.output_type


def test_differential_compile_check_agrees_with_jsonschema() -> None:
    from aiwfd.spec.compiler import root_schema

    rng = random.Random(20240502)
    total = valid_seen = invalid_seen = 0
    files = config_files()
    assert {p.name for p in files} >= set(OWN_CONFIGS)
    for path in files:
        c = compiled_config(path)
        defs = dict(c.config.types)
        gen = Gen(rng, defs)
        for label, node in differential_roots(c):
            schema = root_schema(node, defs)
            reference = Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
            fast = compile_check(node, defs)
            for i in range(48):
                if i < 12:
                    instance = gen.valid(node, 0, (), [])
                    expected = reference.is_valid(instance)
                    assert expected, (path.name, label, instance)
                else:
                    instance = gen.mutated(node)
                    expected = reference.is_valid(instance)
                assert fast(instance) is expected, (path.name, label, instance, expected)
                total += 1
                valid_seen += expected
                invalid_seen += not expected
    print(f"{total} cases: {valid_seen} valid, {invalid_seen} invalid")
    assert total >= 3000
    # the mutations must actually produce both verdicts, most of them invalid
    assert invalid_seen > total * 0.5, (valid_seen, invalid_seen)
    assert valid_seen > total * 0.2, (valid_seen, invalid_seen)


FORMAT_ALPHABET = "0123456789abcdefABCDEF-_.:/@?#%+=~TtZz \n"


@pytest.mark.parametrize("fmt", sorted(VALID_FORMAT))
def test_format_predicates_agree_with_jsonschema_near_the_boundary(fmt: str) -> None:
    """Strings a few edits away from valid ones, where a fast path would be wrong first."""
    rng = random.Random(fmt)
    fast = compile_check(typedsl.Str(format=fmt), {})
    reference = Draft202012Validator({"type": "string", "format": fmt}, format_checker=FORMAT_CHECKER)
    seen = {True: 0, False: 0}
    extra = {"hostname": ["a" * 63 + ".com", "a" * 64 + ".com", ".".join(["abc"] * 64), "a-.b", "a.b.", "1.2.3.4"],
             "date": ["0000-01-01", "2023-02-29", "2024-04-31", "2024-12-31", "99999-01-01"],
             "date-time": ["2024-02-30T10:00:00Z", "0000-01-01T00:00:00Z", "2024-01-01T24:00:00Z",
                           "2024-01-01T23:59:60Z", "2024-01-01T10:00:00+24:00", "2024-01-01T10:00:00z\n"],
             "ipv4": ["01.1.1.1", "1.1.1.01", "255.255.255.255", "1.1.1.256"],
             "uri": ["http://", "http://a b", "http://%zz", "http://%41", "x:", "1http://a"],
             "uuid": ["123E4567-E89B-12D3-A456-426614174000", "{123e4567-e89b-12d3-a456-426614174000}"],
             "email": ["a@b.co\n", "a@b..co", "a@.b.co"], "ipv6": ["::ffff:1.2.3.4", "::1%eth0"]}
    for s in VALID_FORMAT[fmt] + extra.get(fmt, []):
        assert fast(s) is reference.is_valid(s), s
    for _ in range(1500):
        s = list(rng.choice(VALID_FORMAT[fmt]))
        for _ in range(rng.randint(1, 3)):
            op, i = rng.random(), rng.randrange(len(s) + 1)
            c = rng.choice(FORMAT_ALPHABET)
            if op < 0.33:
                s.insert(i, c)
            elif op < 0.66 and i < len(s):
                s[i] = c
            elif s:
                del s[min(i, len(s) - 1)]
        text = "".join(s)
        verdict = reference.is_valid(text)
        assert fast(text) is verdict, text
        seen[verdict] += 1
    assert seen[True] > 20 and seen[False] > 200, seen


def test_differential_on_hand_picked_edge_cases() -> None:
    exprs = {
        "I": "int(0..10)", "N": "number(-1.5..2.5)", "S": "string(2)", "E": "enum(a, b)",
        "A": "string[](min:1, max:2)", "M": "map(enum(x, y), int)", "D": "datetime", "Y": "any",
    }
    defs = {k: typedsl.parse(v, lambda a, n: n) for k, v in exprs.items()}
    defs["F"] = typedsl.Str(6, 8, "email")  # not writable in the language, but a valid node
    cases: list[Any] = [None, True, False, 0, 10, 11, -0.0, 10.0, 10.5, 1e308, -1.5, 2.5, 2.5000001, "ab", "abc",
                        "é🙂", "a", "b", "A", [], ["x"], ["x", "y", "z"], [1], {"x": 1}, {"z": 1}, {"x": True},
                        {"x": 1.0}, "2024-05-01T12:30:00Z", "2024-05-01T25:30:00Z", 2**70, {}, [[]],
                        "a@b.co", "ab@c.de", "abc@d.ef", "abcdefgh", "ab@cdefgh.ij"]
    for key in defs:
        node = typedsl.Ref(key)
        reference = Draft202012Validator({"$ref": f"#/$defs/{key}", "$defs": {k: typedsl.schema(n)
                                          for k, n in defs.items()}}, format_checker=FORMAT_CHECKER)
        fast = compile_check(node, defs)
        for case in cases:
            assert fast(case) is reference.is_valid(case), (key, case)
    # and the spots where a naive predicate would go wrong, by hand
    int_check = compile_check(typedsl.Ref("I"), defs)
    assert int_check(10.0) and not int_check(True) and not int_check(10.5)
    assert compile_check(typedsl.Ref("S"), defs)("é🙂")
    assert not compile_check(typedsl.Ref("M"), defs)({"z": 1})


# ------------------------------------------------------------------ OpenAI strict mode (SPEC §1.4)

STRICT_REJECTED = {
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems", "contains", "minContains",
    "maxContains", "propertyNames", "patternProperties", "minProperties", "maxProperties",
    "unevaluatedProperties", "unevaluatedItems", "dependentRequired", "dependentSchemas", "if", "then",
    "else", "not", "allOf", "oneOf", "prefixItems", "const", "default", "examples", "title", "$schema",
    "$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "definitions",
}
STRICT_ALLOWED = {"type", "properties", "required", "additionalProperties", "items", "enum", "anyOf",
                  "$ref", "$defs", "description"}
STRICT_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


def assert_openai_strict(schema: dict[str, Any]) -> None:
    """Assert OpenAI's strict structured-output rules at every level of `schema`."""
    assert isinstance(schema, dict)
    assert schema.get("type") == "object", "the root must be an object"
    assert "anyOf" not in schema and "$ref" not in schema, "the root must not be anyOf or a $ref"
    defs = schema.get("$defs", {})

    def walk(s: Any, where: str, in_defs: bool = False) -> None:
        assert isinstance(s, dict) and s, f"{where}: an empty or non-object schema"
        bad = set(s) & STRICT_REJECTED
        assert not bad, f"{where}: keywords strict mode rejects: {sorted(bad)}"
        unknown = set(s) - STRICT_ALLOWED
        assert not unknown, f"{where}: keywords outside strict mode's subset: {sorted(unknown)}"
        if "$defs" in s:
            assert where == "#", f"{where}: $defs only at the root"
        if "$ref" in s:
            assert set(s) == {"$ref"}, f"{where}: $ref with siblings"
            ref = s["$ref"]
            assert ref.startswith("#/$defs/") and ref[len("#/$defs/"):] in defs, f"{where}: dangling $ref {ref}"
            return
        if "anyOf" in s:
            assert set(s) <= {"anyOf", "description"}, where
            assert isinstance(s["anyOf"], list) and len(s["anyOf"]) >= 2, where
            for i, sub in enumerate(s["anyOf"]):
                assert "anyOf" not in sub, f"{where}: nested anyOf"
                walk(sub, f"{where}/anyOf/{i}")
            return
        t = s.get("type")
        types = t if isinstance(t, list) else [t]
        assert t is not None and set(types) <= STRICT_TYPES, f"{where}: bad type {t!r}"
        if "enum" in s:
            assert all(isinstance(v, str) for v in s["enum"]) and s["enum"], where
        if "object" in types:
            assert s.get("additionalProperties") is False, f"{where}: additionalProperties must be false"
            props = s.get("properties")
            assert isinstance(props, dict), f"{where}: an object must list its properties"
            assert list(s.get("required", [])) == list(props), f"{where}: every property must be required"
            for name, sub in props.items():
                walk(sub, f"{where}/properties/{name}")
        else:
            assert "properties" not in s and "additionalProperties" not in s and "required" not in s, where
        if "array" in types:
            assert "items" in s, f"{where}: an array needs items"
            walk(s["items"], f"{where}/items")
        else:
            assert "items" not in s, where

    walk({k: v for k, v in schema.items() if k != "$defs"}, "#")
    for key, sub in defs.items():
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+", key), key
        walk(sub, f"#/$defs/{key}")


def assert_response_format(agent: Any) -> dict[str, Any]:
    rf = agent.response_format
    assert set(rf) == {"type", "json_schema"} and rf["type"] == "json_schema"
    js = rf["json_schema"]
    assert set(js) == {"name", "strict", "schema"}
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", js["name"]), js["name"]
    return js


def strict_cases() -> list[tuple[str, str]]:
    return [(p.name, name) for p in config_files() for name, a in compiled_config(p).agents.items()
            if a.response_format is not None and a.response_format["json_schema"]["strict"]]


@pytest.mark.parametrize("file,agent", strict_cases())
def test_strict_response_format_obeys_openai_rules(file: str, agent: str) -> None:
    c = compiled_config(CONFIGS / file)
    a = c.agents[agent]
    js = assert_response_format(a)
    assert js["strict"] is True
    assert_openai_strict(js["schema"])
    Draft202012Validator.check_schema(js["schema"])


def to_model_answer(node: typedsl.Node, value: Any, defs: dict[str, typedsl.Node]) -> Any:
    """What a strict-mode model sends for `value`: optional fields present, as null when absent."""
    node = typedsl.deref(node, defs)
    if isinstance(node, typedsl.Obj):
        return {f.name: to_model_answer(f.type, value[f.name], defs) if f.name in value else None
                for f in node.fields}
    if isinstance(node, typedsl.Array):
        return [to_model_answer(node.item, v, defs) for v in value]
    return value


@pytest.mark.parametrize("file", OWN_CONFIGS)
def test_strict_schema_accepts_model_answers_and_they_clean_up_to_valid_output(file: str) -> None:
    c = compiled_config(CONFIGS / file)
    defs = dict(c.config.types)
    gen = Gen(random.Random(7), defs)
    for name, agent in c.agents.items():
        node = agent.assistant.output_type
        strict = Draft202012Validator(agent.response_format["json_schema"]["schema"])
        for _ in range(40):
            value = gen.valid(node, 0, (), [])
            answer = to_model_answer(node, value, defs)
            if agent.wrapped:
                answer = {"value": answer}
            assert strict.is_valid(answer), (name, answer)
            cleaned = c.clean_output(agent, answer)
            assert cleaned == value
            assert agent.output_validator.errors(cleaned) == []


def test_strict_checker_catches_violations() -> None:
    ok = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
          "additionalProperties": False}
    assert_openai_strict(ok)
    bad = [
        {"anyOf": [ok, {"type": "null"}]},
        {"type": "string"},
        {**ok, "additionalProperties": True},
        {k: v for k, v in ok.items() if k != "additionalProperties"},
        {**ok, "required": []},
        {**ok, "properties": {"a": {"type": "string", "maxLength": 3}}},
        {**ok, "properties": {"a": {"type": "string", "format": "email"}}},
        {**ok, "properties": {"a": {"type": "integer", "minimum": 0}}},
        {**ok, "properties": {"a": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
        {**ok, "properties": {"a": {"$ref": "#/$defs/Missing"}}},
        {**ok, "properties": {"a": {"type": "object", "properties": {}, "required": []}}},
        {**ok, "properties": {"a": {"type": "object", "additionalProperties": {"type": "string"}}}},
        {**ok, "$schema": "https://json-schema.org/draft/2020-12/schema"},
        {**ok, "title": "T"},
        {**ok, "properties": {"a": {}}},
    ]
    for schema in bad:
        with pytest.raises(AssertionError):
            assert_openai_strict(schema)


def output_agents(tmp_path: Path, types: str, outputs: dict[str, str]) -> Compiled:
    agents = "".join(f"  a{i}:\n    model: gpt-4o-mini\n    output_type: {t}\n" for i, t in enumerate(outputs.values()))
    f = tmp_path / "agents.yaml"
    f.write_text(f"version: 0.3\ntypes:\n{types}assistants:\n{agents}")
    return compile_config(load(f))


OUTPUTS_TYPES = """\
  Status: enum(draft, published)
  Labels: Status[](min:1)
  Item:
    sku: string(3..12)
    note?: string(..100)
    price?: number(0..)
    parent?: Item
  Box:
    items: Item[](max:50)
    status: Status
    meta:
      sealed_at?: datetime
      weight: number(0..)
  Same: Box
"""


def test_non_object_outputs_are_wrapped_as_value(tmp_path: Path) -> None:
    c = output_agents(tmp_path, OUTPUTS_TYPES, {"s": "string(1..10)", "e": "Status", "arr": "Item[]",
                                                "named_arr": "Labels", "obj": "Box", "alias": "Same",
                                                "int": "int(0..5)", "inline_enum": "enum(yes, no)"})
    by_type = {a.assistant.output_type_name: a for a in c.agents.values()}
    for type_name, agent in by_type.items():
        schema = assert_response_format(agent)["schema"]
        assert_openai_strict(schema)
        assert agent.strict
        wrapped = type_name not in ("Box", "Same")
        assert agent.wrapped is wrapped, type_name
        if wrapped:
            assert list(schema["properties"]) == ["value"] and schema["required"] == ["value"]
    # the wrapped value carries the type without the keywords strict mode rejects
    assert by_type["string(1..10)"].response_format["json_schema"]["schema"]["properties"]["value"]["type"] == "string"
    e = by_type["Status"].response_format["json_schema"]["schema"]
    assert e["$defs"][e["properties"]["value"]["$ref"].split("/")[-1]] == {
        "type": "string", "enum": ["draft", "published"]}
    assert by_type["enum(yes, no)"].response_format["json_schema"]["schema"]["properties"]["value"] == {
        "type": "string", "enum": ["yes", "no"]}
    # optional fields become anyOf [T, null]; the recursive reference survives
    box = by_type["Box"].response_format["json_schema"]["schema"]
    item = box["$defs"][box["properties"]["items"]["items"]["$ref"].split("/")[-1]]
    assert item["properties"]["note"]["anyOf"][1] == {"type": "null"}
    assert item["properties"]["note"]["anyOf"][0]["type"] == "string"
    assert item["properties"]["parent"]["anyOf"][0]["$ref"].startswith("#/$defs/")
    assert box["properties"]["meta"]["properties"]["sealed_at"]["anyOf"][1] == {"type": "null"}
    # an alias of an object type is sent as that object, not as a bare $ref
    same = by_type["Same"].response_format["json_schema"]["schema"]
    assert same["properties"].keys() == box["properties"].keys()
    # unwrapping on the way back
    agent = by_type["Status"]
    assert c.clean_output(agent, {"value": "draft"}) == "draft"
    assert agent.output_validator.errors("draft") == [] and agent.output_validator.errors("gone") != []


def test_map_or_any_in_an_output_type_is_not_strict_and_warns(tmp_path: Path) -> None:
    types = "  Scores:\n    by_word: map(string, number)\n  Raw:\n    payload: any\n  Fine:\n    x: int\n"
    c = output_agents(tmp_path, types, {"m": "Scores", "a": "Raw", "f": "Fine", "inline": "map(string, int)"})
    strict = {a.assistant.output_type_name: a.response_format["json_schema"]["strict"] for a in c.agents.values()}
    assert strict == {"Scores": False, "Raw": False, "Fine": True, "map(string, int)": False}
    warned = sorted(w.path for w in c.warnings)
    assert warned == ["assistants.a0.output_type", "assistants.a1.output_type", "assistants.a3.output_type"]
    for w in c.warnings:
        assert "strict" in w.message
        assert w.line == (tmp_path / "agents.yaml").read_text().splitlines().index(
            f"  {w.path.split('.')[1]}:") + 1
