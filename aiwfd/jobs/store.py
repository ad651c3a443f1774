"""The job store's vocabulary (SPEC §9): the job document, the `JobStore`
protocol both backends follow (aiwfd/jobs/sqlite.py, aiwfd/jobs/redis_streams.py),
and the errors they raise.

A job's life::

    submit → queued ──claim──→ running ──finish──→ succeeded | failed | canceled
                ↑                 │ lease ran out (kill -9) → claimable again, attempts + 1
                └──── release ────┘ (SIGTERM after the shutdown timeout)
    cancel: queued or running → canceled; finished → JobFinished

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
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiwfd.store.base import StoreError

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "FINISHED",
    "InvalidCursor",
    "Job",
    "JobFinished",
    "JobStatus",
    "JobStore",
    "StoreError",
    "dead_letter_error",
    "decode_cursor",
    "encode_cursor",
    "rfc3339",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

# A job whose runs were lost this many times (each claim counts) fails as a
# dead letter: a job that crashes its instance must not crash the fleet in turn.
DEFAULT_MAX_ATTEMPTS = 5


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
    body: Any  # the input JSON, as submitted
    result: dict[str, Any] | None  # {"data", "trace"} once succeeded
    error: dict[str, Any] | None  # the §3.1 error once failed or canceled (None for a plain cancel)
    webhook_url: str | None  # the per-job webhook (`Webhook-URL`), None: the configured one

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_document(self) -> dict[str, Any]:
        """SPEC §9.1's job document, without `webhook` (the webhook
        deliveries' own store adds it) and without the body or the client."""
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
        }


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


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, seq = text.partition(":")
        if tag != "j1" or not seq.isdigit():
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc


class JobStore(Protocol):
    """Jobs of SPEC §9: aiwfd.jobs.sqlite.SQLiteJobStore (one host) or
    aiwfd.jobs.redis_streams.RedisJobStore (the fleet). Every method raises
    StoreError when the backend does not answer."""

    description: str  # for the start-up log line ("sqlite:/var/lib/aiwfd/jobs.sqlite3", "redis://…"; no password)
    shared: bool  # True when other hosts' instances see the same jobs (Redis)

    async def submit(self, client: str, agent: str, body: Any, webhook_url: str | None = None) -> Job:
        """Store a queued job; durable before it returns (the 202's promise)."""
        ...

    async def claim(self, owner: str, lease: float) -> Job | None:
        """The oldest runnable job (queued, or running with a lease that ran
        out), now running under `owner` for `lease` seconds, attempts + 1; None
        when there is none. A lost job claimed max_attempts times already fails
        as a dead letter instead."""
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
        the next page (None: this was the last). InvalidCursor for a bad cursor."""
        ...

    async def cancel(self, job_id: str, client: str) -> Job | None:
        """Queued or running → canceled (a running job's owner sees renew and
        finish answer False); None when not found (or another client's);
        JobFinished when it already finished."""
        ...

    async def fail_agent(self, agent: str, error: dict[str, Any]) -> int:
        """Fail the agent's queued jobs with `error` (the agent was removed by a
        reload); how many."""
        ...

    async def purge(self, older_than: float) -> int:
        """Delete jobs that finished more than `older_than` seconds ago
        (retention); how many."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; StoreError otherwise (`/health/ready`)."""
        ...

    async def close(self) -> None:
        ...
