"""The guides and the deployment files agree with the code (issue #8, items 3 and 4).

Like datasette's test_docs.py, the lists come from the code, never from a
copy in the test:

- every environment variable the code reads (`env.get("…")`, `environ`,
  any `AIWF_*` literal, the settings registry's variables, and llm.py's
  KEY_VARS / BASE_URL_VARS tables), every flag of `aiwfd.cli.build_parser()`
  (walking the subparsers), every agents-file key of config.py's key tuples, every
  error class of errors.py with its status, every metric, route and stream
  event, and every start-up error message (StartupError texts, taken apart
  with `ast`) appears in docs/; the documented defaults are the code's, and
  the flags and keys the reference tables list exist;
- docs/deploy.md's flag table lists exactly the flags of the settings
  registry (aiwfd/settings.py), each with the registry's default and
  variable; `aiwfd serve --help` is the registry's; Troubleshooting quotes
  every range a usage error can name;
- every relative link of README.md, docs/ and examples/README.md resolves,
  anchors included;
- deploy/docker/Dockerfile (simple line parsing) and deploy/k8s/aiwfd.yaml
  (yaml): the command is a valid `aiwfd serve` invocation for aiwfd's own
  argparse parser; the ports agree; the probe and HEALTHCHECK paths answer
  200 on a real server serving the ConfigMap's agents file with --mock;
  terminationGracePeriodSeconds exceeds preStop + the shutdown timeout; the
  ConfigMap compiles; the Secret holds the keys its providers need; what the
  Dockerfile copies exists and is not excluded from the build context.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiwfd.spec import access
from aiwfd.spec import config as cfg
from aiwfd.spec import jobs as jobs_spec
from aiwfd import errors, settings
from aiwfd import providers as llm
from aiwfd.cli import build_parser
from aiwfd.spec.compiler import load_and_compile
from aiwfd.http.metrics import Metrics
from aiwfd.testing.inprocess import serve
from tests.conftest import REPO

DOCS = REPO / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
CONFIG_MD = DOCS / "config.md"
API_MD = DOCS / "api.md"
DEPLOY_MD = DOCS / "deploy.md"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
K8S = REPO / "deploy" / "k8s" / "aiwfd.yaml"
# aiwfd.testing is the tests' helper package: what it reads (PATH for a
# child) is the test process's environment, not the daemon's.
CODE = sorted(p for p in (REPO / "aiwfd").rglob("*.py") if "testing" not in p.relative_to(REPO).parts)


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in DOC_FILES)


def in_code_span(text: str, token: str) -> bool:
    """`token` starts a code span: `token`, `token FILE`, `token=…`, `token: …`."""
    return re.search("`" + re.escape(token) + r"[`\s=:]", text) is not None


def table_rows(text: str, token: str) -> list[str]:
    """Markdown table rows whose first cell holds a code span starting with `token`."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first = line.split("|")[1]
        if in_code_span(first, token):
            rows.append(line)
    return rows


# --------------------------------------------------------------------------- what the code reads

_ENV_CALL = re.compile(r"""(?:\.get|getenv)\(\s*(?:[^,()"']+,\s*)?["']([A-Z][A-Z0-9_]{2,})["']""")
_ENV_INDEX = re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]{2,})["']\s*\]""")
_AIWF_LITERAL = re.compile(r"""["'](AIWF_[A-Z0-9_]+)["']""")


def env_vars_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in CODE:
        text = path.read_text(encoding="utf-8")
        for rx in (_ENV_CALL, _ENV_INDEX, _AIWF_LITERAL):
            names.update(rx.findall(text))
    names.update(s.env for s in settings.REGISTRY if s.env)
    names.update(llm.KEY_VARS.values())
    names.update(llm.BASE_URL_VARS.values())
    return names


