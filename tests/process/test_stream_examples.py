"""The stream clients of examples/ rebuild `result.data` from `patch` events (issue #14, item 2).

A real `aiwfd serve` talks to an in-process FakeOpenAI that streams a nested
structured answer (objects, arrays of objects, arrays of arrays, map keys
that need JSON Pointer escapes, unicode, escapes, numbers, booleans, optional
fields sent as null) in pieces of 1 to 7 characters, so that keys, escapes,
surrogate pairs and numbers are split across deltas. Each client runs as a
user runs it (`AIWFD_URL`, `AIWFD_API_KEY`, the agent and its input as
arguments, `--json` for one JSON object at the end) and must print a document
rebuilt from the patches equal to `result.data`, which must be the answer
without its optional nulls.

- a re-ask (the first answer violates the type): one `retry` event, the
  document reset to null, the second attempt's patches rebuild the answer;
- every attempt invalid: the `error` event, exit 1;
- a plain-text agent: no patches, `data` is the text;
- an error before the stream (401) and no server at all: exit 1 and 2.

Both clients, examples/python/stream_client.py (standard library only) and
examples/node/stream_client.mjs (skipped without Node 18+), share one server
and one fake for the module. The model is in this test's event loop, so the
clients run as asyncio subprocesses: a blocking wait would stop the fake.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, Stream, Violate
from aiwfd.testing.inprocess import fake_env
from aiwfd.testing.processes import AiwfdProcess, free_port, started
from tests.conftest import REPO
from tests.process.test_examples import _skip_reason, clean_env

EXAMPLES = REPO / "examples"
KEY = "stream-examples-key"
CLIENTS = ["python", "node"]
CLIENT_TIMEOUT = 60.0

CONFIG = """\
version: 0.3
types:
  Ask:
    topic: string
  Item:
    title: string
    tags: string[]
    score: number
    count: int
    done: bool
    note?: string
  Report:
    title: string
    items: Item[]
    labels: map(string, string)
    matrix: int[][]
    summary?: string
assistants:
  reporter:
    use: openai
    model: gpt-4o-mini
    system_prompt: Write the report.
    input_type: Ask
    output_type: Report
    max_attempts: 2
  chatter:
    use: openai
    model: gpt-4o-mini
    system_prompt: Chat.
    input_type: Ask
