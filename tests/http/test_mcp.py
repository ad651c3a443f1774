"""`POST /mcp` (SPEC §10.1) with the official MCP clients against a real in-process aiwfd.

The Python SDK (`mcp` 2.x: `Client` with its default settings, which first
probes `server/discover` and falls back to `initialize`; and the lower
`streamable_http_client` + `ClientSession`), the TypeScript SDK
(tests/node/mcp_client.mjs, skipped when tests/node has no node_modules), and
raw HTTP for what no SDK sends (malformed JSON, batches, a foreign Origin).
One server per module, one FakeOpenAI (reset per test); the load test has its
own slow fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx2
import pytest
from mcp.client import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from aiwfd import __version__
from aiwfd.testing.fakeopenai import FakeOpenAI, Reply
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.metrics import delta

NODE_DIR = Path(__file__).resolve().parent.parent / "node"

CONFIG = """\
version: 0.3
auth:
  keys:
    - name: frontend
      key_env: FRONTEND_KEY
    - name: narrow
      key_env: NARROW_KEY
      agents: [greeter]
    - name: limited
      key_env: LIMITED_KEY
      limits: {requests: 1/min}
types:
  In:
    name: string(1..100)
  Out:
    message: string
    mood?: enum(happy, calm)
  Color: enum(red, green, blue)
  Group:
    members: In[]
assistants:
  greeter:
    model: gpt-4o-mini
    description: Greets someone by name
    input_type: In
    output_type: Out
    max_attempts: 1
  color:
    model: gpt-4o-mini
    input_type: In
    output_type: Color
  tags:
    model: gpt-4o-mini
    input_type: In
    output_type: string[]
  team:
    model: gpt-4o-mini
    input_type: Group
    output_type: Group
  chat:
    model: gpt-4o-mini
    input_type: In
"""
FRONTEND, NARROW, LIMITED = "frontend-key", "narrow-key", "limited-key"


def env(fake: FakeOpenAI) -> dict[str, str]:
    return fake_env(fake, FRONTEND_KEY=FRONTEND, NARROW_KEY=NARROW, LIMITED_KEY=LIMITED)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("mcp"), CONFIG)


@pytest.fixture(scope="module")
async def server(config: Path, fake: FakeOpenAI) -> AsyncIterator[InProcess]:
    async with serve(config, env=env(fake)) as s:
        yield s


@pytest.fixture
def srv(server: InProcess, fake: FakeOpenAI) -> Iterator[InProcess]:
    fake.reset()
    yield server


class Seen:
    """What the SDK's HTTP client sent and got: (JSON-RPC method, status, headers) per POST."""

    def __init__(self) -> None:
        self.exchanges: list[tuple[str | None, int, httpx2.Headers]] = []

    async def on_response(self, response: httpx2.Response) -> None:
        method = None
        if response.request.method == "POST":
            method = json.loads(response.request.content).get("method")
        self.exchanges.append((method, response.status_code, response.headers))


def http_client(key: str | None, seen: Seen | None = None, **kw: Any) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    hooks = {"response": [seen.on_response]} if seen is not None else {}
    return httpx2.AsyncClient(headers=headers, event_hooks=hooks, timeout=httpx2.Timeout(30.0), **kw)


async def rpc(srv: InProcess, method: str, params: dict[str, Any] | None = None, *, key: str | None = FRONTEND,
              rid: Any = 1, raw: bytes | None = None, **headers: str) -> tuple[int, dict[str, str], Any]:
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        msg["id"] = rid
    if params is not None:
        msg["params"] = params
    body = raw if raw is not None else json.dumps(msg).encode()
    async with srv.session.post(srv.url("/mcp"), data=body, headers=h) as r:
        text = await r.text()
        return r.status, dict(r.headers), json.loads(text) if text else None


async def post_agent(srv: InProcess, name: str, body: Any) -> tuple[int, Any]:
    async with srv.session.post(srv.url(f"/agent/{name}"), json=body, headers={"X-API-Key": FRONTEND}) as r:
        return r.status, await r.json()


