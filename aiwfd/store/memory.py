"""The in-process store: the limits of SPEC §8.2 counted by this instance
alone (the start-up log says so when limits are configured). The same
sliding window as the Redis script (aiwfd/store/base.py), in plain Python:
O(limits) per call, no lock (one event loop, no await inside a decision, so
each admit is atomic), a few µs per admit + finish (scripts/bench_store.py)."""

from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

from aiwfd.store.base import BUCKETS, SPAN, Admission, Limit, Standing

__all__ = ["MemoryStore"]

_NO_LIMITS = Admission(True, None, 0.0, (), "")
_new = tuple.__new__  # Standing and Admission are NamedTuples: tuple.__new__(cls, fields) makes one
# Forgetting idle windows keeps memory bounded by the active names (a JWT
# client is any `sub`): a sweep at most this often, checked every _SWEEP_CALLS admits.
_SWEEP_SECONDS = 60.0
_SWEEP_CALLS = 4096
# Plans kept at most (one per client and agent pair in use; see MemoryStore._plan).
_PLANS = 10_000


class _Window:
    """One limit's SPAN buckets as a ring: slot `i % SPAN` holds bucket i,
    `total` is the sum of the buckets newest-BUCKETS .. newest."""

    __slots__ = ("width", "counts", "newest", "total", "oldest")

    def __init__(self, width: float, cur: int) -> None:
        self.width = width  # seconds per bucket
        self.counts = [0] * SPAN
        self.newest = cur
        self.total = 0
        # No bucket below `oldest` holds a count: where the search for the
        # oldest counted bucket (the RateLimit reset) starts; it only moves
        # forward, so finding it costs O(1) amortised, not a scan of the ring.
        self.oldest = cur + 1

    def advance(self, cur: int) -> None:
        """Move the window to bucket `cur`: the buckets that left it are zeroed."""
        gap = cur - self.newest
        if gap <= 0:  # the same bucket (the monotonic clock never goes back)
            return
        counts = self.counts
        if gap >= SPAN:
            for j in range(SPAN):
                counts[j] = 0
            self.total = 0
        else:
            # Bucket i takes the slot of bucket i - SPAN, which has just left the window.
            for i in range(self.newest + 1, cur + 1):
                j = i % SPAN
                self.total -= counts[j]
                counts[j] = 0
        self.newest = cur
        if self.oldest < cur - BUCKETS:
            self.oldest = cur - BUCKETS

    def add(self, cur: int, n: int) -> None:
        self.counts[cur % SPAN] += n
        self.total += n
        if cur < self.oldest:
            self.oldest = cur

    def reset(self, now: float) -> float:
        """Seconds until the oldest counted bucket leaves the window (0 when none is counted)."""
        counts, cur = self.counts, self.newest
        i = self.oldest
        while i <= cur and counts[i % SPAN] == 0:
            i += 1
        self.oldest = i
        return (i + SPAN) * self.width - now if i <= cur else 0.0

    def retry_after(self, now: float, fits: Callable[[int], bool]) -> float:
        """Seconds until enough old buckets have left the window for `fits(count)`."""
        counts, cur, left = self.counts, self.newest, self.total
        for i in range(cur - BUCKETS, cur + 1):
            left -= counts[i % SPAN]
            if fits(left):
                # Bucket i stops overlapping [now - W, now] once now - W reaches its end.
                return max((i + SPAN) * self.width - now, 1e-6)
        return SPAN * self.width  # it never fits (a cost over the quota): one window


class _Plan:
    """A tuple of limits as admit walks it (MemoryStore._plan)."""

    __slots__ = ("limits", "entries", "concurrency", "requests", "tokens")

    def __init__(self, limits: Sequence[Limit], entries: list[tuple[Limit, _Window | None, bool]]) -> None:
        self.limits = limits
        # (limit, its window or None for concurrency, whether it is a requests limit)
        self.entries = tuple(entries)
        self.concurrency = tuple(lim.key for lim in limits if lim.kind == "concurrency")
        self.requests = tuple((lim, w) for lim, w, requests in entries if requests and w is not None)
        self.tokens = tuple(w for lim, w, _ in entries if lim.kind == "tokens" and w is not None)


