"""The error contract (SPEC §3.1), enforced in one table.

Every case is sent as raw bytes on its own connection (so that nothing a
client library normalises gets in the way) and must answer exactly its status
and `type`, in exactly the shape
`{"error": {"type", "message", "details": [...]}, "request_id"}`, with an
`X-Request-ID` header equal to the body's request id; never a 500; and the
server must answer a good request afterwards. The one deliberate 500 is a
separate test at the end.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest

from aiwfd.http import views
from tests.conftest import RawResponse, agents_env, raw_http
from aiwfd.testing.fakeopenai import FakeOpenAI, Hang, Status, Violate
from aiwfd.testing.inprocess import InProcess, serve

API_KEY = "good-key"
MAX_BODY = 16384
GOOD = b'{"name":"Alice"}'
SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


@pytest.fixture(scope="module")
async def srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake, API_KEY=API_KEY),
                     body_timeout=0.5, max_body=MAX_BODY) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


def request(method: str = "POST", path: str = "/agent/greeter", body: bytes = GOOD, *,
            content_type: str | None = "application/json", key: str | bytes | None = API_KEY,
            headers: tuple[bytes, ...] = (), length: int | None = None, chunked: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 request; `length` overrides Content-Length."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type.encode())
    if key is not None:
        lines.append(b"X-API-Key: " + (key.encode() if isinstance(key, str) else key))
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(body, 1000)) + b"0\r\n\r\n"
    elif method != "GET" or body:
        lines.append(b"Content-Length: %d" % (len(body) if length is None else length))
    lines.extend(headers)
    return b"\r\n".join(lines), body


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def nested(depth: int) -> bytes:
    return b'{"name":"Alice","x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@dataclass
class Case:
    id: str
    req: tuple[bytes, bytes]
    status: int
    type: str
    script: tuple[Any, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)  # expected response headers
    details: Any = None  # expected details, when it matters


CASES = [
    # 400: not JSON, or not a JSON object
    Case("not-json", request(body=b'{"name": '), 400, "invalid_json"),
    Case("invalid-utf8", request(body=b'{"name":"Al\xffice"}'), 400, "invalid_json"),
    Case("latin1-charset", request(body=b'{"name":"Alice"}', content_type="application/json; charset=latin-1"),
         400, "invalid_json"),
    Case("nan", request(body=b'{"name":"Alice","x":NaN}'), 400, "invalid_json"),
    Case("infinity", request(body=b'{"name":"Alice","x":Infinity}'), 400, "invalid_json"),
    Case("minus-infinity", request(body=b'{"name":"Alice","x":-Infinity}'), 400, "invalid_json"),
    Case("1e400", request(body=b'{"name":"Alice","x":1e400}'), 400, "invalid_json"),
    Case("duplicate-keys", request(body=b'{"name":"Alice","name":"Bob"}'), 400, "invalid_json"),
    Case("nested-65", request(body=nested(65)), 400, "invalid_json"),
    Case("5000-digit-int", request(body=b'{"name":"Alice","x":' + b"7" * 5000 + b"}"), 400, "invalid_json"),
    Case("array-body", request(body=b'[{"name":"Alice"}]'), 400, "invalid_json"),
    Case("string-body", request(body=b'"Alice"'), 400, "invalid_json"),
    Case("empty-body", request(body=b""), 400, "invalid_json"),
    Case("trailing-data", request(body=b'{"name":"Alice"} {}'), 400, "invalid_json"),
    Case("lone-surrogate", request(body=b'{"name":"\\ud800"}'), 400, "invalid_json"),
    # 401
    Case("no-key", request(key=None), 401, "unauthorized"),
    Case("wrong-key", request(key="bad-key"), 401, "unauthorized"),
    Case("wrong-bearer", request(key=None, headers=(b"Authorization: Bearer bad-key",)), 401, "unauthorized"),
    Case("non-ascii-key", request(key=b"g\xc3\xb6\xc3\xb6d-key"), 401, "unauthorized"),
    Case("latin1-byte-key", request(key=b"good-key\xff"), 401, "unauthorized"),
    # 404
    Case("unknown-agent", request(path="/agent/nobody"), 404, "not_found"),
    Case("unknown-path", request("GET", "/nope", b""), 404, "not_found"),
    Case("crlf-in-path", request(path="/agent/x%0d%0aFAKE"), 404, "not_found"),
    Case("long-agent-name", request(path="/agent/" + "a" * 300), 404, "not_found"),
    Case("agent-subpath", request(path="/agent/greeter/nope"), 404, "not_found"),
    # 405
    Case("get-agent", request("GET", "/agent/greeter", b""), 405, "method_not_allowed", headers={"allow": "POST"}),
    # 408: 10 of 100 bytes, then nothing (body_timeout 0.5 s)
    Case("stalled-body", request(body=b'{"name":"A', length=100), 408, "request_timeout"),
    # 413
    Case("content-length-over-limit", request(body=b"", length=MAX_BODY + 1), 413, "payload_too_large"),
    Case("huge-content-length", request(body=b"", length=10**15), 413, "payload_too_large"),
    Case("chunked-over-limit",
         request(body=b'{"name":"' + b"a" * (MAX_BODY + 100) + b'"}', chunked=True), 413, "payload_too_large"),
    # 415
    Case("text-plain", request(content_type="text/plain"), 415, "unsupported_media_type"),
    Case("form", request(content_type="application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    # 422
    Case("input-schema", request(body=b'{"name":"","language":"xx","nmae":"A"}'), 422, "invalid_input",
         details=[{"path": "language", "message": "must be one of: en, fr, de"},
                  {"path": "name", "message": "must be at least 1 characters long"},
                  {"path": "nmae", "message": "unknown field (did you mean 'name'?)"}]),
    Case("missing-field", request(body=b"{}"), 422, "invalid_input",
         details=[{"path": "name", "message": "required field is missing"}]),
    # provider failures
    Case("rate-limited", request(), 429, "rate_limited", script=(Status(429, retry_after=0),) * 3),
    Case("upstream-error", request(path="/agent/twice"), 502, "upstream_error", script=(Status(500),) * 2),
    Case("invalid-output", request(path="/agent/twice"), 502, "invalid_output", script=(Violate(),) * 2),
    Case("unavailable", request(path="/agent/unreachable"), 503, "unavailable"),
    Case("upstream-timeout", request(path="/agent/slow"), 504, "upstream_timeout", script=(Hang(5),)),
]


def check_error_shape(r: RawResponse, status: int, type_: str) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"].startswith("application/json")
    doc = json.loads(r.body)
    assert set(doc) == {"error", "request_id"}, doc
    assert set(doc["error"]) == {"type", "message", "details"}, doc
    assert doc["error"]["type"] == type_
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert isinstance(doc["error"]["details"], list)
    assert r.headers["x-request-id"] == doc["request_id"]
    assert SANE_ID.match(doc["request_id"])
    return doc


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_error_table(srv: InProcess, fake: FakeOpenAI, case: Case) -> None:
    fake.script(*case.script)
    head, body = case.req
    r = await raw_http(srv.server.port, head, body)
    doc = check_error_shape(r, case.status, case.type)
    for name, value in case.headers.items():
        assert r.headers[name] == value
    if case.status == 429:
        assert int(r.headers["retry-after"]) >= 1
    if case.status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    if case.details is not None:
        assert sorted(doc["error"]["details"], key=lambda d: d["path"]) == case.details
    for d in doc["error"]["details"]:
        assert set(d) == {"path", "message"}
    assert API_KEY not in r.body.decode("utf-8", "replace")
    assert b"Traceback" not in r.body
    # The server is still fine.
    fake.reset()
    good = await raw_http(srv.server.port, *request())
    assert good.status == 200, good.body
    assert set(json.loads(good.body)) == {"data", "trace"}


async def test_the_table_covers_every_error_of_the_spec() -> None:
    spec = {(400, "invalid_json"), (401, "unauthorized"), (404, "not_found"), (405, "method_not_allowed"),
            (408, "request_timeout"), (413, "payload_too_large"), (415, "unsupported_media_type"),
            (422, "invalid_input"), (429, "rate_limited"), (502, "upstream_error"), (502, "invalid_output"),
            (503, "unavailable"), (504, "upstream_timeout")}
    assert {(c.status, c.type) for c in CASES} == spec  # and 500 below


async def test_oversize_content_length_is_refused_before_the_body(srv: InProcess) -> None:
    """413 arrives while the client is still holding back the body."""
    head, _ = request(body=b"", length=MAX_BODY * 1000)
    r = await raw_http(srv.server.port, head, b'{"name":"')
    check_error_shape(r, 413, "payload_too_large")
    assert r.headers.get("connection", "").lower() == "close"


# --------------------------------------------------------------------------
# Request ids


@pytest.mark.parametrize("path, body, status", [
    ("/agent/greeter", GOOD, 200),
    ("/agent/greeter", b"{", 400),
    ("/agent/nobody", GOOD, 404),
])
async def test_sane_request_id_is_echoed(srv: InProcess, path: str, body: bytes, status: int) -> None:
    rid = "client-req.42:abc/DEF+1="
    r = await raw_http(srv.server.port, *request(path=path, body=body, headers=(b"X-Request-ID: " + rid.encode(),)))
    assert r.status == status
    assert r.headers["x-request-id"] == rid
    doc = json.loads(r.body)
    assert (doc["trace"]["request_id"] if status == 200 else doc["request_id"]) == rid


@pytest.mark.parametrize("rid", [b"a" * 200, b"has space", b"semi;colon", b"caf\xc3\xa9", b""])
async def test_insane_request_id_is_replaced(srv: InProcess, rid: bytes) -> None:
    r = await raw_http(srv.server.port, *request(body=b"{", headers=(b"X-Request-ID: " + rid,)))
    doc = check_error_shape(r, 400, "invalid_json")
    assert doc["request_id"].encode() != rid.strip()
    assert SANE_ID.match(doc["request_id"])


async def test_request_ids_are_unique(srv: InProcess) -> None:
    ids = set()
    for _ in range(20):
        async with srv.session.get(srv.url("/health")) as r:
            ids.add(r.headers["X-Request-ID"])
    assert len(ids) == 20


# --------------------------------------------------------------------------
# 500: a bug (there is no honest way to make aiwfd raise; pretend one)


async def test_internal_error(srv: InProcess, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("deliberate bug with secret detail sk-test-openai-key")

    monkeypatch.setattr(views, "call_agent", broken)
    with caplog.at_level(logging.ERROR, logger="aiwfd"):
        r = await raw_http(srv.server.port, *request(headers=(b"X-Request-ID: bug-1",)))
    doc = check_error_shape(r, 500, "internal_error")
    assert doc["request_id"] == "bug-1"
    assert doc["error"]["details"] == []
    text = r.body.decode()
    assert "deliberate bug" not in text and "Traceback" not in text and "sk-test" not in text
    assert "RuntimeError" not in text
    records = [rec for rec in caplog.records if rec.exc_info and "bug-1" in rec.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info[0] is RuntimeError
    assert getattr(records[0], "request_id", None) == "bug-1"
    assert any("status=500 request_id=bug-1" in line for line in srv.log_lines())
    monkeypatch.undo()
    good = await raw_http(srv.server.port, *request())
    assert good.status == 200