async def agent_schemas(srv: InProcess, name: str) -> dict[str, Any]:
    async with srv.session.get(srv.url(f"/agent/{name}/schema")) as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


def wrap(schema: dict[str, Any]) -> dict[str, Any]:
    inner = {k: v for k, v in schema.items() if k not in ("$schema", "$defs")}
    return {"$schema": schema["$schema"], "type": "object", "properties": {"value": inner}, "required": ["value"],
            "additionalProperties": False}


# -- the Python SDK, default settings ------------------------------------------------------------


async def test_python_client_connects_probing_discover_first(srv: InProcess) -> None:
    seen = Seen()
    async with http_client(FRONTEND, seen) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        assert c.server_info is not None
        assert (c.server_info.name, c.server_info.version) == ("aiwfd", __version__)
        assert c.server_capabilities.tools is not None and c.server_capabilities.tools.list_changed is False
        assert c.protocol_version == "2025-11-25"
    # mcp 2.x asks server/discover (revision 2026-07-28) first; we speak the handshake revisions,
    # so it is a 400 (an MCP-Protocol-Version we do not speak) with a JSON-RPC error, and the
    # client falls back to initialize.
    methods = [(m, status) for m, status, _ in seen.exchanges]
    assert methods[:2] == [("server/discover", 400), ("initialize", 200)]
    assert all(status == 202 for m, status in methods if m == "notifications/initialized")


async def test_tools_list_is_the_agents_with_their_schemas(srv: InProcess) -> None:
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    async with srv.session.get(srv.url("/agents")) as r:
        agents = sorted(a["name"] for a in (await r.json())["agents"])
    assert sorted(tools) == agents == ["chat", "color", "greeter", "tags", "team"]
    assert tools["greeter"].description == "Greets someone by name"
    assert tools["color"].description == "In → Color"
    assert tools["chat"].description == "In → text"
    for name, tool in tools.items():
        schemas = await agent_schemas(srv, name)
        assert tool.input_schema == schemas["input"], name
        if name in ("greeter", "team"):  # object outputs: as they are ($defs and all)
            assert tool.output_schema == schemas["output"], name
        elif name in ("color", "tags"):  # the rest wrapped as {"value": …}
            assert tool.output_schema == wrap(schemas["output"]), name
        else:  # no output type: a text answer, no outputSchema
            assert schemas["output"]["type"] == "string" and tool.output_schema is None
    assert "$defs" in tools["team"].output_schema  # type: ignore[operator]


async def test_call_tool_returns_the_data_post_agent_returns(srv: InProcess, fake: FakeOpenAI) -> None:
    answer = {"message": "Hello, Ann", "mood": "happy"}
    fake.script(Reply(data=answer), Reply(data=answer))
    status, plain = await post_agent(srv, "greeter", {"name": "Ann"})
    assert status == 200
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        result = await c.call_tool("greeter", {"name": "Ann"})
    assert result.is_error is False
    assert result.structured_content == plain["data"] == answer
    assert len(result.content) == 1 and result.content[0].type == "text"
    assert json.loads(result.content[0].text) == answer
    trace = (result.meta or {})["aiwfd/trace"]
    assert trace["attempts"] == 1 and trace["usage"] == plain["trace"]["usage"]
    # The model was asked the same thing both times.
    assert fake.requests[0].body["messages"] == fake.requests[1].body["messages"]
    assert fake.requests[0].body["response_format"] == fake.requests[1].body["response_format"]


async def test_a_non_object_output_is_wrapped_in_value(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"value": "green"}), Reply(data={"value": ["a", "b"]}), Reply(data={"value": "green"}))
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        color = await c.call_tool("color", {"name": "Ann"})
        tags = await c.call_tool("tags", {"name": "Ann"})
    assert color.is_error is False and color.structured_content == {"value": "green"}
    assert json.loads(color.content[0].text) == {"value": "green"}  # type: ignore[union-attr]
    assert tags.structured_content == {"value": ["a", "b"]}
    status, plain = await post_agent(srv, "color", {"name": "Ann"})
    assert status == 200 and plain["data"] == "green"  # the plain call answers it bare


