"""Start-up imports only what a start needs (issue 13): the openai SDK only for
`AIWF_TRANSPORT=sdk`. A check on imports, not on a timing (scripts/bench.py
measures the time): each case starts a real process and reads what it
imported before it served, and before and after its first model call.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from aiwfd.testing.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "configs"
MOCK_CFG = CONFIGS / "cli_mock.yaml"
OPENAI_CFG = CONFIGS / "cli_openai.yaml"  # one agent on `openai`, max_attempts 1
# `python -X importtime` writes one line per module, as it finishes importing it.
OPENAI_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*openai(\.|$)")
SERVING = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AIWF_", "GROK_"))}
    env.pop("API_KEY", None)
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), **extra)
    return env


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:  # bound, never listening: a call to it is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class Started:
    """`python -X importtime -m aiwfd serve …`, its stderr read line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "aiwfd", *argv], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        # A process that hangs silently must fail the test, not hold it.
        self._watchdog = threading.Timer(START_TIMEOUT, self.proc.kill)
        self._watchdog.start()

    def read_until(self, pattern: re.Pattern[str]) -> re.Match[str]:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = pattern.search(line)
            if m:
                return m
        raise AssertionError(f"exited ({self.proc.wait()}) before a line matching {pattern.pattern!r}:\n"
                             + "\n".join(self.lines[-30:]))

    def openai_imports(self) -> list[str]:
        return [ln for ln in self.lines if OPENAI_IMPORT.search(ln)]

    def imports_of(self, module: str) -> list[str]:
        rx = re.compile(rf"^import time:\s+\d+ \|\s+\d+ \|\s*{re.escape(module)}(\.|$)")
        return [ln for ln in self.lines if rx.search(ln)]

    def stop(self) -> None:
        self._watchdog.cancel()
        stop_process(self.proc)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Started]]:
    procs: list[Started] = []
    yield procs
    for p in procs:
        p.stop()


def start(procs: list[Started], tmp_path: Path, argv: list[str], **env: str) -> tuple[Started, int]:
    s = Started([*argv, "-p", "0", "--host", "127.0.0.1"], clean_env(tmp_path, **env), tmp_path)
    procs.append(s)
    return s, int(s.read_until(SERVING).group(1))


def post_greeter(port: int) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/agent/greeter", data=json.dumps({"name": "Kim"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_serve_mock_never_imports_openai(started: list[Started], tmp_path: Path) -> None:
    proc, port = start(started, tmp_path, ["serve", "-f", str(MOCK_CFG), "--mock"])
    assert proc.openai_imports() == []
    # Nor jsonschema: a valid body is decided by the compiled predicates.
    assert proc.imports_of("jsonschema") == []
    assert post_greeter(port) == 200
    proc.read_until(re.compile(r"POST /agent/greeter .*status=200"))
    assert proc.openai_imports() == []


def test_serve_openai_over_aiohttp_imports_openai_neither_to_start_nor_to_call(
    started: list[Started], tmp_path: Path,
) -> None:
    proc, port = start(started, tmp_path, ["serve", "-f", str(OPENAI_CFG)],
                       OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=closed_port_url())
    assert proc.openai_imports() == []
    assert post_greeter(port) == 503  # the model call was made: its port is closed
    proc.read_until(re.compile(r"POST /agent/greeter .*status=503"))
    assert proc.openai_imports() == []


def test_the_sdk_transport_does_import_openai(started: list[Started], tmp_path: Path) -> None:
    """The check above can fail: the SDK transport imports the SDK before it serves."""
    proc, _ = start(started, tmp_path, ["serve", "-f", str(OPENAI_CFG)],
                    OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=closed_port_url(), AIWF_TRANSPORT="sdk")
    assert proc.openai_imports() != []


IN_PROCESS = """
import asyncio, sys
from aiwfd import cli, settings
from aiwfd.daemon.server import Server

async def main() -> None:
    args = cli.build_parser().parse_args(["serve", "-f", sys.argv[1], "--mock", "-p", "0", "--host", "127.0.0.1"])
    server = Server(settings.from_args(args, {}), install_signals=False)
    await server.start()
    try:
        print("aiohttp" in sys.modules, "openai" in sys.modules)
    finally:
        await server.stop()

asyncio.run(main())
"""


def test_a_started_server_has_not_imported_openai(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(MOCK_CFG)], cwd=tmp_path, env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=START_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
