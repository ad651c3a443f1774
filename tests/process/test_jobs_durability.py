"""An accepted job is never lost (SPEC §9.2, issue 16 "Must be shown" 2), on
real `aiwfd serve` processes, each test run against both stores: SQLite
(the instances share one --state-dir) and Redis (they share one real
redis-server, --redis-url).

- kill -9 mid-job: the instance running it is SIGKILLed while the fake model
  holds its call; a second instance runs it to the end once the lease
  (`jobs.lease: 1s`, the least) has run out: `attempts: 2`, one result, one
  `job.succeeded` webhook.
- SIGTERM with a running job: it finishes within the shutdown timeout (exit
  0, `succeeded`), or it is cancelled at the timeout, goes back to the queue
  and finishes on the next start (`attempts: 2`).
- 20 random kill -9s under 200 submissions spread over two instances that a
  supervisor restarts (system: 15-45 s a store): every 202'd id ends
  `succeeded`, and its webhook reaches the receiver under one `webhook-id`.
  The chaos takes ~15 s; in about half the runs a kill lands between a
  delivery's claim and its POST, and that webhook then waits out the
  delivery's lease (aiwfd.jobs.delivery: the attempt timeout + 20 s = 30 s,
  not jobs.lease), which is most of the rest.

The model is an in-process FakeOpenAI and the receiver an in-process
aiwfd.testing.webhook_receiver (both real HTTP servers on 127.0.0.1), so
every blocking wait on a child goes through a thread. Waits are on events:
a log line, the fake's call count, the receiver's deliveries, or a job's
status polled with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI, Hold, Reply
from aiwfd.testing.metrics import scrape, value
from aiwfd.testing.processes import START_TIMEOUT, AiwfdProcess, started
from aiwfd.testing.redisproc import RedisServer
from aiwfd.testing.webhook_receiver import Delivery, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
INPUT = {"name": "Ann"}
CONFIG = """\
version: 0.3
providers:
  fake:
    base_url: {url}
    api_key_env: FAKE_KEY
types:
  In:
    name: string
  Out:
    message: string
assistants:
  greeter:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 1
jobs:
  lease: {lease}
  max_attempts: {max_attempts}
  webhook:
    url: {hook}
    allow_private: true
"""


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """The flags that make instances share one store: a state directory, or a
    redis-server of the test's own (no job of another test in it)."""
    if request.param == "sqlite":
        yield ["--state-dir", str(tmp_path / "state")]
    else:
        with RedisServer() as server:
            yield ["--redis-url", server.url]


@contextlib.asynccontextmanager
async def world(tmp_path: Path, store: list[str], *, lease: str = "1s", max_attempts: int = 5,
                latency: float = 0.0, extra: tuple[str, ...] = ()) -> AsyncIterator[
                    tuple[FakeOpenAI, WebhookReceiver, list[str], dict[str, str]]]:
    """The fake model, the receiver, and the args and env of `aiwfd serve` on them."""
    async with FakeOpenAI(latency=latency) as fake, WebhookReceiver([SECRET]) as rx:
        config = tmp_path / "agents.yaml"
        config.write_text(CONFIG.format(url=fake.base_url, hook=rx.url, lease=lease, max_attempts=max_attempts),
                          encoding="utf-8")
        args = ["serve", "-f", str(config), "-p", "0", *store, *extra]
        env = {"FAKE_KEY": "sk-fake", "AIWF_WEBHOOK_SECRET": SECRET, "TMPDIR": str(tmp_path)}
        yield fake, rx, args, env


async def submit(session: aiohttp.ClientSession, proc: AiwfdProcess) -> str:
    async with session.post(proc.url("/agent/greeter/jobs"), json=INPUT) as r:
        doc = await r.json()
        assert r.status == 202, (r.status, doc)
        assert r.headers["Location"] == f"/jobs/{doc['id']}"
        assert doc["status"] == "queued" and doc["attempts"] == 0
        return str(doc["id"])


async def get_job(session: aiohttp.ClientSession, proc: AiwfdProcess, job_id: str) -> dict[str, Any]:
    async with session.get(proc.url(f"/jobs/{job_id}")) as r:
        assert r.status == 200, (r.status, await r.text())
        return dict(await r.json())


