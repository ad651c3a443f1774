"""The job store's vocabulary (SPEC §9): the job document, the `JobStore`
protocol both backends follow (aiwfd/jobs/sqlite.py, aiwfd/jobs/redis_streams.py),
and the errors they raise.

A job's life::

    submit → queued ──claim──→ running ──finish──→ succeeded | failed | canceled
                ↑                 │ lease ran out (kill -9) → claimable again, attempts + 1
                └──── release ────┘ (SIGTERM after the shutdown timeout)
    cancel: queued or running → canceled; finished → JobFinished

A job submitted with a webhook (its own `Webhook-URL`, or the configured
one: `submit(..., webhook=True)`) gets a delivery task when it ends, in the
same transaction (script) that ends it — finish, cancel, fail_agent, or a
dead letter inside claim — so a job end and its delivery are never one
without the other, and a job ends once, so there is one delivery per job
(its id is the job's). Deliveries are leased like jobs::

    pending ──claim_delivery──→ leased ──delivery_result──→ delivered | failed (gone: failed)
       ↑                          │ retry: attempts + 1, due again after `delay`
       └──────────────────────────┘ lease ran out (kill -9): claimable again

A delivery is a task of its own (SPEC §9.3): a failing receiver never
re-runs the agent, and a pending delivery is in the store, so it survives
restarts. The job document's `webhook` ({"status", "attempts",
"last_status"}) follows the delivery's results.

A claim is a lease: the owner renews it while the job runs. When it runs out
any owner may claim the job again, so a job is never lost, and since a
claim, a renew and a finish each check the lease in one atomic step, a job
never runs twice at the same time (a stale owner's renew and finish answer
False) and its result is written once. A job claimed `max_attempts` times
whose lease runs out again is a dead letter: it fails rather than taking
every instance down in turn.

Every failure of the store's backend (Redis down, SQLite locked past the
timeout) is raised as aiwfd.store.base.StoreError, the limits store's error,
so the HTTP layer maps one exception to 503.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Collection, Literal, Protocol

import orjson

from aiwfd.spec.jsonparse import dump_compact
from aiwfd.store.base import StoreError

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DELIVERY_OUTCOMES",
    "Delivery",
    "DeliveryOutcome",
    "EventType",
    "FINISHED",
    "InvalidCursor",
    "Job",
    "JobFinished",
    "JobStatus",
    "JobStore",
    "StoreError",
    "WebhookStatus",
    "check_delivery_result",
    "dead_letter_error",
    "has_webhook",
    "keyed_job_id",
    "msg_id",
    "new_job_id",
    "decode_cursor",
    "encode_cursor",
    "rfc3339",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
EventType = Literal["job.succeeded", "job.failed", "job.canceled"]
# What one attempt came to, as delivery_result records it (webhooks.Outcome.kind).
DeliveryOutcome = Literal["delivered", "gone", "failed", "retry"]
DELIVERY_OUTCOMES: frozenset[str] = frozenset({"delivered", "gone", "failed", "retry"})

# A job whose runs were lost this many times (each claim counts) fails as a
# dead letter: a job that crashes its instance must not crash the fleet in turn.
DEFAULT_MAX_ATTEMPTS = 5


# A job's JSON (its body, result, error) as stored: integers past 64 bits included.
dumps = dump_compact


_LONG_NUMBER = re.compile(rb"\d{19}")


def loads(data: str | bytes) -> Any:
    """What `dumps` stored, read back. orjson reads an integer past 64 bits as
    a float: a text with a run of 19 digits or more is read by the stdlib."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER.search(raw):
        return json.loads(raw)
    return orjson.loads(raw)