async def test_a_text_agent_answers_text(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(content="Hi Ann!"))
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        result = await c.call_tool("chat", {"name": "Ann"})
    assert result.is_error is False and result.structured_content is None
    assert [(b.type, b.text) for b in result.content] == [("text", "Hi Ann!")]  # type: ignore[union-attr]


async def test_invalid_arguments_are_a_tool_error_with_the_error_body(srv: InProcess, fake: FakeOpenAI) -> None:
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        result = await c.call_tool("greeter", {"name": 42, "extra": True})
    assert result.is_error is True
    body = json.loads(result.content[0].text)  # type: ignore[union-attr]
    status, plain = await post_agent(srv, "greeter", {"name": 42, "extra": True})
    assert status == 422
    assert body["error"] == plain["error"]
    assert body["error"]["type"] == "invalid_input"
    assert {d["path"] for d in body["error"]["details"]} == {"name", "extra"}
    assert body["request_id"]
    assert fake.calls == 0


async def test_a_failed_call_is_a_tool_error(srv: InProcess, fake: FakeOpenAI) -> None:
    from aiwfd.testing.fakeopenai import Status

    fake.script(Status(500))
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        result = await c.call_tool("greeter", {"name": "Ann"})
    assert result.is_error is True
    assert json.loads(result.content[0].text)["error"]["type"] == "upstream_error"  # type: ignore[union-attr]
    # The request log names the error though the POST was a 200 (a JSON-RPC result).
    call = [ln for ln in srv.log_lines() if "POST /mcp" in ln and "error=" in ln]
    assert call and "status=200" in call[-1] and "error=upstream_error" in call[-1], srv.log_lines()[-4:]


async def test_an_unknown_tool_is_a_json_rpc_error(srv: InProcess) -> None:
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool("greeterr", {"name": "Ann"})
    assert e.value.code == -32602
    assert "greeterr" in str(e.value) and "greeter" in str(e.value)


async def test_session_client_initialize_ping_list_call(srv: InProcess, fake: FakeOpenAI) -> None:
    """The lower layer: streamable_http_client + ClientSession, initialize by hand."""
    fake.script(Reply(data={"message": "Hi"}))
    async with http_client(FRONTEND) as hc, streamable_http_client(srv.url("/mcp"), http_client=hc) as (read, write), \
            ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.server_info.name == "aiwfd" and init.server_info.version == __version__
        assert init.protocol_version == "2025-11-25"
        assert init.capabilities.tools is not None
        await session.send_ping()
        assert len((await session.list_tools()).tools) == 5
        result = await session.call_tool("greeter", {"name": "Ann"})
        assert result.structured_content == {"message": "Hi"}


# -- auth, allowlist, limits ---------------------------------------------------------------------