async def until(session: aiohttp.ClientSession, proc: AiwfdProcess, job_id: str, timeout: float = 20.0,
                webhook: str = "delivered") -> dict[str, Any]:
    """The job's document once it has finished and its webhook is `webhook`
    (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = await get_job(session, proc, job_id)
        if doc["finished_at"] is not None and (doc["webhook"] or {}).get("status") == webhook:
            return doc
        assert time.monotonic() < deadline, f"job {job_id} still {doc}"
        await asyncio.sleep(0.05)


async def log(proc: AiwfdProcess, pattern: str, timeout: float = 20.0) -> str:
    return await asyncio.to_thread(proc.wait_for_log, pattern, timeout)


def one_success(rx: WebhookReceiver, job_id: str, attempts: int) -> Delivery:
    """The job's only webhook: one delivery, verified, `job.succeeded`."""
    got = rx.by_id(f"msg_{job_id}")
    assert len(got) == 1, [(d.msg_id, d.answered) for d in rx.deliveries]
    [d] = got
    assert d.verified and d.json()["type"] == "job.succeeded"
    data = d.json()["data"]
    assert data["id"] == job_id and data["status"] == "succeeded" and data["attempts"] == attempts
    assert len(rx.deliveries) == 1, [d.msg_id for d in rx.deliveries]
    return d


# --------------------------------------------------------------------------
# kill -9 mid-job


async def test_kill_9_mid_job_another_instance_runs_it_to_the_end(tmp_path: Path, store: list[str]) -> None:
    async with world(tmp_path, store) as (fake, rx, args, env), aiohttp.ClientSession() as session:
        gate = asyncio.Event()  # never set: A's call is held until A dies
        fake.script(Hold(gate))
        async with started(args, env) as a:
            job_id = await submit(session, a)
            await fake.wait_calls(1)  # A runs it: the model call is in flight
            assert (await get_job(session, a, job_id))["status"] == "running"
            a.proc.kill()
            assert await asyncio.to_thread(a.wait, 10) == -signal.SIGKILL
        assert "succeeded" not in a.stderr
        started_at = time.monotonic()
        async with started(args, env) as b:
            await log(b, rf"job {job_id} \(greeter\): succeeded after 2 attempts")
            # Not before A's lease ran out (1 s from A's last renewal, at most 1 s ago).
            assert fake.calls == 2  # run twice, never at the same time: A's call was gone first
            doc = await until(session, b, job_id)
            assert doc["status"] == "succeeded" and doc["attempts"] == 2 and doc["error"] is None
            assert doc["result"]["data"] == {"message": "sample"}
            assert doc["webhook"] == {"status": "delivered", "attempts": 1, "last_status": 200}
            metrics = await scrape(session, b.url("/metrics"))
            assert value(metrics, "aiwfd_jobs_total", agent="greeter", outcome="succeeded") == 1
        assert time.monotonic() - started_at < 15
        assert b.stderr.count(f"job {job_id} ") == 1, b.stderr
        one_success(rx, job_id, attempts=2)  # B has stopped: nothing more is coming


# --------------------------------------------------------------------------
# SIGTERM with a running job


async def test_sigterm_a_running_job_finishes_within_the_shutdown_timeout(tmp_path: Path,
                                                                         store: list[str]) -> None:
    async with world(tmp_path, store, extra=("--shutdown-timeout", "10")) as (fake, rx, args, env), \
            aiohttp.ClientSession() as session:
        gate = asyncio.Event()
        fake.script(Hold(gate))
        async with started(args, env) as a:
            job_id = await submit(session, a)
            await fake.wait_calls(1)
            a.send(signal.SIGTERM)
            await log(a, r"waiting up to \d+s for 1 running job$")
            gate.set()  # the model answers while A drains
            assert await asyncio.to_thread(a.wait, 20) == 0, a.stderr
        assert re.search(rf"job {job_id} \(greeter\): succeeded after 1 attempt$", a.stderr, re.M), a.stderr
        assert "back to the queue" not in a.stderr
        # A sent the webhook of the job that ended during its drain before it exited.
        one_success(rx, job_id, attempts=1)
        async with started(args, env) as b:  # reads the store A left
            doc = await until(session, b, job_id)
            assert doc["status"] == "succeeded" and doc["attempts"] == 1
            assert doc["result"]["data"] == {"message": "sample"}
        assert fake.calls == 1  # not run again by B
        one_success(rx, job_id, attempts=1)


async def test_sigterm_a_job_longer_than_the_shutdown_timeout_goes_back_to_the_queue(
        tmp_path: Path, store: list[str]) -> None:
    async with world(tmp_path, store, extra=("--shutdown-timeout", "0.5")) as (fake, rx, args, env), \
            aiohttp.ClientSession() as session:
        gate = asyncio.Event()  # never set: the first run outlasts the shutdown timeout
        fake.script(Hold(gate))
        async with started(args, env) as a:
            job_id = await submit(session, a)
            await fake.wait_calls(1)
            a.send(signal.SIGTERM)
            await log(a, r"shutdown timeout: 1 running job go")
            await log(a, rf"job {job_id} \(greeter\): back to the queue")
            assert await asyncio.to_thread(a.wait, 20) == 0, a.stderr
        assert fake.disconnects == 1  # its model call was closed
        assert "succeeded" not in a.stderr
        async with started(args, env) as b:
            await log(b, rf"job {job_id} \(greeter\): succeeded after 2 attempts")
            doc = await until(session, b, job_id)
            assert doc["status"] == "succeeded" and doc["attempts"] == 2
            assert doc["result"]["data"] == {"message": "sample"}
        assert fake.calls == 2
        one_success(rx, job_id, attempts=2)


