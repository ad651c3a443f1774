"""The running daemon's state: one immutable snapshot swapped whole on reload.

A request takes the snapshot current when it starts and keeps it to the end,
so a reload never changes a config under a running call. A snapshot swapped
out closes its provider clients once its last request has finished.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import aiohttp
import orjson

from aiwfd.spec.artifacts import write_artifacts
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.http.cors import CorsPolicy, policy
from aiwfd.errors import StartupError
from aiwfd.providers.llm import ModelClient, OpenAICompatible, Transport, signature
from aiwfd.logs import RequestLog
from aiwfd.http.metrics import Metrics
from aiwfd.providers.mock import MockClient
from aiwfd.spec.openapi import Auth, agent_schema_doc, build_openapi
from aiwfd.settings import Settings

logger = logging.getLogger("aiwfd")


@dataclass(eq=False)
class Snapshot:
    compiled: Compiled
    clients: dict[str, ModelClient]
    api_keys: tuple[bytes, ...]
    max_body: int
    agents_json: bytes
    # The CORS policy (SPEC §7.3); whether agent calls need a key, for the documents of §7.1.
    cors: CorsPolicy | None = None
    auth: Auth = "none"
    _agent_schemas: dict[str, bytes] = field(default_factory=dict)
    inflight: int = 0
    retired: bool = False
    closed: bool = False
    # Clients the snapshot that replaced this one reuses: not closed with it.
    handed_over: list[ModelClient] = field(default_factory=list)

    def client(self, agent: CompiledAgent) -> ModelClient:
        return self.clients[agent.provider.name]

    # The API documents (SPEC §7.1) are built on first use and kept for the life
    # of the snapshot (a reload makes a new one). The server writes openapi.json
    # to the artifacts from a thread right after each load, so they are usually
    # ready before a client asks, and never built on the event loop at load time
    # (200 agents: ~140 ms).
    @cached_property
    def openapi(self) -> dict[str, Any]:
        return build_openapi(self.compiled, self.auth)

    @cached_property
    def openapi_json(self) -> bytes:
        return orjson.dumps(self.openapi)

    def write_artifacts(self, directory: str | os.PathLike[str]) -> list[str]:
        """The artifacts of SPEC §4.2, openapi.json included (blocking: run it in a thread)."""
        return write_artifacts(self.compiled, directory, {"openapi.json": self.openapi})

    def agent_schema_json(self, name: str) -> bytes | None:
        """`GET /agent/{name}/schema`; None for an unknown agent."""
        body = self._agent_schemas.get(name)
        if body is None:
            agent = self.compiled.agents.get(name)
            if agent is None:
                return None
            body = self._agent_schemas[name] = orjson.dumps(agent_schema_doc(agent))
        return body

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.clients.values():
            if c in self.handed_over:  # the next snapshot kept it
                continue
            try:
                await c.close()
            except Exception:  # a client that fails to close must not stop the others
                logger.exception("closing provider client %s failed", c.name)


def build_snapshot(compiled: Compiled, settings: Settings, session: aiohttp.ClientSession | None,
                   transport: Transport, previous: Snapshot | None = None) -> Snapshot:
    """Create the clients the agents need; raises StartupError when a key is missing.

    A client of `previous` whose provider, key, base URL and transport are
    unchanged is reused: building one costs ~30-50 ms (an SSL context with the
    CA bundle), and its connections stay pooled across the reload.
    """
    clients: dict[str, ModelClient] = {}
    for agent in compiled.agents.values():
        p = agent.provider
        if p.name in clients:
            continue
        if settings.mock or p.kind == "mock":
            clients[p.name] = MockClient(compiled.config.types)
        else:
            try:
                old = previous.clients.get(p.name) if previous is not None and not previous.retired else None
                if isinstance(old, OpenAICompatible) and old.signature == signature(p, settings.env, session,
                                                                                    transport):
                    clients[p.name] = old
                    continue
                clients[p.name] = OpenAICompatible(p, settings.env, session, transport)
            except StartupError:
                raise
            except Exception as e:  # e.g. a base_url the HTTP client rejects ("http://[::1")
                raise StartupError(f"provider {p.name!r} cannot be configured: {e}") from None
    return Snapshot(
        compiled=compiled,
        clients=clients,
        api_keys=settings.api_keys,
        max_body=settings.effective_max_body(compiled.config),
        agents_json=orjson.dumps({"agents": agents_listing(compiled, settings.mock)}),
        cors=policy(compiled.config.server.cors),
        auth="required" if settings.api_keys else "none",
    )


def agents_listing(compiled: Compiled, mock: bool) -> list[dict[str, Any]]:
    out = []
    for name in sorted(compiled.agents):
        a = compiled.agents[name]
        entry: dict[str, Any] = {
            "name": name,
            "endpoint": f"/agent/{name}",
            "model": a.assistant.model,
            "provider": "mock" if mock else a.provider.name,
        }
        if a.assistant.description:
            entry["description"] = a.assistant.description
        entry["input_type"] = a.assistant.input_type_name
        entry["output_type"] = a.assistant.output_type_name
        entry["input_schema"] = a.input_schema
        entry["output_schema"] = a.output_schema
        out.append(entry)
    return out


@dataclass(eq=False)
class Runtime:
    """Everything the handlers share; `snapshot` is replaced, never mutated."""

    settings: Settings
    snapshot: Snapshot
    artifacts_dir: str
    request_log: RequestLog
    draining: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    # Set when the shutdown timeout has passed: running calls answer 503.
    aborting: bool = False
    # Set once the drain has no request left to wait for: agent calls still
    # arriving on a pooled keep-alive connection get a 503 at once.
    closing: bool = False
    inflight_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: set[asyncio.Task[Any]] = field(default_factory=set)

    def acquire(self) -> Snapshot:
        snap = self.snapshot
        snap.inflight += 1
        return snap

    def release(self, snap: Snapshot) -> None:
        snap.inflight -= 1
        if snap.retired and snap.inflight == 0:
            self._close_later(snap)

    def swap(self, new: Snapshot) -> Snapshot:
        old = self.snapshot
        self.snapshot = new
        kept = {id(c) for c in new.clients.values()}
        old.handed_over = [c for c in old.clients.values() if id(c) in kept]
        old.retired = True
        if old.inflight == 0:
            self._close_later(old)
        return old

    def _close_later(self, snap: Snapshot) -> None:
        task = asyncio.get_running_loop().create_task(snap.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.snapshot.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
