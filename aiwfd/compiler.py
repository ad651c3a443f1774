"""Turn a loaded Config into what serving needs: schemas, validators, response formats.

A `Compiled` is immutable: a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from aiwfd import typedsl
from aiwfd.config import Assistant, Config, Provider, load
from aiwfd.errors import Problem
from aiwfd.typedsl import Node
from aiwfd.validation import Validator, compile_check

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


def compile_config(config: Config) -> Compiled:
    defs = config.types
    type_schemas = {k: root_schema(typedsl.Ref(k), defs, title=k) for k in defs}
    agents: dict[str, CompiledAgent] = {}
    warnings = list(config.warnings)
    checks: dict[str, Any] = {}  # predicates of named types, shared by every agent
    for name, a in config.assistants.items():
        in_schema = root_schema(a.input_type, defs, a.input_type_name) if a.input_type else dict(OPEN_OBJECT)
        out_schema = response_format = None
        wrapped, strict = False, True
        if a.output_type is not None:
            out_schema = root_schema(a.output_type, defs, a.output_type_name)
            target = typedsl.deref(a.output_type, dict(defs))
            wrapped = not isinstance(target, (typedsl.Obj, typedsl.Map))
            sent, strict = strict_root(a.output_type, defs, wrapped)
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
            input_validator=Validator(in_schema, compile_check(a.input_type, defs, checks) if a.input_type else None,
                                      trusted=True),
            output_validator=Validator(out_schema, compile_check(a.output_type, defs, checks), trusted=True)
            if out_schema else None,
        )
    return Compiled(config, agents, type_schemas, tuple(warnings))


def load_and_compile(path: str) -> Compiled:
    return compile_config(load(path))


def _schema_name(a: Assistant) -> str:
    # OpenAI requires ^[a-zA-Z0-9_-]{1,64}$ for json_schema.name.
    name = a.output_type_name or ""
    base = name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"{a.name}_output"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)[:64] or "output"
