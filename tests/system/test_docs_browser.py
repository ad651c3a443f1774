"""GET /docs (SPEC §7.1) and CORS in a real browser (SPEC §7.3).

- The page is Swagger UI from a Python package's bundled assets: every asset
  it references is served by aiwfd itself, with 200, byte for byte the
  package's file; nothing points at another host.
- Debian's headless chromium loads /docs, and the rendered DOM (after the
  page's scripts ran) lists every operation; a screenshot is taken too.
- A page served from a second origin calls an agent with `fetch` and an
  X-API-Key header (so the browser sends a preflight first), like the
  TypeScript client in the README; a page from an origin the config does not
  allow cannot read the answer.

The chromium tests are skipped, saying why, only when chromium is not
installed (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import html.parser
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urljoin, urlsplit

import pytest
from aiohttp import web

from aiwfd.spec.compiler import load_and_compile
from aiwfd.http.docs import asset_dir
from aiwfd.testing.inprocess import InProcess, serve, write_config
from aiwfd.testing.processes import free_port
from tests.conftest import CONFIGS

API_MOCK = CONFIGS / "api_mock.yaml"
KEY = "docs-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install chromium; .ci/run does)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


class _Refs(html.parser.HTMLParser):
    """script src and link href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.refs.append(a["src"])  # type: ignore[arg-type]
        if tag == "link" and a.get("href"):
            self.refs.append(a["href"])  # type: ignore[arg-type]
        if tag == "img" and a.get("src"):
            self.refs.append(a["src"])  # type: ignore[arg-type]


async def chromium(tmp: Path, *args: str, timeout: float = 90.0) -> bytes:
    """Run headless chromium once; returns stdout (the DOM with --dump-dom)."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out, or the test failed meanwhile
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out


@pytest.fixture(scope="module")
async def srv() -> AsyncIterator[InProcess]:
    async with serve(API_MOCK, env={"API_KEY": KEY}) as s:
        yield s


# --------------------------------------------------------------------------
# The page and its assets


async def test_docs_page_serves_swagger_ui_pointing_at_openapi_json(srv: InProcess) -> None:
    async with srv.session.get(srv.url("/docs")) as r:  # no key needed
        assert r.status == 200
        assert r.content_type == "text/html"
        page = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert 'id="swagger-ui"' in page
    # Nothing from another host can load: the policy allows this origin only.
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    async with srv.session.get(srv.url("/docs/aiwfd-docs.js")) as r:
        assert r.status == 200
        init = await r.text()
    assert "SwaggerUIBundle(" in init
    assert '"openapi.json"' in init  # resolved against the page: /openapi.json


async def test_every_asset_of_the_page_is_served_locally(srv: InProcess) -> None:
    page_url = srv.url("/docs")
    async with srv.session.get(page_url) as r:
        page = await r.text()
    parser = _Refs()
    parser.feed(page)
    assert len(parser.refs) >= 4, parser.refs
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page), "no absolute or protocol-relative URL"
    package = asset_dir()
    for ref in parser.refs:
        url = urljoin(page_url, ref)
        assert urlsplit(url).netloc == urlsplit(page_url).netloc, ref
        async with srv.session.get(url) as r:
            assert r.status == 200, url
            body = await r.read()
            assert body, url
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        if (package / name).is_file():  # the package's own bytes, not a copy of some other version
            assert body == (package / name).read_bytes(), name
    # The bundle's own absolute URLs are not fetched: the spec is loaded from here.
    async with srv.session.get(srv.url("/docs/swagger-ui-bundle.js")) as r:
        assert r.headers["Content-Type"].split(";")[0] in ("application/javascript", "text/javascript")
        assert "Cache-Control" in r.headers


async def test_unknown_docs_paths_are_404(srv: InProcess) -> None:
    for path in ("/docs/", "/docs/nope.js", "/docs/../openapi.json.map", "/docs/swagger-ui.js.map"):
        async with srv.session.get(srv.url(path)) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["type"] == "not_found"


# --------------------------------------------------------------------------
# A real browser


@needs_chromium
async def test_chromium_renders_every_operation(srv: InProcess, tmp_path: Path) -> None:
    compiled = load_and_compile(str(API_MOCK))
    shot = tmp_path / "docs.png"
    dom_b, _ = await asyncio.gather(
        chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", srv.url("/docs")),
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--virtual-time-budget=10000",
                 srv.url("/docs")),
    )
    dom = dom_b.decode()
    assert "Unable to render" not in dom and "Failed to load API definition" not in dom
    shown_ids = set(re.findall(r'class="opblock-summary-operation-id"[^>]*>([^<]+)<', dom))
    shown_paths = set(re.findall(r'data-path="([^"]+)"', dom))
    for name in compiled.agents:
        assert name in shown_ids, (name, sorted(shown_ids))
        assert f"/agent/{name}" in shown_paths
    assert {"service.health", "service.listAgents", "service.agentSchema", "service.metrics"} <= shown_ids
    assert "OAS 3.1" in dom  # Swagger UI read the document as OpenAPI 3.1
    # The screenshot is a real 1280x1600 picture with something on it.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1600)
    assert len(data) > 30_000, len(data)
    assert _distinct_colours(data) > 50


def _distinct_colours(png: bytes) -> int:
    """Distinct byte values across the raw scanlines: a blank page has a handful."""
    pos, idat = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))


CROSS_PAGE = """<!DOCTYPE html>
<html><body><div id="out">pending</div>
<script>
fetch("%(api)s/agent/greeter", {
  method: "POST",
  headers: {"Content-Type": "application/json", "X-API-Key": "%(key)s"},
  body: JSON.stringify({name: "Browser"})
}).then(async (r) => {
  const doc = await r.json();
  document.getElementById("out").textContent =
    "status=" + r.status + " message=" + doc.data.message + " step=" + doc.trace.step_name +
    " rid=" + r.headers.get("X-Request-ID");
}).catch((e) => {
  document.getElementById("out").textContent = "failed=" + e.name;
});
</script></body></html>
"""

CROSS_CONFIG = """\
version: 0.3
server:
  cors:
    allow_origins: ["http://127.0.0.1:{port}"]
    allow_headers: [Content-Type, X-API-Key]
