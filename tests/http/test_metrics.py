"""GET /metrics (SPEC §7.2): the metrics move as calls, errors, re-asks and
reloads happen, and no client can create label values.

One in-process aiwfd on tests/configs/http_agents.yaml (agents on the
`openai` provider, pointed at the module's FakeOpenAI).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import agents_env
from aiwfd.testing.fakeopenai import FakeOpenAI, Hang, Reply, Status, Violate
from aiwfd.testing.inprocess import InProcess, serve
from aiwfd.testing.metrics import delta, value

ROUTES = {"/health", "/agents", "/agent/{name}", "/agent/{name}/schema", "/openapi.json", "/metrics", "/docs",
          "unmatched"}


@pytest.fixture(scope="module")
async def cfg(agents_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics") / "agents.yaml"
    shutil.copy(agents_config, path)
    return path


@pytest.fixture(scope="module")
async def srv(fake: FakeOpenAI, cfg: Path) -> AsyncIterator[InProcess]:
    env = agents_env(fake)
    async with serve(cfg, env=env) as s:
        # A reload re-reads the environment (SPEC §5); in-process, that is this one.
        s.server._base_env = {**s.server._base_env, **env}
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


async def post(srv: InProcess, agent: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with srv.session.post(srv.url(f"/agent/{agent}"), json=body) as r:
        return r.status, await r.json()


async def test_every_metric_of_the_spec_is_exposed(srv: InProcess) -> None:
    await post(srv, "greeter", {"name": "Ann"})
    async with srv.session.get(srv.url("/metrics")) as r:
        text = await r.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    # prometheus-client names counter families without `_total`; the samples have it.
    assert {"aiwfd_http_requests", "aiwfd_http_request_duration_seconds", "aiwfd_agent_calls",
            "aiwfd_agent_attempts", "aiwfd_tokens", "aiwfd_upstream_duration_seconds",
            "aiwfd_inflight_requests", "aiwfd_config_reloads"} <= names
    for line in ("# TYPE aiwfd_http_requests_total counter", "# TYPE aiwfd_http_request_duration_seconds histogram",
                 "# TYPE aiwfd_upstream_duration_seconds histogram", "# TYPE aiwfd_inflight_requests gauge"):
        assert line in text


async def test_a_successful_call(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    fake.script(Reply(data={"message": "Hello, Ann!"}))
    status, doc = await post(srv, "greeter", {"name": "Ann"})
    assert status == 200
    after = await srv.scrape()
    usage = doc["trace"]["usage"]
    assert delta(before, after, "aiwfd_http_requests_total", route="/agent/{name}", method="POST", status="200") == 1
    assert delta(before, after, "aiwfd_http_request_duration_seconds_count", route="/agent/{name}") == 1
    assert delta(before, after, "aiwfd_http_request_duration_seconds_sum", route="/agent/{name}") > 0
    assert delta(before, after, "aiwfd_agent_calls_total", agent="greeter", outcome="ok", client="anonymous") == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="greeter") == 1
    assert delta(before, after, "aiwfd_tokens_total", agent="greeter", model="gpt-4o-mini", kind="prompt") == usage["prompt"]
    assert delta(before, after, "aiwfd_tokens_total", agent="greeter", model="gpt-4o-mini",
                 kind="completion") == usage["completion"]
    assert delta(before, after, "aiwfd_upstream_duration_seconds_count", agent="greeter", provider="openai") == 1
    assert delta(before, after, "aiwfd_upstream_duration_seconds_bucket", agent="greeter", provider="openai",
                 le="+Inf") == 1
    # The previous scrape is counted too, under its route.
    assert delta(before, after, "aiwfd_http_requests_total", route="/metrics", method="GET", status="200") == 1


async def test_a_reask_counts_two_attempts(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    fake.script(Violate(), Reply(data={"message": "fixed"}))
    status, doc = await post(srv, "greeter", {"name": "Ann"})
    assert status == 200 and doc["trace"]["attempts"] == 2
    after = await srv.scrape()
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="greeter") == 2
    assert delta(before, after, "aiwfd_agent_calls_total", agent="greeter", outcome="ok", client="anonymous") == 1
    assert delta(before, after, "aiwfd_upstream_duration_seconds_count", agent="greeter", provider="openai") == 2
    prompt = delta(before, after, "aiwfd_tokens_total", agent="greeter", model="gpt-4o-mini", kind="prompt")
    assert prompt == doc["trace"]["usage"]["prompt"]


async def test_errors_are_counted_by_type(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    status, _ = await post(srv, "greeter", {"name": ""})  # 422: the model is never called
    assert status == 422
    fake.script(Violate(), Violate())  # `twice` has max_attempts 2
    status, doc = await post(srv, "twice", {"name": "Ann"})
    assert status == 502 and doc["error"]["type"] == "invalid_output"
    fake.script(Status(400))  # not retried
    status, doc = await post(srv, "tuned", {"name": "Ann"})
    assert status == 502 and doc["error"]["type"] == "upstream_error"
    after = await srv.scrape()
    assert delta(before, after, "aiwfd_http_requests_total", route="/agent/{name}", method="POST", status="422") == 1
    assert delta(before, after, "aiwfd_http_requests_total", route="/agent/{name}", method="POST", status="502") == 2
    assert delta(before, after, "aiwfd_agent_calls_total", agent="greeter", outcome="invalid_input", client="anonymous") == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="greeter") == 0
    assert delta(before, after, "aiwfd_agent_calls_total", agent="twice", outcome="invalid_output", client="anonymous") == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="twice") == 2
    assert delta(before, after, "aiwfd_agent_calls_total", agent="tuned", outcome="upstream_error", client="anonymous") == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="tuned") == 1
    assert delta(before, after, "aiwfd_upstream_duration_seconds_count", agent="tuned", provider="openai") == 1


async def test_inflight_gauge(srv: InProcess, fake: FakeOpenAI) -> None:
    idle = await srv.scrape()
    assert value(idle, "aiwfd_inflight_requests") == 1  # the scrape itself
    fake.script(Hang(0.5), Hang(0.5))
    calls = [asyncio.ensure_future(post(srv, "greeter", {"name": "Ann"})) for _ in range(2)]
    await fake.wait_calls(2)
    busy = await srv.scrape()
    assert value(busy, "aiwfd_inflight_requests") == 3
    for status, _ in await asyncio.gather(*calls):
        assert status == 200
    assert value(await srv.scrape(), "aiwfd_inflight_requests") == 1


async def test_reloads_are_counted(srv: InProcess, cfg: Path) -> None:
    before = await srv.scrape()
    assert await srv.server.reload()
    good = cfg.read_text()
    cfg.write_text("assistants: {greeter: {model: }}\n")
    try:
        assert not await srv.server.reload()
    finally:
        cfg.write_text(good)
    after = await srv.scrape()
    assert delta(before, after, "aiwfd_config_reloads_total", result="ok") == 1
    assert delta(before, after, "aiwfd_config_reloads_total", result="error") == 1


async def pipelined(port: int, requests: list[tuple[str, str]]) -> list[int]:
    """Send every request on one connection, then read the answers' statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(
            f"{m} {p} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}".encode()
            for m, p in requests))
        await writer.drain()
        statuses = []
        for _ in requests:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            statuses.append(int(lines[0].split()[1]))
            length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
            await reader.readexactly(length)
        return statuses
    finally:
        writer.close()


