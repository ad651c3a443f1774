"""The memory store's sliding window, exactly, on a fake clock (no sleeping),
and the pure parts of the store: parse_rate, Limit.key, open_store without a
URL. The behaviour both backends share is tested on both, against a real
redis-server, in tests/process/test_store_redis.py."""

from __future__ import annotations

import sys
import subprocess
from pathlib import Path

import pytest

from aiwfd.store.limits import Limit, Rate, open_store, parse_rate
from aiwfd.store.memory import MemoryStore

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text, rate", [
    ("600/min", Rate(600, 60.0)), ("10/s", Rate(10, 1.0)), ("10/sec", Rate(10, 1.0)),
    ("10/second", Rate(10, 1.0)), ("10/seconds", Rate(10, 1.0)), ("5/minute", Rate(5, 60.0)),
    ("7/h", Rate(7, 3600.0)), ("7/hour", Rate(7, 3600.0)), ("7/hours", Rate(7, 3600.0)),
    ("1/day", Rate(1, 86400.0)), (" 3 / MIN ", Rate(3, 60.0)),
])
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "600", "/min", "600/", "600/week", "600/30s", "-1/min", "0/min",
                                  "1.5/min", "600/ss", "600 per min", "600/min/s"])
def test_parse_rate_refuses(text: str) -> None:
    assert parse_rate(text) is None


def test_parse_rate_refuses_what_is_not_text() -> None:
    assert parse_rate(600) is None  # type: ignore[arg-type]


def test_key_leaves_the_quota_out() -> None:
    a = Limit("requests", "client", "frontend", 600, 60.0)
    assert a.key == Limit("requests", "client", "frontend", 10, 60.0).key == "requests:60000:client:frontend"
    assert a.key != Limit("requests", "agent", "frontend", 600, 60.0).key
    assert a.key != Limit("tokens", "client", "frontend", 600, 60.0).key
    assert a.key != Limit("requests", "client", "frontend", 600, 3600.0).key
    # The name comes last, after fields that never hold a `:`: any name is safe in a key.
    assert Limit("concurrency", "agent", "a:b", 1, 0.0).key == "concurrency:0:agent:a:b"
    assert a.width_us == 1_000_000


def test_open_store_memory_without_url() -> None:
    for url in (None, ""):
        store = open_store(url)
        assert isinstance(store, MemoryStore) and store.description == "memory" and not store.shared


def test_memory_store_does_not_import_redis() -> None:
    code = "import sys, aiwfd.store.limits as l; l.open_store(None); print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


async def test_window_slides_bucket_by_bucket() -> None:
    clock = Clock(6000.0)  # a bucket boundary: 60 s window, 1 s buckets
    store = MemoryStore(clock)
    limits = [Limit("requests", "client", "c", 10, 60.0)]
    for _ in range(4):
        assert (await store.admit(limits)).allowed  # bucket 6000: 4
    clock.now += 30.5
    for _ in range(6):
        adm = await store.admit(limits)  # bucket 6030: 6
    assert adm.allowed and adm.standings[0].remaining == 0
    # The oldest counted bucket (6000) leaves the window when now - 60 passes its end, 6001.
    assert adm.standings[0].reset == pytest.approx(6061 - clock.now)
    refused = await store.admit(limits)
    assert not refused.allowed and refused.retry_after == pytest.approx(6061 - clock.now)
    clock.now = 6060.9  # bucket 6000 still overlaps [now - 60, now]: counted whole (conservative)
    assert not (await store.admit(limits)).allowed
    clock.now = 6061.0
    for _ in range(4):
        assert (await store.admit(limits)).allowed
    refused = await store.admit(limits)
    assert not refused.allowed
    # Next to leave: bucket 6030 (end 6031), a minute after its end.
    assert refused.retry_after == pytest.approx(6091.0 - 6061.0)
    clock.now = 6091.0
    s = (await store.admit(limits)).standings[0]
    assert s.remaining == 5  # the 4 of 6061 and this one
    clock.now += 1000  # long idle: everything left
    assert (await store.admit(limits)).standings[0].remaining == 9


async def test_never_more_than_quota_in_any_real_window() -> None:
    """At a steady 3 calls per second against 10/min, every sliding window of
    60 s holds at most 10 admitted calls."""
    clock = Clock(12345.678)
    store = MemoryStore(clock)
    limits = [Limit("requests", "client", "c", 10, 60.0)]
    admitted: list[float] = []
    for _ in range(3 * 600):
        if (await store.admit(limits)).allowed:
            admitted.append(clock.now)
        clock.now += 1 / 3
    assert len(admitted) > 90  # about 10 a minute for 10 minutes, less one bucket's worth
    j = 0
    for i, t in enumerate(admitted):
        while admitted[j] <= t - 60.0:
            j += 1
        assert i - j + 1 <= 10


async def test_retry_after_for_a_cost() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock)
    limits = [Limit("requests", "client", "c", 10, 60.0)]
    for t in (0.0, 10.0, 20.0):
        clock.now = t
        await store.admit(limits, cost=3)
    clock.now = 25.0
    # 9 counted; a batch of 5 fits once the first two buckets (6 calls) leave: at 71 s.
    refused = await store.admit(limits, cost=5)
    assert not refused.allowed and refused.retry_after == pytest.approx(71.0 - 25.0)
    clock.now = 71.0
    assert (await store.admit(limits, cost=5)).allowed


async def test_tokens_retry_after_until_under_quota() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock)
    limits = [Limit("tokens", "client", "c", 100, 60.0)]
    await store.finish("", limits, 80)
    clock.now = 30.0
    await store.finish("", limits, 40)
    refused = await store.admit(limits)
    assert not refused.allowed and refused.retry_after == pytest.approx(61.0 - 30.0)  # 40 < 100 then
    clock.now = 61.0
    assert (await store.admit(limits)).allowed


async def test_idle_windows_are_forgotten() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock)
    for i in range(100):
        await store.admit([Limit("requests", "client", f"jwt-{i}", 5, 1.0)])
    clock.now = 100.0
    for _ in range(5000):
        await store.admit([Limit("requests", "client", "busy", 10**9, 60.0)])
    assert set(store._windows) == {"requests:60000:client:busy"}


async def test_concurrency_release_follows_the_lease() -> None:
    """finish releases what admit took, even when a reload changed the limits in between."""
    store = MemoryStore()
    before = [Limit("concurrency", "client", "c", 2, 0.0)]
    adm = await store.admit(before, slots=2)
    assert adm.allowed and not (await store.admit(before)).allowed
    after = [Limit("concurrency", "client", "c", 5, 0.0), Limit("concurrency", "agent", "a", 5, 0.0)]
    await store.finish(adm.lease, after, 0, slots=2)
    assert store._inflight == {}
    assert (await store.admit(before, slots=2)).allowed