def cli_flags() -> dict[str, list[argparse.Action]]:
    """Every option string of every subcommand (and of `aiwfd` itself), help excluded."""
    out: dict[str, list[argparse.Action]] = {}

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
                continue
            for opt in action.option_strings:
                out.setdefault(opt, []).append(action)

    walk(build_parser())
    return out


def subcommands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


AGENTS_FILE_KEYS = {
    "top level": cfg.TOP_KEYS, "assistant": cfg.ASSISTANT_KEYS, "provider": cfg.PROVIDER_KEYS,
    "server": cfg.SERVER_KEYS, "cors": cfg.CORS_KEYS, "import": cfg.IMPORT_KEYS, "legacy": cfg.LEGACY_KEYS,
    # SPEC §8: aiwfd/spec/access.py's sections
    "auth": access.AUTH_KEYS, "auth.keys": access.CLIENT_KEYS, "auth.jwt": access.JWT_KEYS,
    "limits": access.LIMITS_KEYS, "limit set": access.LIMIT_SET_KEYS,
    # SPEC §9: aiwfd/spec/jobs.py's section
    "jobs": jobs_spec.JOBS_KEYS, "jobs.webhook": jobs_spec.WEBHOOK_KEYS,
}


def http_errors() -> list[type[errors.HTTPError]]:
    return [c for c in errors.HTTPError.__subclasses__() if c.__module__ == errors.__name__]


@dataclass
class Message:
    where: str
    chunks: list[str]          # the literal parts, between the {placeholders}
    text: str                  # for the failure message


def _literal_parts(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts, cur = [], ""
        for v in node.values:
            if isinstance(v, ast.Constant):
                cur += str(v.value)
            else:
                parts.append(cur)
                cur = ""
        parts.append(cur)
        return parts
    return None


def startup_messages() -> list[Message]:
    """The texts of StartupError(...), of server._bind_error's returns, and of the
    config loader's file-level problems: what `aiwfd serve` can print and stop."""
    found: list[Message] = []
    for path in CODE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # The loader's `read` reports the problems of the file as a whole
        # (missing, unreadable, not YAML, not a mapping).
        in_read = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "read"
                   for n in ast.walk(f)} if path.name == "config.py" else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                arg = None
                if name in ("StartupError", "RetryableStartupError", "UsageError"):
                    arg = node.args[0]
                elif name == "Problem" and id(node) in in_read and len(node.args) >= 4:
                    arg = node.args[3]
                parts = _literal_parts(arg) if arg is not None else None
                if parts is not None:
                    found.append(Message(f"{path.name}:{node.lineno}", parts, ast.unparse(arg)))  # type: ignore[arg-type]
            if isinstance(node, ast.FunctionDef) and node.name == "_bind_error":
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return) and sub.value is not None:
                        parts = _literal_parts(sub.value)
                        if parts is not None:
                            found.append(Message(f"{path.name}:{sub.lineno}", parts, ast.unparse(sub.value)))
    return found


# --------------------------------------------------------------------------- every setting is documented


def test_collectors_find_what_they_should() -> None:
    """Guard the collectors themselves: an empty list would make the tests below pass vacuously."""
    assert {"API_KEY", "PORT", "HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL", "GROK_API_KEY", "GROK_BASE_URL",
            "AIWF_LOG_FORMAT", "AIWF_LOG_LEVEL", "NOTIFY_SOCKET"} <= env_vars_read_by_code()
    assert {"--file", "--port", "--host", "--mock", "--output", "--env-file"} <= set(cli_flags())
    assert {"compile", "serve", "validate"} <= set(subcommands())
    assert len(http_errors()) >= 14
    texts = " ".join(m.text for m in startup_messages())
    assert "not set" in texts and "already in use" in texts and "file not found" in texts
    assert {"--port", "--deadline", "--shutdown-timeout"} <= {f for s in settings.REGISTRY for f in s.flags}


