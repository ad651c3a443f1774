"""SPEC §4 and §4.2: `aiwfd validate` and `aiwfd compile` as real processes,
and the issue #2 benchmark script as a smoke test.

Each command is a separate `python -m aiwfd` process (about a second of
imports each), so the independent ones start together in one fixture.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from aiwfd.testing.processes import run_cli
from tests.conftest import REPO

CONFIGS = REPO / "tests" / "configs"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Several problems in one file; each entry: marker on the offending line, key path, message fragment.
BROKEN = """\
version: 0.3
types:
  Request:
    text: string(1..100)
    lang: enum(en, fr, en)            # dup-enum
    size: string(5..1)                # bad-range
  Reply:
    answer: Strin                     # unknown-type
assistants:
  greeter:
    model: gpt-4o-mini
    sytem_prompt: Say hello.          # typo
    input_type: Request
    output_type: Answer               # undefined-output
    temperature: hot                  # hot
    max_tokens: -1                    # tokens
  "bad name":                         # agent-name
    model: gpt-4o-mini
server:
  max_bdy: 10                         # server-key
"""
BROKEN_EXPECTED = [
    ("dup-enum", "types.Request.lang", "duplicate enum value 'en'"),
    ("bad-range", "types.Request.size", "empty range"),
    ("unknown-type", "types.Reply.answer", "unknown type 'Strin'"),
    ("typo", "assistants.greeter.sytem_prompt", "unknown key (did you mean 'system_prompt'?)"),
    ("undefined-output", "assistants.greeter.output_type", "unknown type 'Answer'"),
    ("hot", "assistants.greeter.temperature", "got 'hot'"),
    ("tokens", "assistants.greeter.max_tokens", "got -1"),
    ("agent-name", "assistants.bad name", "an agent name must match"),
    ("server-key", "server.max_bdy", "unknown key (did you mean 'max_body'?)"),
]

# A valid file: one agent per kind of output, one with map(...) output (not strict: a warning).
VALID = """\
version: 0.3
types:
  Question:
    question: string(1..2000)
  Answer:
    answer: string
    confidence: number(0..1)
  Scores:
    by_label: map(string, number(0..1))
assistants:
  answer:
    model: gpt-4o-mini
    system_prompt: Answer the question.
    input_type: Question
    output_type: Answer
  chat:
    use: mock
    model: mock-1
    system_prompt: Chat.
    input_type: Question
  score:
    model: gpt-4o
    system_prompt: Score the labels.
    input_type: Question
    output_type: Scores
