"""Load an agents file into frozen dataclasses, reporting every problem at once.

Each problem names the file, the line and the key path, with a "did you mean"
hint where one is close, e.g.

    agents.yaml:14: assistants.greeter.sytem_prompt: unknown key (did you mean 'system_prompt'?)

`load()` raises `ConfigError` holding all of them; it never stops at the first.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Literal, Mapping

from aiwfd.spec import typedsl

from aiwfd.spec import yamlsrc
from aiwfd.spec.access import (
    AuthConfig, LimitSet, LimitsConfig, check_allowlists, load_auth, load_limit_set, load_limits,
)
from aiwfd.spec.jobs import JobsConfig, load_jobs
from aiwfd.errors import ConfigError, Problem
from aiwfd.spec.typedsl import Node, TypeSyntaxError

AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TYPE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROVIDER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VERSIONS = ("0.3", "0.3-proposal")

TOP_KEYS = ("version", "imports", "types", "assistants", "providers", "server", "auth", "limits", "jobs")
ASSISTANT_KEYS = (
    "use", "model", "system_prompt", "input_type", "output_type", "max_tokens",
    "temperature", "max_attempts", "timeout", "description", "limits", "fallbacks",
)
FALLBACK_KEYS = ("use", "model")
PROVIDER_KEYS = ("base_url", "api_key_env", "timeout", "organization", "project")
SERVER_KEYS = ("cors", "max_body", "shutdown_timeout", "batch_max", "batch_concurrency")
CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "max_age", "allow_credentials")
IMPORT_KEYS = ("as", "path")
# Keys of the original format that aiwfd does not act on yet: a warning, not an error.
LEGACY_KEYS = ("threads", "thread", "dialog", "depends_on")

ProviderKind = Literal["openai", "grok", "mock", "custom"]
BUILTIN_PROVIDERS: dict[str, ProviderKind] = {"openai": "openai", "grok": "grok", "mock": "mock"}

DEFAULT_MAX_TOKENS = 2000
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_BATCH_MAX = 100
DEFAULT_BATCH_CONCURRENCY = 8


@dataclass(frozen=True)
class Provider:
    name: str
    kind: ProviderKind
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: float | None = None
    organization: str | None = None
    project: str | None = None


@dataclass(frozen=True)
class Assistant:
    name: str
    use: str
    model: str
    system_prompt: str
    input_type: Node | None
    output_type: Node | None
    input_type_name: str | None
    output_type_name: str | None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = None
    description: str | None = None
    line: int | None = None
    limits: LimitSet | None = None  # per agent, all clients together (SPEC §8.2)
    # Tried in order when the model before fails (SPEC §11.1): (provider name, model).
    fallbacks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allow_headers: tuple[str, ...] = ("Content-Type", "Authorization", "X-API-Key", "X-Request-ID")
    max_age: int = 600
    allow_credentials: bool = False


@dataclass(frozen=True)
class ServerSettings:
    cors: Cors | None = None
    max_body: int | None = None
    shutdown_timeout: float | None = None
    batch_max: int = DEFAULT_BATCH_MAX
    batch_concurrency: int = DEFAULT_BATCH_CONCURRENCY


@dataclass(frozen=True)
class Config:
    path: str
    version: str
    types: Mapping[str, Node]
    assistants: Mapping[str, Assistant]
    providers: Mapping[str, Provider]
    server: ServerSettings
    warnings: tuple[Problem, ...] = field(default=())
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    # Every file read (the agents file and its imports) with the text read.
    sources: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def unchanged_on_disk(self) -> bool:
        """Whether every file this config was read from still holds the same text."""
        try:
            return bool(self.sources) and all(
                FsPath(path).read_text(encoding="utf-8") == text for path, text in self.sources)
        except (OSError, UnicodeDecodeError):
            return False


def did_you_mean(word: str, choices: Any) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def parse_size(value: Any) -> int | None:
    """`1048576`, `"1MiB"`, `"512k"`, `"2 MB"` → bytes; None when it is not a size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", value)
    if not m:
        return None
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    n = int(m.group(1)) * scale
    return n if n > 0 else None


