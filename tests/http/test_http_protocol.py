"""What reaches the daemon below the JSON layer (issue 12, items 3-6; SPEC §3.1).

* What aiohttp's HTTP parser rejects is answered in the JSON error shape with
  the right status, an `X-Request-ID`, a request-log line, and nothing of
  the request quoted back (a header may hold a key).
* Compressed bodies: gzip and deflate are limited by their decompressed size
  and invalid data is a 400; any other coding is a 415; on every agent endpoint.
* `Expect: 100-continue` is answered `100 Continue` only after the header checks.
* A request head must arrive within --header-timeout, an idle keep-alive
  connection is closed after --keepalive-timeout.

Everything is sent as raw bytes over a real socket to the real server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any, AsyncIterator

import pytest

from aiwfd.spec import patches
from tests.conftest import agents_env
from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.inprocess import InProcess, serve

API_KEY = "k-one"
MAX_BODY = 65536
# Short, and waited out on purpose by the timeout tests (each waits a few of them);
# the keep-alive timeout is three header timeouts, so the two stay apart.
HEADER_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 1.5
SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
GOOD = b'{"name":"Alice"}'


@pytest.fixture(scope="module")
async def srv(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    async with serve(agents_config, env=agents_env(fake, API_KEY=API_KEY), max_body=MAX_BODY,
                     body_timeout=2.0, header_timeout=HEADER_TIMEOUT,
                     keepalive_timeout=KEEPALIVE_TIMEOUT) as s:
        yield s


@pytest.fixture(scope="module")
async def long_keepalive(fake: FakeOpenAI, agents_config: Any) -> AsyncIterator[InProcess]:
    """The same server with the production keep-alive timeout (75 s): whatever closes a
    connection within a few seconds here is the header timeout, not aiohttp's idle timer."""
    async with serve(agents_config, env=agents_env(fake, API_KEY=API_KEY), max_body=MAX_BODY,
                     body_timeout=2.0, header_timeout=HEADER_TIMEOUT) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes


class Conn:
    """One raw connection: write bytes, read whole responses (interim 1xx included)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, wait: float = 10.0) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), wait)
        lines = head.decode("latin-1").split("\r\n")
        assert re.match(r"HTTP/1\.[01] \d{3}", lines[0]), lines[0]
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), wait) if n else b""
        return Answer(int(lines[0].split()[1]), headers, body, head)

    async def closed(self, wait: float) -> bool:
        """True when the server closes the connection within `wait` seconds (EOF or reset)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), wait):
                pass
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def exchange(port: int, data: bytes) -> Answer:
    conn = await Conn.open(port)
    try:
        await conn.send(data)
        return await conn.answer()
    finally:
        await conn.close()


def post(path: str = "/agent/greeter", body: bytes = GOOD, *extra: bytes, key: bytes = API_KEY.encode(),
         length: int | None = None) -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"X-API-Key: " + key, b"Content-Length: %d" % (len(body) if length is None else length), *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def check_shape(a: Answer, status: int, type_: str) -> dict[str, Any]:
    assert a.status == status, (a.status, a.raw_head, a.body)
    assert a.headers["content-type"].startswith("application/json"), a.headers
    doc = json.loads(a.body)
    assert set(doc) == {"error", "request_id"}, doc
    assert set(doc["error"]) == {"type", "message", "details"}, doc
    assert doc["error"]["type"] == type_, doc
    assert doc["error"]["message"]
    assert a.headers["x-request-id"] == doc["request_id"]
    assert SANE_ID.match(doc["request_id"])
    return doc


async def healthy(srv: InProcess) -> None:
    a = await exchange(srv.server.port, post())
    assert a.status == 200, a.body
    assert set(json.loads(a.body)) == {"data", "trace"}


# --------------------------------------------------------------------------- what the parser rejects

@dataclass
class Attack:
    id: str
    data: bytes
    status: int
    type: str
    secret: bytes  # bytes of the request that must not come back
    headers: tuple[tuple[str, str], ...] = ()


