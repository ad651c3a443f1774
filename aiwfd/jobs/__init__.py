"""Jobs of SPEC §9: the store (aiwfd/jobs/store.py, the `JobStore` protocol and
the job document) and its two backends, SQLite in the state directory for
one host (aiwfd/jobs/sqlite.py) and Redis Streams for the fleet
(aiwfd/jobs/redis_streams.py). `open_job_store` picks one as `open_store`
does for the limits; neither backend is imported before it is asked for.
Webhooks: one attempt in aiwfd/jobs/webhooks.py, the loop that sends the
store's delivery tasks in aiwfd/jobs/delivery.py."""

from __future__ import annotations

from pathlib import Path

from aiwfd.jobs.store import DEFAULT_MAX_ATTEMPTS, JobStore

__all__ = ["open_job_store"]


def open_job_store(redis_url: str | None, state_dir: Path | str, *, timeout: float | None = None,
                   max_attempts: int = DEFAULT_MAX_ATTEMPTS, prefix: str = "aiwfd:") -> JobStore:
    """Redis when `redis_url` is set, else SQLite in `state_dir`
    (Settings.state_path). Nothing connects or touches the disk yet: `ping`
    tells whether the store answers. `timeout` bounds a call (default: 0.5 s
    for Redis, as the limits store; 5 s for SQLite's lock, which another
    instance's write may hold for a moment)."""
    if redis_url:
        try:
            from aiwfd.jobs.redis_streams import RedisJobStore
        except ImportError as exc:  # the error names REDIS_URL, which is what the operator set
            raise ImportError(f"REDIS_URL is set but the redis package is missing ({exc}): pip install 'redis>=5'") from exc
        return RedisJobStore(redis_url, timeout=0.5 if timeout is None else timeout,
                             max_attempts=max_attempts, prefix=prefix)
    from aiwfd.jobs.sqlite import SQLiteJobStore

    return SQLiteJobStore(state_dir, timeout=5.0 if timeout is None else timeout, max_attempts=max_attempts)