class _Loader:
    """Collects problems while walking one agents file and its imports."""

    def __init__(self, parses: typedsl.Parses | None = None) -> None:
        self.parses = parses
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.defs: dict[str, Node] = {}
        self.def_origin: dict[str, tuple[str, int | None, str]] = {}
        self.sources: list[tuple[str, str]] = []

    # ------------------------------------------------------------ reporting

    def err(self, src: yamlsrc.Source, path: tuple[Any, ...], message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(src.file, src.line(path), _dotted(path), message, hint))

    def warn(self, src: yamlsrc.Source, path: tuple[Any, ...], message: str, hint: str | None = None) -> None:
        self.warnings.append(Problem(src.file, src.line(path), _dotted(path), message, hint))

    def check_keys(self, src: yamlsrc.Source, path: tuple[Any, ...], value: dict, allowed: tuple[str, ...],
                   legacy: bool = False) -> None:
        for key in value:
            if key in allowed:
                continue
            if legacy and key in LEGACY_KEYS:
                self.warn(src, path + (key,), "not supported by aiwfd yet; ignored")
                continue
            self.err(src, path + (key,), "unknown key", did_you_mean(key, allowed))

    # ------------------------------------------------------------ files

    def read(self, path: FsPath, display: str, at: tuple[yamlsrc.Source, tuple] | None) -> yamlsrc.Source | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if at:
                self.err(at[0], at[1], f"imported file not found: {path}")
            else:
                self.problems.append(Problem(display, None, "", "file not found"))
            return None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.problems.append(Problem(display, None, "", f"cannot read file: {reason}"))
            return None
        self.sources.append((str(path), text))
        try:
            src = yamlsrc.parse(text, display)
        except yamlsrc.YAMLSyntaxError as e:
            self.problems.append(Problem(display, e.line, "", e.message))
            return None
        for kpath, line in src.duplicates:
            self.problems.append(Problem(display, line, _dotted(kpath), "duplicate key"))
        if not isinstance(src.data, dict):
            what = "empty" if src.data is None else f"a {_kind(src.data)}"
            self.problems.append(Problem(display, src.line(()), "", f"the file is {what}, not a mapping of sections"))
            return None
        return src

    def load_types(self, src: yamlsrc.Source, fspath: FsPath, prefix: str, stack: tuple[FsPath, ...]) -> None:
        """Load `imports:` and `types:` of one file into `self.defs` under `prefix`."""
        data = src.data
        version = data.get("version")
        if "version" in data and str(version) not in VERSIONS:
            self.err(src, ("version",), f"unsupported version {version!r}", "aiwfd reads version 0.3")
        aliases: dict[str, str] = {}
        imports = data.get("imports")
        if imports is not None:
            if not isinstance(imports, list):
                self.err(src, ("imports",), "expected a list of {as, path}")
                imports = []
            for i, item in enumerate(imports):
                alias = self.load_import(src, fspath, prefix, stack, ("imports", i), item)
                if alias:
                    aliases[alias[0]] = alias[1]
        types = data.get("types")
        if types is None:
            types = {}
        if not isinstance(types, dict):
            self.err(src, ("types",), f"expected a mapping of type names, got a {_kind(types)}")
            types = {}
        local = {}
        for name in types:
            if not TYPE_NAME_RE.fullmatch(name):
                self.err(src, ("types", name), "a type name must start with a letter and use letters, digits and _")
            elif name in typedsl.BUILTIN_WORDS:
                self.err(src, ("types", name), f"{name!r} is a built-in type and cannot be redefined")
            else:
                local[name] = prefix + name
        resolve = self.resolver(local, aliases)
        for name, key in local.items():
            node = self.type_value(src, ("types", name), types[name], resolve)
            if node is not None:
                self.defs[key] = node
                self.def_origin[key] = (src.file, src.line(("types", name)), "types." + name)

    def load_import(self, src: yamlsrc.Source, fspath: FsPath, prefix: str, stack: tuple[FsPath, ...],
                    path: tuple, item: Any) -> tuple[str, str] | None:
        if not isinstance(item, dict):
            self.err(src, path, "an import is a mapping {as: alias, path: file.yaml}")
            return None
        self.check_keys(src, path, item, IMPORT_KEYS)
        alias, rel = item.get("as"), item.get("path")
        ok = True
        if not isinstance(alias, str) or not TYPE_NAME_RE.fullmatch(alias):
            self.err(src, path + ("as",), "an import needs an alias: letters, digits and _")
            ok = False
        if not isinstance(rel, str) or not rel:
            self.err(src, path + ("path",), "an import needs the path of a file")
            ok = False
        if not ok:
            return None
        assert isinstance(alias, str) and isinstance(rel, str)  # checked above
        target = (fspath.parent / rel).resolve()
        if target in stack:
            chain = " -> ".join(p.name for p in stack[stack.index(target):] + (target,))
            self.err(src, path + ("path",), f"import cycle: {chain}")
            return None
        # Named the way the importing file was named (not relative to the cwd).
        display = os.path.normpath(os.path.join(os.path.dirname(src.file), rel))
        sub = self.read(target, display, (src, path + ("path",)))
        if sub is None:
            return None
        self.check_keys(sub, (), sub.data, TOP_KEYS, legacy=True)
        self.load_types(sub, target, f"{prefix}{alias}.", stack + (target,))
        return alias, f"{prefix}{alias}."

    def resolver(self, local: dict[str, str], aliases: dict[str, str]) -> typedsl.Resolver:
        def resolve(alias: str | None, name: str) -> str:
            if alias is None:
                if name in local:
                    return local[name]
                raise TypeSyntaxError(f"unknown type {name!r}", did_you_mean(name, list(local) + sorted(typedsl.BUILTIN_WORDS)))
            if alias not in aliases:
                raise TypeSyntaxError(f"unknown import alias {alias!r}", did_you_mean(alias, aliases))
            key = aliases[alias] + name
            if key not in self.defs:
                names = [k[len(aliases[alias]):] for k in self.defs if k.startswith(aliases[alias]) and "." not in k[len(aliases[alias]):]]
                raise TypeSyntaxError(f"unknown type '{alias}.{name}'", did_you_mean(name, names))
            return key
        return resolve

    def type_value(self, src: yamlsrc.Source, path: tuple, value: Any, resolve: typedsl.Resolver) -> Node | None:
        """A type as written in YAML: an expression, a mapping of fields, or [T]."""
        if isinstance(value, str):
            try:
                return typedsl.parse(value, resolve, self.parses)
            except TypeSyntaxError as e:
                self.err(src, path, e.message, e.hint)
                return None
        if isinstance(value, dict):
            fields: list[typedsl.Field] = []
            ok = True
            for raw, fvalue in value.items():
                optional = raw.endswith("?")
                fname = raw[:-1] if optional else raw
                if not fname or fname.endswith("?"):
                    self.err(src, path + (raw,), "a field name must be non-empty (one '?' marks it optional)")
                    ok = False
                    continue
                node = self.type_value(src, path + (raw,), fvalue, resolve)
                if node is None:
                    ok = False
                    continue
                if any(f.name == fname for f in fields):
                    self.err(src, path + (raw,), f"field {fname!r} is defined twice")
                    ok = False
                    continue
                fields.append(typedsl.Field(fname, node, optional))
            return typedsl.Obj(tuple(fields)) if ok else None
        if isinstance(value, list):
            if len(value) != 1:
                self.err(src, path, "an inline array is written as a one-element list: [T]")
                return None
            item = self.type_value(src, path + (0,), value[0], resolve)
            return typedsl.Array(item) if item is not None else None
        self.err(src, path, f"expected a type expression, a mapping of fields or [T], got {_describe(value)}")
        return None

    def check_bare_cycles(self) -> None:
        for key, node in self.defs.items():
            seen = {key}
            while isinstance(node, typedsl.Ref):
                if node.key in seen:
                    file, line, kpath = self.def_origin[key]
                    self.problems.append(Problem(file, line, kpath, "type is defined only in terms of itself"))
                    break
                seen.add(node.key)
                node = self.defs.get(node.key)  # type: ignore[assignment]