class MemoryStore:
    """The embedded store: counters in this process (SPEC §8)."""

    description = "memory"
    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # a fake clock in the unit tests: the window slides without sleeping
        self._windows: dict[str, _Window] = {}
        self._inflight: dict[str, int] = {}
        # lease -> the concurrency counters it holds and how many slots:
        # `finish` releases exactly what `admit` took, even if a reload
        # changed the limits in between, and a second `finish` does nothing.
        self._leases: dict[str, tuple[tuple[str, ...], int]] = {}
        self._ids = itertools.count(1)
        self._plans: dict[int, _Plan] = {}  # id(limits) -> its plan (see _plan)
        self._calls = 0
        self._swept = clock()

    def _window(self, limit: Limit, now: float) -> _Window:
        """The limit's window, moved to `now` (its `newest` is now's bucket)."""
        w = self._windows.get(limit.key)
        if w is None:
            width = limit.width_us / 1_000_000
            w = self._windows[limit.key] = _Window(width, int(now / width))
            return w
        cur = int(now / w.width)
        if cur != w.newest:
            w.advance(cur)
        return w

    def _plan(self, limits: Sequence[Limit], now: float) -> _Plan:
        """What admit and finish need of `limits`, their windows looked up once:
        kept per tuple (quota.Plan's limits, the same object call after call),
        so a call skips a dict lookup and a few attribute reads per limit. A
        list is planned afresh each time (it could change between calls)."""
        if type(limits) is tuple:
            plan = self._plans.get(id(limits))
            if plan is not None and plan.limits is limits:
                return plan
        plan = _Plan(limits, [(lim, None if lim.kind == "concurrency" else self._window(lim, now),
                               lim.kind == "requests") for lim in limits])
        if type(limits) is tuple:
            if len(self._plans) >= _PLANS:  # JWT clients are unbounded in number: so is not this
                self._plans.clear()
            self._plans[id(limits)] = plan  # it holds `limits`: the id is not reused while it is here
        return plan

    async def admit(self, limits: Sequence[Limit], cost: int = 1, slots: int = 1,
                    lease_ttl: float = 120.0) -> Admission:
        if not limits:
            return _NO_LIMITS
        now = self._clock()
        self._calls += 1
        if self._calls % _SWEEP_CALLS == 0 and now - self._swept > _SWEEP_SECONDS:
            self._sweep(now)
        plan = self._plan(limits, now)
        refused: Limit | None = None
        refused_window: _Window | None = None
        inflight = self._inflight
        # Written for speed (scripts/bench_store.py): one pass decides, a second counts.
        for limit, w, requests in plan.entries:
            if w is None:  # concurrency
                if refused is None and inflight.get(limit.key, 0) + slots > limit.quota:
                    refused = limit
                continue
            cur = int(now / w.width)
            if cur != w.newest:
                w.advance(cur)
            if refused is None and (w.total + cost > limit.quota if requests
                                    # tokens: a pre-check; the call adds its tokens in finish
                                    else w.total >= limit.quota):
                refused, refused_window = limit, w

        if refused is None:
            lease = ""
            if plan.concurrency:
                for key in plan.concurrency:
                    inflight[key] = inflight.get(key, 0) + slots
                lease = str(next(self._ids))
                self._leases[lease] = (plan.concurrency, slots)
            # _Window.add and _Window.reset inlined, and the tuples made with
            # tuple.__new__ (a NamedTuple's own __new__ is a Python function):
            # this is the path of every call that is let through.
            standings: list[Standing] = []
            for limit, w in plan.requests:
                cur, counts = w.newest, w.counts
                if cost:
                    counts[cur % SPAN] += cost
                    w.total += cost
                    if cur < w.oldest:
                        w.oldest = cur
                left = limit.quota - w.total
                i = w.oldest
                while i <= cur and counts[i % SPAN] == 0:
                    i += 1
                w.oldest = i
                standings.append(_new(Standing, (limit, left if left > 0 else 0,
                                                 (i + SPAN) * w.width - now if i <= cur else 0.0)))
            return _new(Admission, (True, None, 0.0, tuple(standings), lease))

        standings = []

        if refused_window is None:
            retry = 1.0  # concurrency: no estimate of when a call in flight ends
        else:
            quota = refused.quota
            if refused.kind == "requests":
                retry = refused_window.retry_after(now, lambda left: left + cost <= quota)
            else:
                retry = refused_window.retry_after(now, lambda left: left < quota)
        for limit, w in plan.requests:
            standings.append(Standing(limit, max(0, limit.quota - w.total), w.reset(now)))
        return Admission(False, refused, retry, tuple(standings), "")

    async def finish(self, lease: str, limits: Sequence[Limit], tokens: int, slots: int = 1) -> None:
        if lease:
            taken = self._leases.pop(lease, None)
            if taken is not None:
                keys, n = taken
                inflight = self._inflight
                for key in keys:
                    left = inflight.get(key, 0) - n
                    if left > 0:
                        inflight[key] = left
                    else:
                        inflight.pop(key, None)
        if tokens > 0:
            now = self._clock()
            for w in self._plan(limits, now).tokens:
                cur = int(now / w.width)
                if cur != w.newest:
                    w.advance(cur)
                w.counts[cur % SPAN] += tokens  # _Window.add, inlined
                w.total += tokens
                if cur < w.oldest:
                    w.oldest = cur

    def _sweep(self, now: float) -> None:
        self._swept = now
        stale = [k for k, w in self._windows.items() if int(now / w.width) - w.newest >= SPAN]
        for k in stale:
            del self._windows[k]
        if stale:
            self._plans.clear()  # they hold windows: a call must not count in a forgotten one

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
