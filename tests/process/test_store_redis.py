"""The rate-limit store (SPEC §8.2) against a real redis-server, and the same
behaviour from the memory store: each behavioural test runs on both backends.
Then what only Redis has: several Store objects (= instances) sharing exact
counts, finishes sent with the next admit or by the flusher (seen by the other
instances within milliseconds, sent on close, reported and kept when Redis is
gone), more concurrent calls than redis-py's default pool allows, leases of a
dead instance expiring, and StoreError when Redis is killed, hangs or answers
an error, with recovery once it is back.

Sliding-window tests use a 1 s window and real time (Redis reads its own
clock); their bounds are loose on purpose. tests/unit/test_store_memory.py
checks the window's arithmetic exactly, with a fake clock.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio

from aiwfd.store.limits import Limit, Store, StoreError, open_store
from aiwfd.store.redis import RedisStore, redacted
from aiwfd.testing.processes import free_port
from aiwfd.testing.redisproc import RedisServer

_names = itertools.count()


def name() -> str:
    """A fresh client/agent name per use: the tests share one Redis, never a counter."""
    return f"n{next(_names)}-{time.monotonic_ns()}"


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 2.0) -> float:
    """Poll `check` until it holds (no blind sleep); the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, "not within the deadline"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def redis_store(url: str, **kwargs: Any) -> RedisStore:
    store = open_store(url, **kwargs)
    assert isinstance(store, RedisStore)
    return store


def req(quota: int, who: str, scope: str = "client", window: float = 60.0) -> Limit:
    return Limit("requests", scope, who, quota, window)  # type: ignore[arg-type]


def tok(quota: int, who: str, window: float = 60.0) -> Limit:
    return Limit("tokens", "client", who, quota, window)


def conc(quota: int, who: str) -> Limit:
    return Limit("concurrency", "client", who, quota, 0.0)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, server: RedisServer) -> AsyncIterator[Store]:
    st = open_store(server.url if request.param == "redis" else None)
    try:
        yield st
    finally:
        await st.close()


# -- both backends ---------------------------------------------------------


async def test_description_and_shared(store: Store, server: RedisServer) -> None:
    if store.shared:
        assert store.description == server.url
    else:
        assert store.description == "memory"
    await store.ping()


async def test_all_or_nothing(store: Store) -> None:
    client, agent = name(), name()
    limits = [req(10, client), req(3, agent, "agent")]
    for i in range(3):
        adm = await store.admit(limits)
        assert adm.allowed and adm.refused is None and adm.retry_after == 0
        assert [s.remaining for s in adm.standings] == [9 - i, 2 - i]
    refused = await store.admit(limits)
    assert not refused.allowed and refused.refused == limits[1] and refused.retry_after > 0
    # The refused call counted nowhere: the client still has 7 left, not 6.
    assert [s.remaining for s in refused.standings] == [7, 0]
    assert (await store.admit([limits[0]])).standings[0].remaining == 6

    # A concurrency refusal takes nothing either: no request counted, no slot.
    who = name()
    gate = [req(10, who), conc(1, who)]
    first = await store.admit(gate)
    assert first.allowed and first.lease
    second = await store.admit(gate)
    assert not second.allowed and second.refused == gate[1] and second.lease == ""
    assert second.retry_after == 1.0
    assert second.standings[0].remaining == 9
    await store.finish(first.lease, gate, 0)
    assert (await store.admit(gate)).standings[0].remaining == 8


async def test_batch_cost_whole_or_refused(store: Store) -> None:
    who = name()
    limits = [req(10, who)]
    assert (await store.admit(limits, cost=7)).allowed
    big = await store.admit(limits, cost=4)
    assert not big.allowed and big.standings[0].remaining == 3
    assert (await store.admit(limits, cost=3)).standings[0].remaining == 0
    never = await store.admit([req(5, name())], cost=6)  # more than the quota: never fits
    assert not never.allowed and never.retry_after > 0