@pytest.mark.parametrize("name", sorted(env_vars_read_by_code()))
def test_every_environment_variable_is_documented(name: str) -> None:
    assert in_code_span(docs_text(), name), f"`{name}` is read by aiwfd/ but appears nowhere in docs/"


def test_environment_variables_are_in_the_reference_table() -> None:
    text = DEPLOY_MD.read_text(encoding="utf-8")
    missing = [n for n in sorted(env_vars_read_by_code()) if not table_rows(text, n)]
    assert not missing, f"not in docs/deploy.md's tables of variables: {missing}"


@pytest.mark.parametrize("flag", sorted(cli_flags()))
def test_every_cli_flag_is_documented(flag: str) -> None:
    assert in_code_span(docs_text(), flag), f"`{flag}` is a flag of build_parser() but appears nowhere in docs/"


def test_every_subcommand_is_documented() -> None:
    text = DEPLOY_MD.read_text(encoding="utf-8")
    for name in subcommands():
        assert f"aiwfd {name}" in text, name


def cells(row: str) -> list[str]:
    """A markdown table row's cells (an escaped `\\|` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def flag_table() -> dict[str, tuple[str, str]]:
    """docs/deploy.md's `| flag | default | env | what |` table: first cell → (default, env)."""
    rows: dict[str, tuple[str, str]] = {}
    in_table = False
    for line in DEPLOY_MD.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        c = cells(line)
        if c[:3] == ["flag", "default", "env"]:
            in_table = True
        elif in_table and not set(c[0]) <= set("-: "):
            rows[c[0]] = (c[1], c[2])
    assert rows, "docs/deploy.md has no | flag | default | env | what | table"
    return rows


def flag_cell(s: settings.Setting) -> str:
    """How the table names a setting's flags: `-p`, `--port PORT`."""
    last = s.flags[-1] if s.switch else f"{s.flags[-1]} {s.metavar}".replace("|", "\\|")
    return ", ".join([f"`{f}`" for f in s.flags[:-1]] + [f"`{last}`"])


def serve_parser() -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["serve"]


def test_the_flag_table_is_the_settings_registry() -> None:
    """One row per flag of the registry, with the registry's default and variable,
    and no other row than the command's own (--version)."""
    expected = {flag_cell(s): (s.shown_default, f"`{s.env}`" if s.env else "")
                for s in settings.REGISTRY if s.flags}
    own = {"`--version`": ("", "")}
    assert flag_table() == {**expected, **own}


def test_serve_help_is_the_settings_registry() -> None:
    actions = [a for a in serve_parser()._actions if not isinstance(a, argparse._HelpAction)]
    registry = [s for s in settings.REGISTRY if s.flags]
    assert [tuple(a.option_strings) for a in actions] == [s.flags for s in registry]
    for action, s in zip(actions, registry, strict=True):
        assert action.help == s.help_text()
        if s.env:
            assert f"env {s.env}" in s.help_text()


def test_every_setting_variable_has_its_row() -> None:
    """A variable that a flag also sets names the flag that wins; one that only a
    variable sets shows its default."""
    text = DEPLOY_MD.read_text(encoding="utf-8")
    for s in settings.REGISTRY:
        if not s.env:
            continue
        rows = table_rows(text, s.env)
        assert rows, f"{s.env} has no row in docs/deploy.md"
        if s.flags:
            assert in_code_span(rows[0], s.flag), f"{s.env}'s row does not say that {s.flag} wins: {rows[0]}"
        else:
            assert s.shown_default in rows[0], f"{s.env}: the default {s.shown_default} is not in {rows[0]}"


def test_every_range_of_a_usage_error_is_in_troubleshooting() -> None:
    text = DEPLOY_MD.read_text(encoding="utf-8")
    section = text[text.index("## Troubleshooting"):]
    ranges = {s.expected for s in settings.REGISTRY if s.expected}
    assert len(ranges) >= 5
    missing = sorted(r for r in ranges if f"expected {r}`" not in section)
    assert not missing, f"usage errors not quoted in docs/deploy.md#troubleshooting: {missing}"


