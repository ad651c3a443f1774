"""The webhook delivery loop (SPEC §9.3): the store's delivery tasks, sent.

    stop = asyncio.Event()
    task = asyncio.create_task(run_deliveries(store, session, secrets, owner="host-1234-d",
                                              allow_private=False, stop=stop, default_url=url))
    ...; stop.set(); await task

Each instance runs one loop. It claims due deliveries from the job store
(aiwfd/jobs/store.py: a lease per delivery, so two instances never send one
at the same time), makes one attempt each with aiwfd.jobs.webhooks.deliver,
and records the outcome in the store: done (delivered, 410 gone, a refused
target), or a retry after the outcome's delay, until `retry_for` from the
job's end has passed. The loop never touches the job itself: a failing
receiver never re-runs the agent. Everything it needs is in the store, so a
restart (or another instance) carries on where it stopped; an attempt whose
instance died is made again once its lease runs out (at least once: the
receiver deduplicates by `webhook-id`, the same on every attempt).

Attempts run concurrently (up to `concurrency`): a receiver that hangs for
its 10 s timeout does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiohttp

from aiwfd.jobs.store import Delivery, JobStore, StoreError
from aiwfd.jobs.webhooks import DEFAULT_TIMEOUT, RETRY_FOR, Outcome, deliver, should_give_up

__all__ = ["IDLE", "run_deliveries"]

logger = logging.getLogger("aiwfd")

# How long an idle loop waits before it looks for due deliveries again. A
# delivery of this instance's own jobs is sooner when the worker sets `wake`;
# retries and other instances' job ends are found within this.
IDLE = 0.25


async def run_deliveries(
    store: JobStore,
    session: aiohttp.ClientSession,
    secrets: Sequence[str],
    *,
    owner: str,
    allow_private: bool,
    stop: asyncio.Event,
    default_url: str | None = None,
    retry_for: float = RETRY_FOR,
    timeout: float = DEFAULT_TIMEOUT,
    lease: float | None = None,
    idle: float = IDLE,
    concurrency: int = 16,
    wake: asyncio.Event | None = None,
) -> None:
    """Deliver until `stop` is set; then send what is due at that moment, wait
    for the attempts under way (each bounded by `timeout`) and return.

    `default_url`: the configured webhook (jobs.webhook.url), for jobs that
    name none; a job with neither fails its delivery at once. `session`:
    from webhooks.open_session (it judges the addresses connected to). The
    lease of a claim (default: `timeout` + 20 s) must outlast an attempt, or
    another instance would make it again meanwhile. `wake`, when given, ends
    an idle wait early (set it after a job ends here). StoreErrors are logged
    and the loop goes on after an idle wait: the store coming back resumes it."""
    if not secrets:
        raise ValueError("run_deliveries: no webhook secret to sign with")
    lease = timeout + 20.0 if lease is None else lease
    if lease <= timeout:
        raise ValueError(f"run_deliveries: the lease ({lease:g} s) must outlast an attempt ({timeout:g} s)")
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()
    # Set when an attempt ends: a retry due at once (Retry-After: 0) or a free
    # slot should not wait out an idle period.
    freed = asyncio.Event()

    async def attempt(d: Delivery) -> None:
        try:
            await _attempt(store, session, secrets, d, owner=owner, allow_private=allow_private,
                           default_url=default_url, retry_for=retry_for, timeout=timeout)
        except StoreError as exc:
            # The outcome is not recorded: the lease runs out and the attempt
            # is made again (at least once).
            logger.warning("webhook %s: recording the attempt failed: %s", d.msg_id, exc)
        except Exception:  # a bug must not end every later delivery of this instance
            logger.exception("webhook %s: the attempt failed unexpectedly", d.msg_id)
        finally:
            slots.release()
            freed.set()

    try:
        while True:
            # Once stopped, what is due now is still sent (a job that ended
            # during the drain gets its webhook before the process exits), then
            # the loop ends; the caller's deadline cancels it if that takes long.
            stopping = stop.is_set()
            await slots.acquire()
            freed.clear()
            try:
                d = await store.claim_delivery(owner, lease)
            except StoreError as exc:
                slots.release()
                if stopping:
                    break
                logger.warning("webhook deliveries: the job store failed: %s", exc)
                await _wait(idle, stop)
                continue
            if d is None:
                slots.release()
                if stopping:
                    break
                await _wait(idle, stop, wake, freed)
                if wake is not None:
                    wake.clear()
                continue
            task = asyncio.create_task(attempt(d))
            running.add(task)
            task.add_done_callback(running.discard)
    except asyncio.CancelledError:
        # Cancelled (not stopped): the attempts go too, unrecorded; their
        # leases run out and any instance makes them again.
        for t in running:
            t.cancel()
        raise
    finally:
        # Stopped: attempts under way finish (bounded by `timeout`), since a
        # result recorded now is an attempt not made twice.
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def _attempt(store: JobStore, session: aiohttp.ClientSession, secrets: Sequence[str], d: Delivery, *,
                   owner: str, allow_private: bool, default_url: str | None, retry_for: float,
                   timeout: float) -> None:
    """One attempt of `d`, recorded."""
    started = time.monotonic()
    url = d.webhook_url or default_url
    if url is None:  # the configured webhook was removed since the job was submitted
        outcome = Outcome("failed", None, None, "no webhook URL is configured any more")
    else:
        outcome = await deliver(session, url, d.event(), d.msg_id, secrets, attempt=d.attempts + 1,
                                timeout=timeout, allow_private=allow_private)
    kind = outcome.kind
    if kind == "retry":
        assert outcome.delay is not None
        # On the store's clock: the job's end (first_at) and the claim are
        # both its times, and the attempt's duration is measured here.
        next_at = d.claimed_at + (time.monotonic() - started) + outcome.delay
        if should_give_up(d.first_at, next_at, retry_for):
            kind = "failed"
            logger.warning("webhook %s (%s): giving up after %d attempts: %s", d.msg_id, d.type,
                           d.attempts + 1, outcome.reason)
        else:
            logger.info("webhook %s (%s): attempt %d: %s; again in %.1f s", d.msg_id, d.type,
                        d.attempts + 1, outcome.reason, outcome.delay)
    elif kind != "delivered":
        logger.warning("webhook %s (%s): %s", d.msg_id, d.type, outcome.reason)
    recorded = await store.delivery_result(d.id, owner, kind, outcome.status,
                                           outcome.delay if kind == "retry" else None)
    if not recorded:  # our lease ran out and another instance took it over
        logger.warning("webhook %s: the attempt outlasted its lease; another instance has it", d.msg_id)


async def _wait(seconds: float, *events: asyncio.Event | None) -> None:
    """Until `seconds` pass or one of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