async def test_counters_keyed_without_quota(store: Store) -> None:
    """A reload that changes a quota keeps the counts (SPEC §8.2)."""
    who = name()
    for _ in range(4):
        assert (await store.admit([req(5, who)])).allowed
    assert (await store.admit([req(4, who)])).refused is not None  # lowered: already at 4
    raised = await store.admit([req(100, who)])
    assert raised.allowed and raised.standings[0].remaining == 95
    # Another window or another scope is another counter.
    assert (await store.admit([req(5, who, window=3600.0)])).standings[0].remaining == 4
    assert (await store.admit([req(5, who, scope="agent")])).standings[0].remaining == 4


async def test_requests_window_slides(store: Store) -> None:
    window = 1.0
    who = name()
    limits = [req(5, who, window=window)]
    t0 = time.monotonic()
    for _ in range(3):
        assert (await store.admit(limits)).allowed
    await asyncio.sleep(window / 2)
    t1 = time.monotonic()
    for _ in range(2):
        assert (await store.admit(limits)).allowed
    refused = await store.admit(limits)
    now = time.monotonic()
    assert not refused.allowed
    # The first three leave the window first: about window - (now - t0), up to a bucket (1/60) later.
    assert window - (now - t0) - 0.1 < refused.retry_after <= window - (t1 - t0) + window / 60 + 0.1
    # The reset is the oldest counted bucket's: the first three's too.
    assert abs(refused.standings[0].reset - refused.retry_after) < 0.05
    await asyncio.sleep(refused.retry_after + 0.05)
    # The first three have left; the two of t1 have not: three calls fit, the fourth does not.
    for _ in range(3):
        assert (await store.admit(limits)).allowed
    last = await store.admit(limits)
    assert not last.allowed and 0 < last.retry_after <= window


async def test_tokens_precheck_then_finish(store: Store) -> None:
    who = name()
    limits = [tok(100, who)]
    a = await store.admit(limits)
    b = await store.admit(limits)  # both pass: nothing counted until they finish
    assert a.allowed and b.allowed and a.standings == ()  # no RateLimit standing for tokens
    await store.finish(a.lease, limits, 60)
    assert (await store.admit(limits)).allowed  # 60 < 100
    await store.finish(b.lease, limits, 70)  # a call in flight overshoots by its own tokens: 130
    refused = await store.admit(limits)
    assert not refused.allowed and refused.refused == limits[0]
    assert 55 < refused.retry_after <= 61.1  # the tokens leave with their bucket, a window later
    assert (await store.admit([tok(131, who)])).allowed  # same counter, higher quota
    await store.finish("", [req(1, who)], 10_000)  # tokens go to tokens limits only
    assert (await store.admit([req(1, who)])).allowed


async def test_concurrency_slots_and_release(store: Store) -> None:
    who = name()
    limits = [conc(3, who)]
    one = await store.admit(limits)
    two = await store.admit(limits, slots=2)
    assert one.allowed and two.allowed and one.lease != two.lease
    full = await store.admit(limits)
    assert not full.allowed and full.retry_after == 1.0
    await store.finish(two.lease, limits, 0, slots=2)
    assert not (await store.admit(limits, slots=3)).allowed  # one still in flight
    three = await store.admit(limits, slots=2)
    assert three.allowed
    await store.finish(one.lease, limits, 0)
    await store.finish(one.lease, limits, 0)  # a second finish releases nothing more
    four = await store.admit(limits)
    assert four.allowed
    assert not (await store.admit(limits)).allowed
    await store.finish(three.lease, limits, 0, slots=2)
    await store.finish(four.lease, limits, 0)
    assert (await store.admit(limits, slots=3)).allowed


async def test_no_limits(store: Store) -> None:
    adm = await store.admit([])
    assert adm.allowed and adm.lease == "" and adm.standings == ()
    await store.finish("", [], 100)


# -- Redis only ------------------------------------------------------------