def rfc3339(t: float | None) -> str | None:
    """Epoch seconds as RFC 3339 in UTC with milliseconds ("2026-12-01T13:40:57.123Z")."""
    if t is None:
        return None
    dt = datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def dead_letter_error(attempts: int) -> dict[str, Any]:
    """The error of a job failed as a dead letter (the §3.1 error shape)."""
    return {"type": "internal_error",
            "message": f"the job's run was lost {attempts} times (its instance stopped mid-run); not retried again",
            "details": []}


def check_delivery_result(outcome: str, delay: float | None) -> None:
    """delivery_result's arguments, checked alike by both backends: a retry
    needs its delay, a final outcome has none (a caller's bug either way)."""
    if outcome not in DELIVERY_OUTCOMES:
        raise ValueError(f"delivery_result: {outcome!r} is not one of {sorted(DELIVERY_OUTCOMES)}")
    if (outcome == "retry") != (delay is not None):
        raise ValueError("delivery_result: a delay with retry, and only then")
    if delay is not None and not 0 <= delay < 10 * 24 * 3600:
        raise ValueError(f"delivery_result: delay {delay!r} s is not in [0, 10 days)")


def has_webhook(webhook_url: str | None, webhook: bool | None) -> bool:
    """submit's rule, alike in both backends: `webhook` when given, else
    whether the job names its own URL."""
    return webhook_url is not None if webhook is None else webhook


def new_job_id() -> str:
    """A job's id: 128 random bits, base64url without padding (22 characters)."""
    return secrets.token_urlsafe(16)


# The HMAC key of keyed_job_id: a fixed name, domain separation only (the
# fleet shares no secret, and none is needed: an id is only ever readable by
# the client whose identity went into it).
_JOB_ID_KEY = b"aiwfd job id v1"


