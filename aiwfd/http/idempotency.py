"""`Idempotency-Key` on the routes that change something (SPEC §9.4).

    return await guarded(request, rt, agent, body, run)   # run() answers the request

`guarded` runs `run` at most once per key: the first request with a key
runs and its answer is stored (status, body and the headers worth
replaying: `Location`, the content type); a repeat with the same body gets
that answer again with `Idempotency-Replayed: true` and calls no model; a
repeat while the first runs: 409 `conflict` with `Retry-After: 1`; the key
with another body: 422 `idempotency_key_reused`.

Where it sits: after the client is known (auth), the agent exists, the body
is read and has passed the input schema, before the limits and the model
call. A request refused before that stores nothing: its refusal depends only
on what it sent (and the config), so a retry gets the same refusal anyway,
and a malformed body never takes a key.

What is stored: 2xx and 4xx answers, but not 408/409/429 (they say "try
again", and a replayed 429 would refuse the call for 24 h) and no 5xx
(SPEC: the next try runs again). Not stored means released: the next
request with the key runs.

Keys are per client (`Client.identity`: stable across key rotation),
method, route template and agent: the same key on `/agent/a` and
`/agent/a/batch`, or from two clients, are two keys. The store sees a SHA-256 of them, never the key itself.

The body's fingerprint is the SHA-256 of its canonical JSON (sorted keys,
compact), not of the raw bytes: the same object sent again with other
whitespace, key order or compression (gzip writes a timestamp into its
header) is the same request, and it is exactly what the model would be
sent. Canonical JSON is computed only when a key is sent.

A job submission's id is derived from its key's scope (`keyed_scope`,
aiwfd.jobs.store.keyed_job_id) and the store writes a job once per id: a
first try answered 503 whose write was done after all (it outlived the
store's timeout) stored no answer, and its retry gets that job, or
`ReusedUnstored`'s 422 when the body differs (aiwfd.http.jobs).

While the first request runs its key is a lease of the call's deadline
(`--deadline`, or an agent `timeout:` above it) plus LEASE_MARGIN: a first
request whose instance was killed frees its key when the lease ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from aiwfd.errors import (
    Conflict, HTTPError, IdempotencyKeyReused, InvalidRequest, Unavailable, error_body,
)
from aiwfd.http.keys import CLIENT, REQUEST_ID
from aiwfd.http.runtime import Runtime
from aiwfd.spec.compiler import CompiledAgent
from aiwfd.store.base import StoreError
from aiwfd.store.idempotency import Answer, Claim, IdempotencyStore

logger = logging.getLogger("aiwfd")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
# How long a stored answer is kept (SPEC §9.4: 24 h).
RETENTION = 24 * 3600.0
# What runs of a keyed request outside the engine's deadline: the limits'
# admit and finish and the answer's store round trip (0.5 s each on Redis at
# worst), and a stalled loop. Too short lets a slow first request be taken
# over (two model calls, one stored answer); too long keeps a dead request's
# key busy that much longer.
LEASE_MARGIN = 3.0
MAX_KEY = 255
# The headers a replay carries besides the body (SPEC §9.4: `Location`); not
# the request id, the RateLimit headers or CORS: those are the new request's.
KEPT_HEADERS = ("Content-Type", "Location")
# "Try again" answers: not stored, like 5xx.
NOT_STORED = frozenset({408, 409, 425, 429})

# sf-string (RFC 8941 §3.3.3): printable ASCII, `"` and `\` escaped.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_ESCAPE = re.compile(r'\\(["\\])')
# A bare key: visible ASCII without quotes or spaces. Wider than an sf-token
# on purpose: clients send bare UUIDs, and a UUID may start with a digit.
_BARE = re.compile(r'[\x21\x23-\x7e]+')

Run = Callable[[], Awaitable[web.StreamResponse]]


def parse_key(request: web.Request) -> str | None:
    """The key the request sent; None when it sent none; 400 `invalid_request` when malformed."""
    values = request.headers.getall(HEADER, ())
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"send one {HEADER} header, not {len(values)}")
    raw = values[0].strip(" \t")
    m = _SF_STRING.fullmatch(raw)
    key = _ESCAPE.sub(r"\1", m.group(1)) if m else raw if _BARE.fullmatch(raw) else None
    if not key or len(key) > MAX_KEY:
        # The value is not quoted back: a header may hold anything.
        raise InvalidRequest(f"{HEADER} must be 1-{MAX_KEY} printable ASCII characters, as a quoted "
                             'string ("…") or a bare value without spaces or quotes')
    return key


def fingerprint(body: Any) -> str:
    """SHA-256 (hex) of the body's canonical JSON: sorted keys, compact."""
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer past 64 bits (the parser allows 4,300 digits)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()