"""


def line_of(text: str, marker: str) -> int:
    return next(i + 1 for i, line in enumerate(text.splitlines()) if f"# {marker}" in line)


def stage_compile_config(directory: Path) -> Path:
    """with_imports.yaml and its library, plus an agent without output_type and a custom provider."""
    (directory / "common").mkdir(parents=True)
    shutil.copy(CONFIGS / "common" / "types.yaml", directory / "common" / "types.yaml")
    text = (CONFIGS / "with_imports.yaml").read_text()
    text = text.replace("imports:", "providers:\n  gateway:\n    base_url: https://llm.example.com/v1\n"
                        "    api_key_env: GATEWAY_KEY\n\nimports:", 1)
    text += ("\n  free-text:\n    use: gateway\n    model: llama-3.1-70b\n"
             "    system_prompt: \"Write a short answer.\"\n    input_type: LanguageRequest\n")
    path = directory / "agents.yaml"
    path.write_text(text)
    return path


def bench_cmd() -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_config.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("cli")
    (d / "broken.yaml").write_text(BROKEN)
    (d / "valid.yaml").write_text(VALID)
    compile_dir = d / "compile"
    cfg = stage_compile_config(compile_dir)
    out = compile_dir / "out"
    out.mkdir()
    (out / "README.txt").write_text("not an artifact")
    (out / "agents").mkdir()
    (out / "agents" / "old-agent.json").write_text("{}")  # from an earlier compile

    def compile_twice() -> tuple[Any, set[str], Any, set[str]]:
        first = run_cli(["compile", "-f", "agents.yaml", "-o", "out"], cwd=compile_dir)
        files_first = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        docs = {str(p.relative_to(out)): json.loads(p.read_text()) for p in out.rglob("*.json")}
        # remove an agent (and the type only it used), compile again
        text = cfg.read_text()
        start = text.index("  detect-language:")
        end = text.index("\n  free-text:")
        text = text[:start] + text[end + 1:]
        text = text.replace("  LanguageRequest:\n    text: string(1..5000)\n", "")
        text = text.replace("input_type: LanguageRequest", "input_type: $common.Message")
        cfg.write_text(text)
        second = run_cli(["compile", "-f", "agents.yaml", "-o", "out"], cwd=compile_dir)
        files_second = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        return first, files_first, (second, docs), files_second

    with ThreadPoolExecutor(4) as pool:
        broken = pool.submit(run_cli, ["validate", "-f", "broken.yaml"], None, d)
        valid = pool.submit(run_cli, ["validate", "-f", "valid.yaml"], None, d)
        compiled = pool.submit(compile_twice)
        bench = pool.submit(bench_cmd)
        first, files_first, (second, docs), files_second = compiled.result()
        return {"broken": broken.result(), "valid": valid.result(), "bench": bench.result(),
                "compile1": first, "files1": files_first, "docs": docs, "compile2": second,
                "files2": files_second, "compile_dir": compile_dir}


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


# ------------------------------------------------------------------ validate


def test_validate_prints_every_error_and_exits_1(runs: dict[str, Any]) -> None:
    proc = runs["broken"]
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc)
    lines = proc.stderr.splitlines()
    for marker, keypath, fragment in BROKEN_EXPECTED:
        prefix = f"broken.yaml:{line_of(BROKEN, marker)}: {keypath}: "
        hits = [ln for ln in lines if prefix in ln]
        assert len(hits) == 1, (prefix, proc.stderr)
        assert fragment in hits[0], hits[0]
    assert f"{len(BROKEN_EXPECTED)} errors" in proc.stderr
    assert proc.stdout == ""


def test_validate_prints_a_summary_and_warnings(runs: dict[str, Any]) -> None:
    proc = runs["valid"]
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    out = proc.stdout.splitlines()
    assert 1 <= len(out) <= 24  # one screen
    assert "valid.yaml" in out[0] and "3 agents" in out[0]
    rows = {ln.split()[0]: ln for ln in out[1:] if ln.startswith("  ")}
    assert set(rows) == {"answer", "chat", "score"}
    assert re.search(r"openai/gpt-4o-mini\s+Question -> Answer$", rows["answer"])
    assert re.search(r"mock/mock-1\s+Question -> text$", rows["chat"])
    assert re.search(r"openai/gpt-4o\s+Question -> Scores$", rows["score"])
    assert any("1 warning" in ln for ln in out)
    # the map(...) output cannot be strict: a warning with file, line and key on stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1
    line = VALID.splitlines().index("  score:") + 1
    assert f"valid.yaml:{line}: assistants.score.output_type:" in warnings[0]
    assert "strict" in warnings[0]


# ------------------------------------------------------------------ compile


def test_compile_writes_the_artifacts_of_the_spec(runs: dict[str, Any]) -> None:
    proc = runs["compile1"]
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    files = runs["files1"]
    agents = {"triage-ticket", "draft-reply", "summarize-thread", "detect-language", "free-text"}
    local_types = {"Category", "TicketRequest", "Triage", "ReplyRequest", "Reply", "ThreadSummary",
                   "LanguageRequest"}
    imported = {"Language", "Priority", "Channel", "Address", "Contact", "Message", "Thread"}
    assert {f"agents/{a}.json" for a in agents} <= files
    assert {f"types/{t}.json" for t in local_types} <= files
    type_files = {f for f in files if f.startswith("types/")}
    assert len(type_files) == len(local_types) + len(imported)
    for t in imported:  # the imported library is there, under a name that says where it comes from
        assert sum(1 for f in type_files if f.endswith(f".{t}.json") or f == f"types/{t}.json") == 1, t
    assert "README.txt" in files  # not ours: left alone

    docs = runs["docs"]
    for f in type_files:
        schema = docs[f]
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == DIALECT
    assert docs["types/Category.json"]["enum"] == ["billing", "bug", "feature_request", "account", "other"]
    assert docs["types/LanguageRequest.json"]["properties"] == {
        "text": {"type": "string", "minLength": 1, "maxLength": 5000}}

    for a in agents:
        doc = docs[f"agents/{a}.json"]
        assert doc["agent"] == a
        Draft202012Validator.check_schema(doc["input_schema"])
    triage = docs["agents/triage-ticket.json"]
    assert set(triage) == {"agent", "provider", "model", "input_schema", "output_schema", "response_format"}
    assert (triage["provider"], triage["model"]) == ("openai", "gpt-4o-mini")
    assert set(triage["input_schema"]["properties"]) == {"subject", "body", "customer", "channel", "metadata"}
    assert triage["output_schema"]["properties"]["priority"]["$ref"].startswith("#/$defs/")
    rf = triage["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == ["category", "priority", "language", "summary",
                                                      "suggested_team", "tags"]
    # a non-object output is sent wrapped
    detect = docs["agents/detect-language.json"]
    assert detect["output_schema"]["enum"] == ["en", "fr", "de", "es", "it"]
    assert detect["response_format"]["json_schema"]["schema"]["required"] == ["value"]
    # no output_type: no response_format (the answer is plain text)
    free = docs["agents/free-text.json"]
    assert "response_format" not in free
    assert free["output_schema"] is None
    assert (free["provider"], free["model"]) == ("gateway", "llama-3.1-70b")


def test_compiling_again_removes_stale_files(runs: dict[str, Any]) -> None:
    proc = runs["compile2"]
    assert proc.returncode == 0, proc.stderr
    before, after = runs["files1"], runs["files2"]
    assert "agents/old-agent.json" not in before  # stale from before the first compile
    assert before - after == {"agents/detect-language.json", "types/LanguageRequest.json"}
    assert after <= before
    assert "README.txt" in after
    out = runs["compile_dir"] / "out"
    free = json.loads((out / "agents" / "free-text.json").read_text())
    assert free["input_schema"]["title"].endswith("Message")


# ------------------------------------------------------------------ the benchmark script


def test_bench_config_quick_prints_its_figures(runs: dict[str, Any]) -> None:
    proc = runs["bench"]
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    out = proc.stdout
    assert "200 agents, 400 types" in out
    number = r"\d+(?:\.\d+)?"
    assert re.search(rf"^load \+ compile\s+{number} s\s+{number} s\s+{number} s\s+< 1 s", out, re.M), out
    assert re.search(rf"^validate, valid body\s+{number} µs\s+{number} µs\s+{number} µs\s+< 20 µs", out, re.M), out
    assert re.search(rf"^validate, invalid body\s+{number} µs", out, re.M), out