async def test_instances_share_counts_exactly(server: RedisServer) -> None:
    """Three Store objects on one Redis are three instances: 3 × 50 concurrent
    calls against a quota of 100 let exactly 100 through, for requests and for
    concurrency slots alike."""
    # 150 connections opened at once: a timeout a loaded CI machine meets (not what is tested).
    stores = [open_store(server.url, timeout=5.0) for _ in range(3)]
    try:
        who = name()
        limits = [req(100, who), req(1000, who, "agent"), conc(100, who)]
        results = await asyncio.gather(*(st.admit(limits) for st in stores for _ in range(50)))
        allowed = [r for r in results if r.allowed]
        assert len(allowed) == 100
        assert len({r.lease for r in allowed}) == 100
        assert all(r.refused == limits[0] or r.refused == limits[2] for r in results if not r.allowed)
        # The agent limit counted the 100 admitted calls only.
        check = await stores[1].admit([limits[1]])
        assert check.standings[0].remaining == 1000 - 100 - 1
        # Slots released by one instance are free for another, once its flusher has sent them.
        await asyncio.gather(*(stores[0].finish(r.lease, limits, 0) for r in allowed[:10]))
        raw = redis.asyncio.Redis.from_url(server.url)
        try:
            await eventually(lambda: _zcard(raw, f"aiwfd:concurrency:0:client:{who}", 90))
        finally:
            await raw.aclose()
        later = await asyncio.gather(*(stores[2].admit([conc(100, who)]) for _ in range(11)))
        assert sum(a.allowed for a in later) == 10
    finally:
        for st in stores:
            await st.close()


async def _zcard(raw: "redis.asyncio.Redis", key: str, n: int) -> bool:
    return bool(await raw.zcard(key) == n)


async def test_finish_rides_with_the_next_admit(server: RedisServer) -> None:
    """A finish costs no round trip of its own: the next admit carries it,
    applied before the check (the slot it frees is free for that admit)."""
    store = redis_store(server.url)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        limits = [conc(1, who), tok(100, who)]
        before = int((await raw.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))
        for _ in range(20):
            adm = await store.admit(limits)
            assert adm.allowed
            await store.finish(adm.lease, limits, 4)
        calls = int((await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]) - before
        assert 20 <= calls < 25  # 20 admits; the flusher may have found a finish or two alone
        await store.flush()
        assert await raw.zcard(f"aiwfd:concurrency:0:client:{who}") == 0
        assert sum(int(v) for v in (await raw.hgetall(f"aiwfd:tokens:60000:client:{who}")).values()) == 80
    finally:
        await raw.aclose()
        await store.close()


async def test_release_and_tokens_seen_by_another_instance(server: RedisServer) -> None:
    """With no admit to carry them, the flusher sends the finishes within milliseconds."""
    mine, other = redis_store(server.url), redis_store(server.url)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        limits = [conc(1, who), tok(100, who)]
        held = await mine.admit(limits)
        assert held.allowed and not (await other.admit(limits)).allowed
        await mine.finish(held.lease, limits, 100)
        took = await eventually(lambda: _zcard(raw, f"aiwfd:concurrency:0:client:{who}", 0))
        assert took < 0.5
        # The 100 tokens went with the release: the window is full for everyone.
        refused = await other.admit(limits)
        assert not refused.allowed and refused.refused == limits[1]
    finally:
        await raw.aclose()
        await mine.close()
        await other.close()


async def test_close_sends_pending_finishes(server: RedisServer) -> None:
    store = redis_store(server.url)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        limits = [conc(5, who), tok(100, who)]
        leases = [(await store.admit(limits, slots=2)).lease for _ in range(2)]
        assert await raw.zcard(f"aiwfd:concurrency:0:client:{who}") == 4
        for lease in leases:
            await store.finish(lease, limits, 7, slots=2)
        # Nothing sent yet (finish does not wait for Redis, the flusher has not run): close sends it.
        assert await raw.zcard(f"aiwfd:concurrency:0:client:{who}") == 4
        await store.close()
        assert await raw.zcard(f"aiwfd:concurrency:0:client:{who}") == 0
        assert sum(int(v) for v in (await raw.hgetall(f"aiwfd:tokens:60000:client:{who}")).values()) == 14
    finally:
        await raw.aclose()
        await store.close()


