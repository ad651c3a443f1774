"""Tracing switched off imports nothing of it, and switched on needs nothing
of OpenTelemetry installed (SPEC §11.2): checked in real processes, whose
`sys.modules` is theirs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from aiwfd.testing.otlp_receiver import OTLPReceiver
from aiwfd.testing.processes import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A whole daemon in a fresh interpreter: start, answer an agent call, stop,
# then print the OpenTelemetry modules it imported.
SERVE_AND_LIST = """
import asyncio, json, sys
import aiohttp
from aiwfd.daemon.server import Server
from aiwfd.settings import Settings

async def main():
    s = Settings(file=sys.argv[1], host="127.0.0.1", port=0, mock=True, env=json.loads(sys.argv[3]), state_dir=sys.argv[2])
    server = Server(s, install_signals=False)
    await server.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{server.port}/agent/greeter", json={"name": "Ann"}) as r:
            assert r.status == 200, await r.text()
    await server.stop()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


def test_off_nothing_of_opentelemetry_is_imported(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SERVE_AND_LIST, str(CONFIGS / "cli_mock.yaml"), str(tmp_path), "{}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


async def test_on_it_needs_nothing_of_opentelemetry_installed(tmp_path: Path) -> None:
    # OpenTelemetry made unimportable in the child, as on a machine without it:
    # the spans of the call still reach the collector.
    async with OTLPReceiver() as rx:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "20"}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.modules['opentelemetry'] = None\n" + SERVE_AND_LIST,
            str(CONFIGS / "cli_mock.yaml"), str(tmp_path), json.dumps(env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(child.communicate(), 60)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert child.returncode == 0, err.decode()
        spans = await rx.wait_for(3)
    assert sorted(s.name for s in spans) == ["POST /agent/{name}", "chat mock-model", "invoke_agent greeter"], spans


def test_a_sampler_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    out = run_cli(["serve", "-f", str(CONFIGS / "cli_mock.yaml"), "--mock", "-p", "0", "--state-dir",
                   str(tmp_path)],
                  env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_SAMPLER": "sometimes"})
    assert out.returncode == 1, out.stderr
    assert "OTEL_TRACES_SAMPLER 'sometimes' is not one of always_on" in out.stderr