def test_the_flag_table_lists_only_real_flags() -> None:
    flags = set(cli_flags())
    text = DEPLOY_MD.read_text(encoding="utf-8")
    listed = set()
    for line in text.splitlines():
        if line.startswith("|"):
            listed.update(re.findall(r"`(--?[a-z][a-z-]*)", line.split("|")[1]))
    assert listed, "docs/deploy.md has no flag table"
    assert listed <= flags, f"documented flags that build_parser() does not have: {sorted(listed - flags)}"


@pytest.mark.parametrize("section,key", [(s, k) for s, keys in AGENTS_FILE_KEYS.items() for k in keys])
def test_every_agents_file_key_is_documented(section: str, key: str) -> None:
    assert in_code_span(CONFIG_MD.read_text(encoding="utf-8"), key), \
        f"{section} key `{key}` (config.py) appears nowhere in docs/config.md"


def config_md_section(heading: str) -> tuple[str, str]:
    """docs/config.md's `## heading` section, and the file without it."""
    text = CONFIG_MD.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end], text[:start] + text[end:]


def test_documented_agents_file_defaults_are_the_code_defaults() -> None:
    # The jobs: section has keys of the same names (timeout, max_attempts)
    # with other defaults: checked on their own, below.
    _, text = config_md_section("Jobs")
    cors = cfg.Cors()
    expected = {
        "max_tokens": [str(cfg.DEFAULT_MAX_TOKENS)],
        "temperature": [str(cfg.DEFAULT_TEMPERATURE)],
        "max_attempts": [str(cfg.DEFAULT_MAX_ATTEMPTS)],
        "timeout": [f"{llm.DEFAULT_TIMEOUT:g}"],
        "batch_max": [str(cfg.DEFAULT_BATCH_MAX)],
        "batch_concurrency": [str(cfg.DEFAULT_BATCH_CONCURRENCY)],
        "shutdown_timeout": [f"{cfg.DEFAULT_SHUTDOWN_TIMEOUT:g}"],
        "max_body": [str(cfg.DEFAULT_MAX_BODY)],
        "max_age": [str(cors.max_age)],
        "allow_credentials": [str(cors.allow_credentials).lower()],
        "allow_methods": list(cors.allow_methods),
        "allow_headers": list(cors.allow_headers),
        "algorithms": list(access.JWTConfig("i", "a").algorithms),
        "client_claim": [access.JWTConfig("i", "a").client_claim],
        "on_store_error": [access.LimitsConfig().on_store_error],
    }
    for key, values in expected.items():
        rows = table_rows(text, key)
        assert rows, f"no table row for `{key}` in docs/config.md"
        for row in rows:
            for v in values:
                assert v in row, f"`{key}`: the code's default {v!r} is not in {row}"


def test_documented_jobs_defaults_are_the_code_defaults() -> None:
    """The default column of docs/config.md#jobs, durations read by the loader's
    own parser, is JobsConfig's and WebhookConfig's."""
    section, _ = config_md_section("Jobs")
    jobs, webhook = jobs_spec.JobsConfig(), jobs_spec.WebhookConfig()
    expected: dict[str, Any] = {
        "concurrency": jobs.concurrency, "timeout": jobs.timeout, "retention": jobs.retention,
        "lease": jobs.lease, "max_attempts": jobs.max_attempts,
        "secret_env": webhook.secret_env, "allow_private": webhook.allow_private, "retry_for": webhook.retry_for,
    }
    for key, value in expected.items():
        rows = table_rows(section, key)
        assert len(rows) == 1, f"docs/config.md#jobs should have one row for `{key}`, has {len(rows)}"
        shown = re.fullmatch(r"`([^`]*)`", cells(rows[0])[1])
        assert shown, f"`{key}`: the default cell is not one code span: {rows[0]}"
        if isinstance(value, bool):
            documented: Any = shown.group(1) == "true"
        elif isinstance(value, float):
            documented = jobs_spec.parse_duration(shown.group(1))
        elif isinstance(value, int):
            documented = int(shown.group(1))
        else:
            documented = shown.group(1)
        assert documented == value, f"`{key}`: docs/config.md#jobs says {shown.group(1)}, the code {value!r}"


