"""README.md's runnable shell blocks run as written (issue #8, item 1).

The marker: a fenced block whose info string is `sh runnable` (GitHub shows
it as an ordinary `sh` block). `sh runnable expect=422` says the block's curl
calls answer 422 (the default: every call 2xx). Every runnable block, in
order, goes into one bash script (`set -euo pipefail`) that runs in a fresh
temporary directory, so exports and files carry over from block to block as
in the reader's terminal:

- `aiwfd` and `aiwf` are this checkout's (`python -m aiwfd`, by a small
  wrapper first on PATH); keys and listen settings are removed from the
  environment;
- a line that starts the server (`aiwfd serve …`) runs in the background
  with `--mock -p <free port>` added, and the script waits for its listening
  line; on exit the script sends SIGTERM and reports the server's exit status;
- `127.0.0.1:8080` / `localhost:8080` become the free port;
- `curl` is wrapped to print each call's status and URL after its body.

Then, per block: the script got that far, every call's status is the
expected one, an agent call's 200 body is `{"data", "trace"}` with the trace
fields the README describes, a stream ends with a `result` event, a batch
has `results`. A block's output example (the next fenced block, before any
heading or other runnable block) is checked too: JSON must have the same
shape as the last answer (keys, and value types), plain text must equal the
block's output exactly. Finally the server stopped with exit status 0 and
logged one line per request.

The two set-up commands at the top are not run here (CI runs them); their
text is checked, since CI depends on them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aiwfd.testing.processes import free_port
from tests.conftest import REPO

README = REPO / "README.md"
SETUP_COMMANDS = [
    "python3 -m pip install -e . && python3 -m aiwfd serve -f config.example.yaml --mock",
    "python3 -m pip install -e '.[test]' && python3 -m pytest",
]
SERVE_LINE = re.compile(r"^(?P<indent>\s*)(?P<cmd>(?:aiwfd|aiwf|python3? -m aiwfd) serve\b[^&#]*?)\s*&?\s*$")
TRACE_KEYS = {"step_name", "usage", "attempts", "duration", "model", "request_id"}
CLEARED = ("API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "GROK_API_KEY", "GROK_BASE_URL", "PORT", "HOST",
           "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class Block:
    info: str
    body: str
    line: int
    heading_before: bool = False  # a heading between the previous block and this one

    @property
    def runnable(self) -> bool:
        words = self.info.split()
        return len(words) >= 2 and words[0] in ("sh", "bash", "shell") and words[1] == "runnable"

    @property
    def expect(self) -> set[int] | None:
        m = re.search(r"\bexpect=([\d,]+)", self.info)
        return {int(s) for s in m.group(1).split(",")} if m else None


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i, heading = 0, False
    while i < len(lines):
        m = re.match(r"^(`{3,})(.*)$", lines[i])
        if not m:
            if re.match(r"^#{1,6} ", lines[i]):
                heading = True
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i + 1
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        assert j < len(lines), f"README.md:{start}: unclosed code block"
        blocks.append(Block(info, "\n".join(lines[i + 1:j]), start, heading))
        heading = False
        i = j + 1
    return blocks


@dataclass
class Call:
    status: int
    url: str
    body: str


@dataclass
class Ran:
    block: Block
    output: str = ""
    calls: list[Call] = field(default_factory=list)


def script_for(blocks: list[Block], port: int, work: Path) -> str:
    out = [
        "set -euo pipefail",
        f'WORK={sh_quote(str(work))}',
        'SERVER_PID=""',
        "curl() { command curl --show-error --max-time 30 -w '\\n@@curl %{http_code} %{url_effective}\\n' \"$@\"; }",
        "stop_server() {",
        '  if [ -n "$SERVER_PID" ]; then',
        '    kill -TERM "$SERVER_PID" 2>/dev/null || true',
        '    rc=0; wait "$SERVER_PID" || rc=$?',
        '    echo "@@server-exit $rc"',
        "  fi",
        "}",
        "trap stop_server EXIT",
        "wait_listening() {",
        "  for _ in $(seq 1 300); do",
        "    if grep -q 'on http://' \"$WORK/server.log\" 2>/dev/null; then return 0; fi",
        '    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "@@server-died" >&2; cat "$WORK/server.log" >&2; return 1; fi',
        "    sleep 0.1",
        "  done",
        '  echo "@@server-timeout" >&2; return 1',
        "}",
    ]
    for n, block in enumerate(blocks):
        out.append(f"printf '\\n@@block {n}\\n'")
        for line in block.body.splitlines():
            line = line.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("localhost:8080", f"127.0.0.1:{port}")
            m = SERVE_LINE.match(line)
            if m:
                out.append(f'{m.group("indent")}{m.group("cmd")} --mock -p {port} >"$WORK/server.log" 2>&1 &')
                out.append('SERVER_PID=$!; echo "$SERVER_PID" >"$WORK/server.pid"; wait_listening')
            else:
                out.append(line)
    out.append("printf '\\n@@end\\n'")
    return "\n".join(out) + "\n"


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def split_output(stdout: str, blocks: list[Block]) -> list[Ran]:
    ran = [Ran(b) for b in blocks]
    parts = re.split(r"^@@block (\d+)$", stdout, flags=re.M)
    for k in range(1, len(parts), 2):
        r = ran[int(parts[k])]
        chunk = parts[k + 1].split("\n@@end\n")[0]
        calls, text, body = [], [], []
        for line in chunk.splitlines(keepends=True):
            m = re.match(r"^@@curl (\d{3}) (\S+)$", line.rstrip("\n"))
            if m:
                calls.append(Call(int(m.group(1)), m.group(2), "".join(body).strip("\n")))
                body = []
            else:
                body.append(line)
                text.append(line)
        r.output = "".join(text).strip("\n")
        r.calls = calls
    return ran


def same_shape(shown: Any, actual: Any, path: str = "") -> list[str]:
    """Where the README's example and the real answer differ in keys or value types."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path or '(root)'}: an object in the README, {type(actual).__name__} in reality"]
        problems = []
        if set(shown) != set(actual):
            problems.append(f"{path or '(root)'}: keys {sorted(shown)} in the README, {sorted(actual)} in reality")
        for k in set(shown) & set(actual):
            problems += same_shape(shown[k], actual[k], f"{path}.{k}" if path else k)
        return problems
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return [f"{path}: a list in the README, {type(actual).__name__} in reality"]
        return [p for s, a in zip(shown, actual) for p in same_shape(s, a, path + "[]")]
    kinds = {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}
    if kinds.get(type(shown)) != kinds.get(type(actual)):
        return [f"{path}: {shown!r} in the README, {actual!r} in reality"]
    return []