def load(path: str | os.PathLike[str], parses: typedsl.Parses | None = None) -> Config:
    """Read, check and resolve an agents file. Raises ConfigError with every problem.

    `parses`: the type expressions parsed by earlier loads (a reload), kept by
    the caller; without it the load starts clean (still sharing the parses of
    an expression its file repeats)."""
    ld = _Loader(parses if parses is not None else typedsl.Parses())
    fspath = FsPath(path)
    display = str(path)
    src = ld.read(fspath, display, None)
    if src is None:
        raise ConfigError(ld.problems)
    data = src.data
    ld.check_keys(src, (), data, TOP_KEYS, legacy=True)
    ld.load_types(src, fspath.resolve(), "", (fspath.resolve(),))
    ld.check_bare_cycles()
    local_types = tuple(k for k in ld.defs if "." not in k)
    providers = _providers(ld, src, data.get("providers"))
    resolve = ld.resolver({k: k for k in local_types} | _pending_local(data, ld), _aliases(data))
    assistants = _assistants(ld, src, data.get("assistants"), providers, resolve)
    server = _server(ld, src, data.get("server"))
    auth = load_auth(ld, src, data.get("auth"))
    check_allowlists(ld, src, auth, assistants)
    limits = load_limits(ld, src, data.get("limits"))
    jobs = load_jobs(ld, src, data.get("jobs"))
    if ld.problems:
        raise ConfigError(_in_file_order(ld.problems))
    return Config(
        path=display,
        version=str(data.get("version", "0.3")),
        types=ld.defs,
        assistants=assistants,
        providers=providers,
        server=server,
        warnings=tuple(_in_file_order(ld.warnings)),
        auth=auth,
        limits=limits,
        jobs=jobs,
        sources=tuple(ld.sources),
    )


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    """Problems grouped by file (first seen first), by line within a file."""
    files = {p.file: i for i, p in reversed(list(enumerate(problems)))}
    return sorted(problems, key=lambda p: (files[p.file], p.line or 0))


