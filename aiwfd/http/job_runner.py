"""This instance's share of the jobs (SPEC §9.2) and of their webhooks (§9.3).

    runner = JobRunner(rt, store, owner="host-1234-5f3a")
    runner.start()                  # the claim loop, the purge loop, the webhook loop
    runner.wake()                   # a job was submitted here: claim it now
    runner.cancel_local(job_id)     # DELETE /jobs/{id} of a job running here
    await runner.drain(deadline)    # SIGTERM: see below

The claim loop takes jobs from the store while fewer than
`jobs.concurrency` run here: at once when a job is submitted to this
instance, else every IDLE seconds (jobs submitted elsewhere, leases that ran
out). Every claim is a lease of `jobs.lease` seconds, renewed every third of
it while the job runs; a job whose instance died (kill -9, a lost host) is
claimed again by any instance once its lease runs out.

A run ends one of five ways (`aiwfd_jobs_total{outcome}`): succeeded or
failed (the result is written, once: only the lease holder can), canceled
(DELETE: the model call is closed), lost (a renew or the finish found the
job no longer ours: its lease ran out and another instance has it, or it
was canceled on another instance), released (SIGTERM: the job did not end
within the shutdown timeout and goes back to the queue).

Drain (SIGTERM): no job is claimed any more; running jobs get until the
deadline, then are cancelled and released; webhook attempts under way get
the same deadline, then their leases run out and any instance makes them.

The runner reads the current snapshot for every claim, so a SIGHUP's
`jobs:` (concurrency, lease, timeout, webhook) applies to the next job; a
job runs on the snapshot current when it starts, like a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import aiohttp

from aiwfd import telemetry
from aiwfd.auth.clients import ANONYMOUS, Client
from aiwfd.engine import CallStats, call_agent
from aiwfd.errors import Forbidden, HTTPError, InternalError, InvalidInput, NotFound, error_body
from aiwfd.http import quota
from aiwfd.http.runtime import Runtime, Snapshot
from aiwfd.jobs.delivery import run_deliveries
from aiwfd.jobs.settings import WebhookSettings
from aiwfd.jobs.store import Job, JobStatus, JobStore, StoreError
from aiwfd.jobs.webhooks import open_session

__all__ = ["IDLE", "JobRunner", "removed_agent_error"]

logger = logging.getLogger("aiwfd")

# How often an idle runner looks for jobs it was not woken for (submitted to
# another instance, or whose lease ran out).
IDLE = 0.25
# How often finished jobs past `jobs.retention` are removed.
PURGE_EVERY = 60.0
# While the store does not answer: how long between two tries.
STORE_RETRY = 0.5
# The part of a lease a run counts on (from when it asked for the claim or renew).
LEASE_SAFETY = 0.8
# Tries to fail a removed agent's queued jobs while the store does not answer.
FAIL_AGENT_TRIES = 10
# How long the drain waits for the loops to see it (a store call's timeout, and some).
STOP_LOOPS = 6.0


def removed_agent_error(agent: str) -> dict[str, Any]:
    """The error of a queued job whose agent a reload removed (SPEC §9.2)."""
    return _error(NotFound(f"agent {agent[:64]!r} no longer exists (a reload removed it)"))


def _error(e: HTTPError) -> dict[str, Any]:
    return dict(error_body(e, "")["error"])


class JobRunner:
    def __init__(self, rt: Runtime, store: JobStore, owner: str) -> None:
        self.rt, self.store, self.owner = rt, store, owner
        self.running: dict[str, asyncio.Task[None]] = {}
        # Why a running job's task was cancelled: "canceled" (DELETE here),
        # "lost" (a renew said it is not ours), else the drain's "released".
        self._why: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._deliveries: _Deliveries | None = None
        self._old_deliveries: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ control

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._claim_loop()), loop.create_task(self._purge_loop())]
        self.configure(self.rt.snapshot)

    def wake(self) -> None:
        self._wake.set()

    def wake_deliveries(self) -> None:
        if self._deliveries is not None:
            self._deliveries.wake.set()

    def cancel_local(self, job_id: str) -> None:
        """The job was canceled in the store: stop its run here, if it runs here."""
        task = self.running.get(job_id)
        if task is not None:
            self._why[job_id] = "canceled"
            task.cancel()

    def configure(self, snap: Snapshot) -> None:
        """(Re)start the webhook loop when the snapshot's webhook settings differ
        from the running loop's (a reload that rotated the secret, say)."""
        wanted = snap.webhooks
        current = self._deliveries
        if current is not None and current.settings == wanted:
            return
        if current is not None:
            # The old loop finishes its attempts under way, in the background;
            # the store's leases keep the two loops from sending one delivery twice.
            current.stop.set()
            self._old_deliveries.add(current.task)
            current.task.add_done_callback(self._old_deliveries.discard)
            self._deliveries = None
        if wanted is not None and not self._stop.is_set():
            self._deliveries = _Deliveries.start(self.store, wanted, self.owner + "-d")

    async def agents_removed(self, names: set[str]) -> None:
        """A reload removed these agents: their queued jobs fail with not_found."""
        for name in sorted(names):
            n = None
            for _ in range(FAIL_AGENT_TRIES):
                try:
                    n = await self.store.fail_agent(name, removed_agent_error(name))
                    break
                except StoreError as e:
                    logger.warning("jobs of the removed agent %r: the job store failed: %s", name, e)
                    await self._pause(STORE_RETRY * 4)
            if n is None:
                # Not lost: claims skip an agent no instance knows, so its jobs stay
                # queued until a later reload removes it again, or one brings it back.
                logger.error("the queued jobs of the removed agent %r could not be failed; they stay queued", name)
                continue
            if n:
                logger.info("failed %d queued job%s of the removed agent %r", n, "" if n == 1 else "s", name)

    async def drain(self, deadline: float) -> None:
        """No job is claimed any more; running ones get until `deadline` (loop
        time), then go back to the queue; webhook attempts the same."""
        self._stop.set()
        self._freed.set()
        self._wake.set()
        loop = asyncio.get_running_loop()
        # The loops end at their next step once `_stop` is set (a store call
        # under way finishes first: a cancel inside redis-py's call is not
        # always passed on); cancelled only if one does not.
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=STOP_LOOPS)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
        running = list(self.running.values())
        if running:
            logger.info("waiting up to %.0fs for %d running job%s", max(0.0, deadline - loop.time()),
                        len(running), "" if len(running) == 1 else "s")
            await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
            left = [t for t in self.running.values() if not t.done()]
            if left:
                logger.warning("shutdown timeout: %d running job%s go back to the queue", len(left),
                               "" if len(left) == 1 else "s")
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
        tasks = set(self._old_deliveries)
        if self._deliveries is not None:
            self._deliveries.stop.set()
            tasks.add(self._deliveries.task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            for t in pending:  # unrecorded: their leases run out and any instance makes them
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._deliveries = None

    # ------------------------------------------------------------ loops

    async def _claim_loop(self) -> None:
        token = secrets.token_hex(8)
        while not self._stop.is_set():
            jobs = self.rt.snapshot.compiled.config.jobs
            if len(self.running) >= jobs.concurrency:
                self._freed.clear()
                await self._freed.wait()
                continue
            self._wake.clear()  # before the claim: a submission meanwhile wakes the wait below
            self.store.max_attempts = jobs.max_attempts  # type: ignore[attr-defined]  # both backends have it
            asked = asyncio.get_running_loop().time()
            try:
                # Only agents this config has: during a rolling reload another
                # instance may know an agent this one does not (yet).
                job = await self.store.claim(self.owner, jobs.lease, agents=self.rt.snapshot.compiled.agents,
                                             token=token)
            except StoreError as e:
                # The same token on the retry: a claim whose answer was lost
                # gives its job back instead of stranding it for a lease.
                self._store_failed("claiming jobs", e)
                await self._pause(STORE_RETRY)
                continue
            token = secrets.token_hex(8)
            if job is not None and job.id in self.running:  # a retried claim of one already running here
                continue
            if job is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE)
                continue
            if self._stop.is_set():  # claimed as the drain began: back to the queue at once
                await self._release(job)
                return
            self.running[job.id] = asyncio.get_running_loop().create_task(self._run(job, jobs.lease, asked))

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the drain begins."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _purge_loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = await self.store.purge(self.rt.snapshot.compiled.config.jobs.retention)
                if n:
                    logger.info("removed %d finished job%s past jobs.retention", n, "" if n == 1 else "s")
            except StoreError as e:
                self._store_failed("removing old jobs", e)
            await self._pause(PURGE_EVERY)

    # ------------------------------------------------------------ one job

    async def _run(self, job: Job, lease: float, claimed_at: float) -> None:
        renewer = asyncio.get_running_loop().create_task(self._renew(job, lease, claimed_at))
        outcome = "lost"
        finishing: asyncio.Future[str] | None = None
        try:
            try:
                status, result, error = await self._call(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: the job fails rather than being run again and again
                logger.exception("job %s (%s): the run failed unexpectedly", job.id, job.agent)
                status, result, error = "failed", None, _error(InternalError())
            renewer.cancel()
            # A task of its own, shielded: a cancel arriving now (the drain's
            # deadline) must neither leave a finished run unwritten nor release it.
            finishing = asyncio.ensure_future(self._finish(job, status, result, error, lease))
            outcome = await asyncio.shield(finishing)
        except asyncio.CancelledError:
            if finishing is not None:
                outcome = await finishing
            else:
                outcome = self._why.pop(job.id, "released")
                if outcome == "released":
                    await self._release(job)
                elif outcome == "canceled":
                    logger.info("job %s (%s): canceled while running; its model call was closed", job.id,
                                job.agent)
        finally:
            renewer.cancel()
            self._why.pop(job.id, None)
            self.running.pop(job.id, None)
            self._freed.set()
            self.rt.metrics.jobs.inc((job.agent, outcome))

    async def _call(self, job: Job) -> tuple[JobStatus, dict[str, Any] | None, dict[str, Any] | None]:
        if telemetry.TRACER is None:
            return await self._call_agent(job)
        # A trace of its own (the run happens after the submitting request's
        # ended), linked to the submitting request's span.
        span, token = telemetry.root_span(f"job {job.agent}", {
            "aiwfd.job.id": job.id, "aiwfd.job.attempt": job.attempts, "gen_ai.agent.name": job.agent},
            link=job.traceparent)
        status = "failed"
        try:
            status, result, error = await self._call_agent(job)
            if error is not None:
                span.set_error(str(error.get("type")))
            return status, result, error
        finally:
            telemetry.detach(token)
            span.set_attribute("aiwfd.job.status", status)
            span.end()

    async def _call_agent(self, job: Job) -> tuple[JobStatus, dict[str, Any] | None, dict[str, Any] | None]:
        rt = self.rt
        async with rt.lease(background=True) as snap:
            agent = snap.compiled.agents.get(job.agent)
            if agent is None:
                return "failed", None, removed_agent_error(job.agent)
            problems = agent.input_validator.errors(job.body)
            if problems:  # the agent's input type changed since the job was accepted
                return "failed", None, _error(InvalidInput(
                    f"the job's input no longer matches {agent.assistant.input_type_name or 'the input type'} "
                    "(changed by a reload)", details=problems))
            client = _submitter(snap, job.client, agent.name)
            if client is None:
                return "failed", None, _error(Forbidden(
                    "the job's client may no longer call this agent (its key or allowlist changed in a reload)"))
            stats = CallStats()
            status, error_type = 200, None
            try:
                result = await call_agent(snap.compiled, agent, snap.client(agent), job.body, job.id,
                                          snap.compiled.config.jobs.timeout, stats)
                return "succeeded", result, None
            except HTTPError as e:
                status, error_type = e.status, e.type
                return "failed", None, _error(e)
            finally:
                rt.metrics.record_agent(agent, stats, status, error_type, client.label)
                tokens = stats.total_tokens
                if tokens and rt.store is not None:
                    # SPEC §8.2 for jobs: admitted at submission, the tokens counted when it runs.
                    plan = quota.plan_for(snap, client, agent)
                    try:
                        await rt.store.finish("", plan.limits, tokens, 0)
                    except StoreError as e:
                        quota.store_failed(rt, "finish", e)

    async def _renew(self, job: Job, lease: float, claimed_at: float) -> None:
        """Renew the lease every third of it. A run never outlives the lease it
        holds: when the store has not confirmed a renew by the time the lease
        runs out (the store away, a renew stuck behind other calls), the run
        stops, since another instance may be running the job by then."""
        loop = asyncio.get_running_loop()
        # Our clock, not the store's: a margin for the two to differ, and for the claim's own trip.
        held_until = claimed_at + lease * LEASE_SAFETY
        delay = lease / 3
        while True:
            await asyncio.sleep(delay)
            sent = loop.time()
            try:
                ours = await asyncio.wait_for(self.store.renew(job.id, self.owner, lease),
                                              max(0.0, held_until - sent))
            except (StoreError, asyncio.TimeoutError) as e:
                if loop.time() < held_until:
                    if isinstance(e, StoreError):
                        self._store_failed(f"renewing job {job.id}'s lease", e)
                    delay = min(STORE_RETRY, max(0.0, held_until - loop.time()))
                    continue
                self._lose(job, "its lease ran out before the job store confirmed a renew")
                return
            if not ours:
                self._lose(job, "canceled, or its lease ran out and another instance has it")
                return
            held_until = sent + lease * LEASE_SAFETY
            delay = lease / 3

    def _lose(self, job: Job, why: str) -> None:
        logger.warning("job %s (%s): no longer ours (%s): stopping this run", job.id, job.agent, why)
        task = self.running.get(job.id)
        if task is not None:
            self._why[job.id] = "lost"
            task.cancel()

    async def _finish(self, job: Job, status: JobStatus, result: dict[str, Any] | None,
                      error: dict[str, Any] | None, lease: float) -> str:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + lease
        while True:
            try:
                written = await self.store.finish(job.id, self.owner, status, result, error)
                break
            except StoreError as e:
                self._store_failed(f"writing job {job.id}'s result", e)
                if loop.time() >= give_up:
                    logger.error("job %s (%s): its result could not be written for %.0f s; it runs again "
                                 "once its lease runs out", job.id, job.agent, lease)
                    return "lost"
                await asyncio.sleep(STORE_RETRY)
        if not written:
            logger.warning("job %s (%s): the result was not written: the job is no longer ours (canceled, or "
                           "its lease ran out and another instance has it)", job.id, job.agent)
            return "lost"
        self.wake_deliveries()
        logger.info("job %s (%s): %s after %d attempt%s%s", job.id, job.agent, status, job.attempts,
                    "" if job.attempts == 1 else "s", f" ({error['type']})" if error else "")
        return status

    async def _release(self, job: Job) -> None:
        try:
            await self.store.release(job.id, self.owner)
            logger.info("job %s (%s): back to the queue (shutdown)", job.id, job.agent)
        except StoreError as e:  # not lost: the lease runs out and any instance runs it again
            self._store_failed(f"releasing job {job.id}", e)

    def _store_failed(self, what: str, e: StoreError) -> None:
        if self.rt.jobs_log.ready():
            logger.error("the job store (%s) does not answer: %s; %s failed (retrying; logged at most once "
                         "a minute)", self.store.description, e, what)


def _submitter(snap: Snapshot, identity: str, agent: str) -> Client | None:
    """The client a job was submitted by, as the current config knows it (for
    its limits and metrics label); None when it may no longer call `agent` (a
    reload removed its key or narrowed its allowlist). A token's scopes are
    not kept with the job: with auth.jwt still set, it runs."""
    if identity.startswith("jwt:"):
        return Client(identity[4:], "jwt", limits=snap.jwt.limits) if snap.jwt is not None else None
    if identity == ANONYMOUS.identity:
        return None if snap.auth_required else ANONYMOUS
    found = snap.keys.by_identity(identity)
    return found if found is not None and found.may_call(agent) else None


class _Deliveries:
    """One webhook loop (aiwfd.jobs.delivery) with its session and settings."""

    def __init__(self, settings: WebhookSettings, session: aiohttp.ClientSession, stop: asyncio.Event,
                 wake: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.settings, self.session, self.stop, self.wake, self.task = settings, session, stop, wake, task

    @classmethod
    def start(cls, store: JobStore, settings: WebhookSettings, owner: str) -> _Deliveries:
        session = open_session(settings.allow_private)
        stop, wake = asyncio.Event(), asyncio.Event()

        async def run() -> None:
            try:
                await run_deliveries(store, session, settings.secrets, owner=owner,
                                     allow_private=settings.allow_private, stop=stop, default_url=settings.url,
                                     retry_for=settings.retry_for, wake=wake)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the webhook loop stopped unexpectedly")
            finally:
                await session.close()

        return cls(settings, session, stop, wake, asyncio.get_running_loop().create_task(run()))