async def test_unknown_agents_and_paths_create_no_label_values(srv: InProcess) -> None:
    # Warm up the label sets that unknown requests legitimately share.
    for method, path in (("GET", "/nope"), ("POST", "/nope"), ("POST", "/agent/nope"),
                         ("GET", "/agent/nope/schema"), ("PURGE", "/nope"), ("GET", "/agent/nope"),
                         ("DELETE", "/nope"), ("DELETE", "/agent/nope"), ("POST", "/docs/nope.js")):
        async with srv.session.request(method, srv.url(path), json={"name": "x"}) as r:
            assert r.status in (404, 405)
    before = await srv.scrape()
    rng = random.Random(7)
    # Methods the HTTP parser knows but aiwfd does not route: all share method="other".
    methods = ["GET", "POST", "DELETE", "PURGE", "PROPFIND", "MKCOL", "LOCK"]

    def target() -> tuple[str, str]:
        u = uuid.uuid4().hex
        return rng.choice([
            ("GET", f"/{u}"), ("POST", f"/{u}/{rng.randint(0, 10**9)}"), ("POST", f"/agent/{u}"),
            ("GET", f"/agent/{u}/schema"), (rng.choice(methods), f"/{u}?q={u}"), ("GET", f"/docs/{u}.js"),
            ("DELETE", f"/agent/{u[:8]}"),
        ])

    # Pipelined over a few keep-alive connections: the client's cost stays small.
    requests = [target() for _ in range(10_000)]
    chunks = [requests[i::8] for i in range(8)]
    results = await asyncio.gather(*(pipelined(srv.server.port, c) for c in chunks))  # type: ignore[arg-type]
    statuses = [s for r in results for s in r]
    assert len(statuses) == 10_000
    assert set(statuses) <= {404, 405}
    after = await srv.scrape()
    labels_before = {k for k in before if not k[0].startswith("aiwfd_inflight")}
    labels_after = {k for k in after if not k[0].startswith("aiwfd_inflight")}
    assert labels_after - labels_before == set(), sorted(labels_after - labels_before)[:10]
    unmatched = delta(before, after, "aiwfd_http_requests_total", route="unmatched", method="GET", status="404")
    assert unmatched > 0
    total = sum(v - value(before, k[0], **dict(k[1])) for k, v in after.items()
                if k[0] == "aiwfd_http_requests_total")
    assert total == 10_000 + 1  # + the scrape before
    for name, labels in after:
        d = dict(labels)
        if "route" in d:
            assert d["route"] in ROUTES or d["route"].startswith("/docs/"), d
        if "agent" in d:
            assert len(d["agent"]) < 20 and d["agent"] not in ("nope",), d
        if "method" in d:
            assert d["method"] in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, d