# --------------------------------------------------------------------------
# 20 random kill -9s under 200 submissions

SUBMISSIONS = 200
KILLS = 20


class Fleet:
    """Two instances on one store; a supervisor task per slot starts its
    instance again whenever it exits (the killer's SIGKILL)."""

    def __init__(self, args: list[str], env: dict[str, str], n: int = 2) -> None:
        self.args, self.env = args, env
        self.procs: list[AiwfdProcess | None] = [None] * n
        self.up = [asyncio.Event() for _ in range(n)]
        self.all: list[AiwfdProcess] = []
        self.restarts = 0
        self.died = asyncio.Condition()  # notified when the supervisor sees an instance exit
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []

    async def _start(self, i: int) -> None:
        proc = await asyncio.to_thread(partial(AiwfdProcess, self.args, env=self.env, timeout=START_TIMEOUT))
        self.all.append(proc)
        self.procs[i] = proc
        self.up[i].set()

    async def _supervise(self, i: int) -> None:
        while not self._stopping:
            proc = self.procs[i]
            assert proc is not None
            await asyncio.to_thread(proc.proc.wait)
            self.up[i].clear()
            async with self.died:
                self.died.notify_all()
            if self._stopping:
                return
            await asyncio.to_thread(proc.wait, 10)  # its output read to the end
            self.restarts += 1
            await self._start(i)

    async def settle(self, proc: AiwfdProcess, timeout: float = 2.0) -> None:
        """After a request to `proc` broke: until its supervisor has seen it
        exit (or `timeout`, if it is still alive), not a spin of retries."""
        async with self.died:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.died.wait_for(lambda: proc.proc.returncode is not None), timeout)

    def live(self) -> list[AiwfdProcess]:
        return [p for i, p in enumerate(self.procs) if p is not None and self.up[i].is_set()
                and p.proc.poll() is None]

    async def any_live(self, prefer: int = 0) -> AiwfdProcess:
        """A running instance, `prefer`'s when it is up; else the first to come up."""
        n = len(self.procs)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for k in range(n):
                i = (prefer + k) % n
                p = self.procs[i]
                if p is not None and self.up[i].is_set() and p.proc.poll() is None:
                    return p
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no instance came up again"
            waits = [asyncio.ensure_future(e.wait()) for e in self.up]
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def __aenter__(self) -> Fleet:
        try:
            await asyncio.gather(*(self._start(i) for i in range(len(self.procs))))
        except BaseException:
            await self.__aexit__()
            raise
        self._supervisors = [asyncio.ensure_future(self._supervise(i)) for i in range(len(self.procs))]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        await asyncio.gather(*(asyncio.to_thread(p.stop, signal.SIGTERM, 15) for p in list(self.all)))
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        # One a supervisor was starting meanwhile.
        await asyncio.gather(*(asyncio.to_thread(p.stop, signal.SIGTERM, 15) for p in self.all))


async def submit_anywhere(session: aiohttp.ClientSession, fleet: Fleet, n: int,
                          unanswered: list[int]) -> str:
    """Submit to instance n % 2 (or whichever is up) until one answers 202.
    A request whose connection broke after it was sent may have been stored
    without its 202 reaching us: it is counted in `unanswered`."""
    while True:
        proc = await fleet.any_live(prefer=n % 2)
        try:
            async with session.post(proc.url("/agent/greeter/jobs"), json=INPUT) as r:
                doc = await r.json()
                assert r.status == 202, (r.status, doc)
                return str(doc["id"])
        except aiohttp.ClientConnectorError:
            pass  # refused: it has just died; nothing was sent
        except (aiohttp.ClientError, asyncio.TimeoutError):
            unanswered[0] += 1
        await fleet.settle(proc)


