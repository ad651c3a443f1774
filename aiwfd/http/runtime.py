"""The running daemon's state: one immutable snapshot swapped whole on reload.

A request takes the snapshot current when it starts and keeps it to the end,
so a reload never changes a config under a running call. A snapshot swapped
out closes its provider clients once its last request has finished.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Coroutine, Mapping

import aiohttp
import orjson

from aiwfd.auth.clients import KeyTable, key_table
from aiwfd.spec.access import JWTConfig
from aiwfd.spec.artifacts import write_artifacts
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.engine import Candidate, Models
from aiwfd.http.cors import CorsPolicy, policy
from aiwfd.errors import StartupError, Unavailable
from aiwfd.providers.base import ModelClient, Transport
from aiwfd.providers.endpoints import signature
from aiwfd.providers.openai_compatible import OpenAICompatible
from aiwfd.logs import RequestLog, Throttle
from aiwfd.http.metrics import Metrics
from aiwfd.providers.mock import MockClient
from aiwfd.spec.openapi import Auth, agent_schema_doc, build_openapi
from aiwfd.settings import Settings

from aiwfd.store.base import Store, StoreError
from aiwfd.store.idempotency import IdempotencyStore

from aiwfd.jobs.settings import WebhookSettings, webhook_settings
from aiwfd.jobs.store import JobStore

if TYPE_CHECKING:
    from aiwfd.auth.jwt import Verifier
    from aiwfd.http.job_runner import JobRunner

logger = logging.getLogger("aiwfd")


class Usage:
    """A snapshot's bookkeeping, the one part of it that changes: the requests
    holding it, whether it was swapped out, whether its clients are closed.
    Written only by the Runtime's `lease` and `swap` and by `Snapshot.close`."""

    __slots__ = ("inflight", "retired", "closed", "handed_over")

    def __init__(self) -> None:
        self.inflight = 0
        self.retired = False
        self.closed = False
        # Clients (and the JWT verifier) the snapshot that replaced this one
        # reuses: not closed with it.
        self.handed_over: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What a request is answered from: built once per load, never changed.

    The documents of SPEC §7.1 are built on first use (the fields they are
    built from never change, so the first answer is every answer); `usage`
    is the Runtime's bookkeeping of the snapshot, kept apart from it.
    """

    compiled: Compiled
    clients: Mapping[str, ModelClient]
    keys: KeyTable
    max_body: int
    agents_json: bytes
    # The CORS policy (SPEC §7.3); whether agent calls need a key, for the documents of §7.1.
    cors: CorsPolicy | None = None
    auth: Auth = "none"
    jwt: JWTConfig | None = None
    # Verifies the bearer tokens of auth.jwt; kept across reloads that leave auth.jwt alone.
    verifier: Verifier | None = None
    usage: Usage = field(default_factory=Usage)
    # The webhooks' secrets and URL (jobs:, read from the environment at load); None: no job has one.
    webhooks: WebhookSettings | None = None
    # (client name, its limits, agent) -> the Limits of such a call (aiwfd.http.quota).
    limit_cache: dict[Any, Any] = field(default_factory=dict)
    _agent_schemas: dict[str, bytes] = field(default_factory=dict)
    _models: dict[str, Models] = field(default_factory=dict)

    @property
    def inflight(self) -> int:
        return self.usage.inflight

    @property
    def retired(self) -> bool:
        return self.usage.retired

    @property
    def closed(self) -> bool:
        return self.usage.closed

    @property
    def auth_required(self) -> bool:
        return len(self.keys) > 0 or self.jwt is not None

    def client(self, agent: CompiledAgent) -> ModelClient | Models:
        """What `call_agent` calls for `agent`: its provider's client, or with
        `fallbacks:` the models in the order they are tried."""
        primary = self.clients[agent.provider.name]
        if not agent.fallbacks:
            return primary
        models = self._models.get(agent.name)
        if models is None:
            models = self._models[agent.name] = Models(
                (Candidate(agent.assistant.model, agent.provider, primary),)
                + tuple(Candidate(model, p, self.clients[p.name]) for model, p in agent.fallbacks))
        return models

    # The API documents (SPEC §7.1) are built on first use and kept for the life
    # of the snapshot (a reload makes a new one, which takes the previous one's
    # document when the config and auth are the same: build_snapshot). The
    # server writes openapi.json to the artifacts from a thread right after
    # each load, so they are usually ready before a client asks, and never
    # built on the event loop at load time (200 agents: ~140 ms).
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
        usage = self.usage
        if usage.closed:
            return
        usage.closed = True
        for c in self.clients.values():
            if c in usage.handed_over:  # the next snapshot kept it
                continue
            try:
                await c.close()
            except Exception:  # a client that fails to close must not stop the others
                logger.exception("closing provider client %s failed", c.name)
        if self.verifier is not None and self.verifier not in usage.handed_over:
            await self.verifier.close()


def build_snapshot(compiled: Compiled, settings: Settings, session: aiohttp.ClientSession | None,
                   transport: Transport, previous: Snapshot | None = None) -> Snapshot:
    """Create the clients the agents need; raises StartupError when a key is missing.

    A client of `previous` whose provider, key, base URL and transport are
    unchanged is reused: building one costs ~30-50 ms (an SSL context with the
    CA bundle), and its connections stay pooled across the reload.
    """
    clients: dict[str, ModelClient] = {}
    # Every provider an agent may call: its own and its fallbacks' (a missing
    # key of a fallback's provider fails the start like the primary's).
    providers = [p for a in compiled.agents.values() for p in (a.provider, *(f[1] for f in a.fallbacks))]
    for p in providers:
        if p.name in clients:
            continue
        if settings.mock or p.kind == "mock":
            clients[p.name] = MockClient(compiled.config.types)
        else:
            try:
                old = previous.clients.get(p.name) if previous is not None and not previous.usage.retired else None
                if isinstance(old, OpenAICompatible) and old.signature == signature(p, settings.env, session,
                                                                                    transport):
                    clients[p.name] = old
                    continue
                clients[p.name] = OpenAICompatible(p, settings.env, session, transport)
            except StartupError:
                raise
            except Exception as e:  # e.g. a base_url the HTTP client rejects ("http://[::1")
                raise StartupError(f"provider {p.name!r} cannot be configured: {e}") from None
    auth = compiled.config.auth
    keys = key_table(auth, settings.api_keys, settings.env)
    verifier = None
    if auth.jwt is not None:
        from aiwfd.auth.jwt import JWTSettings, Verifier  # PyJWT: only with auth.jwt

        j = auth.jwt
        # What verifies a token: auth.jwt less its limits. A reload that leaves
        # these alone keeps the verifier, and with it the loaded keys.
        wanted = JWTSettings(j.issuer, j.audience, j.algorithms, j.jwks_url, j.client_claim, j.scope_prefix)
        if previous is not None and previous.verifier is not None and previous.verifier.settings == wanted:
            verifier = previous.verifier
        elif session is not None:
            verifier = Verifier(wanted, session)
    webhooks = webhook_settings(compiled.config.jobs, settings.env)
    snapshot = Snapshot(
        compiled=compiled,
        webhooks=webhooks,
        clients=clients,
        keys=keys,
        max_body=settings.effective_max_body(compiled.config),
        agents_json=orjson.dumps({"agents": agents_listing(compiled, settings.mock)}),
        cors=policy(compiled.config.server.cors),
        auth="required" if len(keys) or auth.jwt is not None else "none",
        jwt=auth.jwt,
        verifier=verifier,
    )
    if previous is not None and compiled is previous.compiled and snapshot.auth == previous.auth:
        # The same config (a SIGHUP that rotated a key): the same document. Taken
        # only once built, and set as cached_property would set it (a first-use cache).
        built = previous.__dict__.get("openapi")
        if built is not None:
            snapshot.__dict__["openapi"] = built
    return snapshot


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


class Phase(enum.IntEnum):
    """Where the process is in its life; it only ever moves forward (`Runtime.enter`).

    Each phase keeps what the ones before it do:

    - SERVING: everything answered;
    - DRAINING: the listener is closed; /health answers 503 and every answer
      carries `Connection: close`, so keep-alive connections end politely;
    - CLOSING: no request is left to wait for: an agent call still arriving
      on a pooled keep-alive connection is answered 503 at once;
    - ABORTING: the shutdown timeout passed: running calls are cancelled and
      answer 503.
    """

    SERVING = 0
    DRAINING = 1
    CLOSING = 2
    ABORTING = 3


class Lease:
    """`async with runtime.lease() as snap`: the snapshot current when the
    request starts, held until it has answered (a swapped-out snapshot closes
    its clients once its last lease ends)."""

    __slots__ = ("_runtime", "_snapshot", "_background")

    def __init__(self, runtime: "Runtime", background: bool = False) -> None:
        self._runtime = runtime
        self._background = background

    async def __aenter__(self) -> Snapshot:
        runtime = self._runtime
        if runtime.phase >= Phase.CLOSING and not self._background:
            # The drain is over: a model call started now could not finish.
            raise Unavailable("the server is shutting down; retry on another instance")
        snap = self._snapshot = runtime.snapshot
        snap.usage.inflight += 1
        return snap

    async def __aexit__(self, *exc: object) -> None:
        snap = self._snapshot
        usage = snap.usage
        usage.inflight -= 1
        if usage.retired and usage.inflight == 0:
            self._runtime._close_later(snap)


@dataclass(eq=False)
class Runtime:
    """Everything the handlers share; `snapshot` is replaced (`swap`), never mutated."""

    settings: Settings
    snapshot: Snapshot
    artifacts_dir: str
    request_log: RequestLog
    metrics: Metrics = field(default_factory=Metrics)
    # The limits' counters (SPEC §8.2): the process's for its life, so they survive reloads.
    store: Store | None = None
    # "The store does not answer" lines, each store's at most once a minute.
    store_log: Throttle = field(default_factory=Throttle)
    idempotency_log: Throttle = field(default_factory=Throttle)
    # Idempotency keys (SPEC §9.4): SQLite in the state directory, or Redis with REDIS_URL.
    idempotency: IdempotencyStore | None = None
    # Jobs (SPEC §9): the store (SQLite in the state directory, or Redis) and
    # this instance's runner of them (which also sends the webhooks).
    jobs: JobStore | None = None
    job_runner: JobRunner | None = None
    jobs_log: Throttle = field(default_factory=Throttle)
    phase: Phase = Phase.SERVING
    inflight_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: set[asyncio.Task[Any]] = field(default_factory=set)

    def enter(self, phase: Phase) -> None:
        """Move on to `phase`; a later phase already reached stays (ABORTING before CLOSING)."""
        self.phase = max(self.phase, phase)

    def lease(self, background: bool = False) -> Lease:
        """`background`: for a job, which the drain waits for on its own
        (aiwfd.http.job_runner), so it is not refused once requests are."""
        return Lease(self, background)

    async def store_problem(self) -> str | None:
        """Why the store does not answer (for /health/ready); None when it does."""
        return await _problem("the store", self.store)

    async def jobs_problem(self) -> str | None:
        """Why the job store does not answer (for /health/ready); None when it does."""
        return await _problem("the job store", self.jobs)

    def swap(self, new: Snapshot) -> Snapshot:
        old = self.snapshot
        self.snapshot = new
        kept = {id(c) for c in new.clients.values()}
        usage = old.usage
        usage.handed_over = tuple(c for c in old.clients.values() if id(c) in kept)
        if old.verifier is not None and old.verifier is new.verifier:
            usage.handed_over += (old.verifier,)
        usage.retired = True
        if usage.inflight == 0:
            self._close_later(old)
        return old

    def _close_later(self, snap: Snapshot) -> None:
        self.track(snap.close())

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, referenced until it ends and awaited by `close`."""
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.snapshot.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        if self.idempotency is not None:
            await self.idempotency.close()
        if self.jobs is not None:
            await self.jobs.close()


async def _problem(what: str, store: Store | JobStore | None) -> str | None:
    if store is None:
        return None
    try:
        await store.ping()
    except StoreError as e:
        return f"{what} ({store.description}) does not answer: {e}"
    return None
