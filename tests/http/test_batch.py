"""POST /agent/{name}/batch (SPEC §7.5): per-input results in input order, one
bad input never failing the others, `batch_concurrency` honoured, the limits,
metrics and the request log; and both new endpoints in openapi.json.

The module's fake answers each input by its name (EchoFake below), so that an
answer can be matched to its input whatever order the calls arrive in.
tests/configs/sb_agents.yaml sets batch_max 5 and batch_concurrency 3.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from aiwfd.spec.compiler import load_and_compile
from aiwfd.spec.config import DEFAULT_BATCH_CONCURRENCY, DEFAULT_BATCH_MAX
from aiwfd.testing.fakeopenai import Behaviour, FakeOpenAI, Hold, Reply, Status
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.metrics import delta
from tests.conftest import CONFIGS

CONFIG = CONFIGS / "sb_agents.yaml"


class EchoFake(FakeOpenAI):
    """Answers `{"message": "Hello, <name>"}` for the input's name, after `delay`
    seconds; `plan[name]` overrides: a number of seconds, or a behaviour used on
    every call for that name (e.g. Status(500): that input always fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0
        self.plan: dict[str, float | Behaviour] = {}
        self.answered: list[str] = []  # names, in the order their answers were sent

    async def _answer(self, request: web.Request, body: dict[str, Any],
                      behaviour: Behaviour | None) -> web.StreamResponse:
        name = str(json.loads(body["messages"][1]["content"]).get("name"))
        if behaviour is None:
            planned = self.plan.get(name, self.delay)
            if isinstance(planned, (int, float)):
                behaviour = Reply(data={"message": f"Hello, {name}"}, delay=planned)
            else:
                behaviour = planned
        response = await super()._answer(request, body, behaviour)
        self.answered.append(name)
        return response


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[EchoFake]:
    async with EchoFake() as f:
        yield f


@pytest.fixture(scope="module")
async def srv(fake: EchoFake) -> AsyncIterator[InProcess]:
    async with serve(CONFIG, env=fake_env(fake)) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: EchoFake) -> None:
    fake.reset()
    fake.delay = 0.0
    fake.plan = {}
    fake.answered = []


async def batch(srv: InProcess, agent: str, body: Any) -> tuple[int, dict[str, str], Any]:
    async with srv.session.post(srv.url(f"/agent/{agent}/batch"), json=body) as r:
        return r.status, dict(r.headers), await r.json()


# --------------------------------------------------------------------------
# Results in input order; a mix of good and bad inputs


async def test_results_in_input_order(srv: InProcess, fake: EchoFake) -> None:
    names = ["Ann", "Bob", "Cat", "Dan", "Eve"]
    # The first inputs answer last: the model holds Ann, Bob and Cat (the
    # batch_concurrency of 3 in flight) until the test lets each go.
    gates = {n: asyncio.Event() for n in ("Ann", "Bob", "Cat")}
    fake.plan = {n: Hold(g, Reply(data={"message": f"Hello, {n}"})) for n, g in gates.items()}
    call = asyncio.create_task(batch(srv, "greeter", {"inputs": [{"name": n} for n in names]}))
    await fake.wait_calls(3)
    assert sorted(json.loads(r.messages[1]["content"])["name"] for r in fake.requests) == ["Ann", "Bob", "Cat"]
    gates["Cat"].set()
    await fake.wait_calls(5)  # Cat's slot went to Dan, Dan's to Eve
    gates["Bob"].set()
    gates["Ann"].set()
    status, headers, doc = await call
    assert status == 200, doc
    assert fake.answered[:2] == ["Cat", "Dan"] and sorted(fake.answered) == sorted(names), fake.answered
    assert list(doc) == ["results"]
    results = doc["results"]
    assert [r["data"] for r in results] == [{"message": f"Hello, {n}"} for n in names]
    for r in results:
        assert set(r) == {"data", "trace"}
        t = r["trace"]
        assert t["attempts"] == 1 and t["step_name"] == "greeter" and t["model"] == "gpt-4o-mini"
        assert t["request_id"] == headers["X-Request-ID"]  # the batch's id, shared
        assert t["usage"]["total"] == t["usage"]["prompt"] + t["usage"]["completion"] > 0
    assert fake.calls == 5
    # Each input went to the model as its own conversation.
    sent = sorted(json.loads(r.body["messages"][1]["content"])["name"] for r in fake.requests)
    assert sent == sorted(names)


