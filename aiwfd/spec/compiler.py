"""Turn a loaded Config into what serving needs: schemas, validators, response formats.

A `Compiled` is immutable: a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from aiwfd.spec import typedsl
from aiwfd.spec.config import Assistant, Config, Provider, load
from aiwfd.errors import Problem
from aiwfd.spec.typedsl import Node
from aiwfd.spec.validation import Validator, compile_check

OPEN_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class CompiledAgent:
    assistant: Assistant
    provider: Provider
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    # The exact `response_format` sent to the provider; None for plain text.
    response_format: dict[str, Any] | None
    # The output type is not an object, so the model answers {"value": …}.
    wrapped: bool
    strict: bool
    input_validator: Validator
    output_validator: Validator | None
    # The fallbacks of SPEC §11.1, in order: (model, provider). The strict
    # schema (`response_format`) is the same for every model.
    fallbacks: tuple[tuple[str, Provider], ...] = ()

    @property
    def name(self) -> str:
        return self.assistant.name

    def artifact(self) -> dict[str, Any]:
        """`agents/<name>.json` of SPEC §4.2."""
        out: dict[str, Any] = {
            "agent": self.name,
            "provider": self.provider.name,
            "model": self.assistant.model,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
        }
        if self.response_format is not None:
            out["response_format"] = self.response_format
        return out


@dataclass(frozen=True)
class Compiled:
    config: Config
    agents: Mapping[str, CompiledAgent]
    type_schemas: Mapping[str, dict[str, Any]]
    warnings: tuple[Problem, ...]

    def clean_output(self, agent: CompiledAgent, data: Any) -> Any:
        """Unwrap `{"value": …}` and drop the nulls strict mode puts in optional fields."""
        node = agent.assistant.output_type
        assert node is not None
        if agent.wrapped:
            if not isinstance(data, dict) or "value" not in data:
                return data
            data = data["value"]
        return typedsl.drop_nulls(node, data, dict(self.config.types))


def root_schema(node: Node, defs: Mapping[str, Node], title: str | None = None) -> dict[str, Any]:
    """A standalone JSON Schema for `node`, carrying the `$defs` it needs."""
    body_node = defs[node.key] if isinstance(node, typedsl.Ref) else node
    out: dict[str, Any] = {"$schema": typedsl.SCHEMA_DIALECT}
    if title:
        out["title"] = title
    out.update(typedsl.schema(body_node))
    keys = typedsl.closure([body_node], dict(defs))
    if keys:
        out["$defs"] = {k: typedsl.schema(defs[k]) for k in keys}
    return out


def strict_root(node: Node, defs: Mapping[str, Node], wrapped: bool) -> tuple[dict[str, Any], bool]:
    """The schema the model sees (SPEC §1.4): root is a closed object."""
    # An alias chain (`Out: Other`, `Other: {…}`) is followed to the object, so
    # the root is the object itself and never a bare `$ref`.
    body_node = node if wrapped else typedsl.deref(node, dict(defs))
    body, strict = typedsl.strict_schema(body_node)
    if wrapped:
        body = {"type": "object", "properties": {"value": body}, "required": ["value"],
                "additionalProperties": False}
    keys = typedsl.closure([body_node], dict(defs))
    if keys:
        body["$defs"] = {}
        for k in keys:
            body["$defs"][k], ok = typedsl.strict_schema(defs[k])
            strict = strict and ok
    return body, strict


class Memo:
    """What compiles keep for later ones: the parsed type expressions
    (`typedsl.Parses`) and the schemas and validators built from them.

    The daemon's Server owns one for its life, so a reload reuses what the
    last load built; a caller without one (`aiwfd validate`, a test) starts
    clean. Everything in it is frozen or never mutated once built, so any
    number of `Compiled` can share it.
    """

    PIECES_MAX = 20_000

    def __init__(self) -> None:
        self.parses = typedsl.Parses()
        self.pieces: dict[tuple[Any, ...], Any] = {}


def compile_config(config: Config, memo: Memo | None = None) -> Compiled:
    defs = config.types
    build = _Pieces(defs, (memo or Memo()).pieces)
    type_schemas = {k: build.root_schema(typedsl.Ref(k), k) for k in defs}
    agents: dict[str, CompiledAgent] = {}
    warnings = list(config.warnings)
    for name, a in config.assistants.items():
        in_schema = build.root_schema(a.input_type, a.input_type_name) if a.input_type else dict(OPEN_OBJECT)
        out_schema = response_format = None
        wrapped, strict = False, True
        if a.output_type is not None:
            out_schema = build.root_schema(a.output_type, a.output_type_name)
            target = typedsl.deref(a.output_type, build.defs)
            wrapped = not isinstance(target, (typedsl.Obj, typedsl.Map))
            sent, strict = build.strict_root(a.output_type, wrapped)
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": _schema_name(a), "strict": strict, "schema": sent},
            }
            if not strict:
                warnings.append(Problem(
                    config.path, a.line, f"assistants.{name}.output_type",
                    "contains map(…) or any, which strict structured outputs cannot express; "
                    "sent with strict: false (the answer is still validated)",
                ))
        agents[name] = CompiledAgent(
            assistant=a,
            provider=config.providers[a.use],
            input_schema=in_schema,
            output_schema=out_schema,
            response_format=response_format,
            wrapped=wrapped,
            strict=strict,
            input_validator=build.validator(a.input_type, a.input_type_name, in_schema) if a.input_type
            else Validator(in_schema, trusted=True),
            output_validator=build.validator(a.output_type, a.output_type_name, out_schema)
            if a.output_type is not None and out_schema is not None else None,
            fallbacks=tuple((model, config.providers[use]) for use, model in a.fallbacks),
        )
    return Compiled(config, agents, type_schemas, tuple(warnings))


class _Pieces:
    """The schemas and validators of one compile, shared with earlier compiles through `Memo.pieces`.

    Each piece is keyed by everything it is built from: the type node, its
    title and the named types it reaches. A reload of a file where one type
    changed rebuilds the pieces that reach that type and reuses the rest
    (200 agents: ~40 ms of a ~100 ms compile). The pieces are never mutated
    after they are built, so two Compiled can share them.
    """

    def __init__(self, defs: Mapping[str, Node], pieces: dict[tuple[Any, ...], Any]) -> None:
        self.defs = dict(defs)
        self.pieces = pieces
        self.checks: dict[str, Any] = {}  # predicates of named types, for compile_check
        self._deps: dict[Node, tuple[Any, ...]] = {}

    def deps(self, node: Node) -> tuple[Any, ...]:
        """The node and every named type it reaches, with their definitions."""
        found = self._deps.get(node)
        if found is None:
            body = self.defs[node.key] if isinstance(node, typedsl.Ref) else node
            found = self._deps[node] = (node, body, *((k, self.defs[k]) for k in typedsl.closure([body], self.defs)))
        return found

    def _get(self, key: tuple[Any, ...], build: Any) -> Any:
        pieces = self.pieces
        hit = pieces.get(key)
        if hit is None:
            if len(pieces) >= Memo.PIECES_MAX:
                pieces.clear()
            hit = pieces[key] = build()
        return hit

    def root_schema(self, node: Node, title: str | None) -> dict[str, Any]:
        return self._get(("root", title, self.deps(node)), lambda: root_schema(node, self.defs, title))

    def strict_root(self, node: Node, wrapped: bool) -> tuple[dict[str, Any], bool]:
        return self._get(("strict", wrapped, self.deps(node)), lambda: strict_root(node, self.defs, wrapped))

    def validator(self, node: Node, title: str | None, schema: dict[str, Any]) -> Validator:
        return self._get(("validator", title, self.deps(node)),
                         lambda: Validator(schema, compile_check(node, self.defs, self.checks), trusted=True))


def load_and_compile(path: str, memo: Memo | None = None) -> Compiled:
    """`memo`: what earlier compiles built, to reuse (see `Memo`); None starts clean."""
    memo = memo or Memo()
    return compile_config(load(path, memo.parses), memo)


def _schema_name(a: Assistant) -> str:
    # OpenAI requires ^[a-zA-Z0-9_-]{1,64}$ for json_schema.name.
    name = a.output_type_name or ""
    base = name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"{a.name}_output"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)[:64] or "output"
