"""Shared fixtures of the HTTP tests: one FakeOpenAI per module, the agents
config pointed at it, and a raw-socket HTTP client for what aiohttp's client
refuses to send (stalled bodies, raw header bytes, unnormalised paths)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.inprocess import fake_env
from aiwfd.testing.processes import free_port

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "tests" / "configs"
LOCAL_API_KEY = "local-test-key"

# tests/ is split by what a test starts (docs/architecture.md):
#   unit/     nothing: pure functions, the layer and lint rules
#   http/     an in-process aiwfd Server on a free port, the fake model in the same loop
#   process/  real `aiwfd serve` (or validate/compile) processes: signals, exit codes, stderr
#   system/   heavy outside programs: nginx and a cluster under load, headless Chromium,
#             pip install into a venv, schemathesis, the benchmark smoke run
# Everything under system/ gets the `system` marker (setup.cfg), so
# `python3 -m pytest -m "not system"` is the inner loop, and CI's second run
# on the oldest Python setup.cfg declares.
SYSTEM_DIR = Path(__file__).resolve().parent / "system"


def example_applier() -> Callable[[Any, list[dict[str, Any]]], Any]:
    """`apply(doc, ops)` of examples/python/patch.py: the tests check the applier users copy."""
    path = REPO / "examples" / "python" / "patch.py"
    spec = importlib.util.spec_from_file_location("aiwfd_example_patch", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.apply  # type: ignore[no-any-return]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM_DIR in item.path.parents:
            item.add_marker(pytest.mark.system)


def agents_env(fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    """fake_env plus the key of the `local` provider of http_agents.yaml."""
    return fake_env(fake, LOCAL_API_KEY=LOCAL_API_KEY, **extra)


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
def agents_config(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/configs/http_agents.yaml with the fake's URL and a closed port filled in."""
    text = (CONFIGS / "http_agents.yaml").read_text(encoding="utf-8")
    text = text.replace("@FAKE_URL@", fake.base_url)
    text = text.replace("@DEAD_URL@", f"http://127.0.0.1:{free_port()}/v1")
    path = tmp_path_factory.mktemp("http") / "agents.yaml"
    path.write_text(text, encoding="utf-8")
    return path


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


async def raw_http(port: int, head: bytes, body: bytes = b"", *, wait: float = 10.0) -> RawResponse:
    """Send `head` (request line and headers, without the blank line) and `body`
    as raw bytes, keep the connection open, and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), wait)
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), wait)
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        data = await asyncio.wait_for(reader.readexactly(n), wait)
        return RawResponse(int(status_line.split()[1]), headers, data)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
