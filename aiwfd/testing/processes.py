"""Real processes for tests and benchmarks: a free port, a child's output read
line by line and waited on, `python -m aiwfd ARGS` as a child
(:class:`AiwfdProcess`, :func:`run_cli`) and the fake model as a child
(:func:`fake_process`)::

    with AiwfdProcess(["serve", "-f", cfg, "-p", "0"], env=...) as proc:
        proc.url("/health"); proc.send(signal.SIGHUP); proc.wait_for_log("reloaded")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "LISTEN_RE",
    "START_TIMEOUT",
    "AiwfdProcess",
    "LineReader",
    "fake_process",
    "free_port",
    "run_cli",
    "serve_loopback",
    "started",
]

# The "listening" line of `aiwfd serve` (SPEC §5): where a child bound with `-p 0`.
LISTEN_RE = re.compile(r"on http://(\[[^\]]+\]|[^:\s]+):(\d+)")


def stop_process(proc: "subprocess.Popen[Any]", sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop a child: `sig` (a graceful stop), then SIGKILL if it is still there after `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def serve_loopback(app: "web.Application") -> tuple["web.AppRunner", int]:
    """Serve `app` on 127.0.0.1 on a port the kernel picks, bound before the
    server starts (no race for it): the runner to clean up, and the port."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


def free_port() -> int:
    """A loopback port free right now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LineReader:
    """A child's output stream read line by line by a thread; `wait_for`
    waits on new lines (a condition variable), not on a clock."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self.stream:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> str:
        """The first line from index `start` matching `pattern`; AssertionError
        when none came within `timeout` or the stream ended without one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        return self.lines[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    raise AssertionError(f"no line matching {pattern!r}; so far:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.5))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class AiwfdProcess:
    """`python -m aiwfd ARGS` as a child process, its stderr collected line by line."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 inherit_env: bool = True, wait_ready: bool = True, timeout: float = 20.0) -> None:
        full_env = dict(os.environ) if inherit_env else {"PATH": os.environ.get("PATH", "")}
        for k in ("API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT", "HOST", "NOTIFY_SOCKET",
                  "WATCHDOG_USEC", "AIWF_LOG_FORMAT", "AIWF_LOG_LEVEL"):
            full_env.pop(k, None)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        # A state directory of its own unless the test names one: jobs left
        # queued by one test's process must never be run by another's.
        self._state_dir: str | None = None
        if "--state-dir" not in args and "AIWF_STATE_DIR" not in full_env and "STATE_DIRECTORY" not in full_env:
            self._state_dir = full_env["AIWF_STATE_DIR"] = tempfile.mkdtemp(prefix="aiwfd-test-state-")
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiwfd", *args], env=full_env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._stderr = LineReader(self.proc.stderr)
        self.lines = self._stderr.lines
        self.stdout = ""
        self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._out_reader.start()
        self.host: str | None = None
        self.port: int | None = None
        if wait_ready:
            line = self.wait_for_log(LISTEN_RE.pattern, timeout=timeout)
            m = LISTEN_RE.search(line)
            assert m
            self.host, self.port = m.group(1), int(m.group(2))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def wait_for_log(self, pattern: str, timeout: float = 20.0, start: int = 0) -> str:
        """The first stderr line from index `start` matching `pattern`."""
        return self._stderr.wait_for(pattern, timeout, start)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._stderr.join(5)
        self._out_reader.join(5)
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None
        return rc

    @property
    def stderr(self) -> str:
        return self._stderr.text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(5)

    def __enter__(self) -> "AiwfdProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            self.stop()
        else:
            self.wait(5)


# Event-driven waits are generous: they cost nothing when things go well.
START_TIMEOUT = 60.0


@contextlib.asynccontextmanager
async def started(args: list[str], env: Mapping[str, str]) -> AsyncIterator[AiwfdProcess]:
    """A real process, started and always stopped without blocking the test's
    loop (an in-process fake model may live in it)."""
    proc = await asyncio.to_thread(functools.partial(AiwfdProcess, args, env=env, timeout=START_TIMEOUT))
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop, signal.SIGTERM, 15)


def run_cli(args: list[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m aiwfd ARGS` to completion (for validate, compile and start-up failures)."""
    full_env = dict(os.environ)
    for k in ("API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT", "HOST", "NOTIFY_SOCKET"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "aiwfd", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def fake_process(latency_ms: int = 0, extra: list[str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """aiwfd.testing.fakeopenai as its own process (for real-process tests): yields (proc, base_url)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiwfd.testing.fakeopenai", "--port", "0",
         "--latency-ms", str(latency_ms), *(extra or [])],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING"), line
        yield proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        stop_process(proc, timeout=10)