def _pending_local(data: dict, ld: _Loader) -> dict[str, str]:
    """Local type names that failed to parse still resolve, so one bad type
    does not also make every assistant that uses it an 'unknown type'."""
    types = data.get("types")
    if not isinstance(types, dict):
        return {}
    return {n: n for n in types if TYPE_NAME_RE.fullmatch(n) and n not in typedsl.BUILTIN_WORDS}


def _aliases(data: dict) -> dict[str, str]:
    imports = data.get("imports")
    if not isinstance(imports, list):
        return {}
    return {i["as"]: i["as"] + "." for i in imports if isinstance(i, dict) and isinstance(i.get("as"), str)}


def _providers(ld: _Loader, src: yamlsrc.Source, section: Any) -> dict[str, Provider]:
    providers: dict[str, Provider] = {n: Provider(n, k) for n, k in BUILTIN_PROVIDERS.items()}
    if section is None:
        return providers
    if not isinstance(section, dict):
        ld.err(src, ("providers",), f"expected a mapping of provider names, got a {_kind(section)}")
        return providers
    for name, body in section.items():
        path = ("providers", name)
        if name in BUILTIN_PROVIDERS:
            ld.err(src, path, f"{name!r} is a built-in provider; give yours another name")
            continue
        if not PROVIDER_NAME_RE.fullmatch(name):
            ld.err(src, path, "a provider name uses letters, digits, _ and -")
            continue
        if not isinstance(body, dict):
            ld.err(src, path, "expected a mapping with base_url")
            continue
        ld.check_keys(src, path, body, PROVIDER_KEYS)
        base_url = body.get("base_url")
        if not isinstance(base_url, str) or not re.match(r"^https?://[^\s/]+", base_url):
            ld.err(src, path + ("base_url",), "expected an http:// or https:// URL",
                   None if "base_url" in body else "every provider needs base_url")
            base_url = None
        key_env = body.get("api_key_env")
        if key_env is not None and not (isinstance(key_env, str) and ENV_NAME_RE.fullmatch(key_env)):
            ld.err(src, path + ("api_key_env",), "expected the name of an environment variable")
            key_env = None
        timeout = _positive_number(ld, src, path + ("timeout",), body.get("timeout"))
        org = _opt_str(ld, src, path + ("organization",), body.get("organization"))
        project = _opt_str(ld, src, path + ("project",), body.get("project"))
        providers[name] = Provider(name, "custom", base_url, key_env, timeout, org, project)
    return providers


