"""CORS from the agents file's `server.cors` (SPEC §7.3): preflights, headers on
every answer including errors, disallowed origins, no section → no CORS at all,
and a policy that changes on reload. (A real browser calling cross-origin is in
tests/system/test_docs_browser.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from aiwfd.testing.inprocess import InProcess, serve, write_config
from tests.conftest import CONFIGS

KEY = "cors-test-key"
ORIGIN = "https://app.example"
OTHER = "http://localhost:5173"
EVIL = "https://evil.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type,x-api-key"}


def cors_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


def varies_on_origin(headers: Any) -> bool:
    return any("origin" in [p.strip().lower() for p in v.split(",")] for v in headers.getall("Vary", []))


@pytest.fixture(scope="module")
async def srv() -> AsyncIterator[InProcess]:
    async with serve(CONFIGS / "api_cors.yaml", env={"API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
async def plain() -> AsyncIterator[InProcess]:
    """No `server.cors`."""
    async with serve(CONFIGS / "api_mock.yaml", env={"API_KEY": KEY}) as s:
        yield s


async def test_preflight_is_answered_with_the_configuration(srv: InProcess) -> None:
    async with srv.session.options(srv.url("/agent/greeter"), headers=PREFLIGHT) as r:
        assert r.status == 204  # no API key: a preflight never carries credentials
        assert await r.read() == b""
        h = r.headers
    assert h["Access-Control-Allow-Origin"] == ORIGIN
    assert h["Access-Control-Allow-Methods"] == "GET, POST"
    assert h["Access-Control-Allow-Headers"] == "Content-Type, X-API-Key, Authorization, X-Request-ID"
    assert h["Access-Control-Max-Age"] == "1234"
    assert h["Access-Control-Allow-Credentials"] == "true"
    assert varies_on_origin(h)
    assert h["X-Request-ID"]
    async with srv.session.options(srv.url("/agent/greeter"), headers={**PREFLIGHT, "Origin": OTHER}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == OTHER


@pytest.mark.parametrize("path", ["/agents", "/health", "/agent/greeter/schema", "/agent/nope", "/no/such/path"])
async def test_preflight_on_any_path(srv: InProcess, path: str) -> None:
    async with srv.session.options(srv.url(path), headers=PREFLIGHT) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_headers_on_a_successful_call(srv: InProcess) -> None:
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Ann"},
                                headers={"Origin": ORIGIN, "X-API-Key": KEY}) as r:
        assert r.status == 200
        h = r.headers
    assert h["Access-Control-Allow-Origin"] == ORIGIN
    assert h["Access-Control-Allow-Credentials"] == "true"
    exposed = {v.strip() for v in h["Access-Control-Expose-Headers"].split(",")}
    # A browser script can read the request id, and the limits' headers (SPEC §8.2).
    assert {"X-Request-ID", "Retry-After", "RateLimit-Policy", "RateLimit"} <= exposed
    assert varies_on_origin(h)
    async with srv.session.get(srv.url("/agents"), headers={"Origin": OTHER}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == OTHER


ERRORS = [
    ("POST", "/agent/greeter", {}, {"name": "Ann"}, 401),
    ("POST", "/agent/greeter", {"X-API-Key": "wrong"}, {"name": "Ann"}, 401),
    ("POST", "/agent/nope", {"X-API-Key": KEY}, {"name": "Ann"}, 404),
    ("GET", "/no/such/path", {}, None, 404),
    ("GET", "/agent/greeter", {}, None, 405),
    ("POST", "/agent/greeter", {"X-API-Key": KEY}, {"name": ""}, 422),
    ("POST", "/agent/greeter", {"X-API-Key": KEY, "Content-Type": "application/json"}, "{bad", 400),
    ("POST", "/agent/greeter", {"X-API-Key": KEY, "Content-Type": "text/plain"}, "hi", 415),
    ("POST", "/agent/greeter", {"X-API-Key": KEY, "Content-Type": "application/json",
                                "Content-Length": str(10**9)}, None, 413),
]


@pytest.mark.parametrize("method,path,headers,body,status", ERRORS, ids=[f"{e[4]}-{e[1]}" for e in ERRORS])
async def test_headers_on_errors(srv: InProcess, method: str, path: str, headers: dict[str, str],
                                 body: Any, status: int) -> None:
    kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
    if status == 413:
        kw = {"data": b"{}", "skip_auto_headers": ["Content-Length"]}
    async with srv.session.request(method, srv.url(path), headers={"Origin": ORIGIN, **headers}, **kw) as r:
        assert r.status == status
        doc = await r.json()
        assert doc["error"]["type"]
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert varies_on_origin(r.headers)


async def test_a_disallowed_origin_gets_no_cors_headers(srv: InProcess) -> None:
    async with srv.session.options(srv.url("/agent/greeter"), headers={**PREFLIGHT, "Origin": EVIL}) as r:
        assert r.status == 405  # not a preflight this server answers: an ordinary OPTIONS
        assert cors_headers(r.headers) == {}
        assert varies_on_origin(r.headers)
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Ann"},
                                headers={"Origin": EVIL, "X-API-Key": KEY}) as r:
        assert r.status == 200
        assert cors_headers(r.headers) == {}
    async with srv.session.post(srv.url("/agent/greeter"), json={"name": "Ann"}, headers={"Origin": EVIL}) as r:
        assert r.status == 401
        assert cors_headers(r.headers) == {}
    # An origin that only looks like an allowed one.
    for origin in ("https://app.example.evil.example", "http://app.example", "https://app.example:444", "null"):
        async with srv.session.get(srv.url("/agents"), headers={"Origin": origin}) as r:
            assert cors_headers(r.headers) == {}, origin


async def test_no_origin_no_cors_headers(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/health")) as r:
        assert r.status == 200
        assert cors_headers(r.headers) == {}


async def test_without_a_cors_section_there_is_no_cors(plain: InProcess) -> None:
    async with plain.session.options(srv_url := plain.url("/agent/greeter"), headers=PREFLIGHT) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
        assert (await r.json())["error"]["type"] == "method_not_allowed"
        assert cors_headers(r.headers) == {}
        assert not varies_on_origin(r.headers)
    async with plain.session.post(srv_url, json={"name": "Ann"}, headers={"Origin": ORIGIN, "X-API-Key": KEY}) as r:
        assert r.status == 200
        assert cors_headers(r.headers) == {}
    async with plain.session.post(srv_url, json={"name": "Ann"}, headers={"Origin": ORIGIN}) as r:
        assert r.status == 401
        assert cors_headers(r.headers) == {}


BASE = """\
version: 0.3
{server}
assistants:
  greeter:
    use: mock
    model: m
"""
WILDCARD = """server:
  cors:
    allow_origins: ["*"]
    max_age: 60
"""


async def test_the_policy_follows_reloads(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, BASE.format(server=""))
    async with serve(cfg) as s:
        async def preflight() -> tuple[int, dict[str, str], bool]:
            async with s.session.options(s.url("/agent/greeter"), headers={**PREFLIGHT, "Origin": EVIL}) as r:
                return r.status, cors_headers(r.headers), varies_on_origin(r.headers)

        assert await preflight() == (405, {}, False)
        write_config(tmp_path, BASE.format(server=WILDCARD))
        assert await s.server.reload()
        status, h, vary = await preflight()
        assert status == 204
        assert h["Access-Control-Allow-Origin"] == "*"
        assert h["Access-Control-Max-Age"] == "60"
        assert "Access-Control-Allow-Credentials" not in h
        assert not vary  # `*` does not depend on the origin
        async with s.session.post(s.url("/agent/greeter"), json={}, headers={"Origin": EVIL}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        write_config(tmp_path, BASE.format(server=""))
        assert await s.server.reload()
        assert await preflight() == (405, {}, False)
