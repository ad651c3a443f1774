"""Named clients in a real `aiwfd serve` (SPEC §8): SIGHUP changes keys and limits at
once, the limit counters survive the reload, and no key or digest reaches stderr."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import http_sf

from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.processes import AiwfdProcess, run_cli, started

CONFIG = """\
version: 0.3
auth:
  keys:
    - name: frontend
      key_env: FRONTEND_API_KEY
      limits: {{requests: {quota}/min}}
    - name: reports
      key_sha256: "{digest}"
types:
  In: {{name: string}}
  Out: {{message: string}}
assistants:
  greeter: {{model: gpt-4o-mini, input_type: In, output_type: Out}}
"""
OLD, NEW, REPORTS = "frontend-key-before", "frontend-key-after", "reports-key-0789"


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


async def post(session: aiohttp.ClientSession, proc: AiwfdProcess, key: str) -> tuple[int, dict[str, str], Any]:
    async with session.post(proc.url("/agent/greeter"), json={"name": "Ada"}, headers={"X-API-Key": key}) as r:
        return r.status, dict(r.headers), await r.json()


async def reload(proc: AiwfdProcess) -> None:
    mark = len(proc.lines)
    proc.send(signal.SIGHUP)
    await asyncio.to_thread(proc.wait_for_log, r"reloaded ", 20.0, mark)


async def test_sighup_swaps_keys_and_limits_and_keeps_the_counts(tmp_path: Path) -> None:
    cfg, env_file = tmp_path / "agents.yaml", tmp_path / "aiwfd.env"
    digest = hashlib.sha256(REPORTS.encode()).hexdigest()
    write(cfg, CONFIG.format(quota=4, digest=digest))
    write(env_file, f"FRONTEND_API_KEY={OLD}\n")
    async with FakeOpenAI() as fake, \
            started(["serve", "-f", str(cfg), "-p", "0", "--env-file", str(env_file)],
                    {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-test", "TMPDIR": str(tmp_path)}) as proc, \
            aiohttp.ClientSession() as session:
        for _ in range(2):
            assert (await post(session, proc, OLD))[0] == 200
        assert (await post(session, proc, NEW))[0] == 401
        assert (await post(session, proc, REPORTS))[0] == 200

        # The key rotated in .env and the limit raised, in one SIGHUP.
        write(env_file, f"FRONTEND_API_KEY={NEW}\n")
        write(cfg, CONFIG.format(quota=5, digest=digest))
        await reload(proc)
        status, _, doc = await post(session, proc, OLD)
        assert status == 401 and doc["error"]["type"] == "unauthorized"
        status, headers, _ = await post(session, proc, NEW)
        # The two calls made before the reload still count: 5 - 3.
        assert status == 200
        assert dict(http_sf.parse(headers["RateLimit"].encode(), tltype="list"))["client"]["r"] == 2
        for _ in range(2):
            assert (await post(session, proc, NEW))[0] == 200
        status, headers, doc = await post(session, proc, NEW)
        assert status == 429 and doc["error"]["details"][0]["quota"] == 5

        # A client removed from the file fails at once.
        write(cfg, CONFIG.format(quota=5, digest="0" * 64))
        await reload(proc)
        assert (await post(session, proc, REPORTS))[0] == 401
        # A reload that would leave a key_env unset is refused; the old keys keep working.
        write(env_file, "OTHER=1\n")
        mark = len(proc.lines)
        proc.send(signal.SIGHUP)
        line = await asyncio.to_thread(proc.wait_for_log, r"reload failed", 20.0, mark)
        assert "FRONTEND_API_KEY is not set" in line
        assert (await post(session, proc, NEW))[0] == 429  # still frontend, still limited
    stderr = proc.stderr
    assert "client=frontend" in stderr and "client=reports" in stderr
    for secret in (OLD, NEW, REPORTS, digest, hashlib.sha256(OLD.encode()).hexdigest(),
                   hashlib.sha256(NEW.encode()).hexdigest()):
        assert secret not in stderr


async def test_a_key_env_not_set_at_start_is_exit_1_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "agents.yaml"
    write(cfg, CONFIG.format(quota=4, digest="0" * 64))
    cp = await asyncio.to_thread(run_cli, ["serve", "-f", str(cfg), "-p", "0"], {"OPENAI_API_KEY": "sk-x"})
    assert cp.returncode == 1, cp.stderr
    assert "auth.keys: client 'frontend': the environment variable FRONTEND_API_KEY is not set" in cp.stderr
