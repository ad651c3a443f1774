"""A real HTTP webhook receiver for tests, verifying with `standardwebhooks`.

    async with WebhookReceiver(secrets) as rx:
        rx.script(Answer(503, times=3), Answer(200))
        ... deliver(session, rx.url, ...) ...
        await rx.wait_for(4)
        assert all(d.verified for d in rx.deliveries)

Listens on 127.0.0.1, on a port the kernel picks (bound before the server
starts, so there is no race for it). Every request is recorded as a
`Delivery`, verified with the reference implementation of Standard Webhooks
(the `standardwebhooks` package) against each configured secret: what aiwfd
signs is checked by code that is not aiwfd's.

That package raises a bare ValueError (not its WebhookVerificationError) on
a malformed signature header, and signs wrongly when handed a non-UTC
datetime; here it only verifies, from the header's Unix seconds, and a
ValueError counts as "not verified", never as a 500.

Behaviours are consumed in order; when the script runs out, 200.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from aiohttp import web

from aiwfd.testing.processes import serve_loopback
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["Answer", "Delivery", "Hang", "Redirect", "WebhookReceiver"]


@dataclass(frozen=True)
class Answer:
    """Answer `status` (with `Retry-After: retry_after` if given), `times` times."""

    status: int = 200
    retry_after: str | None = None
    times: int = 1


@dataclass(frozen=True)
class Redirect:
    """Answer `status` with `Location: location` (default: this receiver's /elsewhere)."""

    location: str | None = None
    status: int = 302
    times: int = 1


@dataclass(frozen=True)
class Hang:
    """Read the request, then never answer (until the receiver closes)."""

    times: int = 1


Behaviour = Union[Answer, Redirect, Hang]


@dataclass
class Delivery:
    """One request as received."""

    path: str
    msg_id: str | None
    timestamp: str | None
    signature: str | None
    content_type: str | None
    body: bytes
    verified: bool                       # some configured secret verifies it
    verified_by: tuple[int, ...]         # indices of the secrets that verify it
    answered: int | None                 # the status sent back; None for a hang
    received_at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, secrets: Sequence[str], path: str = "/hook") -> None:
        self.secrets = tuple(secrets)
        self._verifiers = [Webhook(s) for s in self.secrets]
        self.path = path
        self.deliveries: list[Delivery] = []
        self._script: deque[Behaviour] = deque()
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, each `times` times."""
        for b in behaviours:
            self._script.extend([b] * b.times)

    def by_id(self, msg_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.msg_id == msg_id]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Delivery]:
        """Until `count` requests have arrived (a condition, not a poll)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.deliveries) >= count), timeout)
        return self.deliveries

    def verify_with(self, delivery: Delivery) -> tuple[int, ...]:
        """Indices of the configured secrets that verify `delivery`."""
        headers = {k: v for k, v in (("webhook-id", delivery.msg_id), ("webhook-timestamp", delivery.timestamp),
                                     ("webhook-signature", delivery.signature)) if v is not None}
        ok = []
        for i, wh in enumerate(self._verifiers):
            try:
                wh.verify(delivery.body, headers, json_parse=False)
            except (WebhookVerificationError, ValueError):
                # ValueError: the package's own, on a malformed header (or a
                # body that is not UTF-8). Not verified, nothing more.
                continue
            ok.append(i)
        return tuple(ok)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        behaviour: Behaviour = self._script.popleft() if self._script else Answer(200)
        if isinstance(behaviour, Hang):
            answered: int | None = None
        else:
            answered = behaviour.status
        delivery = Delivery(
            path=request.path,
            msg_id=request.headers.get("webhook-id"),
            timestamp=request.headers.get("webhook-timestamp"),
            signature=request.headers.get("webhook-signature"),
            content_type=request.headers.get("content-type"),
            body=body,
            verified=False,
            verified_by=(),
            answered=answered,
            headers=dict(request.headers),
        )
        delivery.verified_by = self.verify_with(delivery)
        delivery.verified = bool(delivery.verified_by)
        async with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()
        if isinstance(behaviour, Hang):
            await self._closing.wait()
            return web.Response(status=503)
        if isinstance(behaviour, Redirect):
            location = behaviour.location or self.base_url + "/elsewhere"
            return web.Response(status=behaviour.status, headers={"Location": location})
        headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
        return web.Response(status=behaviour.status, headers=headers, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_loopback(app)

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
