"""A real redis-server for tests and benchmarks (issue 15: no mock of Redis)::

    with RedisServer() as server:
        store = open_store(server.url)
        server.kill(); ...; server.start()    # the same port again
        server.pause(); ...; server.resume()  # a Redis that hangs (SIGSTOP)

On loopback, a free port, nothing persisted (`--save '' --appendonly no`),
its working directory a temporary one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from aiwfd.testing.processes import LineReader, free_port, stop_process

__all__ = ["REDIS_SERVER", "RedisServer"]

REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """redis-server as a child process; `start` waits for "Ready to accept connections"."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self._fixed = port is not None
        self.port = port or free_port()
        self.args = args
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: LineReader | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="aiwfd-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "RedisServer":
        """Start it (again, on the same port after `stop` or `kill`)."""
        assert not self.running, "redis-server is already running"
        # A free port may be taken between free_port() and the bind: pick
        # another, unless the port was given or this is a restart.
        for attempt in range(3):
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self._dir.name, *self.args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            self.output = LineReader(self.proc.stdout)
            try:
                self.output.wait_for("Ready to accept connections", timeout=self.timeout)
                return self
            except AssertionError:
                stop_process(self.proc, signal.SIGKILL, 5)
                self.output.join(5)
                if self._fixed or attempt == 2 or "Address already in use" not in self.output.text:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """A clean stop (SIGTERM; no data is saved)."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
            if self.output is not None:
                self.output.join(5)
        self._fixed = True  # a restart must come back on the same port

    def kill(self) -> None:
        """SIGKILL: Redis gone at once, its connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            if self.output is not None:
                self.output.join(5)
        self._fixed = True

    def pause(self) -> None:
        """SIGSTOP: Redis still accepts connections (the kernel does) but never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.running:
            self.resume()  # a stopped process does not act on SIGTERM
        self.stop()
        self._dir.cleanup()