HEAD = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
ATTACKS = [
    Attack("nul-in-api-key", b"POST /agent/greeter HTTP/1.1\r\n" + HEAD + b"X-API-Key: k-one\x00\r\n"
           b"Content-Length: 16\r\n\r\n" + GOOD, 400, "invalid_request", b"k-one"),
    Attack("content-length-1e20", b"POST /agent/greeter HTTP/1.1\r\n" + HEAD +
           b"Content-Length: 100000000000000000000\r\n\r\n", 413, "payload_too_large", b"100000000000000000000"),
    Attack("negative-content-length", b"POST /agent/greeter HTTP/1.1\r\n" + HEAD +
           b"Content-Length: -16\r\n\r\n" + GOOD, 400, "invalid_request", b"-16"),
    Attack("unknown-method", b"FOO /agent/greeter HTTP/1.1\r\n" + HEAD + b"\r\n", 405, "method_not_allowed",
           b"FOO", headers=(("allow", "GET, HEAD, POST"),)),
    Attack("non-ascii-path", b"GET /agent/\xff\xfeevil HTTP/1.1\r\n" + HEAD + b"\r\n", 404, "not_found", b"evil"),
    Attack("10k-header-line", b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Pad: " + b"s3cr3t" * 1700 + b"\r\n\r\n",
           431, "headers_too_large", b"s3cr3t"),
    Attack("5000-headers", b"GET /health HTTP/1.1\r\n" + HEAD +
           b"".join(b"X-H%d: s3cr3t\r\n" % i for i in range(5000)) + b"\r\n", 431, "headers_too_large", b"s3cr3t"),
    Attack("10k-request-line", b"GET /" + b"s3cr3t" * 1700 + b" HTTP/1.1\r\n" + HEAD + b"\r\n",
           414, "uri_too_long", b"s3cr3t"),
    Attack("brotli-garbage", post("/agent/greeter", b"s3cr3t-not-brotli", b"Content-Encoding: br"), 415,
           "unsupported_media_type", b"s3cr3t"),
    Attack("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03s3cr3t" + b"\x00" * 40, 400,
           "invalid_request", b"s3cr3t"),
    Attack("bad-http-version", b"GET /health HTTP/9.9\r\n" + HEAD + b"X-S: s3cr3t\r\n\r\n", 400,
           "invalid_request", b"s3cr3t"),
    Attack("not-http", b"s3cr3t\r\n\r\n", 400, "invalid_request", b"s3cr3t"),
    Attack("space-in-header-name", b"GET /health HTTP/1.1\r\n" + HEAD + b"X s3cr3t: 1\r\n\r\n", 400,
           "invalid_request", b"s3cr3t"),
    Attack("chunked-and-length", b"POST /agent/greeter HTTP/1.1\r\n" + HEAD + b"X-API-Key: k-one\r\n"
           b"Transfer-Encoding: chunked\r\nContent-Length: 16\r\n\r\n" + GOOD, 400, "invalid_request", b"k-one"),
    # The parser's message quotes the request: a header must not steer the answer.
    Attack("reason-in-a-header-value", b"GET /health HTTP/1.1\r\n" + HEAD +
           b"X-S: Content-Length overflow Too many headers\x7f\r\n\r\n", 400, "invalid_request", b"overflow"),
    Attack("missing-host", b"GET /health HTTP/1.1\r\nX-S: s3cr3t\r\n\r\n", 400, "invalid_request", b"s3cr3t"),
    Attack("bad-chunk-size", b"POST /agent/greeter HTTP/1.1\r\n" + HEAD + b"X-API-Key: k-one\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nzz-s3cr3t\r\n", 400, "invalid_request", b"s3cr3t"),
]


@pytest.mark.parametrize("round_", [1, 2, 3])
async def test_parser_rejections_are_json_errors(srv: InProcess, round_: int) -> None:
    """The catalogue of the attack (issue 12, item 5), three times over; healthy after each."""
    for attack in ATTACKS:
        mark = len(srv.log_lines())
        a = await exchange(srv.server.port, attack.data)
        doc = check_shape(a, attack.status, attack.type)
        for name, value in attack.headers:
            assert a.headers[name] == value, attack.id
        assert attack.secret not in a.raw_head + a.body, attack.id
        assert b"Traceback" not in a.body
        # One request-log line, under the answer's request id.
        assert any(f"request_id={doc['request_id']}" in line and f"status={attack.status}" in line
                   for line in srv.log_lines()[mark:]), (attack.id, srv.log_lines()[mark:])
        assert all(attack.secret.decode("latin-1") not in line for line in srv.log_lines()), attack.id
        await healthy(srv)