async def test_without_credentials_the_sdk_sees_401(srv: InProcess) -> None:
    seen = Seen()
    async with http_client(None, seen) as hc:
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises; the 401 is what matters
            async with Client(streamable_http_client(srv.url("/mcp"), http_client=hc)):
                pass
    assert seen.exchanges and all(status == 401 for _, status, _ in seen.exchanges)
    assert all(h["WWW-Authenticate"].startswith("Bearer") for _, _, h in seen.exchanges)
    status, headers, doc = await rpc(srv, "tools/list", key=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert doc["error"]["type"] == "unauthorized"
    status, _, doc = await rpc(srv, "tools/list", key="wrong")
    assert status == 401 and doc["error"]["type"] == "unauthorized"
    # X-API-Key works as on every agent route.
    status, _, doc = await rpc(srv, "ping", key=None, **{"X-API-Key": FRONTEND})
    assert status == 200 and doc == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def test_the_allowlist_limits_what_a_client_lists_and_calls(srv: InProcess, fake: FakeOpenAI) -> None:
    async with http_client(NARROW) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["greeter"]
        result = await c.call_tool("color", {"name": "Ann"})
        assert result.is_error is True
        assert json.loads(result.content[0].text)["error"]["type"] == "forbidden"  # type: ignore[union-attr]
        assert (await c.call_tool("greeter", {"name": "Ann"})).is_error is False
    assert fake.calls == 1


async def test_limits_apply_and_the_sdk_shows_the_429(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    async with http_client(LIMITED) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        first = await c.call_tool("greeter", {"name": "Ann"})
        second = await c.call_tool("greeter", {"name": "Ann"})
        await c.list_tools()  # not an agent call: not counted, not refused
    assert first.is_error is False
    assert second.is_error is True
    err = json.loads(second.content[0].text)["error"]  # type: ignore[union-attr]
    assert err["type"] == "rate_limited"
    assert err["details"] == [{"limit": "requests", "scope": "client", "quota": 1, "window": 60}]
    assert fake.calls == 1
    after = await srv.scrape()
    labels = {"agent": "greeter", "client": "limited"}
    assert delta(before, after, "aiwfd_agent_calls_total", outcome="ok", **labels) == 1
    assert delta(before, after, "aiwfd_agent_calls_total", outcome="rate_limited", **labels) == 1


# -- metrics and the request log -----------------------------------------------------------------


async def test_a_tool_call_is_an_agent_call_in_metrics_and_log(srv: InProcess, fake: FakeOpenAI) -> None:
    before = await srv.scrape()
    lines_before = len(srv.log_lines())
    async with http_client(FRONTEND) as hc, Client(streamable_http_client(srv.url("/mcp"), http_client=hc)) as c:
        await c.call_tool("greeter", {"name": "Ann"})
        await c.call_tool("greeter", {"name": 1})
        with pytest.raises(MCPError):
            await c.call_tool("nobody", {})
    after = await srv.scrape()
    labels = {"agent": "greeter", "client": "frontend"}
    assert delta(before, after, "aiwfd_agent_calls_total", outcome="ok", **labels) == 1
    assert delta(before, after, "aiwfd_agent_calls_total", outcome="invalid_input", **labels) == 1
    assert delta(before, after, "aiwfd_agent_attempts_total", agent="greeter") == 1
    # The route label is the template; an unknown tool adds no agent label.
    assert delta(before, after, "aiwfd_http_requests_total", route="/mcp", method="POST", status="200") >= 4
    assert not any(dict(labels_).get("agent") == "nobody" for _, labels_ in after)
    mcp_lines = [ln for ln in srv.log_lines()[lines_before:] if " POST /mcp " in ln]
    assert any("attempts=1" in ln and "tokens=" in ln and "client=frontend" in ln for ln in mcp_lines)


# -- raw JSON-RPC: what the SDKs never send ------------------------------------------------------


async def test_get_mcp_is_405(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/mcp"), headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
        assert (await r.json())["error"]["type"] == "method_not_allowed"


async def test_initialize_negotiates_the_revision(srv: InProcess) -> None:
    for asked, got in (("2025-06-18", "2025-06-18"), ("2025-11-25", "2025-11-25"), ("2024-11-05", "2025-11-25"),
                       ("2999-01-01", "2025-11-25")):
        params = {"protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        status, headers, doc = await rpc(srv, "initialize", params)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert "Mcp-Session-Id" not in headers  # stateless
        assert doc["id"] == 1 and doc["result"]["protocolVersion"] == got
        assert doc["result"]["serverInfo"] == {"name": "aiwfd", "version": __version__}
        assert doc["result"]["capabilities"] == {"tools": {"listChanged": False}}


async def test_notifications_and_responses_are_202_without_body(srv: InProcess) -> None:
    for method in ("notifications/initialized", "notifications/cancelled", "notifications/whatever"):
        status, _, doc = await rpc(srv, method, rid=None)
        assert (status, doc) == (202, None)
    status, _, doc = await rpc(srv, "", raw=b'{"jsonrpc": "2.0", "id": 7, "result": {}}')
    assert (status, doc) == (202, None)


async def test_json_rpc_errors(srv: InProcess) -> None:
    cases: list[tuple[bytes, int, int]] = [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"', 400, -32700),  # malformed
        (b"", 400, -32700),
        (b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "ping"}', 400, -32700),  # duplicate key
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', 400, -32600),  # a batch
        (b'"ping"', 400, -32600),
        (b'{"id": 1, "method": "ping"}', 400, -32600),  # no jsonrpc
        (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 3}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}', 400, -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "resources/list"}', 200, -32601),
        (b'{"jsonrpc": "2.0", "id": "d", "method": "server/discover"}', 200, -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}', 200, -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}', 200, -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "greeter", "arguments": [1]}}',
         200, -32602),
    ]
    for body, status, code in cases:
        got, headers, doc = await rpc(srv, "", raw=body)
        assert (got, doc["error"]["code"]) == (status, code), (body, doc)
        assert headers["Content-Type"].startswith("application/json")
        assert doc["jsonrpc"] == "2.0" and isinstance(doc["error"]["message"], str)
    _, _, doc = await rpc(srv, "", raw=b'{"jsonrpc": "2.0", "id": "abc", "method": "nope"}')
    assert doc["id"] == "abc"  # the request's id, as sent


