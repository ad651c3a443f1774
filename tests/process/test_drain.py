"""SIGTERM/SIGINT drain and crash leftovers (SPEC §5, §4.2), against a real `aiwfd serve` process.

The model is an in-process FakeOpenAI, so the test's event loop must keep
running while the test waits: every blocking wait goes through a thread.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, Hold
from aiwfd.testing.processes import START_TIMEOUT, AiwfdProcess, started
from tests.conftest import CONFIGS

LIFE = str(CONFIGS / "life_basic.yaml")
INPUT = {"name": "Alice"}


def env_for(fake: FakeOpenAI | None, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"TMPDIR": str(tmp_path), "OPENAI_API_KEY": "sk-x"}
    if fake is not None:
        env["OPENAI_BASE_URL"] = fake.base_url
    env.update(extra)
    return env




def ephemeral_dirs(root: Path, pid: int) -> list[Path]:
    return sorted(p for p in root.glob(f"aiwfd-{pid}-*") if p.is_dir())


async def call(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], str | None]:
    async with session.post(url, json=INPUT) as r:
        return r.status, orjson.loads(await r.read()), r.headers.get("Connection")


async def raw_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET on an already-open connection (no client library: the connection is this one)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: aiwfd\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split()[1]), headers, body


async def wait_log(proc: AiwfdProcess, pattern: str, start: int = 0, timeout: float = 20.0) -> str:
    return await asyncio.to_thread(proc.wait_for_log, pattern, timeout, start)


# ---------------------------------------------------------------- SIGTERM


async def test_sigterm_finishes_all_inflight_requests(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake, \
            started(["serve", "-f", LIFE, "-p", "0"], env_for(fake, tmp_path)) as proc:
        [ephemeral] = ephemeral_dirs(tmp_path, proc.pid)
        # The model holds every answer until the probes below are done: the
        # drain lasts exactly as long as the test needs, not "long enough".
        answer = asyncio.Event()
        fake.script(*[Hold(answer)] * 50)
        assert (ephemeral / "agents" / "greeter.json").is_file()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            # A keep-alive connection opened (and used) before the signal.
            reader, writer = await asyncio.open_connection(proc.host, proc.port)
            status, headers, body = await raw_request(reader, writer, "/health")
            assert status == 200 and orjson.loads(body)["status"] == "ok"
            assert headers.get("connection", "").lower() != "close"

            calls = [asyncio.create_task(call(session, proc.url("/agent/greeter"))) for _ in range(50)]
            await fake.wait_calls(50, timeout=30)
            assert fake.inflight == 50  # all 50 are in flight when the signal comes
            mark = len(proc.lines)
            proc.send(signal.SIGTERM)
            # Logged once the listener is closed; the drain lasts until the model answers.
            await wait_log(proc, r"waiting up to 30s for \d+ in-flight requests", mark)

            # New connections are refused...
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(proc.host, proc.port)
            # ...but the open keep-alive connection is still answered: 503 draining, then closed.
            status, headers, body = await raw_request(reader, writer, "/health")
            assert status == 503
            assert orjson.loads(body) == {"status": "draining"}
            assert headers["connection"].lower() == "close"
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the server closed it
            writer.close()

            assert proc.proc.poll() is None and fake.inflight == 50  # still draining
            answer.set()
            results = await asyncio.gather(*calls)
        assert [r[0] for r in results] == [200] * 50, [r for r in results if r[0] != 200][:3]
        assert all(r[1]["data"] == {"message": "sample"} for r in results)
        # Answered during the drain: each tells the client not to reuse the connection.
        assert all((r[2] or "").lower() == "close" for r in results)

        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert any(ln.endswith("info: stopped") for ln in proc.lines)
        assert not ephemeral.exists()
        assert ephemeral_dirs(tmp_path, proc.pid) == []
        assert fake.disconnects == 0


async def test_shutdown_timeout_answers_503_to_what_is_still_running(tmp_path: Path) -> None:
    timeout = 0.5  # waited out on purpose: the held calls end only at the timeout
    async with FakeOpenAI() as fake, \
            started(["serve", "-f", LIFE, "-p", "0", "--shutdown-timeout", str(timeout)],
                  env_for(fake, tmp_path)) as proc:
        [ephemeral] = ephemeral_dirs(tmp_path, proc.pid)
        fake.script(*[Hold(asyncio.Event())] * 10)  # never answered: the timeout must end them
        async with aiohttp.ClientSession() as session:
            calls = [asyncio.create_task(call(session, proc.url("/agent/greeter"))) for _ in range(10)]
            await fake.wait_calls(10, timeout=30)
            signalled = time.monotonic()
            proc.send(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 15)
            elapsed = time.monotonic() - signalled
            # Every client got an answer (a dropped connection would raise here).
            results = await asyncio.gather(*calls)
        assert rc == 0
        assert elapsed < timeout + 2.0, f"exited {elapsed:.2f}s after SIGTERM:\n{proc.stderr}"
        assert elapsed >= timeout * 0.9, "did not wait for the shutdown timeout"
        for status, body, connection in results:
            assert status == 503
            assert body["error"]["type"] == "unavailable"
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]
            assert set(body) == {"error", "request_id"} and body["request_id"]
            assert (connection or "").lower() == "close"
        assert proc.wait_for_log(r"shutdown timeout: answering 503 to 10 requests")
        assert len([ln for ln in proc.lines if "POST /agent/greeter" in ln and "status=503" in ln]) == 10
        assert "Traceback" not in proc.stderr
        assert not ephemeral.exists()


async def test_second_sigint_exits_at_once(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake, \
            started(["serve", "-f", LIFE, "-p", "0"], env_for(fake, tmp_path)) as proc:
        [ephemeral] = ephemeral_dirs(tmp_path, proc.pid)
        fake.script(Hold(asyncio.Event()))  # never answered: only the second SIGINT ends it
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(call(session, proc.url("/agent/greeter")))
            await fake.wait_calls(1, timeout=30)
            proc.send(signal.SIGINT)
            await wait_log(proc, r"waiting up to 30s for 1 in-flight")
            proc.send(signal.SIGTERM)  # a further SIGTERM does not cut the drain short
            proc.send(signal.SIGINT)
            assert await asyncio.to_thread(proc.wait, 10) == 130
            with pytest.raises(aiohttp.ClientError):
                await pending
        assert any("second interrupt" in line for line in proc.lines)
        assert not ephemeral.exists()


# ---------------------------------------------------------------- crash leftovers


async def test_kill9_leftovers_removed_at_next_start(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               stdin=subprocess.DEVNULL)
    try:
        live = tmp_path / f"aiwfd-{sleeper.pid}-x"  # a directory of a process that still runs
        live.mkdir()
        (live / "keep").write_text("mine")
        not_ours = tmp_path / "aiwfd-notapid-x"
        not_ours.mkdir()

        args = ["serve", "-f", LIFE, "-p", "0", "--mock"]
        killed = await asyncio.to_thread(partial(AiwfdProcess, args, env=env_for(None, tmp_path),
                                                 timeout=START_TIMEOUT))
        try:
            [crashed] = ephemeral_dirs(tmp_path, killed.pid)
            killed.send(signal.SIGKILL)
            assert await asyncio.to_thread(killed.wait, 10) == -signal.SIGKILL
        finally:
            await asyncio.to_thread(killed.stop, signal.SIGKILL, 5)
        assert crashed.is_dir() and (crashed / "agents" / "greeter.json").is_file()  # nobody cleaned up

        async with started(args, env_for(None, tmp_path)) as proc:
            line = await wait_log(proc, r"removed .* left by a process that no longer runs")
            assert crashed.name in line
            assert not crashed.exists()
            assert live.is_dir() and (live / "keep").read_text() == "mine"
            assert not_ours.is_dir()
            [own] = ephemeral_dirs(tmp_path, proc.pid)
            assert len([ln for ln in proc.lines if re.search(r"removed .*aiwfd-", ln)]) == 1
        assert not own.exists()  # its own directory goes at a clean stop
        assert live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