async def test_a_known_method_on_the_wrong_path_is_405_with_its_allow(srv: InProcess) -> None:
    """Methods the parser accepts reach the catch-all route: 405 with the path's own `Allow`."""
    a = await exchange(srv.server.port, b"PATCH /agent/greeter HTTP/1.1\r\n" + HEAD + b"Content-Length: 0\r\n\r\n")
    check_shape(a, 405, "method_not_allowed")
    assert a.headers["allow"] == "POST"
    a = await exchange(srv.server.port, b"PURGE /nowhere HTTP/1.1\r\n" + HEAD + b"\r\n")
    check_shape(a, 404, "not_found")


# --------------------------------------------------------------------------- compressed bodies

def padded(n: int) -> bytes:
    """A valid GreetingRequest of about `n` bytes: JSON whitespace compresses to almost nothing."""
    return b'{"name":"Alice"' + b" " * n + b"}"


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENDPOINTS = ["/agent/greeter", "/agent/greeter/stream", "/agent/greeter/batch"]


def body_for(path: str, raw: bytes) -> bytes:
    """`raw` (one GreetingRequest's JSON) as the body the endpoint takes."""
    return b'{"inputs":[' + raw + b"]}" if path.endswith("/batch") else raw


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("coding, compress", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", deflate_raw),
    ("GZip", gzip.compress), ("identity", lambda b: b),
])
async def test_compressed_bodies_are_read_whole(srv: InProcess, path: str, coding: str, compress: Any) -> None:
    """A body decompressing to ~60 KB from a few hundred bytes: read whole, not cut at the compressed size."""
    raw = body_for(path, padded(MAX_BODY - 200))
    data = compress(raw)
    a = await exchange(srv.server.port, post(path, data, b"Content-Encoding: " + coding.encode(),
                                             b"Connection: close"))
    assert a.status == 200, (a.status, a.body[:300])


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("case, coding, data, status, type_", [
    ("over-limit", b"gzip", gzip.compress(padded(400_000)), 413, "payload_too_large"),
    ("bomb", b"gzip", gzip.compress(b" " * (50 << 20)), 413, "payload_too_large"),
    ("deflate-over-limit", b"deflate", zlib.compress(padded(400_000)), 413, "payload_too_large"),
    ("not-gzip", b"gzip", b'{"name":"Alice"}', 400, "invalid_json"),
    ("not-deflate", b"deflate", b"\xff\xfe definitely not deflate", 400, "invalid_json"),
    ("truncated-gzip", b"gzip", gzip.compress(GOOD)[:-12], 400, "invalid_json"),
    ("garbage-after-gzip", b"gzip", gzip.compress(GOOD) + b"junk", 400, "invalid_json"),
    ("brotli", b"br", b"\x1b\x0f\x00\xf8", 415, "unsupported_media_type"),
    ("compress", b"compress", b"\x1f\x9d", 415, "unsupported_media_type"),
    ("two-codings", b"gzip, gzip", gzip.compress(gzip.compress(GOOD)), 415, "unsupported_media_type"),
])
async def test_compressed_body_errors(srv: InProcess, path: str, case: str, coding: bytes, data: bytes,
                                      status: int, type_: str) -> None:
    a = await exchange(srv.server.port, post(path, data, b"Content-Encoding: " + coding, b"Connection: close"))
    check_shape(a, status, type_)
    await healthy(srv)


async def test_a_body_of_many_empty_gzip_members_is_refused(srv: InProcess) -> None:
    """50,000 empty members took 1.4 s of the event loop to inflate: more than 64 are a 400."""
    data = gzip.compress(GOOD) + gzip.compress(b"") * 3000
    a = await exchange(srv.server.port, post("/agent/greeter", data, b"Content-Encoding: gzip"))
    check_shape(a, 400, "invalid_json")


