"""A compile reuses what an earlier compile built only when nothing it depends on changed.

Reloads compile the same file again; the parser and the compiler keep what
they built in the `Memo` the caller passes (typedsl.parse by text, schemas
and validators by type and the named types they reach); each test starts
with a fresh one. These tests change one definition at a time and
check that everything depending on it is rebuilt, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aiwfd.spec import typedsl
from aiwfd.spec.compiler import Memo, load_and_compile
from aiwfd.errors import ConfigError

BASE = """\
types:
  Inner:
    n: int(0..10)
  Outer:
    inner: Inner
    name: string
  Other:
    x: bool
assistants:
  uses_outer:
    model: m
    input_type: Outer
    output_type: Outer
  uses_other:
    model: m
    input_type: Other
"""


@pytest.fixture
def memo() -> Memo:
    return Memo()


def compile_text(tmp_path: Path, text: str, memo: Memo, name: str = "agents.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return load_and_compile(str(f), memo)


def test_an_edit_deep_in_a_type_reaches_every_schema_and_validator_above_it(tmp_path: Path, memo: Memo) -> None:
    first = compile_text(tmp_path, BASE, memo)
    second = compile_text(tmp_path, BASE.replace("int(0..10)", "int(0..99)"), memo)
    a1, a2 = first.agents["uses_outer"], second.agents["uses_outer"]
    body = {"inner": {"n": 50}, "name": "x"}
    assert not a1.input_validator.is_valid(body)
    assert a2.input_validator.is_valid(body)
    assert a2.output_validator is not None and a2.output_validator.is_valid(body)
    assert a2.input_schema["$defs"]["Inner"]["properties"]["n"]["maximum"] == 99
    assert second.type_schemas["Outer"]["$defs"]["Inner"]["properties"]["n"]["maximum"] == 99
    sent = a2.response_format["json_schema"]["schema"]  # type: ignore[index]
    assert "99" in sent["$defs"]["Inner"]["properties"]["n"]["description"]
    # What the edit does not reach is shared with the first compile.
    assert second.agents["uses_other"].input_validator is first.agents["uses_other"].input_validator
    assert second.type_schemas["Other"] is first.type_schemas["Other"]


def test_the_same_name_in_another_file_is_another_type(tmp_path: Path, memo: Memo) -> None:
    first = compile_text(tmp_path, BASE, memo, "a.yaml")
    other = BASE.replace("    n: int(0..10)", "    n: string")
    second = compile_text(tmp_path, other, memo, "b.yaml")
    assert first.type_schemas["Inner"]["properties"]["n"]["type"] == "integer"
    assert second.type_schemas["Inner"]["properties"]["n"]["type"] == "string"
    assert second.agents["uses_outer"].input_validator.is_valid({"inner": {"n": "s"}, "name": "x"})
    assert not first.agents["uses_outer"].input_validator.is_valid({"inner": {"n": "s"}, "name": "x"})


def test_an_unchanged_file_compiles_to_shared_pieces(tmp_path: Path, memo: Memo) -> None:
    first = compile_text(tmp_path, BASE, memo)
    second = compile_text(tmp_path, BASE, memo)
    assert first is not second
    for name in first.agents:
        assert second.agents[name].input_validator is first.agents[name].input_validator
        assert second.agents[name].input_schema is first.agents[name].input_schema


def test_a_parse_is_reused_only_when_the_references_resolve_the_same(memo: Memo) -> None:
    def first(alias: str | None, name: str) -> str:
        return f"first.{name}"

    def second(alias: str | None, name: str) -> str:
        return f"second.{name}"

    a = typedsl.parse("Thing[]", first, memo.parses)
    assert a == typedsl.Array(typedsl.Ref("first.Thing"))
    # A hit returns the very node the memo holds; an equal new one would be a miss.
    assert typedsl.parse("Thing[]", first, memo.parses) is a
    b = typedsl.parse("Thing[]", second, memo.parses)
    assert b == typedsl.Array(typedsl.Ref("second.Thing"))
    assert b is not a
    assert typedsl.parse("Thing[]", second, memo.parses) is b


def test_a_reference_that_no_longer_resolves_is_reported_after_a_hit(tmp_path: Path, memo: Memo) -> None:
    compile_text(tmp_path, BASE, memo)
    broken = BASE.replace("  Inner:\n    n: int(0..10)\n", "  Inner2:\n    n: int(0..10)\n")
    with pytest.raises(ConfigError) as info:
        compile_text(tmp_path, broken, memo)
    [p] = [p for p in info.value.problems if "Inner" in p.message]
    assert p.path == "types.Outer.inner" and "unknown type" in p.message
    assert p.hint and "Inner2" in p.hint


def test_without_a_shared_memo_nothing_is_reused(tmp_path: Path) -> None:
    first = compile_text(tmp_path, BASE, Memo())
    second = compile_text(tmp_path, BASE, Memo())
    assert second.agents["uses_other"].input_validator is not first.agents["uses_other"].input_validator
    assert second.config.assistants["uses_outer"].input_type is not first.config.assistants["uses_outer"].input_type