async def test_more_callers_than_the_default_pool(server: RedisServer) -> None:
    """redis-py 8's default pool refuses a 101st connection; 300 calls at once
    on one store all answer, and every one is counted. (A 5 s timeout: 300
    connections opened at once on a loaded CI machine can take over the
    default 0.5 s; what is tested is the pool's cap, not connect latency.)"""
    store = redis_store(server.url, timeout=5.0)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        limits = [req(10**6, who), conc(1000, who), tok(10**9, who)]
        gate = asyncio.Event()

        async def call() -> None:
            await gate.wait()
            adm = await store.admit(limits)
            assert adm.allowed
            await asyncio.sleep(0.01)  # all 300 in flight at once
            await store.finish(adm.lease, limits, 3)

        tasks = [asyncio.create_task(call()) for _ in range(300)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)  # a StoreError would raise here
        await store.flush()
        assert await raw.zcard(f"aiwfd:concurrency:0:client:{who}") == 0
        assert sum(int(v) for v in (await raw.hgetall(f"aiwfd:tokens:60000:client:{who}")).values()) == 900
        assert (await store.admit([limits[0]])).standings[0].remaining == 10**6 - 301
    finally:
        await raw.aclose()
        await store.close()


def test_url_max_connections_wins() -> None:
    assert RedisStore("redis://127.0.0.1:1/0")._client.connection_pool.max_connections == 4096
    assert RedisStore("redis://127.0.0.1:1/0?max_connections=7")._client.connection_pool.max_connections == 7


async def test_dead_instance_lease_expires(server: RedisServer) -> None:
    """An instance killed with -9 never calls finish: its slots free themselves after lease_ttl."""
    dead, alive = open_store(server.url), open_store(server.url)
    try:
        limits = [conc(1, name())]
        assert (await dead.admit(limits, lease_ttl=0.5)).allowed
        assert not (await alive.admit(limits)).allowed
        await asyncio.sleep(0.6)
        assert (await alive.admit(limits)).allowed
    finally:
        await dead.close()
        await alive.close()


async def test_keys_expire_and_name_no_quota(server: RedisServer) -> None:
    store = open_store(server.url, prefix="aiwfd-keys:")
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        await store.admit([req(7, who, window=2.0), tok(9, who, window=2.0), conc(3, who)])
        await store.finish("", [tok(9, who, window=2.0)], 5)
        assert isinstance(store, RedisStore)
        await store.flush()
        keys = sorted(k.decode() for k in await raw.keys("aiwfd-keys:*"))
        assert keys == sorted([f"aiwfd-keys:requests:2000:client:{who}", f"aiwfd-keys:tokens:2000:client:{who}",
                               f"aiwfd-keys:concurrency:0:client:{who}"])
        for key in keys:
            ttl = await raw.pttl(key)
            assert 0 < ttl <= (121_000 + 1000 if "concurrency" in key else 4100), (key, ttl)
        # One bucket field per window, holding the count.
        assert list((await raw.hgetall(f"aiwfd-keys:requests:2000:client:{who}")).values()) == [b"1"]
    finally:
        await raw.aclose()
        await store.close()


async def test_script_reloaded_after_flush(server: RedisServer) -> None:
    """NOSCRIPT (a restart, SCRIPT FLUSH): the script goes whole once, then by its SHA again."""
    store = open_store(server.url)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        limits = [req(5, name()), tok(5, name()), conc(5, name())]
        first = await store.admit(limits)
        await raw.script_flush()
        second = await store.admit(limits)
        assert first.allowed and second.allowed and second.standings[0].remaining == 3
        await raw.script_flush()
        await store.finish(second.lease, limits, 3)
        third = await store.admit(limits)
        assert third.allowed
    finally:
        await raw.aclose()
        await store.close()


async def test_error_reply_is_store_error(server: RedisServer) -> None:
    store = open_store(server.url, prefix="aiwfd-wrong:")
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        who = name()
        await raw.set(f"aiwfd-wrong:requests:60000:client:{who}", "not a hash")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.admit([req(5, who)])
    finally:
        await raw.aclose()
        await store.close()


