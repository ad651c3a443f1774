"""Tracing switched off costs nothing, and switched on without the SDK is one
line (SPEC §11.2): checked in real processes, whose `sys.modules` is theirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aiwfd.testing.processes import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A whole daemon in a fresh interpreter: start, answer an agent call, stop,
# then print the OpenTelemetry modules it imported.
SERVE_AND_LIST = """
import asyncio, sys
import aiohttp
from aiwfd.daemon.server import Server
from aiwfd.settings import Settings

async def main():
    s = Settings(file=sys.argv[1], host="127.0.0.1", port=0, mock=True, env={}, state_dir=sys.argv[2])
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
    out = subprocess.run([sys.executable, "-c", SERVE_AND_LIST, str(CONFIGS / "cli_mock.yaml"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_on_without_the_sdk_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    # The SDK made unimportable in the child, as on a machine without the [otel] extra.
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; "
            "sys.modules['opentelemetry.exporter'] = None; "
            "from aiwfd.cli import main; sys.exit(main())")
    out = subprocess.run(
        [sys.executable, "-c", code, "serve", "-f", str(CONFIGS / "cli_mock.yaml"), "--mock", "-p", "0",
         "--state-dir", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed" in lines[0]
    assert "pip install 'aiwfd[otel]'" in lines[0]


def test_a_sampler_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    out = run_cli(["serve", "-f", str(CONFIGS / "cli_mock.yaml"), "--mock", "-p", "0", "--state-dir",
                   str(tmp_path)],
                  env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_SAMPLER": "sometimes"})
    assert out.returncode == 1, out.stderr
    assert "OTEL_TRACES_SAMPLER 'sometimes' is not one of always_on" in out.stderr