def test_the_key_tables_list_only_real_keys() -> None:
    """Every table of docs/config.md headed `key` lists keys config.py knows."""
    known = {k for keys in AGENTS_FILE_KEYS.values() for k in keys}
    listed: set[str] = set()
    in_key_table = False
    for line in CONFIG_MD.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        first = line.split("|")[1].strip()
        if first == "key":
            in_key_table = True
            continue
        if in_key_table and not set(first) <= set("-: "):
            listed.update(re.findall(r"`([a-z_]+)`", first))
    assert len(listed) > 20
    assert listed <= known, f"documented keys that config.py does not accept: {sorted(listed - known)}"


def test_every_error_type_is_documented_with_its_status() -> None:
    text = API_MD.read_text(encoding="utf-8")
    for cls in http_errors():
        row = re.search(rf"^\| {cls.status} \| `{re.escape(cls.type)}` \|", text, re.M)
        assert row, f"docs/api.md has no row `| {cls.status} | `{cls.type}` |` ({cls.__name__})"


def test_every_metric_is_documented() -> None:
    text = API_MD.read_text(encoding="utf-8")
    names = []
    for family in Metrics().registry.collect():
        names.append(family.name + "_total" if family.type == "counter" else family.name)
    assert len(names) >= 8
    missing = [n for n in names if not in_code_span(text, n)]
    assert not missing, f"metrics not in docs/api.md: {missing}"


def test_every_route_is_documented() -> None:
    from aiwfd.http.app import ROUTES  # the one route table the app is built from

    assert len(ROUTES) >= 8
    text = API_MD.read_text(encoding="utf-8")
    for r in ROUTES:
        assert f"`{r.method} {r.path}`" in text, f"{r.method} {r.path} is not in docs/api.md's endpoints"


def test_every_stream_event_is_documented() -> None:
    source = (REPO / "aiwfd" / "http" / "stream.py").read_text(encoding="utf-8")
    events = set(re.findall(r"""(?:event|send)\(\s*["']([a-z]+)["']""", source))
    assert {"start", "delta", "result", "error"} <= events
    rows = API_MD.read_text(encoding="utf-8")
    for name in sorted(events):
        assert re.search(rf"^\| `{name}` \|", rows, re.M), f"stream event {name!r} has no row in docs/api.md"


def stream_events_of(source: str) -> set[str]:
    return set(re.findall(r"""(?:event|send)\(\s*["']([a-z]+)["']""", source))


def test_no_stream_event_is_documented_that_the_stream_does_not_send() -> None:
    """The event table of docs/api.md#streaming is exactly the events sent (a
    `partial` row outlived its event once)."""
    sent = stream_events_of((REPO / "aiwfd" / "http" / "stream.py").read_text(encoding="utf-8"))
    text = API_MD.read_text(encoding="utf-8")
    section = text[text.index("## Streaming\n"):]
    section = section[:section.index("\n## ", 1)]
    table = section[section.index("| event | data |"):]
    table = table[:table.index("\n\n")]
    assert set(re.findall(r"^\| `([a-z-]+)` \|", table, re.M)) == sent
    for path in (API_MD, REPO / "README.md", REPO / "examples" / "README.md"):
        assert not re.search(r"event: partial|`partial`", path.read_text(encoding="utf-8")), path


