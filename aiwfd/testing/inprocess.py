"""aiwfd's real Server (real socket, real middleware) inside the test's event
loop: cheap, and it shares the loop with an in-process fake model::

    async with serve(config_path, env=fake_env(fake)) as srv:
        async with srv.session.post(srv.url("/agent/greeter"), json={...}) as r: ...
        srv.log_lines()          # the request log, one entry per request
        await srv.scrape()       # /metrics, parsed
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import aiohttp

from aiwfd.daemon.server import Server
from aiwfd.logs import RequestLog
from aiwfd.settings import Settings
from aiwfd.testing import metrics

__all__ = ["InProcess", "fake_env", "serve", "write_config"]


def fake_env(fake: Any, **extra: str) -> dict[str, str]:
    """Environment pointing the built-in providers at a FakeOpenAI."""
    env = {"OPENAI_API_KEY": "sk-test-openai-key", "OPENAI_BASE_URL": fake.base_url,
           "GROK_API_KEY": "xai-test-grok-key", "GROK_BASE_URL": fake.base_url}
    env.update(extra)
    return env


def write_config(directory: Path, text: str, name: str = "agents.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class InProcess:
    server: Server
    session: aiohttp.ClientSession
    log: io.StringIO
    host: str = "127.0.0.1"

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.server.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def log_lines(self) -> list[str]:
        return [line for line in self.log.getvalue().splitlines() if line]

    async def scrape(self) -> metrics.Samples:
        """GET /metrics as {(sample, labels): value} (see aiwfd.testing.metrics)."""
        return await metrics.scrape(self.session, self.url("/metrics"))


@contextlib.asynccontextmanager
async def serve(config: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                **settings: Any) -> AsyncIterator[InProcess]:
    """aiwfd's real Server (real socket, real middleware) inside the test's loop."""
    log = io.StringIO()
    own_state = None
    if "state_dir" not in settings:  # isolated, like aiwfd.testing.processes.AiwfdProcess
        own_state = settings["state_dir"] = tempfile.mkdtemp(prefix="aiwfd-test-state-")
    s = Settings(file=str(config), host="127.0.0.1", port=0, env=dict(env or {}), **settings)
    server = Server(s, install_signals=False, request_log=RequestLog(s.log_format, log))
    try:
        await server.start()
    except BaseException:
        if own_state is not None:
            shutil.rmtree(own_state, ignore_errors=True)
        raise
    session = aiohttp.ClientSession()
    try:
        yield InProcess(server, session, log)
    finally:
        await session.close()
        await server.stop()
        if own_state is not None:
            shutil.rmtree(own_state, ignore_errors=True)