types:
  GreetingRequest:
    name: string(1..100)
  GreetingResponse:
    message: string(5..40)
assistants:
  greeter:
    use: mock
    model: mock-model
    input_type: GreetingRequest
    output_type: GreetingResponse
"""


@needs_chromium
async def test_chromium_calls_an_agent_cross_origin(tmp_path: Path) -> None:
    allowed_port, denied_port = free_port(), free_port()
    cfg = write_config(tmp_path, CROSS_CONFIG.format(port=allowed_port))
    async with serve(cfg, env={"API_KEY": KEY}) as api:
        page = (CROSS_PAGE % {"api": api.base, "key": KEY}).encode()

        async def index(request: web.Request) -> web.Response:
            return web.Response(body=page, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", index)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            for port in (allowed_port, denied_port):
                await web.TCPSite(runner, "127.0.0.1", port).start()
            allowed, denied = await asyncio.gather(
                chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", f"http://127.0.0.1:{allowed_port}/"),
                chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", f"http://127.0.0.1:{denied_port}/"),
            )
        finally:
            await runner.cleanup()
        log = api.log_lines()
    out_ok = _out(allowed)
    assert out_ok.startswith("status=200 message=sample text step=greeter rid="), out_ok
    assert len(out_ok.split("rid=")[1]) > 4  # X-Request-ID is exposed to the script
    assert _out(denied) == "failed=TypeError"  # the browser refused to hand over the answer
    # What aiwfd saw: the allowed page's preflight (answered) and its call; the
    # other page's preflight was refused, so its browser never sent the call.
    options = [ln for ln in log if " OPTIONS /agent/greeter " in ln]
    posts = [ln for ln in log if " POST /agent/greeter " in ln]
    assert sorted(re.search(r"status=(\d+)", ln).group(1) for ln in options) == ["204", "405"], log  # type: ignore[union-attr]
    assert len(posts) == 1 and "status=200" in posts[0], log


def _out(dom: bytes) -> str:
    m = re.search(r'<div id="out">([^<]*)</div>', dom.decode())
    assert m, dom[-2000:]
    return m.group(1)