def keyed_job_id(scope: str, generation: int = 0) -> str:
    """The id of the job an Idempotency-Key submits, derived from the key's
    scope (aiwfd.http.idempotency.scope: client, route, agent, key), in
    new_job_id's format: every retry of the submission, on any instance,
    names the same job, so submit(job_id=...) stores it once. `generation`:
    the key used again after its 24 h, while the job of the first use is
    still retained (aiwfd.http.jobs)."""
    msg = scope if generation == 0 else f"{scope}\n{generation}"
    digest = hmac.new(_JOB_ID_KEY, msg.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def msg_id(job_id: str) -> str:
    """The `webhook-id` of a job's delivery: derived from the job, so it is
    the same on every retry and on every instance (receivers deduplicate by it)."""
    return "msg_" + job_id


@dataclass(frozen=True)
class WebhookStatus:
    """The `webhook` of SPEC §9.1's job document. `pending` from submission
    until the delivery is done; `failed` also for a 410 (the receiver said
    stop) and for a delivery given up after retry_for."""

    status: Literal["pending", "delivered", "failed"]
    attempts: int  # attempts made (requests sent, or refused targets)
    last_status: int | None  # the HTTP status of the latest answer; None: none yet, or no answer

    def to_document(self) -> dict[str, Any]:
        return {"status": self.status, "attempts": self.attempts, "last_status": self.last_status}


@dataclass(frozen=True)
class Job:
    """One job as stored. Times are epoch seconds (the store's clock: Redis
    `TIME`, or the host's for SQLite); `started_at` is when the latest run
    started; `attempts` counts runs started (claims)."""

    id: str
    client: str
    agent: str
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    body: Any  # the input JSON, as submitted; None in list()'s jobs (a listing never reads the bodies)
    result: dict[str, Any] | None  # {"data", "trace"} once succeeded
    error: dict[str, Any] | None  # the §3.1 error once failed or canceled (None for a plain cancel)
    webhook_url: str | None  # the per-job webhook (`Webhook-URL`), None: the configured one
    webhook: WebhookStatus | None = None  # None: the job has no webhook
    # The W3C traceparent of the request that submitted it (None: tracing was
    # off): the run's own trace links to it. Internal: not in the document.
    traceparent: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_document(self) -> dict[str, Any]:
        """SPEC §9.1's job document (`webhook`: null for a job without one),
        without the body, the client or the webhook's URL (it may hold a token)."""
        return {
            "id": self.id,
            "agent": self.agent,
            "status": self.status,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
            "webhook": self.webhook.to_document() if self.webhook is not None else None,
        }


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery task: the webhook of one job end, leased to the
    claimer. Times are the store's clock (epoch seconds): `claimed_at` is
    the store's now at the claim, so the caller measures `retry_for` against
    `first_at` on that clock, not its own."""

    id: str  # the job's id: one delivery per job
    type: EventType
    attempts: int  # attempts recorded so far (0 for the first)
    first_at: float  # when the job ended: retry_for counts from here
    next_at: float  # when it was due
    claimed_at: float
    job: Job  # as it is now (its document is the event's data)

    @property
    def msg_id(self) -> str:
        return msg_id(self.id)

    @property
    def webhook_url(self) -> str | None:
        """The job's own target; None: the configured one."""
        return self.job.webhook_url

    def event(self) -> dict[str, Any]:
        """The body of SPEC §9.3, the same on every attempt (one webhook-id,
        one body): `timestamp` is the job's end, not the attempt's, and the
        data is the job document without its `webhook`, which changes with
        every attempt and says nothing to the receiver (always "pending")."""
        data = self.job.to_document()
        del data["webhook"]
        return {"type": self.type, "timestamp": rfc3339(self.job.finished_at or self.first_at), "data": data}


class JobFinished(Exception):
    """cancel() of a job that already finished (SPEC §9.1: 409 conflict). Holds it."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} already {job.status}")
        self.job = job


class InvalidCursor(ValueError):
    """A `cursor` that no list() gave (→ 400 invalid_request)."""


# The cursor is the insertion sequence number of the last job of a page
# (newest first: the next page holds the smaller ones), so jobs inserted while
# a client pages never shift a page. Encoded so that clients do not build them.
def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"j1:{seq}".encode()).decode().rstrip("=")


MAX_SEQ = 2**63 - 1  # SQLite's INTEGER: a larger one would overflow (OverflowError, not a 400)


def decode_cursor(cursor: str) -> int:
    """The seq of a cursor encode_cursor made; InvalidCursor for anything else
    (ASCII digits only, 0 <= seq < 2**63: no cursor of ours is longer)."""
    try:
        if len(cursor) > 64:  # "j1:" + 19 digits is 30 characters
            raise ValueError("too long")
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, seq = text.partition(":")
        if tag != "j1" or not (seq.isascii() and seq.isdigit()) or len(seq) > 19 or int(seq) > MAX_SEQ:
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor[:80]!r}") from exc


class JobStore(Protocol):
    """Jobs of SPEC §9: aiwfd.jobs.sqlite.SQLiteJobStore (one host) or
    aiwfd.jobs.redis_streams.RedisJobStore (the fleet). Every method raises
    StoreError when the backend does not answer."""

    description: str  # for the start-up log line ("sqlite:/var/lib/aiwfd/jobs.sqlite3", "redis://…"; no password)
    shared: bool  # True when other hosts' instances see the same jobs (Redis)

    async def submit(self, client: str, agent: str, body: Any, webhook_url: str | None = None,
                     *, webhook: bool | None = None, traceparent: str | None = None,
                     job_id: str | None = None) -> Job:
        """Store a queued job; durable before it returns (the 202's promise).
        `webhook`: whether its end is delivered to a webhook (default: when
        it names its own `webhook_url`; True without one: the configured URL,
        which the delivery loop reads when it delivers). `traceparent`: the
        submitting request's span, kept for the run to link to (SPEC §11.2).

        `job_id`: the id to store it under (keyed_job_id; default a random
        one). When a job with that id exists already (a retry of a submission
        whose first write outlived the store's timeout, but was done), nothing
        is written and that job is returned as it is now, in the same atomic
        step as the write would have been: whoever's it is and whatever its
        body, which the caller compares with its own."""
        ...

    async def claim(self, owner: str, lease: float, *, agents: Collection[str] | None = None,
                    token: str | None = None) -> Job | None:
        """The oldest runnable job (queued, or running with a lease that ran
        out), now running under `owner` for `lease` seconds, attempts + 1; None
        when there is none. A lost job claimed max_attempts times already fails
        as a dead letter instead (whatever its agent).

        `agents`: only jobs of these agents (the instance's config); None: any.
        A job of another agent is left as it is, for an instance that knows it
        (a rolling reload): not claimed, no attempt counted, claimable at once
        by the next claim that names its agent (or none).

        `token`: the caller's name for this claim, the same on a retry of it
        after a StoreError (a reply that timed out, the claim may have run):
        a job already claimed by (owner, token), still running under `owner`,
        is returned again (lease renewed, no attempt counted) instead of being
        stranded under `owner` until its lease runs out. A fresh token per
        claim: a token that took no job, or whose job is not `owner`'s any
        more, claims as without one."""
        ...

    async def renew(self, job_id: str, owner: str, lease: float) -> bool:
        """Extend the lease to `lease` seconds from now. False: the job is no
        longer ours (its lease ran out and another owner claimed it, it was
        canceled or finished): stop running it."""
        ...

    async def finish(self, job_id: str, owner: str, status: JobStatus,
                     result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        """Write the outcome once: only the lease holder, only while running.
        False (nothing written) otherwise. A lease that ran out but that no
        one claimed yet still counts as held: the run was not superseded."""
        ...

    async def release(self, job_id: str, owner: str) -> None:
        """Give the job back to the queue without a result (SIGTERM after the
        shutdown timeout); nothing when it is not ours any more. Its place in
        the queue is the backend's (SQLite: where it was; Redis: the end)."""
        ...

    async def get(self, job_id: str, client: str) -> Job | None:
        """The job, or None when it does not exist or is another client's."""
        ...

    async def list(self, client: str, status: str | None = None, agent: str | None = None,
                   limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """The client's jobs, newest first, at most `limit`, and the cursor of
        the next page (None: this was the last). InvalidCursor for a bad cursor.
        The jobs' `body` is None: a listing does not read the inputs (they may
        be large; the documents never show them)."""
        ...

    async def cancel(self, job_id: str, client: str) -> Job | None:
        """Queued or running → canceled (a running job's owner sees renew and
        finish answer False); None when not found (or another client's);
        JobFinished when it already finished."""
        ...

    async def fail_agent(self, agent: str, error: dict[str, Any]) -> int:
        """Fail the agent's queued jobs with `error` (the agent was removed by a
        reload); how many. Also those that claims with `agents` left alone."""
        ...

    async def purge(self, older_than: float) -> int:
        """Delete jobs that finished more than `older_than` seconds ago
        (retention), with their delivery if it is still pending (retention
        bounds what is stored: keep it ≥ jobs.webhook.retry_for); how many."""
        ...

    async def claim_delivery(self, owner: str, lease: float) -> Delivery | None:
        """The delivery due first (pending, due now, not leased by another
        owner, or its lease ran out), now leased to `owner` for `lease`
        seconds; None when none is due. The lease is the caller's time for
        one attempt: let it exceed the attempt's timeout."""
        ...

    async def delivery_result(self, delivery_id: str, owner: str, outcome: DeliveryOutcome,
                              status: int | None = None, delay: float | None = None) -> bool:
        """Record one attempt (attempts + 1, `last_status` = status). retry:
        due again `delay` seconds from the store's now, lease released;
        delivered: done; gone, failed: done, the webhook `failed`. False
        (nothing written) when the delivery is not `owner`'s any more (its
        lease ran out and another owner claimed it) or is done."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; StoreError otherwise (`/health/ready`)."""
        ...

    async def close(self) -> None:
        ...
