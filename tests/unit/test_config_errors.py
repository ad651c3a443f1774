"""SPEC §1 / §4.1: every load error names the file, the line and the key path.

    agents.yaml:14: assistants.greeter.sytem_prompt: unknown key (did you mean 'system_prompt'?)

Lines are found in the YAML text of each test (the line holding a marker), so
the expected line is the one a reader of the file would point at.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aiwfd.spec.config import load
from aiwfd.errors import ConfigError, Problem

GOOD_AGENT = """\
  greeter:
    model: gpt-4o-mini
    system_prompt: Say hello.
"""


def write(directory: Path, text: str, name: str = "agents.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing `needle`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) >= nth, needle
    return hits[nth - 1]


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems
    return info.value.problems


def the_problem(path: Path) -> Problem:
    found = problems(path)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_the_example_of_the_spec_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 0.3\n" + "\n" * 9 + "assistants:\n  greeter:\n    model: gpt-4o-mini\n    sytem_prompt: hi\n"
    assert line_of(text, "sytem_prompt") == 14
    write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    p = the_problem(Path("agents.yaml"))
    assert str(p) == "agents.yaml:14: assistants.greeter.sytem_prompt: unknown key (did you mean 'system_prompt'?)"
    assert (p.file, p.line, p.path) == ("agents.yaml", 14, "assistants.greeter.sytem_prompt")


# Each case: YAML text, the marker on the offending line, the key path, the message (exact or a fragment).
CASES: dict[str, tuple[str, str, str, str]] = {
    "unknown type reference": (
        "types:\n  Req:\n    name: string\n    address: Adress   # <-\n  Address:\n    city: string\n"
        "assistants:\n  greeter:\n    model: m\n    input_type: Req\n",
        "# <-", "types.Req.address", "unknown type 'Adress' (did you mean 'Address'?)"),
    "string(5..1)": (
        "types:\n  Req:\n    name: string(5..1)\nassistants:\n" + GOOD_AGENT,
        "string(5..1)", "types.Req.name", "invalid type 'string(5..1)': empty range: 5 is greater than 1"),
    "int(a..b)": (
        "types:\n  Req:\n    age: int(a..b)\nassistants:\n" + GOOD_AGENT,
        "int(a..b)", "types.Req.age", "int bound 'a' is not a whole number"),
    "enum()": (
        "types:\n  Status: enum()\nassistants:\n" + GOOD_AGENT,
        "enum()", "types.Status", "enum() needs at least one value"),
    "duplicate enum value": (
        "types:\n  Req:\n    lang: enum(en, fr, en)\nassistants:\n" + GOOD_AGENT,
        "enum(en, fr, en)", "types.Req.lang", "duplicate enum value 'en'"),
    "undefined input_type": (
        "types:\n  Req:\n    a: string\nassistants:\n  greeter:\n    model: m\n    input_type: Request\n",
        "input_type", "assistants.greeter.input_type", "unknown type 'Request'"),
    "undefined output_type": (
        "types:\n  Req:\n    a: string\nassistants:\n  greeter:\n    model: m\n    input_type: Req\n"
        "    output_type: Reply\n",
        "output_type", "assistants.greeter.output_type", "unknown type 'Reply'"),
    "unknown top-level key": (
        "version: 0.3\nasistants:\n  x: 1\nassistants:\n" + GOOD_AGENT,
        "asistants", "asistants", "unknown key (did you mean 'assistants'?)"),
    "unknown assistant key": (
        "assistants:\n  greeter:\n    model: m\n    temprature: 0.2\n",
        "temprature", "assistants.greeter.temprature", "unknown key (did you mean 'temperature'?)"),
    "unknown provider key": (
        "providers:\n  local:\n    base_url: http://127.0.0.1:8000/v1\n    api_key: secret\n"
        "assistants:\n  greeter:\n    use: local\n    model: m\n",
        "api_key:", "providers.local.api_key", "unknown key (did you mean 'api_key_env'?)"),
    "unknown server key": (
        "server:\n  max_body: 1MiB\n  shutdown_timout: 5\nassistants:\n" + GOOD_AGENT,
        "shutdown_timout", "server.shutdown_timout", "unknown key (did you mean 'shutdown_timeout'?)"),
    "unknown cors key": (
        "server:\n  cors:\n    allow_origins: ['https://app.example.com']\n    allow_header: [X-Api-Key]\n"
        "assistants:\n" + GOOD_AGENT,
        "allow_header:", "server.cors.allow_header", "unknown key (did you mean 'allow_headers'?)"),
    "unknown import key": (
        "imports:\n  - as: lib\n    path: lib.yaml\n    from: x\nassistants:\n" + GOOD_AGENT,
        "from:", "imports[0].from", "unknown key"),
    "temperature: hot": (
        "assistants:\n  greeter:\n    model: m\n    temperature: hot\n",
        "temperature", "assistants.greeter.temperature", "expected a number from 0 to 2, got 'hot'"),
    "max_tokens: -1": (
        "assistants:\n  greeter:\n    model: m\n    max_tokens: -1\n",
        "max_tokens", "assistants.greeter.max_tokens", "got -1"),
    "agent name": (
        "assistants:\n  greet/er:\n    model: m\n",
        "greet/er", "assistants.greet/er", "an agent name must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"),
    "agent name with a leading dash": (
        "assistants:\n  -greeter:\n    model: m\n",
        "-greeter", "assistants.-greeter", "an agent name must match"),
    "agent name too long": (
        "assistants:\n  " + "a" * 65 + ":\n    model: m\n",
        "a" * 65, "assistants." + "a" * 65, "an agent name must match"),
    "agent name with a trailing newline": (
        'assistants:\n  "greeter\\n":\n    model: m\n',
        "greeter", "assistants.greeter\n", "an agent name must match"),
    "version 0.4": (
        'version: "0.4"\nassistants:\n' + GOOD_AGENT,
        "version", "version", "unsupported version '0.4'"),
    "version 0.4 as a number": (
        "version: 0.4\nassistants:\n" + GOOD_AGENT,
        "version", "version", "unsupported version"),
    "no assistants": (
        "version: 0.3\ntypes:\n  Req:\n    a: string\n",
        "version", "", "no assistants defined"),
    "empty assistants": (
        "version: 0.3\nassistants: {}\n",
        "assistants", "assistants", "no assistants defined"),
    "duplicate key": (
        "assistants:\n  greeter:\n    model: m\n    model: n   # <-\n",
        "# <-", "assistants.greeter.model", "duplicate key"),
    "not YAML": (
        "assistants:\n  greeter:\n    model: [gpt-4o\n    use: openai\n",
        "use: openai", "", "not valid YAML"),
    "a colon inside an expression": (
        "types:\n  Req:\n    tags: string[](min: 1)\nassistants:\n" + GOOD_AGENT,
        "min: 1", "", "write T[](min:1, max:10)"),
    "a list, not a mapping": (
        "- greeter\n- translator\n",
        "- greeter", "", "the file is a list, not a mapping of sections"),
    "empty": (
        "\n",
        "", "", "the file is empty, not a mapping of sections"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_error_names_file_line_and_key(tmp_path: Path, case: str) -> None:
    text, marker, keypath, message = CASES[case]
    write(tmp_path, "types:\n  Thing: string\n", "lib.yaml")  # for the case that imports it
    path = write(tmp_path, text)
    p = the_problem(path)
    line = line_of(text, marker) if marker else 1
    assert p.file == str(path)
    assert p.line == line
    assert p.path == keypath
    assert message in str(p)
    prefix = f"{path}:{line}: {keypath}: " if keypath else f"{path}:{line}: "
    assert str(p).startswith(prefix), str(p)
    assert "\n" not in str(p).replace("greeter\n", "")


def test_missing_file(tmp_path: Path) -> None:
    p = the_problem(tmp_path / "nope.yaml")
    assert str(p) == f"{tmp_path / 'nope.yaml'}: file not found"
    assert p.line is None


def test_missing_import_file(tmp_path: Path) -> None:
    text = "imports:\n  - as: common\n    path: common/types.yaml\nassistants:\n" + GOOD_AGENT
    path = write(tmp_path, text)
    p = the_problem(path)
    assert (p.file, p.line, p.path) == (str(path), line_of(text, "path:"), "imports[0].path")
    assert "not found" in p.message and "common/types.yaml" in p.message


def test_import_cycle(tmp_path: Path) -> None:
    a = "imports:\n  - as: b\n    path: b.yaml\ntypes:\n  A: string\nassistants:\n" + GOOD_AGENT
    b = "version: 0.3\nimports:\n  - as: a\n    path: a.yaml\ntypes:\n  B: int\n"
    write(tmp_path, b, "b.yaml")
    path = write(tmp_path, a, "a.yaml")
    p = the_problem(path)
    assert p.file == str(tmp_path / "b.yaml")
    assert (p.line, p.path) == (line_of(b, "path: a.yaml"), "imports[0].path")
    assert p.message == "import cycle: a.yaml -> b.yaml -> a.yaml"


def test_self_import_is_a_cycle(tmp_path: Path) -> None:
    text = "imports:\n  - as: me\n    path: ./agents.yaml\nassistants:\n" + GOOD_AGENT
    path = write(tmp_path, text)
    p = the_problem(path)
    assert (p.line, p.path) == (3, "imports[0].path") and "import cycle" in p.message


def test_errors_in_an_imported_file_name_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = "types:\n  Address:\n    city: string\n    zip: strin\n"
    write(tmp_path, lib, "lib/types.yaml")
    write(tmp_path, "imports:\n  - as: lib\n    path: lib/types.yaml\ntypes:\n  Req:\n    to: $lib.Address\n"
          "assistants:\n  greeter:\n    model: m\n    input_type: Req\n")
    monkeypatch.chdir(tmp_path)
    found = problems(Path("agents.yaml"))
    first = found[0]
    assert str(first) == "lib/types.yaml:4: types.Address.zip: unknown type 'strin' (did you mean 'string'?)"
    # run from elsewhere with an absolute path: the imported file is still named next to the main one
    monkeypatch.chdir("/")
    assert problems(tmp_path / "agents.yaml")[0].file == str(tmp_path / "lib" / "types.yaml")


def test_an_imported_type_that_does_not_exist(tmp_path: Path) -> None:
    write(tmp_path, "types:\n  Address:\n    city: string\n", "lib.yaml")
    text = ("imports:\n  - as: lib\n    path: lib.yaml\ntypes:\n  Req:\n    to: $lib.Adress\n    via: $lob.Address\n"
            "assistants:\n  greeter:\n    model: m\n    input_type: Req\n")
    path = write(tmp_path, text)
    found = problems(path)
    assert [(p.line, p.path) for p in found] == [(6, "types.Req.to"), (7, "types.Req.via")]
    assert "unknown type 'lib.Adress'" in found[0].message and found[0].hint == "did you mean 'Address'?"
    assert "unknown import alias 'lob'" in found[1].message and found[1].hint == "did you mean 'lib'?"


ACCEPTED_VERSIONS = ['"0.3"', "0.3", '"0.3-proposal"', None]


@pytest.mark.parametrize("version", ACCEPTED_VERSIONS)
def test_accepted_versions(tmp_path: Path, version: str | None) -> None:
    head = f"version: {version}\n" if version else ""
    cfg = load(write(tmp_path, head + "assistants:\n" + GOOD_AGENT))
    assert cfg.version == "0.3-proposal" if version == '"0.3-proposal"' else cfg.version == "0.3"


def test_legacy_keys_load_with_a_warning(tmp_path: Path) -> None:
    text = ("version: 0.3\nthreads:\n  main: [greeter]\nassistants:\n  greeter:\n    model: m\n"
            "    thread: main\n    dialog: true\n    depends_on: [other]\n  other:\n    model: m\n")
    cfg = load(write(tmp_path, text))
    assert set(cfg.assistants) == {"greeter", "other"}
    got = [(w.line, w.path) for w in cfg.warnings]
    assert got == [(line_of(text, "threads:"), "threads"),
                   (line_of(text, "thread: main"), "assistants.greeter.thread"),
                   (line_of(text, "dialog:"), "assistants.greeter.dialog"),
                   (line_of(text, "depends_on:"), "assistants.greeter.depends_on")]
    assert all("not supported" in w.message for w in cfg.warnings)
    # a legacy key is not allowed everywhere: inside providers it is an unknown key
    bad = write(tmp_path, "providers:\n  p:\n    base_url: http://x\n    threads: 1\nassistants:\n" + GOOD_AGENT)
    assert the_problem(bad).path == "providers.p.threads"


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    text = (
        "version: 0.3\n"
        "typez: {}                      # 1\n"
        "types:\n"
        "  Req:\n"
        "    name: string(5..1)          # 2\n"
        "    lang: enum(en, en)          # 3\n"
        "assistants:\n"
        "  greeter:\n"
        "    model: m\n"
        "    sytem_prompt: hi            # 4\n"
        "    input_type: Req\n"
        "    output_type: Nope           # 5\n"
        "    temperature: hot            # 6\n"
        "  bad.name:                     # 7\n"
        "    model: m\n"
        "server:\n"
        "  cors:\n"
        "    allow_origin: ['*']         # 8\n"
    )
    path = write(tmp_path, text)
    found = problems(path)
    lines = [p.line for p in found]
    assert lines == sorted(lines)
    assert len(found) == 9  # the cors section without allow_origins is a ninth
    for n in range(1, 9):
        assert line_of(text, f"# {n}") in lines, n
    assert any(p.path == "server.cors.allow_origins" for p in found)


def test_type_names_and_builtins(tmp_path: Path) -> None:
    text = "types:\n  string:\n    a: int\n  2Bad: string\nassistants:\n" + GOOD_AGENT
    found = problems(write(tmp_path, text))
    assert [(p.line, p.path) for p in found] == [(2, "types.string"), (4, "types.2Bad")]
    assert "built-in" in found[0].message


def test_a_type_defined_only_as_itself(tmp_path: Path) -> None:
    text = "types:\n  A: B\n  B: A\nassistants:\n" + GOOD_AGENT
    found = problems(write(tmp_path, text))
    assert [p.path for p in found] == ["types.A", "types.B"]
    assert all("itself" in p.message for p in found)


def test_input_type_must_be_an_object(tmp_path: Path) -> None:
    text = "types:\n  Status: enum(a, b)\nassistants:\n  greeter:\n    model: m\n    input_type: Status\n"
    p = the_problem(write(tmp_path, text))
    assert (p.line, p.path) == (6, "assistants.greeter.input_type") and "not an object" in p.message


# --------------------------------------------------------------------------- auth: and limits: (SPEC §8)

DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ACCESS_CASES: dict[str, tuple[str, str, str, str]] = {
    "a key without a name": (
        "auth:\n  keys:\n    - key_env: FRONTEND_KEY   # <-\n",
        "# <-", "auth.keys[0].name", "every key needs a name"),
    "a key with both key_env and key_sha256": (
        f"auth:\n  keys:\n    - name: a   # <-\n      key_env: A_KEY\n      key_sha256: '{DIGEST}'\n",
        "# <-", "auth.keys[0]", "give exactly one of key_env: or key_sha256:"),
    "a short digest": (
        "auth:\n  keys:\n    - name: a\n      key_sha256: abc123\n",
        "key_sha256", "auth.keys[0].key_sha256", "expected 64 hex digits (the key's SHA-256)"),
    "two clients of one name": (
        "auth:\n  keys:\n    - name: a\n      key_env: A_KEY\n    - name: a   # <-\n      key_env: B_KEY\n",
        "# <-", "auth.keys[1].name", "client name 'a' is already taken (names must be unique)"),
    "a name API_KEY's clients use": (
        "auth:\n  keys:\n    - name: api-key-1\n      key_env: A_KEY\n",
        "api-key-1", "auth.keys[0].name", "api-key-N names the keys of API_KEY"),
    "an allowlist naming an unknown agent": (
        "auth:\n  keys:\n    - name: a\n      key_env: A_KEY\n      agents: [greter]\n",
        "agents:", "auth.keys[0].agents", "unknown agent 'greter' (did you mean 'greeter'?)"),
    "a rate without a unit": (
        "limits:\n  default: {requests: 600}\n",
        "default", "limits.default.requests", "expected a rate such as '600/min', got 600"),
    "a rate per fortnight": (
        "limits:\n  default:\n    tokens: 5/fortnight\n",
        "fortnight", "limits.default.tokens", "one of s, min, hour, day"),
    "concurrency 0": (
        "assistants:\n  greeter:\n    model: m\n    limits: {concurrency: 0}\n",
        "limits", "assistants.greeter.limits.concurrency", "expected a whole number ≥ 1, got 0"),
    "an unknown limit": (
        "limits:\n  default:\n    burst: 5\n",
        "burst", "limits.default.burst", "unknown key"),
    "on_store_error: maybe": (
        "limits:\n  on_store_error: maybe\n",
        "maybe", "limits.on_store_error", "expected allow or deny, got 'maybe'"),
    "jwt without an issuer": (
        "auth:\n  jwt:   # <-\n    audience: aiwfd\n",
        "# <-", "auth.jwt.issuer", "discovery reads {issuer}/.well-known/openid-configuration"),
    "jwt with a shared secret": (
        "auth:\n  jwt:\n    issuer: https://login.example.com\n    audience: aiwfd\n    algorithms: [HS256]\n",
        "algorithms", "auth.jwt.algorithms", "unsupported algorithm 'HS256' (a shared secret"),
}


@pytest.mark.parametrize("case", list(ACCESS_CASES))
def test_access_errors_name_file_line_and_key(tmp_path: Path, case: str) -> None:
    text, marker, keypath, message = ACCESS_CASES[case]
    if "assistants:" not in text:
        text += "assistants:\n" + GOOD_AGENT
    path = write(tmp_path, text)
    p = the_problem(path)
    assert (p.file, p.line, p.path) == (str(path), line_of(text, marker), keypath), str(p)
    assert message in str(p), str(p)


def test_access_sections_load(tmp_path: Path) -> None:
    text = (f"auth:\n  keys:\n    - name: frontend\n      key_env: FRONTEND_KEY\n"
            f"      limits: {{requests: 120/min, tokens: 50000/minutes, concurrency: 4}}\n"
            f"    - name: reports\n      key_sha256: '{DIGEST.upper()}'\n      agents: [greeter]\n"
            "  jwt:\n    issuer: https://login.example.com/realms/main\n    audience: aiwfd\n"
            "    algorithms: [RS256, ES256]\n    client_claim: azp\n    scope_prefix: 'aiwfd:'\n"
            "limits:\n  default: {requests: 10/s}\n  on_store_error: deny\n"
            "assistants:\n  greeter:\n    model: m\n    limits: {requests: 2/day}\n")
    c = load(write(tmp_path, text))
    front, reports = c.auth.keys
    assert front.name == "frontend" and front.key_env == "FRONTEND_KEY" and front.agents is None
    assert front.limits is not None and (str(front.limits.requests), str(front.limits.tokens)) == (
        "120/min", "50000/min") and front.limits.concurrency == 4
    assert reports.key_sha256 == DIGEST and reports.agents == ("greeter",)
    assert c.auth.jwt is not None and c.auth.jwt.algorithms == ("RS256", "ES256") and c.auth.jwt.client_claim == "azp"
    assert c.limits.on_store_error == "deny" and str(c.limits.default.requests) == "10/s"  # type: ignore[union-attr]
    assert str(c.assistants["greeter"].limits.requests) == "2/day"  # type: ignore[union-attr]