async def test_one_bad_input_never_fails_the_others(srv: InProcess, fake: EchoFake) -> None:
    fake.plan = {"Cat": Status(500)}  # the provider fails on every attempt for this input
    inputs = [{"name": "Ann"}, {"name": ""}, {"name": "Cat"}, 7, {"name": "Eve", "nickname": "E"}]
    status, headers, doc = await batch(srv, "twice", {"inputs": inputs})
    assert status == 200, doc
    results = doc["results"]
    assert len(results) == 5
    assert results[0]["data"] == {"message": "Hello, Ann"} and results[0]["trace"]["attempts"] == 1
    kinds = [r.get("error", {}).get("type") for r in results]
    assert kinds == [None, "invalid_input", "upstream_error", "invalid_input", "invalid_input"]
    for r in results[1:]:
        assert set(r) == {"error"} and set(r["error"]) == {"type", "message", "details"}
    # Input-schema errors, with paths relative to the input (as the plain call reports them).
    assert results[1]["error"]["details"][0]["path"] == "name"
    assert results[3]["error"]["details"] == [{"path": "", "message": "expected an object, got a number"}]
    assert results[4]["error"]["details"][0]["path"] == "nickname"
    # The provider failure was retried within max_attempts (2) for that input only.
    assert fake.calls == 3
    # One log line for the batch: attempts and tokens summed over the inputs.
    line = srv.log_lines()[-1]
    tokens = results[0]["trace"]["usage"]["total"]
    assert "POST /agent/twice/batch - " in line and "status=200" in line
    assert f"request_id={headers['X-Request-ID']} attempts=3 tokens={tokens}" in line, line


async def test_a_scripted_failure_hits_one_input_only(srv: InProcess, fake: EchoFake) -> None:
    # A scripted 400 (not retried) goes to whichever call arrives first: one
    # input gets upstream_error, the others their answers.
    fake.script(Status(400))
    names = ["Ann", "Bob", "Cat"]
    status, _, doc = await batch(srv, "greeter", {"inputs": [{"name": n} for n in names]})
    assert status == 200
    errors = [r for r in doc["results"] if "error" in r]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "upstream_error"
    for n, r in zip(names, doc["results"]):
        if "data" in r:
            assert r["data"] == {"message": f"Hello, {n}"}


# --------------------------------------------------------------------------
# Concurrency


async def test_batch_concurrency_is_honoured(srv: InProcess, fake: EchoFake) -> None:
    fake.delay = 0.1  # long enough for the calls of a round to overlap
    status, _, doc = await batch(srv, "greeter", {"inputs": [{"name": f"N{i}"} for i in range(5)]})
    assert status == 200 and all("data" in r for r in doc["results"])
    assert fake.max_inflight == 3  # batch_concurrency
    # The bound is per batch: two batches at once have twice as many calls in flight.
    fake.reset()
    fake.delay = 0.15
    both = await asyncio.gather(*(batch(srv, "greeter", {"inputs": [{"name": f"{b}{i}"} for i in range(4)]})
                                  for b in "XY"))
    assert [s for s, _, _ in both] == [200, 200]
    assert fake.max_inflight == 6


async def test_the_batch_shares_one_deadline(fake: EchoFake) -> None:
    fake.delay = 0.5
    async with serve(CONFIG, env=fake_env(fake), deadline=0.75) as s:
        status, _, doc = await batch(s, "greeter", {"inputs": [{"name": f"N{i}"} for i in range(5)]})
    assert status == 200
    kinds = [r.get("error", {}).get("type", "ok") for r in doc["results"]]
    # Three answered at once within the deadline; the last two had too little time left.
    assert kinds[:3] == ["ok", "ok", "ok"]
    assert kinds[3:] == ["upstream_timeout", "upstream_timeout"]


# --------------------------------------------------------------------------
# Limits and the body's shape


async def test_body_without_an_inputs_array_or_over_the_limit_is_422(srv: InProcess, fake: EchoFake) -> None:
    cases: list[tuple[Any, str]] = [
        ({"inputs": [{"name": f"N{i}"} for i in range(6)]}, "6 inputs; a batch holds at most 5"),
        ({}, "required field is missing"),
        ({"input": [{"name": "Ann"}]}, "required field is missing"),
        ({"inputs": {"name": "Ann"}}, "expected an array, got an object"),
        ({"inputs": "Ann"}, "expected an array, got a string"),
        ({"inputs": None}, "expected an array, got null"),
        ({"inputs": [], "extra": 1}, "unknown field"),
    ]
    for body, message in cases:
        status, headers, doc = await batch(srv, "greeter", body)
        assert status == 422, (body, doc)
        assert doc["error"]["type"] == "invalid_input"
        assert doc["request_id"] == headers["X-Request-ID"]
        assert any(message in d["message"] for d in doc["error"]["details"]), (body, doc)
        assert {d["path"] for d in doc["error"]["details"]} <= {"inputs", "input", "extra"}
    # At the limit, and empty: fine.
    status, _, doc = await batch(srv, "greeter", {"inputs": []})
    assert (status, doc) == (200, {"results": []})
    assert fake.calls == 0
    status, _, doc = await batch(srv, "greeter", {"inputs": [{"name": f"N{i}"} for i in range(5)]})
    assert status == 200 and len(doc["results"]) == 5


