"""The job routes of SPEC §9.1.

    POST   /agent/{name}/jobs   202 + Location: the job, stored before the answer
    GET    /jobs/{id}           the job document (another client's: 404)
    GET    /jobs                the client's jobs, newest first, paged by cursor
    DELETE /jobs/{id}           queued or running → canceled; finished: 409

A submission goes through what `POST /agent/{name}` does before the model
call (auth, the agent, the body, the input schema, the Idempotency-Key, the
limits), so what would fail there fails here, synchronously, with its
status. The call itself is the runner's (aiwfd.http.job_runner).
"""

from __future__ import annotations

import logging
import time
from typing import Any, get_args

from aiohttp import web

from aiwfd import telemetry
from aiwfd.errors import Conflict, InvalidInput, InvalidRequest, NotFound, Unavailable
from aiwfd.http import access, idempotency, quota, views
from aiwfd.http.keys import CLIENT, RUNTIME
from aiwfd.http.middlewares import json_response
from aiwfd.http.runtime import Runtime, Snapshot
from aiwfd.jobs.store import InvalidCursor, Job, JobFinished, JobStatus, JobStore, StoreError, keyed_job_id

WEBHOOK_HEADER = "Webhook-URL"
# A submission holds its Idempotency-Key only until the job is stored (one store write).
SUBMIT_LEASE = 30.0
# The ids one Idempotency-Key may name in turn (keyed_job_id's generations):
# one per 24 h that the key was used again while its jobs were retained.
MAX_GENERATIONS = 8
DEFAULT_PAGE, MAX_PAGE = 20, 100
STATUSES = get_args(JobStatus)
_MAX_URL = 2048


def _store(rt: Runtime) -> JobStore:
    if rt.jobs is None:
        raise Unavailable("jobs are not available in this server")
    return rt.jobs


logger = logging.getLogger("aiwfd")


def _store_down(rt: Runtime, e: StoreError) -> Unavailable:
    if rt.jobs_log.ready():
        rt_store = rt.jobs
        logger.error("the job store (%s) does not answer: %s; job requests get 503 (logged at most once "
                     "a minute)", rt_store.description if rt_store else "?", e)
    return Unavailable("the job store does not answer; try again shortly", headers={"Retry-After": "1"})


def webhook_url(request: web.Request, snap: Snapshot) -> str | None:
    """The job's own webhook (`Webhook-URL`), checked against
    jobs.allow_request_webhooks; None when the request names none."""
    values = request.headers.getall(WEBHOOK_HEADER, ())
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"send one {WEBHOOK_HEADER} header, not {len(values)}")
    url = values[0].strip()
    jobs = snap.compiled.config.jobs
    if not jobs.allow_request_webhooks:
        raise InvalidInput(f"{WEBHOOK_HEADER} is not allowed here: jobs.allow_request_webhooks names no prefix")
    if len(url) > _MAX_URL or not jobs.allows_webhook(url):
        # The URL is not quoted back: it may carry a token.
        raise InvalidInput(f"{WEBHOOK_HEADER} is not under a prefix of jobs.allow_request_webhooks")
    return url


async def submit(request: web.Request) -> web.StreamResponse:
    """`POST /agent/{name}/jobs`."""
    rt = request.app[RUNTIME]
    store = _store(rt)
    async with rt.lease() as snap:
        target: list[str | None] = [None]

        def check_headers() -> None:
            target[0] = webhook_url(request, snap)

        agent, body = await views.begin(request, rt, snap, idempotent=True, check=check_headers)
        views.check_input(agent, body)
        url = target[0]
        configured = snap.webhooks is not None and snap.webhooks.url is not None

        async def run() -> web.Response:
            client = request[CLIENT]
            # The request counts now; its tokens when it runs (job_runner), no slot is held meanwhile.
            async with quota.admitted(request, rt, snap, client, agent, cost=1, slots=0):
                try:
                    # The request's span: the job's run, a trace of its own, links to it.
                    job = await submit_keyed(store, idempotency.keyed_scope(request, rt, agent),
                                             client.identity, agent.name, body, url,
                                             webhook=url is not None or configured,
                                             traceparent=telemetry.traceparent())
                except StoreError as e:
                    raise _store_down(rt, e) from None
            if rt.job_runner is not None:
                rt.job_runner.wake()
            return json_response(job.to_document(), 202, {"Location": f"/jobs/{job.id}"})

        return await idempotency.guarded(request, rt, agent, body, run, extra=url or "", lease=SUBMIT_LEASE)


def _window_scope(scope: str, window: int) -> str:
    return f"{scope}\n@{window}"


