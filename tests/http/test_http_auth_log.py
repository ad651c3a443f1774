"""Authentication (SPEC §3) and the request log (SPEC §3.2).

Three in-process servers share the module's FakeOpenAI: one open (no
API_KEY), one with API_KEY="k1,k2", one writing the request log as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncIterator

import pytest

from tests.conftest import agents_env, raw_http
from aiwfd.testing.fakeopenai import FakeOpenAI, Reply
from aiwfd.testing.inprocess import InProcess, serve

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
GREETER_LINE = re.compile(
    rf"^{TS} POST /agent/greeter - \S+ status=200 request_id=\S+ attempts=1 tokens=\d+$")
ANY_LINE = re.compile(rf"^{TS} [A-Z]+ \S+ - \S+ status=\d{{3}} request_id=\S+( [a-z_]+=\S+)*$")
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(s|ms|µs)$")


@pytest.fixture(scope="module")
async def open_srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake)) as s:
        yield s


@pytest.fixture(scope="module")
async def keyed_srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    # A long body timeout: a 401 for a body that never comes proves the key is
    # checked first (reading the body would end in a 408 only after 30 s).
    async with serve(agents_config, env=agents_env(fake, API_KEY="k1,k2"), body_timeout=30) as s:
        yield s


@pytest.fixture(scope="module")
async def json_srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake), log_format="json") as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


async def call(srv: InProcess, path: str = "/agent/greeter", body: Any = None,
               headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict[str, str], Any]:
    kw: dict[str, Any] = {"headers": headers or {}}
    if method == "POST":
        kw["json"] = {"name": "Alice"} if body is None else body
    async with srv.session.request(method, srv.url(path), **kw) as r:
        return r.status, dict(r.headers), await r.json()


def new_lines(srv: InProcess, before: int) -> list[str]:
    return srv.log_lines()[before:]


# --------------------------------------------------------------------------
# Authentication


async def test_open_without_api_key(open_srv: InProcess) -> None:
    status, _, doc = await call(open_srv)
    assert status == 200, doc


@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": "k3"},
    {"X-API-Key": "k1,k2"},
    {"X-API-Key": "k"},
    {"X-API-Key": "k1x"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Basic azE6"},
    {"Authorization": "k1"},
], ids=["none", "wrong", "the-whole-list", "prefix", "k1x", "wrong-bearer", "basic", "no-scheme"])
async def test_wrong_or_missing_key_is_401(keyed_srv: InProcess, fake: FakeOpenAI, headers: dict[str, str]) -> None:
    status, resp_headers, doc = await call(keyed_srv, headers=headers)
    assert status == 401, doc
    assert doc["error"]["type"] == "unauthorized"
    assert doc["request_id"] == resp_headers["X-Request-ID"]
    assert fake.calls == 0


@pytest.mark.parametrize("headers", [
    {"X-API-Key": "k2"},
    {"X-API-Key": "k1"},
    {"Authorization": "Bearer k1"},
    {"Authorization": "Bearer k2"},
    {"Authorization": "bearer k1"},
], ids=["x-api-key-k2", "x-api-key-k1", "bearer-k1", "bearer-k2", "lowercase-scheme"])
async def test_right_key_is_200(keyed_srv: InProcess, headers: dict[str, str]) -> None:
    status, _, doc = await call(keyed_srv, headers=headers)
    assert status == 200, doc
    assert doc["trace"]["attempts"] == 1


@pytest.mark.parametrize("path", ["/health", "/agents"])
async def test_health_and_agents_stay_open(keyed_srv: InProcess, path: str) -> None:
    status, _, doc = await call(keyed_srv, path, method="GET")
    assert status == 200, doc


async def test_unknown_agent_needs_the_key_too(keyed_srv: InProcess) -> None:
    status, _, doc = await call(keyed_srv, "/agent/nobody")
    assert status == 401  # no key: no hint about which agents exist
    status, _, doc = await call(keyed_srv, "/agent/nobody", headers={"X-API-Key": "k1"})
    assert status == 404


@pytest.mark.parametrize("key_header", [b"", b"X-API-Key: nope\r\n"], ids=["no-key", "wrong-key"])
async def test_auth_is_checked_before_the_body_is_read(keyed_srv: InProcess, fake: FakeOpenAI,
                                                       key_header: bytes) -> None:
    head = (b"POST /agent/greeter HTTP/1.1\r\nHost: 127.0.0.1\r\n" + key_header
            + b"Content-Type: application/json\r\nContent-Length: 50")
    r = await raw_http(keyed_srv.server.port, head, b"", wait=5.0)  # the body never comes
    assert r.status == 401
    assert json.loads(r.body)["error"]["type"] == "unauthorized"
    assert fake.calls == 0


# --------------------------------------------------------------------------
# The request log (text)


async def test_log_line_of_a_call(open_srv: InProcess) -> None:
    before = len(open_srv.log_lines())
    status, headers, doc = await call(open_srv)
    assert status == 200
    lines = new_lines(open_srv, before)
    assert len(lines) == 1
    line = lines[0]
    assert GREETER_LINE.match(line), line
    fields = dict(f.split("=", 1) for f in line.split()[5:])
    assert fields["request_id"] == headers["X-Request-ID"] == doc["trace"]["request_id"]
    assert int(fields["tokens"]) == doc["trace"]["usage"]["total"]
    assert GO_DURATION.match(line.split()[4]), line


async def test_one_line_per_request(open_srv: InProcess) -> None:
    before = len(open_srv.log_lines())
    ids = []
    for path, method in [("/health", "GET"), ("/agents", "GET"), ("/agent/greeter", "POST"),
                         ("/agent/nobody", "POST"), ("/nope", "GET"), ("/agent/greeter", "GET")]:
        async with open_srv.session.request(method, open_srv.url(path), json={"name": "A"}) as r:
            await r.read()
            ids.append((method, path, r.status, r.headers["X-Request-ID"]))
    lines = new_lines(open_srv, before)
    assert len(lines) == len(ids)
    for line, (method, path, status, rid) in zip(lines, ids):
        assert ANY_LINE.match(line), line
        assert line.split()[1:3] == [method, path]
        assert f" status={status} request_id={rid}" in line


async def test_error_line_names_the_error(open_srv: InProcess) -> None:
    before = len(open_srv.log_lines())
    status, _, doc = await call(open_srv, body={"name": ""})
    assert status == 422
    (line,) = new_lines(open_srv, before)
    assert re.match(rf"^{TS} POST /agent/greeter - \S+ status=422 request_id={doc['request_id']}\b", line), line
    assert "error=invalid_input" in line


@pytest.mark.parametrize("raw_path, escaped", [
    (b"/agent/x%0d%0aFAKE", "/agent/x\\x0d\\x0aFAKE"),
    (b"/agent/x%0aFAKE%20status=200", "/agent/x\\x0aFAKE\\x20status=200"),
    (b"/x%1b[31mred%00", "/x\\x1b[31mred\\x00"),
])
async def test_control_characters_are_escaped(open_srv: InProcess, raw_path: bytes, escaped: str) -> None:
    before = len(open_srv.log_lines())
    head = b"POST " + raw_path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2"
    r = await raw_http(open_srv.server.port, head, b"{}")
    assert r.status == 404
    raw = open_srv.log.getvalue()
    assert "\r" not in raw and "\x1b" not in raw and "\x00" not in raw
    lines = new_lines(open_srv, before)
    assert len(lines) == 1
    assert ANY_LINE.match(lines[0]), lines[0]
    assert lines[0].split()[2] == escaped
    for line in open_srv.log_lines():  # no forged line anywhere
        assert re.match(rf"^{TS} ", line), line


async def test_no_body_output_or_key_in_the_logs(keyed_srv: InProcess, fake: FakeOpenAI,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    before = len(keyed_srv.log_lines())
    secrets = ["BODY-MARKER-91", "OUTPUT-MARKER-73", "WRONG-KEY-55", "k1", "k2"]
    with caplog.at_level(logging.DEBUG):
        fake.script(Reply(data={"message": "OUTPUT-MARKER-73"}))
        status, _, doc = await call(keyed_srv, body={"name": "BODY-MARKER-91"}, headers={"X-API-Key": "k2"})
        assert status == 200 and doc["data"]["message"] == "OUTPUT-MARKER-73"
        fake.script(Reply(data={"message": "OUTPUT-MARKER-73"}))
        status, _, _ = await call(keyed_srv, body={"name": "BODY-MARKER-91"}, headers={"Authorization": "Bearer k1"})
        assert status == 200
        status, _, _ = await call(keyed_srv, body={"name": "BODY-MARKER-91"}, headers={"X-API-Key": "WRONG-KEY-55"})
        assert status == 401
        status, _, _ = await call(keyed_srv, body={"name": "BODY-MARKER-91", "x": 1},
                                  headers={"X-API-Key": "k1"})
        assert status == 422
        fake.script(*[Reply(data={"message": 1, "why": "OUTPUT-MARKER-73"})] * 3)
        status, _, _ = await call(keyed_srv, body={"name": "BODY-MARKER-91"}, headers={"X-API-Key": "k1"})
        assert status == 502
    lines = new_lines(keyed_srv, before)
    assert len(lines) == 5
    logged = "\n".join(lines) + "\n" + caplog.text
    for secret in secrets:
        assert secret not in logged, secret
    assert "sk-test-openai-key" not in logged


async def test_malformed_request_does_not_log_its_bytes(keyed_srv: InProcess,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp rejects a control character in a header before our middleware
    runs; its message quotes the header, which must not reach the log."""
    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection("127.0.0.1", keyed_srv.server.port)
        writer.write(b"POST /agent/greeter HTTP/1.1\r\nHost: x\r\n"
                     b"X-API-Key: LEAKED-KEY-31\x01\r\nContent-Length: 2\r\n\r\n{}")
        answer = await reader.read()  # aiohttp answers and closes
        writer.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request"), answer[:80]
    assert "LEAKED-KEY-31" not in caplog.text
    assert "malformed HTTP request" in caplog.text
    # The server goes on answering.
    status, _, _ = await call(keyed_srv, headers={"X-API-Key": "k1"})
    assert status == 200