def test_description_never_has_the_password() -> None:
    assert redacted("redis://user:s3cret@cache.internal:6380/2?password=x") == "redis://cache.internal:6380/2"
    assert redacted("rediss://:s3cret@cache.internal") == "rediss://cache.internal/0"
    assert redacted("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock"
    assert "s3cret" not in RedisStore("redis://:s3cret@127.0.0.1:1/0").description


def test_bad_url_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        open_store("http://127.0.0.1:6379/0")


async def test_unreachable_redis_fails_fast() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="redis://127.0.0.1"):
            await store.ping()
        with pytest.raises(StoreError):
            await store.admit([req(5, name())])
        assert time.monotonic() - started < 1.0
    finally:
        await store.close()


async def test_killed_redis_then_back() -> None:
    """SIGKILL: StoreError at once, on pooled connections too; the same port
    back: the next call works, nothing restarted on our side."""
    with RedisServer() as srv:
        store = redis_store(srv.url, timeout=0.5)
        errors: list[StoreError] = []
        store.on_finish_error = errors.append
        try:
            limits = [req(100, name()), tok(100, name()), conc(100, name())]
            # Several connections in the pool, all of which the kill breaks.
            held = await asyncio.gather(*(store.admit(limits) for _ in range(5)))
            assert all(a.allowed for a in held)
            await asyncio.to_thread(srv.kill)
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.admit(limits)
            await store.finish(held[0].lease, limits, 10)  # recorded, never raises
            # Admits that carry it and fail put it back once each, not once per admit in flight.
            failed = await asyncio.gather(*(store.admit(limits) for _ in range(20)), return_exceptions=True)
            assert all(isinstance(f, StoreError) for f in failed)
            assert store._releases == {f"aiwfd:{limits[2].key}": [f"{held[0].lease}:1"]}
            with pytest.raises(StoreError):
                await store.ping()  # it sends the pending finish: reported too

            async def reported() -> bool:
                return bool(errors)

            await eventually(reported)
            assert all("redis://127.0.0.1" in str(e) for e in errors)
            assert time.monotonic() - started < 1.5
            await asyncio.to_thread(srv.start)
            # A connection error kept the finish: the flusher sends it once Redis is back.
            raw = redis.asyncio.Redis.from_url(srv.url)
            try:
                async def tokens_back() -> bool:
                    return bool(await raw.exists(f"aiwfd:{limits[1].key}"))

                await eventually(tokens_back, within=3.0)
            finally:
                await raw.aclose()
            again = await asyncio.gather(*(store.admit(limits) for _ in range(5)))
            # Redis came back empty (nothing persisted): the counts start over.
            assert all(a.allowed for a in again) and again[-1].standings[0].remaining >= 95
            await store.ping()
        finally:
            await store.close()


async def test_killed_mid_call() -> None:
    """Calls in flight when Redis dies fail with StoreError, not a hang."""
    with RedisServer() as srv:
        store = open_store(srv.url, timeout=0.5)
        try:
            limits = [req(10**9, name()), conc(10**9, name())]
            await store.ping()

            async def hammer() -> list[object]:
                outcomes: list[object] = []
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    try:
                        outcomes.append(await store.admit(limits))
                    except StoreError as exc:
                        outcomes.append(exc)
                        break
                return outcomes

            tasks = [asyncio.create_task(hammer()) for _ in range(8)]
            await asyncio.sleep(0.2)
            killed = time.monotonic()
            await asyncio.to_thread(srv.kill)
            results = await asyncio.gather(*tasks)
            assert time.monotonic() - killed < 1.5
            assert all(isinstance(r[-1], StoreError) for r in results)
            assert all(len(r) > 1 for r in results)  # they were admitted before the kill
            await asyncio.to_thread(srv.start)
            assert (await store.admit(limits)).allowed
        finally:
            await store.close()