async def submit_keyed(store: JobStore, scope: str | None, client: str, agent: str, body: Any,
                       url: str | None, *, webhook: bool, traceparent: str | None,
                       now: float | None = None) -> Job:
    """The submission's job (`_store_job`), its keyed ids taken from the 24 h
    window the submission falls in (RETENTION-long, counted from the epoch).
    An id derived from the key alone came back once its job was purged
    (jobs.retention, by default the key's own 24 h): the key used again the
    next day named the first job's id, so two jobs had one id and one
    webhook-id (`msg_<id>`, which receivers deduplicate). A window's ids end
    with it; a retry just past a window's end finds its job under the
    previous window's ids (read, never written) while that job is within 24 h."""
    if scope is None:
        return await _store_job(store, None, client, agent, body, url, webhook=webhook, traceparent=traceparent)
    now = time.time() if now is None else now
    window = int(now // idempotency.RETENTION)
    previous = _window_scope(scope, window - 1)
    for generation in range(MAX_GENERATIONS):
        job = await store.get(keyed_job_id(previous, generation), client)
        if job is None:
            break
        if job.created_at >= now - idempotency.RETENTION:
            _check_same(job, client, agent, body, url)
            return job
    return await _store_job(store, _window_scope(scope, window), client, agent, body, url,
                            webhook=webhook, traceparent=traceparent)


def _check_same(job: Job, client: str, agent: str, body: Any, url: str | None) -> None:
    if (job.client, job.agent, job.webhook_url) != (client, agent, url) or (
            idempotency.fingerprint(job.body) != idempotency.fingerprint(body)):
        raise idempotency.ReusedUnstored(idempotency.REUSED)


async def _store_job(store: JobStore, scope: str | None, client: str, agent: str, body: Any, url: str | None,
                     *, webhook: bool, traceparent: str | None) -> Job:
    """The submission's job, stored. Without an Idempotency-Key: a new one
    under a random id. With one: under the id derived from the key's scope,
    so that a retry after a 503 whose write was done after all (it outlived
    the store's timeout) gets that job rather than a second one; the store's
    submit returns an existing job instead of writing. The key store
    had no answer for the key (else `guarded` replayed it), so an existing
    job within the key's 24 h is this key's first try: the same body and
    `Webhook-URL`, or 422 as `guarded` answers a mismatched key. One older
    than that is of a key used again after it was forgotten (jobs.retention
    above 24 h): the next id of the key's chain."""
    if scope is None:
        return await store.submit(client, agent, body, url, webhook=webhook, traceparent=traceparent)
    for generation in range(MAX_GENERATIONS):
        job = await store.submit(client, agent, body, url, webhook=webhook, traceparent=traceparent,
                                 job_id=keyed_job_id(scope, generation))
        if job.created_at >= time.time() - idempotency.RETENTION:
            _check_same(job, client, agent, body, url)
            return job
    # A key used again every day for MAX_GENERATIONS days, each job still retained: unguarded.
    return await store.submit(client, agent, body, url, webhook=webhook, traceparent=traceparent)


async def get(request: web.Request) -> web.Response:
    """`GET /jobs/{id}`."""
    rt = request.app[RUNTIME]
    store = _store(rt)
    client = request[CLIENT] = await access.authenticate(request, rt.snapshot)
    try:
        job = await store.get(request.match_info["id"], client.identity)
    except StoreError as e:
        raise _store_down(rt, e) from None
    if job is None:
        raise _no_job()
    return json_response(job.to_document())


async def listing(request: web.Request) -> web.Response:
    """`GET /jobs?status=&agent=&limit=&cursor=`."""
    rt = request.app[RUNTIME]
    store = _store(rt)
    client = request[CLIENT] = await access.authenticate(request, rt.snapshot)
    q = request.query
    unknown = sorted(set(q) - {"status", "agent", "limit", "cursor"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0][:40]!r}; use status, agent, limit or cursor")
    status = q.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    limit = _limit(q.get("limit"))
    try:
        jobs, cursor = await store.list(client.identity, status, q.get("agent") or None, limit,
                                        q.get("cursor") or None)
    except InvalidCursor:
        raise InvalidRequest("invalid cursor: pass the next_cursor of a previous page") from None
    except StoreError as e:
        raise _store_down(rt, e) from None
    body: dict[str, Any] = {"jobs": [j.to_document() for j in jobs], "next_cursor": cursor}
    return json_response(body)


async def cancel(request: web.Request) -> web.Response:
    """`DELETE /jobs/{id}`."""
    rt = request.app[RUNTIME]
    store = _store(rt)
    client = request[CLIENT] = await access.authenticate(request, rt.snapshot)
    job_id = request.match_info["id"]
    try:
        job = await store.cancel(job_id, client.identity)
    except JobFinished as e:
        raise Conflict(f"the job already {e.job.status}; only a queued or running job can be canceled") from None
    except StoreError as e:
        raise _store_down(rt, e) from None
    if job is None:
        raise _no_job()
    if rt.job_runner is not None:
        rt.job_runner.cancel_local(job.id)
    return json_response(job.to_document())


def _no_job() -> NotFound:
    return NotFound("no such job (or it is another client's, or it finished longer ago than jobs.retention)")


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)