async def test_two_gzip_members_are_one_body(srv: InProcess) -> None:
    """RFC 1952 lets a gzip stream hold several members; their contents are concatenated."""
    data = gzip.compress(b'{"name":') + gzip.compress(b'"Alice"}')
    a = await exchange(srv.server.port, post("/agent/greeter", data, b"Content-Encoding: gzip"))
    assert a.status == 200, a.body


# --------------------------------------------------------------------------- Expect: 100-continue

def expecting(path: str = "/agent/greeter", length: int = len(GOOD), *extra: bytes,
              key: bytes = API_KEY.encode(), ctype: bytes = b"application/json") -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: " + ctype,
             b"X-API-Key: " + key, b"Content-Length: %d" % length, b"Expect: 100-continue", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("case, head, status, type_", [
    ("wrong-key", expecting(key=b"nope"), 401, "unauthorized"),
    ("unknown-agent", expecting("/agent/nobody"), 404, "not_found"),
    ("unknown-path", expecting("/nowhere"), 404, "not_found"),
    ("get-only-path", expecting("/health"), 405, "method_not_allowed"),
    ("too-large", expecting(length=MAX_BODY + 1), 413, "payload_too_large"),
    ("not-json", expecting(ctype=b"text/plain"), 415, "unsupported_media_type"),
    ("brotli", expecting("/agent/greeter", 4, b"Content-Encoding: br"), 415, "unsupported_media_type"),
    ("stream-wrong-key", expecting("/agent/greeter/stream", key=b"nope"), 401, "unauthorized"),
    ("batch-too-large", expecting("/agent/greeter/batch", MAX_BODY + 1), 413, "payload_too_large"),
    ("malformed-idempotency-key", expecting("/agent/greeter", len(GOOD), b'Idempotency-Key: "a b'),
     400, "invalid_request"),
    ("batch-two-idempotency-keys", expecting("/agent/greeter/batch", 4, b"Idempotency-Key: a",
                                             b"Idempotency-Key: b"), 400, "invalid_request"),
])
async def test_no_100_continue_before_a_refusal(srv: InProcess, case: str, head: bytes, status: int,
                                                type_: str) -> None:
    """The client never gets an invitation to upload a body that will be refused; the
    connection then closes, since the body it held back cannot be told from a next request."""
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(head)
        a = await conn.answer()
        check_shape(a, status, type_)
        assert a.headers.get("connection", "").lower() == "close"
        assert await conn.closed(5.0)
    finally:
        await conn.close()


@pytest.mark.parametrize("path, body", [
    ("/agent/greeter", GOOD), ("/agent/greeter/stream", GOOD),
    ("/agent/greeter/batch", b'{"inputs":[{"name":"Alice"}]}'),
])
async def test_100_continue_once_the_headers_pass(srv: InProcess, path: str, body: bytes) -> None:
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(expecting(path, len(body), b"Connection: close"))
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(body)
        final = await asyncio.wait_for(conn.reader.read(), 10)
        assert final.startswith(b"HTTP/1.1 200 "), final[:200]
    finally:
        await conn.close()


async def test_a_refused_body_sent_without_waiting_is_read_and_answered(srv: InProcess) -> None:
    """Clients that send the body at once (Go's default, curl after 1 s) are not reset:
    aiohttp's lingering read takes the body, and the client reads its 401."""
    body = b'{"name":"' + b"a" * 60000 + b'"}'
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(expecting(length=len(body), key=b"nope") + body)
        check_shape(await conn.answer(), 401, "unauthorized")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- header and keep-alive timeouts

async def test_a_connection_that_sends_nothing_is_closed(long_keepalive: InProcess) -> None:
    conn = await Conn.open(long_keepalive.server.port)
    try:
        assert await conn.closed(HEADER_TIMEOUT + 5)
    finally:
        await conn.close()


async def test_a_trickled_head_gets_408_and_is_closed(srv: InProcess) -> None:
    """One byte every 0.2 s: a head that would take ~6 s is cut at the header timeout."""
    head = post()[:30]
    conn = await Conn.open(srv.server.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        sent = 0
        while sent < len(head):
            await conn.send(head[sent:sent + 1])
            sent += 1
            try:
                data = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 0.2)
            except asyncio.TimeoutError:
                continue
            break
        else:
            pytest.fail("the whole trickled head was sent and nothing came back")
        assert sent < len(head), "closed only after the whole head arrived"
        status = data.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 408"), status
        rest = await asyncio.wait_for(conn.reader.read(), 5)
        doc = json.loads(rest)
        assert doc["error"]["type"] == "request_timeout"
        assert loop.time() - started < HEADER_TIMEOUT + 3
    finally:
        await conn.close()
    await healthy(srv)