def example_streams(path: Path) -> list[str]:
    """The fenced blocks of `path` that show a whole stream (start to result)."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line.strip())
    return [b for b in blocks if b.startswith("event: start\n") and "event: result\n" in b]


def _apply_example() -> Any:
    import importlib.util
    spec = importlib.util.spec_from_file_location("example_patch", REPO / "examples" / "python" / "patch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.apply


def _no_nulls(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _no_nulls(v) for k, v in doc.items() if v is not None}
    return [_no_nulls(v) for v in doc] if isinstance(doc, list) else doc


@pytest.mark.parametrize("path", [API_MD, REPO / "README.md"], ids=lambda p: p.name)
def test_the_example_streams_add_up(path: Path) -> None:
    """The streams the guides show (captured from a server) hold together: the
    deltas are the answer, the patches applied to null give `result.data` (the
    optional nulls dropped), and a patch never shows a number before it ends."""
    apply = _apply_example()
    streams = example_streams(path)
    assert streams, f"{path.name} shows no whole stream"
    for block in streams:
        events = [(m.group(1), json.loads(m.group(2)))
                  for m in re.finditer(r"^event: (\w+)\ndata: (.*)$", block, re.M)]
        assert [e for e, _ in events][0] == "start" and events[-1][0] == "result"
        assert {e for e, _ in events} <= {"start", "delta", "patch", "result"}
        text, doc = "", None
        for name, data in events:
            if name == "delta":
                text += data["text"]
            elif name == "patch":
                assert all(op["op"] in ("add", "replace", "append") for op in data), data
                doc = apply(doc, data)
        result = events[-1][1]["data"]
        assert doc == result == _no_nulls(json.loads(text)), path.name
        assert events[0][1]["request_id"] == events[-1][1]["trace"]["request_id"]


@pytest.mark.parametrize("message", startup_messages(), ids=lambda m: m.where)
def test_every_startup_error_message_is_documented(message: Message) -> None:
    """Troubleshooting quotes every start-up failure as the code words it
    (each literal part between the placeholders, in docs/deploy.md)."""
    text = DEPLOY_MD.read_text(encoding="utf-8")
    section = text[text.index("## Troubleshooting"):]
    for chunk in message.chunks:
        if len(chunk.strip()) < 4:
            continue
        assert chunk in section, (f"{message.where}: {message.text} — the text {chunk!r} is not in "
                                  "docs/deploy.md#troubleshooting")


# --------------------------------------------------------------------------- links

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def github_slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


LINKED = [REPO / "README.md", *DOC_FILES, REPO / "examples" / "README.md"]


@pytest.mark.parametrize("source", LINKED, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(source: Path) -> None:
    text = _FENCE.sub("", source.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (source.parent / file_part).resolve() if file_part else source
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_readme_links_to_the_guides() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for target in ("docs/config.md", "docs/api.md", "docs/deploy.md", "examples/"):
        assert f"]({target}" in text, target


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1]:]


def exec_form(ins: Instruction) -> list[str]:
    try:
        argv = json.loads(ins.args)
    except ValueError:
        raise AssertionError(f"line {ins.line}: {ins.keyword} {ins.args} is not in exec form "
                             '(["aiwfd", …]): in shell form /bin/sh is PID 1 and aiwfd never sees SIGTERM') from None
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), ins.args
    return argv


def one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]  # the last one wins, as in Docker


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """argv is `aiwfd …` (or `aiwf`, `python -m aiwfd`): parsed by aiwfd's own parser."""
    if argv[:3] in (["python", "-m", "aiwfd"], ["python3", "-m", "aiwfd"]):
        argv = ["aiwfd", *argv[3:]]
    assert argv and Path(argv[0]).name in ("aiwfd", "aiwf"), f"not an aiwfd command: {argv}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"aiwfd's parser rejects {shlex.join(argv)}") from None
    assert args.command == "serve", f"{shlex.join(argv)} does not serve"
    assert not args.mock, "the deployed command must not use --mock"
    return args