async def all_succeeded(session: aiohttp.ClientSession, fleet: Fleet, ids: list[str],
                        timeout: float) -> dict[str, dict[str, Any]]:
    """Every job's document once all have finished (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while True:
        proc = await fleet.any_live()
        try:
            for job_id in ids:
                if job_id not in done:
                    doc = await get_job(session, proc, job_id)
                    if doc["status"] not in ("queued", "running"):
                        done[job_id] = doc
        except aiohttp.ClientError:
            await fleet.settle(proc)  # that instance was just killed: ask the other
            continue
        if len(done) == len(ids):
            return done
        left = [(i, d) for i, d in ((i, done.get(i)) for i in ids) if d is None][:5]
        assert time.monotonic() < deadline, f"{len(ids) - len(done)} jobs not finished, e.g. {left}"
        await asyncio.sleep(0.1)


async def all_delivered(rx: WebhookReceiver, msg_ids: set[str], timeout: float) -> None:
    """Until every one of `msg_ids` reached the receiver (waits on its deliveries)."""
    deadline = time.monotonic() + timeout
    while not msg_ids <= {d.msg_id for d in rx.deliveries}:
        missing = sorted(msg_ids - {d.msg_id for d in rx.deliveries})
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(missing)} webhooks never arrived, e.g. {missing[:5]}"
        with contextlib.suppress(asyncio.TimeoutError):
            await rx.wait_for(len(rx.deliveries) + 1, timeout=remaining)


@pytest.mark.system
async def test_nothing_accepted_is_lost_under_20_kill_9s(tmp_path: Path, store: list[str]) -> None:
    seed = int(os.environ.get("AIWF_CHAOS_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    began = time.monotonic()
    # lease 1s (the least): a killed instance's jobs run again within about a
    # second. max_attempts high: an unlucky job may be on several killed instances.
    async with world(tmp_path, store, lease="1s", max_attempts=50, latency=0.05) as (fake, rx, args, env), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        # The model answers after 10-200 ms (then 50 ms once the script is used up).
        fake.script(*(Reply(delay=rng.uniform(0.01, 0.2)) for _ in range(2 * SUBMISSIONS)))
        async with Fleet(args, env) as fleet:
            accepted: list[str] = []
            unanswered = [0]
            kills: list[int] = []

            async def submitter() -> None:
                async def one(n: int) -> None:
                    accepted.append(await submit_anywhere(session, fleet, n, unanswered))

                pending = []
                for n in range(SUBMISSIONS):
                    pending.append(asyncio.ensure_future(one(n)))
                    await asyncio.sleep(rng.uniform(0.0, 0.1))  # the stream's pace, not a synchronisation
                await asyncio.gather(*pending)

            async def killer() -> None:
                for _ in range(KILLS):
                    await asyncio.sleep(rng.uniform(0.2, 1.2))  # a random moment, not a synchronisation
                    victims = fleet.live()
                    if not victims:  # both restarting: the next one that is up
                        victims = [await fleet.any_live()]
                    victim = rng.choice(victims)
                    victim.proc.kill()
                    kills.append(victim.pid)

            await asyncio.gather(submitter(), killer())
            chaos = time.monotonic() - began
            assert len(kills) == KILLS and len(accepted) == SUBMISSIONS
            assert len(set(accepted)) == SUBMISSIONS  # 200 jobs, not one answered twice

            docs = await all_succeeded(session, fleet, accepted, timeout=45)
            bad = {i: (d["status"], d["error"]) for i, d in docs.items() if d["status"] != "succeeded"}
            assert not bad, f"{len(bad)} jobs did not succeed (seed {seed}): {list(bad.items())[:5]}"
            reruns = sum(d["attempts"] - 1 for d in docs.values())

            # Deliveries whose instance died mid-attempt are made again after
            # their lease (the attempt timeout + 20 s).
            await all_delivered(rx, {f"msg_{i}" for i in accepted}, timeout=45)
        # Every instance has stopped: whatever the receiver has now is all it gets.
        by_msg: dict[str | None, list[Delivery]] = {}
        for d in rx.deliveries:
            by_msg.setdefault(d.msg_id, []).append(d)
        assert all(d.verified for d in rx.deliveries)
        job_of = {m: {x.json()["data"]["id"] for x in ds} for m, ds in by_msg.items()}
        assert all(len(j) == 1 for j in job_of.values()), job_of  # one webhook-id, one job
        seen = {next(iter(j)) for j in job_of.values()}
        assert len(by_msg) == len(seen)  # and one webhook-id per job
        extra = seen - set(accepted)
        # A job may be stored by a request whose 202 never arrived (its
        # instance killed in between): at most one per broken request.
        assert len(extra) <= unanswered[0], (sorted(extra), unanswered[0])
        assert set(accepted) <= seen
        for m, ds in by_msg.items():
            assert all(x.json()["type"] == "job.succeeded" for x in ds), (m, [x.json()["type"] for x in ds])
        duplicates = len(rx.deliveries) - len(by_msg)
        kind = "redis" if "--redis-url" in store else "sqlite"
        print(f"\n[{kind}] seed {seed}: {SUBMISSIONS} accepted, {KILLS} kill -9s, {fleet.restarts} restarts, "
              f"{reruns} re-runs, {fake.calls} model calls, {duplicates} duplicate deliveries, "
              f"{len(extra)} job(s) of unanswered submissions ({unanswered[0]} broken requests); "
              f"chaos {chaos:.1f} s, total {time.monotonic() - began:.1f} s")