async def test_hung_redis_times_out() -> None:
    """A Redis that accepts but never answers (SIGSTOP): StoreError within about the timeout."""
    with RedisServer() as srv:
        store = open_store(srv.url, timeout=0.3)
        try:
            limits = [req(5, name())]
            assert (await store.admit(limits)).allowed
            srv.pause()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.admit(limits)
            with pytest.raises(StoreError):
                await store.ping()
            assert time.monotonic() - started < 2 * 0.3 + 0.5
            srv.resume()
            adm = await store.admit(limits)
            # The call that timed out may or may not have been counted: Redis ran it on waking.
            assert adm.allowed and adm.standings[0].remaining in (2, 3)
        finally:
            await store.close()


async def test_slots_of_an_admit_that_timed_out_are_given_back() -> None:
    """A stalled Redis runs the timed-out admit when it wakes: its slot, which no finish
    will release, goes with the next send instead of locking the limit for lease_ttl."""
    with RedisServer() as srv:
        store = redis_store(srv.url, timeout=0.3)
        other = redis_store(srv.url, timeout=0.3)  # another instance: sees only what Redis holds
        try:
            limits = [conc(1, name())]
            key = store.prefix + limits[0].key
            srv.pause()
            with pytest.raises(StoreError):
                await store.admit(limits, lease_ttl=600)
            srv.resume()
            probe = redis.asyncio.Redis.from_url(srv.url)
            try:
                # Whether Redis ran the script on waking depends on when it saw the
                # client hang up: take the slot as that late run would have.
                [member] = store._releases[key]
                await probe.zadd(key, {member: time.time() * 1e6 + 600e6})
                # The next send of the store that lost the answer carries the release.
                assert (await store.admit([req(100, name())])).allowed
                await eventually(lambda: _zcard(probe, key, 0))
            finally:
                await probe.aclose()
            assert (await other.admit(limits)).allowed
        finally:
            await store.close()
            await other.close()


async def _zcard(client: Any, key: str, n: int) -> bool:
    return bool(await client.zcard(key) == n)


async def test_calls_share_one_pipelined_connection(server: RedisServer) -> None:
    """200 admits at once on one store go on one connection (its `_Link`), each
    caller with its own answer: the replies come back in order, to the right futures."""
    store = redis_store(server.url)
    raw = redis.asyncio.Redis.from_url(server.url)
    try:
        await store.ping()  # ping's own pooled connection, opened before the count
        before = len(await raw.client_list())
        names = [name() for _ in range(200)]
        results = await asyncio.gather(*(store.admit([req(10 + i, who)]) for i, who in enumerate(names)))
        assert [r.standings[0].remaining for r in results] == [9 + i for i in range(200)]
        assert len(await raw.client_list()) == before + 1
    finally:
        await raw.aclose()
        await store.close()


async def test_cancelled_admit_gives_its_slots_back(server: RedisServer) -> None:
    """A caller that goes away mid-admit (a client that disconnected): the script
    still runs and takes a slot nobody will finish; the store releases it with its next send."""
    store = redis_store(server.url)
    other = redis_store(server.url)
    probe = redis.asyncio.Redis.from_url(server.url)
    try:
        limits = [conc(1, name())]
        key = store.prefix + limits[0].key
        await store.ping()
        task = asyncio.create_task(store.admit(limits, lease_ttl=600))
        await asyncio.sleep(0)  # queued on the link, not answered yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.flush()  # the release goes with the next send
        await eventually(lambda: _zcard(probe, key, 0))
        assert (await other.admit(limits)).allowed
    finally:
        await probe.aclose()
        await store.close()
        await other.close()


async def test_a_held_up_loop_is_not_a_hung_redis(server: RedisServer) -> None:
    """The event loop held past the timeout (a starved CPU) while Redis answered:
    the watchdog's timer comes before the reads, yet no call fails."""
    store = redis_store(server.url, timeout=0.2)
    try:
        limits = [req(10**6, name()), conc(10**6, name())]
        assert (await store.admit(limits)).allowed  # the link is open
        calls = [asyncio.ensure_future(store.admit(limits)) for _ in range(50)]
        for _ in range(3):
            await asyncio.sleep(0)  # the admits are queued and written
        time.sleep(0.4)  # the loop is held; Redis answers meanwhile  # noqa: ASYNC251
        results = await asyncio.gather(*calls)
        assert all(r.allowed for r in results)
    finally:
        await store.close()
