"""Read a YAML file into plain data, remembering the line of every key.

Error messages must name the line of the offending key, and PyYAML's plain
loader forgets positions; composing the node graph keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]


@dataclass
class Source:
    """A parsed YAML document and the 1-based line of each path in it."""

    file: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    duplicates: list[tuple[Path, int]] = field(default_factory=list)

    def line(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


class YAMLSyntaxError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


# libyaml composes nodes (with their marks) about five times faster than the
# pure-Python parser; a 200-agent file would otherwise spend most of its load here.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_STR_TAG = "tag:yaml.org,2002:str"


def parse(text: str, file: str) -> Source:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or str(e)
        if e.context:
            problem = f"{problem} ({e.context})"
        if "mapping values are not allowed" in problem:
            problem += " (a ': ' inside a value starts a mapping: write T[](min:1, max:10) or quote the value)"
        raise YAMLSyntaxError(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise YAMLSyntaxError(f"not valid YAML: {e}", None) from None
    finally:
        loader.dispose()
    src = Source(file, None)
    if node is None:
        return src
    src.lines[()] = node.start_mark.line + 1
    src.data = _convert(node, (), src, yaml.SafeLoader(""), set())
    return src


def _convert(node: yaml.Node, path: Path, src: Source, ctor: yaml.SafeLoader, active: set[int]) -> Any:
    if id(node) in active:
        raise YAMLSyntaxError("not valid YAML: recursive alias", node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        active.add(id(node))
        ctor.flatten_mapping(node)
        out: dict[str, Any] = {}
        for k, v in node.value:
            # Keys are always names here; taking the source text keeps `on:`
            # and `yes:` from turning into booleans (YAML 1.1).
            key = k.value if isinstance(k, yaml.ScalarNode) else str(ctor.construct_object(k, deep=True))
            kpath = path + (key,)
            if key in out:
                src.duplicates.append((kpath, k.start_mark.line + 1))
            src.lines[kpath] = k.start_mark.line + 1
            out[key] = _convert(v, kpath, src, ctor, active)
        active.discard(id(node))
        return out
    if isinstance(node, yaml.SequenceNode):
        active.add(id(node))
        items = []
        for i, v in enumerate(node.value):
            src.lines[path + (i,)] = v.start_mark.line + 1
            items.append(_convert(v, path + (i,), src, ctor, active))
        active.discard(id(node))
        return items
    if node.tag == _STR_TAG:  # what construct_object would return, without its bookkeeping
        return node.value
    try:
        return ctor.construct_object(node)
    except yaml.constructor.ConstructorError as e:
        raise YAMLSyntaxError(f"not valid YAML: {e.problem}", node.start_mark.line + 1) from None