def _assistants(ld: _Loader, src: yamlsrc.Source, section: Any, providers: dict[str, Provider],
                resolve: typedsl.Resolver) -> dict[str, Assistant]:
    if section is None or section == {}:
        ld.err(src, ("assistants",) if section == {} else (), "no assistants defined",
               "add an 'assistants:' section with at least one agent")
        return {}
    if not isinstance(section, dict):
        ld.err(src, ("assistants",), f"expected a mapping of agent names, got a {_kind(section)}")
        return {}
    out: dict[str, Assistant] = {}
    for name, body in section.items():
        path = ("assistants", name)
        if not AGENT_NAME_RE.fullmatch(name):
            ld.err(src, path, "an agent name must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ (it is part of the URL)")
            continue
        if not isinstance(body, dict):
            ld.err(src, path, f"expected a mapping of settings, got {_describe(body)}")
            continue
        ld.check_keys(src, path, body, ASSISTANT_KEYS, legacy=True)
        n_before = len(ld.problems)
        use = body.get("use", "openai")
        if not isinstance(use, str) or use not in providers:
            ld.err(src, path + ("use",), f"unknown provider {use!r}", did_you_mean(str(use), providers))
        model = body.get("model")
        if "model" not in body:
            ld.err(src, path, "missing key 'model'")
        elif not isinstance(model, str) or not model:
            ld.err(src, path + ("model",), f"expected a model name, got {_describe(model)}")
        prompt = _opt_str(ld, src, path + ("system_prompt",), body.get("system_prompt")) or ""
        in_node, in_name = _type_ref(ld, src, path + ("input_type",), body.get("input_type"), resolve)
        if in_node is not None:
            target = _try_deref(in_node, ld.defs)
            if target is not None and not isinstance(target, (typedsl.Obj, typedsl.Map, typedsl.AnyT)):
                ld.err(src, path + ("input_type",), f"{in_name!r} is not an object type",
                       "the request body is a JSON object; use a type with fields")
        out_node, out_name = _type_ref(ld, src, path + ("output_type",), body.get("output_type"), resolve)
        max_tokens = _int(ld, src, path + ("max_tokens",), body.get("max_tokens"), DEFAULT_MAX_TOKENS, 1, None)
        temperature = _number(ld, src, path + ("temperature",), body.get("temperature"), DEFAULT_TEMPERATURE, 0, 2)
        attempts = _int(ld, src, path + ("max_attempts",), body.get("max_attempts"), DEFAULT_MAX_ATTEMPTS, 1, 10)
        timeout = _positive_number(ld, src, path + ("timeout",), body.get("timeout"))
        description = _opt_str(ld, src, path + ("description",), body.get("description"))
        limits = load_limit_set(ld, src, path + ("limits",), body.get("limits"))
        fallbacks = _fallbacks(ld, src, path + ("fallbacks",), body.get("fallbacks"), providers, use, model)
        if len(ld.problems) != n_before:
            continue
        assert isinstance(model, str)  # a problem was recorded otherwise
        out[name] = Assistant(
            name=name, use=use, model=model, system_prompt=prompt,
            input_type=in_node, output_type=out_node, input_type_name=in_name, output_type_name=out_name,
            max_tokens=max_tokens, temperature=temperature, max_attempts=attempts,
            timeout=timeout, description=description, line=src.line(path), limits=limits,
            fallbacks=fallbacks,
        )
    return out