async def test_the_protocol_version_header(srv: InProcess) -> None:
    for version in ("2025-06-18", "2025-11-25"):
        status, _, doc = await rpc(srv, "ping", **{"MCP-Protocol-Version": version})
        assert status == 200 and doc["result"] == {}
    status, _, doc = await rpc(srv, "ping", **{"MCP-Protocol-Version": "2026-07-28"})
    assert status == 400 and doc["error"]["code"] == -32600 and doc["id"] == 1
    assert "2025-11-25" in doc["error"]["message"]
    # initialize is the negotiation: its header is not held against it.
    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    status, _, doc = await rpc(srv, "initialize", params, **{"MCP-Protocol-Version": "2026-07-28"})
    assert status == 200 and doc["result"]["protocolVersion"] == "2025-06-18"


async def test_http_checks_come_first(srv: InProcess) -> None:
    status, _, doc = await rpc(srv, "ping", **{"Content-Type": "text/plain"})
    assert status == 415 and doc["error"]["type"] == "unsupported_media_type"
    status, _, doc = await rpc(srv, "ping", Origin="https://evil.example")
    assert status == 403 and doc["error"]["type"] == "forbidden"
    status, _, doc = await rpc(srv, "ping", Origin=srv.base)  # this server's own origin
    assert status == 200
    huge = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + b"a" * (2 << 20) + b'"}}'
    status, _, doc = await rpc(srv, "", raw=huge)
    assert status == 413 and doc["error"]["type"] == "payload_too_large"


# -- the TypeScript SDK --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@modelcontextprotocol" / "sdk")
                    .is_dir(), reason="node or tests/node/node_modules missing (npm ci in tests/node)")
async def test_typescript_client(srv: InProcess, fake: FakeOpenAI) -> None:
    answer = {"message": "Hello, Ann"}
    fake.script(Reply(data=answer), Reply(data={"value": "blue"}))
    proc = await asyncio.create_subprocess_exec(
        "node", "mcp_client.mjs", srv.url("/mcp"), FRONTEND, cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)
    assert seen["unauthenticated"]["code"] == 401, seen["unauthenticated"]
    assert seen["server"] == {"name": "aiwfd", "version": __version__}
    assert seen["capabilities"]["tools"] == {"listChanged": False}
    tools = {t["name"]: t for t in seen["tools"]}
    assert sorted(tools) == ["chat", "color", "greeter", "tags", "team"]
    for name in tools:
        schemas = await agent_schemas(srv, name)
        assert tools[name]["inputSchema"] == schemas["input"]
    assert tools["greeter"]["outputSchema"] == (await agent_schemas(srv, "greeter"))["output"]
    assert tools["color"]["outputSchema"] == wrap((await agent_schemas(srv, "color"))["output"])
    assert seen["ping"] == {}
    assert seen["greeter"]["isError"] is False and seen["greeter"]["structuredContent"] == answer
    assert json.loads(seen["greeter"]["content"][0]["text"]) == answer
    assert seen["color"]["structuredContent"] == {"value": "blue"}
    assert seen["invalid"]["isError"] is True
    assert json.loads(seen["invalid"]["content"][0]["text"])["error"]["type"] == "invalid_input"
    assert seen["unknown"]["code"] == -32602
    # The SDK opens its GET stream after initialize: 405, which it takes as "no stream".
    assert any(" GET /mcp " in ln and "status=405" in ln for ln in srv.log_lines())