def test_batch_defaults(tmp_path: Path) -> None:
    text = CONFIG.read_text(encoding="utf-8").replace("  batch_max: 5\n  batch_concurrency: 3\n", "  max_body: 1MiB\n")
    server = load_and_compile(str(write_config(tmp_path, text))).config.server
    assert (server.batch_max, server.batch_concurrency) == (DEFAULT_BATCH_MAX, DEFAULT_BATCH_CONCURRENCY) == (100, 8)


# --------------------------------------------------------------------------
# Metrics


async def test_batch_counts_in_metrics(srv: InProcess, fake: EchoFake) -> None:
    before = await srv.scrape()
    fake.plan = {"Cat": Status(500)}
    inputs = [{"name": "Ann"}, {"name": "Bob"}, {"name": ""}, {"name": "Cat"}]
    status, _, doc = await batch(srv, "twice", {"inputs": inputs})
    assert status == 200
    await batch(srv, "twice", {"inputs": "nope"})  # 422 for the whole batch: no agent call
    after = await srv.scrape()

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    route = "/agent/{name}/batch"
    assert d("aiwfd_http_requests_total", route=route, method="POST", status="200") == 1
    assert d("aiwfd_http_requests_total", route=route, method="POST", status="422") == 1
    assert d("aiwfd_http_request_duration_seconds_count", route=route) == 2
    # One agent call per input.
    assert d("aiwfd_agent_calls_total", agent="twice", outcome="ok", client="anonymous") == 2
    assert d("aiwfd_agent_calls_total", agent="twice", outcome="invalid_input", client="anonymous") == 1
    assert d("aiwfd_agent_calls_total", agent="twice", outcome="upstream_error", client="anonymous") == 1
    assert d("aiwfd_agent_attempts_total", agent="twice") == 4
    prompt = sum(r["trace"]["usage"]["prompt"] for r in doc["results"] if "data" in r)
    assert d("aiwfd_tokens_total", agent="twice", model="gpt-4o-mini", kind="prompt") == prompt
    assert d("aiwfd_upstream_duration_seconds_count", agent="twice", provider="openai") == 4
    # The plain route's counters did not move.
    assert d("aiwfd_http_requests_total", route="/agent/{name}", method="POST", status="200") == 0


# --------------------------------------------------------------------------
# openapi.json documents both endpoints


async def test_openapi_documents_stream_and_batch(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/openapi.json")) as r:
        doc = await r.json()
    validate(doc)
    paths = doc["paths"]
    op_ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids))
    stream_op = paths["/agent/greeter/stream"]["post"]
    assert stream_op["operationId"] == "greeter.stream"
    assert list(stream_op["responses"]["200"]["content"]) == ["text/event-stream"]
    assert stream_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GreetingRequest"}
    # Statuses: the errors found before the model is called (no API_KEY here: no 401).
    assert set(stream_op["responses"]) == {"200", "400", "404", "408", "413", "415", "422", "500", "503"}
    assert {} in stream_op["security"]
    for event in ("start", "delta", "patch", "retry", "result", "error", "keep-alive"):
        assert event in stream_op["responses"]["200"]["description"]

    op = paths["/agent/greeter/batch"]["post"]
    assert op["operationId"] == "greeter.batch"
    components = {"components": doc["components"]}
    body_schema = {**op["requestBody"]["content"]["application/json"]["schema"], **components}
    v = jsonschema.Draft202012Validator(body_schema)
    assert v.is_valid({"inputs": [{"name": "Ann"}]})
    assert not v.is_valid({"inputs": [{"name": "Ann"}] * 6})  # maxItems = batch_max
    assert not v.is_valid({}) and not v.is_valid({"inputs": {}})
    # A real answer, good and bad inputs mixed, matches the documented 200.
    _, _, answer = await batch(srv, "greeter", {"inputs": [{"name": "Ann"}, {"name": ""}]})
    ok_schema = {**op["responses"]["200"]["content"]["application/json"]["schema"], **components}
    jsonschema.Draft202012Validator(ok_schema).validate(answer)
    assert not jsonschema.Draft202012Validator(ok_schema).is_valid({"results": [{"data": 5}]})