@dataclass
class Tour:
    blocks: list[Block]
    output_of: dict[int, Block]
    ran: list[Ran]
    result: subprocess.CompletedProcess[str]
    server_log: str
    port: int


def find_output_examples(all_blocks: list[Block]) -> dict[int, Block]:
    """Runnable block (index among runnable blocks) -> the example of its output."""
    out: dict[int, Block] = {}
    n = -1
    for i, b in enumerate(all_blocks):
        if not b.runnable:
            continue
        n += 1
        if i + 1 < len(all_blocks):
            nxt = all_blocks[i + 1]
            if not nxt.runnable and not nxt.heading_before and nxt.info in ("", "text", "json"):
                out[n] = nxt
    return out


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Tour:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl): the README's calls use it")
    all_blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    blocks = [b for b in all_blocks if b.runnable]
    assert blocks, "README.md has no `sh runnable` block"
    assert sum(bool(SERVE_LINE.match(ln)) for b in blocks for ln in b.body.splitlines()) == 1, \
        "the tour starts the server exactly once"

    work = tmp_path_factory.mktemp("readme")
    (work / "tmp").mkdir()
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    for name in ("aiwfd", "aiwf"):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {sh_quote(sys.executable)} -m aiwfd "$@"\n')
        wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in CLEARED and not k.startswith("AIWF_") and not k.lower().endswith("_proxy")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", TMPDIR=str(work / "tmp"),
               PYTHONPATH=str(REPO), NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    port = free_port()
    script = work / ".readme.sh"
    script.write_text(script_for(blocks, port, work))
    try:
        result = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True,
                                timeout=90, stdin=subprocess.DEVNULL)
    finally:
        _kill_leftover(work / "server.pid")
    log = (work / "server.log").read_text(encoding="utf-8", errors="replace") if (work / "server.log").exists() else ""
    return Tour(blocks, find_output_examples(all_blocks), split_output(result.stdout, blocks), result, log, port)