def image_argv() -> list[str]:
    stage = final_stage(dockerfile())
    return exec_form(one(stage, "ENTRYPOINT")) + exec_form(one(stage, "CMD"))


def test_dockerfile_cmd_is_a_valid_serve_invocation() -> None:
    args = parse_serve(image_argv())
    assert args.host in ("0.0.0.0", "::"), "in a container aiwfd must listen on every interface"
    assert args.port is not None, "name the port: it must match EXPOSE and the probes"


def test_dockerfile_ports_and_healthcheck_match_the_command() -> None:
    stage = final_stage(dockerfile())
    port = int(parse_serve(image_argv()).port)
    exposed = [int(p.split("/")[0]) for p in one(stage, "EXPOSE").args.split()]
    assert port in exposed, f"serve listens on {port}, EXPOSE says {exposed}"
    health = one(stage, "HEALTHCHECK").args
    assert f"127.0.0.1:{port}/health" in health or f"localhost:{port}/health" in health, health


def test_dockerfile_runs_unprivileged_and_stops_with_sigterm() -> None:
    stage = final_stage(dockerfile())
    user = one(stage, "USER").args.split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    stop = [i.args for i in stage if i.keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"]), "aiwfd drains on SIGTERM"


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")] \
        if ignore.exists() else []
    copies = [i for i in dockerfile() if i.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"line {ins.line}: COPY {src}: no such file in the build context"
            if "*" in patterns:  # deny all, then re-include: each source must be re-included
                assert any(p.startswith("!") and fnmatch.fnmatch(src.rstrip("/"), p[1:].rstrip("/"))
                           for p in patterns), f"{src} is excluded by {ignore.name}"


def test_dockerfile_serves_the_file_it_copies() -> None:
    stage = final_stage(dockerfile())
    path = parse_serve(image_argv()).file
    dests = [shlex.split(i.args)[-1] for i in stage if i.keyword == "COPY"]
    assert path in dests, f"serve -f {path}, but the image copies nothing there ({dests})"


# --------------------------------------------------------------------------- Kubernetes


def k8s_objects() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text(encoding="utf-8")) if d]
    objects: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        objects[d["kind"]] = d
    return objects


def container() -> dict[str, Any]:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "aiwfd"]
    return c


def k8s_argv() -> list[str]:
    c = container()
    # Kubernetes: `command` replaces ENTRYPOINT, `args` replaces CMD.
    stage = final_stage(dockerfile())
    command = c.get("command") or exec_form(one(stage, "ENTRYPOINT"))
    args = c.get("args") if "args" in c else exec_form(one(stage, "CMD"))
    return [str(a) for a in [*command, *args]]


def container_port(c: dict[str, Any], ref: Any) -> int:
    for p in c["ports"]:
        if ref in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"port {ref!r} is not a port of the container")