async def test_keep_alive_idle_and_second_head_timeouts(srv: InProcess) -> None:
    """After an answer the connection may idle --keepalive-timeout; the next head, once
    begun, must be complete within --header-timeout."""
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(post())
        assert (await conn.answer()).status == 200
        # Idle: open past the header timeout, closed by the keep-alive timeout.
        assert not await conn.closed(HEADER_TIMEOUT + 0.2)
        assert await conn.closed(KEEPALIVE_TIMEOUT + 5)
    finally:
        await conn.close()
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(post())
        assert (await conn.answer()).status == 200
        await conn.send(b"POST /agent/gre")  # the next head begins, and stalls
        a = await conn.answer(HEADER_TIMEOUT + 5)
        check_shape(a, 408, "request_timeout")
        assert await conn.closed(5)
    finally:
        await conn.close()


async def test_a_slow_body_is_not_cut_by_the_header_timeout(srv: InProcess) -> None:
    """The head is complete: the body has --body-timeout (2 s here), not the header timeout."""
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(post("/agent/greeter", b"", length=len(GOOD)))
        await asyncio.sleep(HEADER_TIMEOUT + 0.3)  # deliberately slower than the header timeout
        await conn.send(GOOD)
        assert (await conn.answer()).status == 200
    finally:
        await conn.close()


# --------------------------------------------------------------------------- a bug in the stream

async def test_a_bug_in_the_patch_parser_is_logged_and_costs_no_answer(
        srv: InProcess, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: Any, value: Any) -> Any:
        raise RuntimeError("boom")

    # The one injected bug: a parser whose every value fails.
    monkeypatch.setattr(patches.PatchParser, "_put", broken)
    with caplog.at_level(logging.ERROR, logger="aiwfd"):
        conn = await Conn.open(srv.server.port)
        try:
            await conn.send(post("/agent/greeter/stream", GOOD, b"Connection: close"))
            a = await conn.answer()
            events = await asyncio.wait_for(conn.reader.read(), 10)  # the whole stream
        finally:
            await conn.close()
    assert a.status == 200 and b"event: result" in events and b"event: patch" not in events, events[-300:]
    assert events.count(b"event: delta") > 1, events
    rid = a.headers["x-request-id"]
    assert sum("into patches" in r.getMessage() and rid in r.getMessage() and r.exc_info is not None
               for r in caplog.records) == 1, caplog.text


async def test_a_body_left_unread_does_not_arm_the_header_timer(long_keepalive: InProcess) -> None:
    """A request refused before its body (401) whose body arrives after the answer: aiohttp
    reads it away (lingering). Those bytes are no head: no stray 408 at the header
    timeout, and the kept-alive connection still serves the next request."""
    conn = await Conn.open(long_keepalive.server.port)
    try:
        await conn.send(post(key=b"nope")[:-len(GOOD)])
        check_shape(await conn.answer(), 401, "unauthorized")
        await conn.send(GOOD)  # the body, late
        assert not await conn.closed(2 * HEADER_TIMEOUT + 0.2)
        await conn.send(post())
        assert (await conn.answer()).status == 200
    finally:
        await conn.close()


async def test_a_chunk_malformed_in_a_later_packet_is_400_at_once(srv: InProcess) -> None:
    """Before: the body waited --body-timeout for bytes that never came (408 after 2 s here),
    and the parser's queued error was never answered."""
    conn = await Conn.open(srv.server.port)
    try:
        await conn.send(b"POST /agent/greeter HTTP/1.1\r\n" + HEAD + b"X-API-Key: k-one\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"nam\r\n")
        await asyncio.sleep(0.2)  # deliberately a later packet, after the handler started reading
        await conn.send(b"zz-not-a-size\r\n")
        a = await conn.answer()
        check_shape(a, 400, "invalid_json")
        assert await conn.closed(5)  # one answer, then the connection ends
    finally:
        await conn.close()