def _kill_leftover(pid_file: Path) -> None:
    """Only if the script itself was killed (timeout) and could not stop the server."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def describe(tour: Tour) -> str:
    return (f"--- stdout\n{tour.result.stdout[-4000:]}\n--- stderr\n{tour.result.stderr[-4000:]}\n"
            f"--- server log\n{tour.server_log[-3000:]}")


def test_setup_commands_stay_first() -> None:
    """CI runs the README's first two commands: they stay the first two blocks, as they are."""
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    assert [b.body.strip() for b in blocks[:2]] == SETUP_COMMANDS


def test_the_tour_runs_to_the_end(tour: Tour) -> None:
    assert tour.result.returncode == 0, describe(tour)
    assert "\n@@end\n" in tour.result.stdout, describe(tour)


def test_every_runnable_block_ran(tour: Tour) -> None:
    markers = re.findall(r"^@@block (\d+)$", tour.result.stdout, re.M)
    assert [int(m) for m in markers] == list(range(len(tour.blocks))), describe(tour)


def test_the_tour_calls_the_server(tour: Tour) -> None:
    calls = [c for r in tour.ran for c in r.calls]
    assert any(re.search(r"/agent/[^/]+$", c.url) for c in calls), "the tour never calls an agent"
    assert all(f"127.0.0.1:{tour.port}" in c.url for c in calls), [c.url for c in calls]


def test_every_call_answers_as_expected(tour: Tour) -> None:
    problems = []
    for r in tour.ran:
        expected = r.block.expect
        for c in r.calls:
            ok = c.status in expected if expected else 200 <= c.status < 300
            if not ok:
                problems.append(f"README.md:{r.block.line}: {c.url} answered {c.status}: {c.body[:300]}")
    assert not problems, "\n".join(problems) + "\n" + describe(tour)


def test_answers_have_the_documented_shape(tour: Tour) -> None:
    for r in tour.ran:
        for c in r.calls:
            where = f"README.md:{r.block.line}: {c.url}"
            if c.status >= 400:
                doc = json.loads(c.body)
                assert set(doc) == {"error", "request_id"}, where
                assert {"type", "message", "details"} <= set(doc["error"]), where
            elif re.search(r"/agent/[^/]+$", c.url):
                doc = json.loads(c.body)
                assert set(doc) == {"data", "trace"}, where
                assert set(doc["trace"]) == TRACE_KEYS, where
                assert set(doc["trace"]["usage"]) == {"prompt", "completion", "total"}, where
            elif c.url.endswith("/stream"):
                events = re.findall(r"^event: (\w+)$", c.body, re.M)
                assert events[0] == "start" and events[-1] == "result", (where, events)
            elif c.url.endswith("/batch"):
                doc = json.loads(c.body)
                assert isinstance(doc["results"], list) and doc["results"], where
            else:
                json.loads(c.body)


def test_output_examples_match_what_the_commands_print(tour: Tour) -> None:
    assert tour.output_of, "no output example follows a runnable block"
    for n, example in tour.output_of.items():
        r = tour.ran[n]
        where = f"README.md:{example.line}"
        if example.info == "json":
            assert r.calls, f"{where}: a JSON example after a block that makes no call"
            shown = json.loads(example.body)
            problems = same_shape(shown, json.loads(r.calls[-1].body))
            assert not problems, f"{where}: the example differs from the real answer:\n" + "\n".join(problems)
        else:
            assert r.output == example.body.strip("\n"), f"{where}: the README shows\n{example.body}\nbut it prints\n{r.output}"


def test_the_server_stopped_cleanly_and_logged_every_call(tour: Tour) -> None:
    m = re.search(r"^@@server-exit (\d+)$", tour.result.stdout, re.M)
    assert m, describe(tour)
    assert m.group(1) == "0", describe(tour)
    calls = [c for r in tour.ran for c in r.calls]
    logged = [ln for ln in tour.server_log.splitlines() if " status=" in ln and " request_id=" in ln]
    assert len(logged) == len(calls), describe(tour)
    assert "stopped" in tour.server_log.splitlines()[-1], describe(tour)