def _fallbacks(ld: _Loader, src: yamlsrc.Source, path: tuple, value: Any, providers: dict[str, Provider],
               use: Any, model: Any) -> tuple[tuple[str, str], ...]:
    """`fallbacks:` of an assistant: `{model}` (the assistant's provider) or `{use, model}`."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        ld.err(src, path, "expected a list such as [{model: gpt-4.1-mini}, {use: grok, model: grok-3-mini}]")
        return ()
    out: list[tuple[str, str]] = []
    seen = {(use, model)}
    for i, entry in enumerate(value):
        at = path + (i,)
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            ld.err(src, at, f"expected {{model: …}} or {{use: …, model: …}}, got {_describe(entry)}")
            continue
        ld.check_keys(src, at, entry, FALLBACK_KEYS)
        f_use, f_model = entry.get("use", use), entry.get("model")
        if not isinstance(f_use, str) or f_use not in providers:
            ld.err(src, at + ("use",), f"unknown provider {f_use!r}", did_you_mean(str(f_use), providers))
            continue
        if not isinstance(f_model, str) or not f_model:
            ld.err(src, at + ("model",) if "model" in entry else at, "expected a model name"
                   if "model" in entry else "missing key 'model'")
            continue
        if (f_use, f_model) in seen:
            what = "the assistant's own model" if (f_use, f_model) == (use, model) else "an earlier fallback"
            ld.err(src, at, f"{f_use}/{f_model} is {what}", "a fallback must be another model or provider")
            continue
        seen.add((f_use, f_model))
        out.append((f_use, f_model))
    return tuple(out)


def _try_deref(node: Node, defs: Mapping[str, Node]) -> Node | None:
    try:
        return typedsl.deref(node, dict(defs))
    except (TypeSyntaxError, KeyError):
        return None


def _type_ref(ld: _Loader, src: yamlsrc.Source, path: tuple, value: Any,
              resolve: typedsl.Resolver) -> tuple[Node | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        ld.err(src, path, f"expected the name of a type, got {_describe(value)}")
        return None, None
    try:
        return typedsl.parse(value, resolve, ld.parses), value.strip().lstrip("$")
    except TypeSyntaxError as e:
        ld.err(src, path, e.message.replace(f"invalid type {value.strip()!r}: ", ""), e.hint)
        return None, None


def _server(ld: _Loader, src: yamlsrc.Source, section: Any) -> ServerSettings:
    if section is None:
        return ServerSettings()
    if not isinstance(section, dict):
        ld.err(src, ("server",), f"expected a mapping, got {_describe(section)}")
        return ServerSettings()
    ld.check_keys(src, ("server",), section, SERVER_KEYS)
    cors = _cors(ld, src, section.get("cors"))
    max_body = None
    if section.get("max_body") is not None:
        max_body = parse_size(section["max_body"])
        if max_body is None:
            ld.err(src, ("server", "max_body"), "expected a size in bytes such as 1048576 or '1MiB'")
    shutdown = None
    if section.get("shutdown_timeout") is not None:
        shutdown = _number(ld, src, ("server", "shutdown_timeout"), section["shutdown_timeout"], 0, 0, None)
    return ServerSettings(
        cors=cors,
        max_body=max_body,
        shutdown_timeout=shutdown,
        batch_max=_int(ld, src, ("server", "batch_max"), section.get("batch_max"), DEFAULT_BATCH_MAX, 1, None),
        batch_concurrency=_int(ld, src, ("server", "batch_concurrency"), section.get("batch_concurrency"),
                               DEFAULT_BATCH_CONCURRENCY, 1, None),
    )


def _cors(ld: _Loader, src: yamlsrc.Source, section: Any) -> Cors | None:
    if section is None:
        return None
    path = ("server", "cors")
    if not isinstance(section, dict):
        ld.err(src, path, f"expected a mapping, got {_describe(section)}")
        return None
    ld.check_keys(src, path, section, CORS_KEYS)
    default = Cors()

    def strings(key: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
        v = section.get(key)
        if v is None:
            return fallback
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            ld.err(src, path + (key,), "expected a list of strings")
            return fallback
        return tuple(v)

    origins = strings("allow_origins", ())
    if not origins:
        ld.err(src, path + ("allow_origins",), "list the origins allowed to call the API ('*' for any)")
    credentials = section.get("allow_credentials", False)
    if not isinstance(credentials, bool):
        ld.err(src, path + ("allow_credentials",), f"expected true or false, got {_describe(credentials)}")
        credentials = False
    if credentials and "*" in origins:
        ld.err(src, path + ("allow_credentials",), "browsers refuse credentials with the origin '*'",
               "list the origins explicitly")
    return Cors(
        allow_origins=origins,
        allow_methods=tuple(m.upper() for m in strings("allow_methods", default.allow_methods)),
        allow_headers=strings("allow_headers", default.allow_headers),
        max_age=_int(ld, src, path + ("max_age",), section.get("max_age"), default.max_age, 0, None),
        allow_credentials=credentials,
    )


# ------------------------------------------------------------------ scalar checks


def _int(ld: _Loader, src: yamlsrc.Source, path: tuple, v: Any, default: int, lo: int | None, hi: int | None) -> int:
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        ld.err(src, path, f"expected {_range_text('a whole number', lo, hi)}, got {_describe(v)}")
        return default
    return v


def _number(ld: _Loader, src: yamlsrc.Source, path: tuple, v: Any, default: float, lo: float | None,
            hi: float | None) -> float:
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        ld.err(src, path, f"expected {_range_text('a number', lo, hi)}, got {_describe(v)}")
        return default
    return float(v)


def _positive_number(ld: _Loader, src: yamlsrc.Source, path: tuple, v: Any) -> float | None:
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        ld.err(src, path, f"expected a number of seconds greater than 0, got {_describe(v)}")
        return None
    return float(v)


def _opt_str(ld: _Loader, src: yamlsrc.Source, path: tuple, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        ld.err(src, path, f"expected a string, got {_describe(v)}")
        return None
    return v


def _range_text(what: str, lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}"
    if lo is not None:
        return f"{what} ≥ {lo}"
    return what


def _kind(v: Any) -> str:
    kinds: dict[type, str] = {dict: "mapping", list: "list", str: "string"}
    return kinds.get(type(v), type(v).__name__)


def _describe(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, (dict, list)):
        return f"a {_kind(v)}"
    return repr(v)


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