"""

ASK = {"topic": "streams"}


def _item(i: int) -> dict[str, Any]:
    return {
        "title": f"Item {i}: naïve café ☕, 𝄞 clef, \"quoted\", back\\slash, tab\there, line\nbreak, \u0007 bell",
        "tags": ["a/b", "~tilde", "ünï", ""] if i % 2 else [],
        "score": [-12.5e-3, 3.14159, 1e100, 0.0, -7][i % 5],
        "count": [1001, 0, -42, 9007199254740991][i % 4],  # 2**53 - 1: exact in JavaScript too
        "done": i % 3 == 0,
        "note": None if i % 2 else f"note {i}",  # strict mode sends absent optionals as null
    }


ANSWER: dict[str, Any] = {
    "title": "Quarterly \"review\" — 日本語 and emoji 😀",
    "items": [_item(i) for i in range(8)],
    # Keys that need escaping in a JSON Pointer ("/" is "~1", "~" is "~0"), the
    # empty key (path "/labels/"), and one that a careless JavaScript applier
    # would take for the object's prototype.
    "labels": {"a/b": "slash", "x~y": "tilde", "~1": "looks escaped", "": "empty", "__proto__": "proto"},
    "matrix": [[1, 22, 333], [], [-4444, 0]],
    "summary": None,
}


def without_nulls(doc: Any) -> Any:
    """What `result.data` holds: the optional fields sent as null are dropped (every
    null in ANSWER is an optional field's)."""
    if isinstance(doc, dict):
        return {k: without_nulls(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [without_nulls(v) for v in doc]
    return doc


EXPECTED = without_nulls(ANSWER)

# How the model writes the answer: compact with raw unicode (as OpenAI's
# structured outputs do), and indented with every non-ASCII character as a
# \u escape (surrogate pairs for 𝄞 and 😀), whitespace between every token.
ENCODINGS: dict[str, Callable[[Any], str]] = {
    "compact": lambda doc: json.dumps(doc, ensure_ascii=False, separators=(",", ":")),
    "escaped": lambda doc: json.dumps(doc, ensure_ascii=True, indent=2),
}


@dataclass
class Done:
    rc: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        lines = self.stdout.splitlines()
        assert len(lines) == 1, f"--json prints one line:\n{self.stdout}\n{self.stderr}"
        out = json.loads(lines[0])
        assert isinstance(out, dict) and set(out) == {"document", "data", "trace", "patches", "retries"}, out
        return out


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
async def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AiwfdProcess]:
    cfg = tmp_path_factory.mktemp("stream-examples") / "agents.yaml"
    cfg.write_text(CONFIG, encoding="utf-8")
    async with started(["serve", "-f", str(cfg), "-p", "0"], fake_env(fake, API_KEY=KEY)) as proc:
        yield proc


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


def command(client: str) -> list[str]:
    if client == "python":
        return [sys.executable, str(EXAMPLES / "python" / "stream_client.py")]
    reason = _skip_reason("node")
    if reason:
        pytest.skip(reason)
    return [shutil.which("node") or "node", str(EXAMPLES / "node" / "stream_client.mjs")]


async def run(client: str, url: str, *args: str, key: str | None = KEY) -> Done:
    env = clean_env(AIWFD_URL=url)
    if key is not None:
        env["AIWFD_API_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        *command(client), *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
    finally:
        if proc.returncode is None:  # timed out (or the test was cancelled): not left running
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("chunk_chars", [1, 3, 7])
async def test_the_client_rebuilds_result_data_from_the_patches(
        client: str, encoding: str, chunk_chars: int, server: AiwfdProcess, fake: FakeOpenAI) -> None:
    content = ENCODINGS[encoding](ANSWER)
    fake.script(Stream(content=content, chunk_chars=chunk_chars))
    done = await run(client, server.base, "reporter", json.dumps(ASK), "--json")
    assert done.rc == 0, (done.stdout, done.stderr)
    out = done.json()
    assert out["data"] == EXPECTED  # the server dropped the optional nulls
    assert out["document"] == out["data"]
    assert out["retries"] == 0 and out["trace"]["attempts"] == 1
    # Incremental: many patch events, not one at the end (one delta per model piece).
    assert out["patches"] >= len(content) // chunk_chars // 4, out["patches"]
    assert done.stderr == ""


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_human_output_names_the_rebuilt_document(client: str, server: AiwfdProcess,
                                                           fake: FakeOpenAI) -> None:
    """Not a terminal: nothing per event, then `data`, `trace` and `stream` lines."""
    fake.script(Stream(data=ANSWER, chunk_chars=4))
    done = await run(client, server.base, "reporter", json.dumps(ASK))
    assert done.rc == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["data", "trace", "stream"], done.stdout
    assert json.loads(lines[0][len("data: "):]) == EXPECTED
    assert lines[1].startswith("trace: step_name=reporter attempts=1 ")
    assert lines[2].startswith("stream: patches=") and lines[2].endswith(" retries=0 rebuilt=equal"), lines[2]
    assert "\x1b[" not in done.stdout  # no redrawing when stdout is not a terminal


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_reask_resets_the_document(client: str, server: AiwfdProcess, fake: FakeOpenAI) -> None:
    # The first answer streams patches of its own (a longer title, other items)
    # before it fails validation: count must be an integer.
    wrong = {**ANSWER, "title": "a first draft " * 10,
             "items": [{**_item(1), "count": "many"}, _item(2), _item(3)]}
    fake.script(Violate(data=wrong), Stream(content=ENCODINGS["compact"](ANSWER), chunk_chars=3))
    done = await run(client, server.base, "reporter", json.dumps(ASK), "--json")
    assert done.rc == 0, (done.stdout, done.stderr)
    out = done.json()
    assert out["retries"] == 1 and out["trace"]["attempts"] == 2
    assert out["document"] == out["data"] == EXPECTED
    assert fake.calls == 2
    # The retry is shown with its errors, on stderr (stdout stays the one JSON line).
    assert done.stderr.startswith("retry: attempt 2: items"), done.stderr
    assert "count" in done.stderr


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_error_event_is_exit_1(client: str, server: AiwfdProcess, fake: FakeOpenAI) -> None:
    fake.script(Violate(data={**ANSWER, "matrix": "none"}), Violate(data={**ANSWER, "matrix": [["x"]]}))
    done = await run(client, server.base, "reporter", json.dumps(ASK), "--json")
    assert done.rc == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith("retry: attempt 2: matrix"), done.stderr
    # After the 200, an error has no status: the line is the others' without it.
    assert lines[1].startswith("error: invalid_output: ") and "(request_id " in lines[1], done.stderr
    assert any(ln.startswith("  matrix") for ln in lines[2:]), done.stderr


@pytest.mark.parametrize("client", CLIENTS)
async def test_plain_text_has_no_patches(client: str, server: AiwfdProcess, fake: FakeOpenAI) -> None:
    text = "Plain text, streamed — ünïcode and \"quotes\"."
    fake.script(Stream(content=text, chunk_chars=2))
    done = await run(client, server.base, "chatter", json.dumps(ASK), "--json")
    assert done.rc == 0, (done.stdout, done.stderr)
    out = done.json()
    assert out["data"] == text and out["document"] is None and out["patches"] == 0


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_error_answer_before_the_stream_is_exit_1(client: str, server: AiwfdProcess) -> None:
    done = await run(client, server.base, "reporter", json.dumps(ASK), key="wrong-key")
    assert done.rc == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: 401 unauthorized: ") and "(request_id " in done.stderr, done.stderr
    done = await run(client, server.base, "reporter", json.dumps({"topic": 5}))
    assert done.rc == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: 422 invalid_input: "), done.stderr
    assert "\n  topic: " in done.stderr


@pytest.mark.parametrize("client", CLIENTS)
async def test_no_server_is_exit_2(client: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await run(client, url, "reporter", json.dumps(ASK))
    assert done.rc == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"error: no answer from {url}"), done.stderr


def test_the_examples_are_in_the_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for path in ("python/patch.py", "python/stream_client.py", "node/patch.mjs", "node/stream_client.mjs"):
        assert path in readme, f"{path} is not in examples/README.md"
        text = (EXAMPLES / path).read_text(encoding="utf-8")
        if "client" in path:
            assert "AIWFD_URL" in text and "AIWFD_API_KEY" in text, path

