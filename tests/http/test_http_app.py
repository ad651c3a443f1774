"""`create_app` on its own (aiohttp's TestServer, no daemon): the headers every
answer gets from the on_response_prepare hook, the phases of a drain, the
lease a request holds on its snapshot, and the snapshot's immutability."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aiwfd.http.app import ROUTES, create_app
from aiwfd.http.keys import RUNTIME
from aiwfd.http.runtime import Phase, Runtime, build_snapshot
from aiwfd.logs import RequestLog
from aiwfd.settings import Settings
from aiwfd.spec.compiler import load_and_compile

CONFIG = Path(__file__).parent.parent / "configs" / "api_cors.yaml"
ORIGIN = "https://app.example"
BODY = {"name": "Ada"}


def make_runtime(tmp_path: Path) -> Runtime:
    settings = Settings(file=str(CONFIG), host="127.0.0.1", port=0, env={}, mock=True)
    compiled = load_and_compile(settings.file)
    return Runtime(settings=settings, snapshot=build_snapshot(compiled, settings, None, "aiohttp"),
                   artifacts_dir=str(tmp_path), request_log=RequestLog("text", io.StringIO()))


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(make_runtime(tmp_path)))) as c:
        yield c


def runtime_of(client: TestClient) -> Runtime:
    app = client.server.app
    assert app is not None
    return app[RUNTIME]


async def test_the_app_stands_alone_and_closes_its_snapshot_at_cleanup(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    async with TestClient(TestServer(create_app(rt))) as c:
        resp = await c.post("/agent/greeter", json=BODY)
        assert resp.status == 200, await resp.text()
        assert rt.snapshot.inflight == 0 and not rt.snapshot.closed
    assert rt.snapshot.closed


@pytest.mark.parametrize("path", ["/agent/greeter", "/agent/greeter/stream", "/nowhere"])
async def test_every_answer_json_or_streamed_gets_its_headers_once(client: TestClient, path: str) -> None:
    resp = await client.post(path, json=BODY, headers={"Origin": ORIGIN, "X-Request-ID": "rid-1"})
    await resp.read()
    assert resp.headers.getall("X-Request-ID") == ["rid-1"]
    assert resp.headers.getall("Access-Control-Allow-Origin") == [ORIGIN]
    assert resp.headers.getall("Vary") == ["Origin"]
    assert "Connection" not in resp.headers or resp.headers["Connection"].lower() != "close"


async def test_the_phases_of_a_drain_only_move_forward(client: TestClient) -> None:
    rt = runtime_of(client)
    rt.enter(Phase.DRAINING)
    resp = await client.get("/health")
    assert resp.status == 503 and await resp.json() == {"status": "draining"}
    assert resp.headers["Connection"] == "close"
    # Still answered while draining, on a connection that then closes.
    resp = await client.post("/agent/greeter/stream", json=BODY)
    assert resp.status == 200 and resp.headers["Connection"] == "close"
    await resp.read()
    rt.enter(Phase.CLOSING)
    rt.enter(Phase.DRAINING)
    assert rt.phase is Phase.CLOSING
    resp = await client.post("/agent/greeter", json=BODY)
    assert resp.status == 503 and (await resp.json())["error"]["type"] == "unavailable"
    assert rt.snapshot.inflight == 0


async def test_a_retired_snapshot_closes_when_its_last_lease_ends(client: TestClient) -> None:
    rt = runtime_of(client)
    old = rt.snapshot
    async with rt.lease() as snap:
        assert snap is old and old.inflight == 1
        rt.swap(dataclasses.replace(old, usage=type(old.usage)()))
        assert old.retired and not old.closed
    assert old.inflight == 0
    await rt.close()
    assert old.closed


def test_a_snapshot_is_frozen(tmp_path: Path) -> None:
    snap = make_runtime(tmp_path).snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.max_body = 1  # type: ignore[misc]


def test_the_route_table_is_what_the_app_serves(tmp_path: Path) -> None:
    app = create_app(make_runtime(tmp_path))
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    assert {(r.method, r.path) for r in ROUTES} <= served
    # The metrics count an agent call per request on the routes the table marks.
    assert app[RUNTIME].metrics.agent_routes == {"/agent/{name}", "/agent/{name}/stream"}