def probes(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def k8s_agents_file(tmp_path: Path) -> Path:
    objs = k8s_objects()
    c = container()
    args = parse_serve(k8s_argv())
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in c["volumeMounts"]:
        vol = volumes[mount["name"]]
        if "configMap" in vol and args.file.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert vol["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
            key = args.file[len(mount["mountPath"].rstrip("/")) + 1:]
            data = objs["ConfigMap"]["data"]
            assert key in data, f"the ConfigMap has no {key!r} for serve -f {args.file}"
            path = tmp_path / key
            path.write_text(data[key], encoding="utf-8")
            return path
    raise AssertionError(f"serve -f {args.file} is not in a mounted ConfigMap")


def test_k8s_objects_are_complete() -> None:
    objs = k8s_objects()
    assert {"ConfigMap", "Secret", "Deployment", "Service"} <= set(objs)
    dep = objs["Deployment"]["spec"]
    assert dep["selector"]["matchLabels"].items() <= dep["template"]["metadata"]["labels"].items()
    svc = objs["Service"]["spec"]
    assert svc["selector"].items() <= dep["template"]["metadata"]["labels"].items()
    c = container()
    for port in svc["ports"]:
        container_port(c, port["targetPort"])
    secret_refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert objs["Secret"]["metadata"]["name"] in secret_refs


def test_k8s_command_is_a_valid_serve_invocation_on_the_container_port() -> None:
    args = parse_serve(k8s_argv())
    assert args.host in ("0.0.0.0", "::")
    assert int(args.port) == container_port(container(), "http")
    assert int(args.port) in [int(p.split("/")[0]) for p in one(final_stage(dockerfile()), "EXPOSE").args.split()]


def test_k8s_probes_use_the_serving_port() -> None:
    c = container()
    port = int(parse_serve(k8s_argv()).port)
    found = probes(c)
    assert {"readinessProbe", "livenessProbe"} <= set(found)
    for name, probe in found.items():
        assert container_port(c, probe["httpGet"]["port"]) == port, name
    annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == port


def test_k8s_grace_period_exceeds_prestop_and_drain(tmp_path: Path) -> None:
    objs = k8s_objects()
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    args = parse_serve(k8s_argv())
    config = cfg.load(k8s_agents_file(tmp_path))
    flags = settings.flag_values(args)  # parsed as `aiwfd serve` parses them
    drain = settings.Settings(shutdown_timeout=flags.get("shutdown_timeout")).effective_shutdown_timeout(config)
    pre_stop = 0.0
    hook = container().get("lifecycle", {}).get("preStop")
    if hook:
        if "sleep" in hook and "seconds" in hook["sleep"]:
            pre_stop = float(hook["sleep"]["seconds"])
        else:
            cmd = hook["exec"]["command"]
            assert cmd[0].endswith("sleep"), f"unexpected preStop hook {cmd}"
            pre_stop = float(cmd[1])
    grace = pod["terminationGracePeriodSeconds"]
    # After --shutdown-timeout the daemon gives cancelled calls up to 2 s to answer 503.
    assert grace > pre_stop + drain + 2, (f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop:g} s "
                                          f"+ shutdown timeout {drain:g} s + 2 s")


def test_k8s_config_map_compiles_and_the_secret_has_its_keys(tmp_path: Path) -> None:
    compiled = load_and_compile(str(k8s_agents_file(tmp_path)))
    assert not compiled.warnings, [str(w) for w in compiled.warnings]
    secret = k8s_objects()["Secret"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    env = {e["name"] for e in container().get("env", [])}
    needed = {llm.key_var(a.provider) for a in compiled.agents.values()} - {None}
    assert needed <= keys | env, f"the agents need {sorted(needed)}; the Secret has {sorted(keys)}"
    assert "API_KEY" in keys, "a Service reachable in the cluster should require a client key"


def test_k8s_read_only_root_has_a_writable_tmp() -> None:
    """Without -o the compiled artifacts go to a temporary directory: it must be writable."""
    c = container()
    if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        return
    if parse_serve(k8s_argv()).output_dir:
        return
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "mount an emptyDir at /tmp"


async def test_probe_and_healthcheck_paths_answer_200(tmp_path: Path) -> None:
    """The paths the Dockerfile and the manifest probe, GET on a real server
    serving the ConfigMap's agents file (mock provider, no key)."""
    paths = {probe["httpGet"]["path"] for probe in probes(container()).values()}
    health = one(final_stage(dockerfile()), "HEALTHCHECK").args
    paths.update(re.findall(r"https?://[^/'\"]+(/[^'\"\s]*)", health))
    assert paths
    agents = k8s_agents_file(tmp_path)
    async with serve(agents, mock=True) as srv:
        for path in sorted(paths):
            async with srv.session.get(srv.url(path)) as r:
                assert r.status == 200, f"GET {path}: {r.status}"
        annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/path" in annotations:
            async with srv.session.get(srv.url(annotations["prometheus.io/path"])) as r:
                assert r.status == 200