# -- load ----------------------------------------------------------------------------------------


@pytest.mark.system  # a load test: the inner loop has test_http_agent's 500 concurrent calls
async def test_500_concurrent_tool_calls(tmp_path: Path) -> None:
    async with FakeOpenAI(latency=0.3) as slow:
        async with serve(write_config(tmp_path, CONFIG), env=env(slow)) as s:
            limits = httpx2.Limits(max_connections=600, max_keepalive_connections=600)
            async with http_client(FRONTEND, limits=limits) as hc, \
                    Client(streamable_http_client(s.url("/mcp"), http_client=hc)) as c:
                await c.list_tools()  # the SDK checks structuredContent against the listed outputSchema
                started = time.monotonic()
                results = await asyncio.gather(*(c.call_tool("greeter", {"name": f"n{i}"}) for i in range(500)))
                elapsed = time.monotonic() - started
            assert all(r.is_error is False and isinstance(r.structured_content, dict) for r in results)
            assert slow.calls == 500
            assert slow.max_inflight >= 50, slow.max_inflight  # concurrent (the provider pool is the bound), not one after another
            assert elapsed < 30, elapsed


# -- the guide's snippet -------------------------------------------------------------------------


def guide_snippet() -> str:
    """The Python block of docs/api.md's MCP section."""
    text = (Path(__file__).resolve().parent.parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    section = text[text.index("\n## MCP\n"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block in docs/api.md's MCP section"
    return m.group(1)


async def test_the_guides_python_snippet_runs(srv: InProcess, fake: FakeOpenAI) -> None:
    fake.script(Reply(data={"message": "Hello, Alice!"}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", guide_snippet(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AIWFD_MCP_URL": srv.url("/mcp"), "AIWFD_KEY": FRONTEND})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["['chat', 'color', 'greeter', 'tags', 'team']",
                                         "{'message': 'Hello, Alice!'}"]


# -- the MCP Inspector's CLI: a third client, when installed -------------------------------------


def inspector() -> str | None:
    """`MCP_INSPECTOR` (the path of its `mcp-inspector` binary), else one on PATH; it is not in
    tests/node's lock file (111 MB with its web UI): `npm install @modelcontextprotocol/inspector`."""
    return os.environ.get("MCP_INSPECTOR") or shutil.which("mcp-inspector")


@pytest.mark.skipif(inspector() is None, reason="no MCP Inspector (set MCP_INSPECTOR to its mcp-inspector binary)")
async def test_inspector_cli(srv: InProcess, fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script(Reply(data={"message": "Hi Ann"}))
    binary = inspector()
    assert binary is not None
    runs = {}
    for method, extra in (("tools/list", []), ("tools/call", ["--tool-name", "greeter", "--tool-arg", "name=Ann"])):
        proc = await asyncio.create_subprocess_exec(
            binary, "--cli", srv.url("/mcp"), "--method", method, *extra,
            "--header", f"Authorization: Bearer {FRONTEND}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HOME": str(tmp_path)})  # it keeps a catalog under ~/.mcp-inspector
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        runs[method] = json.loads(out)
    assert [t["name"] for t in runs["tools/list"]["tools"]] == ["chat", "color", "greeter", "tags", "team"]
    assert runs["tools/call"]["structuredContent"] == {"message": "Hi Ann"}
    assert runs["tools/call"]["isError"] is False