# --------------------------------------------------------------------------
# The request log (JSON)


async def test_json_log(json_srv: InProcess) -> None:
    before = len(json_srv.log_lines())
    status, headers, doc = await call(json_srv)
    assert status == 200
    status404, headers404, _ = await call(json_srv, "/agent/nobody")
    lines = new_lines(json_srv, before)
    assert len(lines) == 2
    ok, missing = (json.loads(line) for line in lines)
    assert re.fullmatch(TS, ok["time"])
    assert ok["method"] == "POST" and ok["path"] == "/agent/greeter"
    assert ok["status"] == 200
    assert ok["request_id"] == headers["X-Request-ID"]
    assert ok["attempts"] == 1
    assert ok["tokens"] == doc["trace"]["usage"]["total"]
    assert GO_DURATION.match(ok["duration"])
    assert "error" not in ok
    assert missing["status"] == 404 and missing["error"] == "not_found"
    assert missing["request_id"] == headers404["X-Request-ID"]


async def test_json_log_escapes_control_characters(json_srv: InProcess) -> None:
    before = len(json_srv.log_lines())
    head = b"POST /agent/x%0d%0aFAKE HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2"
    r = await raw_http(json_srv.server.port, head, b"{}")
    assert r.status == 404
    lines = new_lines(json_srv, before)
    assert len(lines) == 1
    assert json.loads(lines[0])["path"] == "/agent/x\r\nFAKE"
    for line in json_srv.log_lines():
        json.loads(line)