def scope(request: web.Request, client_identity: str, agent: str, key: str) -> str:
    """The store's key: client, method, route template, agent and the key, hashed
    (a JSON list, so no separator inside a name can make two scopes one)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    parts = json.dumps([client_identity, request.method, route, agent, key], ensure_ascii=False)
    return hashlib.sha256(parts.encode()).hexdigest()


def keyed_scope(request: web.Request, rt: Runtime, agent: CompiledAgent) -> str | None:
    """The scope `guarded` holds the request's key under; None when it holds
    none (no key sent, or no key store): what a job's id is derived from
    (aiwfd.jobs.store.keyed_job_id), so that a retry names the same job."""
    key = parse_key(request)
    if key is None or rt.idempotency is None:
        return None
    return scope(request, request[CLIENT].identity, agent.name, key)


REUSED = f"this {HEADER} was used with a different request body; use a new key for a new request"


class ReusedUnstored(IdempotencyKeyReused):
    """The 422 of a key reused with another body, found by `run()` rather than
    by the key store (a job of the key exists but no answer was stored: the
    first try got a 503). Not stored: the key stays free, so the first body's
    retry still gets its job, not this 422."""


def lease_for(rt: Runtime, agent: CompiledAgent) -> float:
    """How long a first request may hold its key: past what the engine allows a
    call (an agent's own timeout above the deadline raises it, and a batch's
    last input may start just before the deadline: engine.call_agent)."""
    own = agent.assistant.timeout or agent.provider.timeout or 0
    return rt.settings.deadline + own + LEASE_MARGIN


def stored(resp: web.StreamResponse) -> Answer | None:
    """What a store keeps of an answer; None when it must not be kept."""
    if resp.status >= 500 or resp.status in NOT_STORED or not isinstance(resp, web.Response):
        return None
    body = resp.body
    if not isinstance(body, (bytes, bytearray)):
        return None  # a streamed or file body: not replayable
    headers = tuple((h, resp.headers[h]) for h in KEPT_HEADERS if h in resp.headers)
    return Answer(resp.status, headers, bytes(body))


def error_answer(err: HTTPError, request_id: str) -> Answer | None:
    """An error as stored: the body the middleware renders for it (aiwfd.http.middlewares)."""
    if err.status >= 500 or err.status in NOT_STORED:
        return None
    headers = [("Content-Type", "application/json")]
    headers += [(h, err.headers[h]) for h in KEPT_HEADERS if h in err.headers and h != "Content-Type"]
    return Answer(err.status, tuple(headers), orjson.dumps(error_body(err, request_id)))


def replay(answer: Answer) -> web.Response:
    resp = web.Response(status=answer.status, body=answer.body)
    for name, value in answer.headers:
        resp.headers[name] = value
    resp.headers[REPLAYED] = "true"
    return resp


async def guarded(request: web.Request, rt: Runtime, agent: CompiledAgent, body: Any, run: Run,
                  *, extra: str = "", lease: float | None = None) -> web.StreamResponse:
    """`run()` under the request's Idempotency-Key (just `run()` without one).
    `extra` joins the fingerprint (say a job's `Webhook-URL`); `lease` replaces
    the call's (a job submission holds its key only until it is accepted)."""
    key = parse_key(request)
    store = rt.idempotency
    if key is None or store is None:
        return await run()
    client = request[CLIENT]
    skey = scope(request, client.identity, agent.name, key)
    fp = fingerprint(body) if not extra else hashlib.sha256(
        (fingerprint(body) + "\n" + extra).encode()).hexdigest()
    claim = await _claim(rt, store, skey, fp, lease if lease is not None else lease_for(rt, agent))
    if claim.state == "mismatch":
        raise IdempotencyKeyReused(REUSED)
    if claim.state == "running":
        raise Conflict(f"a request with this {HEADER} is still running; retry shortly",
                       headers={"Retry-After": "1"})
    if claim.state == "done":
        assert claim.answer is not None
        return replay(claim.answer)
    token = claim.token
    try:
        resp = await run()
    except HTTPError as e:
        answer = None if isinstance(e, ReusedUnstored) else error_answer(e, request[REQUEST_ID])
        await asyncio.shield(_settle(rt, store, skey, token, answer))
        raise
    except BaseException:  # a bug (500), a cancellation: nothing to replay; the next try runs
        await asyncio.shield(_settle(rt, store, skey, token, None))
        raise
    await asyncio.shield(_settle(rt, store, skey, token, stored(resp)))
    return resp


async def _claim(rt: Runtime, store: IdempotencyStore, key: str, fp: str, lease: float) -> Claim:
    # The claim runs to its end even when the request is cancelled meanwhile
    # (the client went away): a key taken then is given back at once rather
    # than held until its lease ends.
    task = asyncio.ensure_future(store.claim(key, fp, lease))
    try:
        return await asyncio.shield(task)
    except StoreError as e:
        _failed(rt, store, "a request with an Idempotency-Key is refused with 503", e)
        raise Unavailable("the idempotency key store does not answer; try again shortly",
                          headers={"Retry-After": "1"}) from None
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _give_back(rt, store, key, t))
        raise


def _give_back(rt: Runtime, store: IdempotencyStore, key: str, task: "asyncio.Future[Claim]") -> None:
    if task.cancelled() or task.exception() is not None:
        return
    claim = task.result()
    if claim.state == "acquired":
        rt.track(_settle(rt, store, key, claim.token, None))


async def _settle(rt: Runtime, store: IdempotencyStore, key: str, token: str, answer: Answer | None) -> None:
    """Store the answer, or free the key when there is none to keep."""
    try:
        if answer is None:
            await store.release(key, token)
        elif not await store.complete(key, token, answer, RETENTION):
            logger.warning("an answer was not stored for its Idempotency-Key: the request outlived its "
                           "lease (%.0f s past the deadline) and another took the key over", LEASE_MARGIN)
    except StoreError as e:
        _failed(rt, store, "an answer was not stored (a retry runs again once the lease ends)", e)


def _failed(rt: Runtime, store: IdempotencyStore, what: str, error: StoreError) -> None:
    if rt.idempotency_log.ready():
        logger.error("the idempotency key store (%s) does not answer: %s; %s (logged at most once a minute)",
                     store.description, error, what)
