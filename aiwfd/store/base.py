"""The store's vocabulary (SPEC §8.2): what a limit is, what `admit` answers,
the one error a store raises, and the `Store` protocol both backends follow.

The sliding window is the same in both backends (aiwfd/store/memory.py,
aiwfd/store/redis.py): a window of W seconds is cut into BUCKETS buckets of
W/BUCKETS each; a call at time `now` falls in bucket `floor(now / width)`, and
the window's count is the sum of the BUCKETS + 1 buckets that overlap
[now - W, now]. Counting the partly-expired oldest bucket whole makes the
count conservative: no real sliding window of W ever holds more than the
quota; a caller may be refused up to one bucket (W/60) early.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, Sequence

from aiwfd.spec.access import Rate  # the config's `600/min`, one definition for both layers

__all__ = [
    "BUCKETS",
    "Admission",
    "Kind",
    "Limit",
    "Rate",
    "Scope",
    "Standing",
    "Store",
    "StoreError",
]

Kind = Literal["requests", "tokens", "concurrency"]
Scope = Literal["client", "agent"]

# 60 buckets: a 1/min limit refuses at most 1 s early, and a window costs at
# most 61 small counters, whatever its quota (a moving log of one entry per
# unit of cost would cost a 100k-token call 100k entries).
BUCKETS = 60
# The buckets that overlap the last window: the BUCKETS whole ones and the
# oldest, partly expired one.
SPAN = BUCKETS + 1


@dataclass(frozen=True)
class Limit:
    """One limit that applies to a call: the client's or the agent's."""

    kind: Kind
    scope: Scope
    name: str  # the client's or the agent's name
    quota: int
    window: float  # seconds; 0 for concurrency

    @functools.cached_property
    def key(self) -> str:
        """The counters' identity: scope, name, kind and window, not the quota,
        so that a reload that changes a quota keeps the counts (SPEC §8.2:
        counters survive a reload). The name comes last, so a `:` in it
        cannot make two limits share a key. Cached: computed per call otherwise."""
        return f"{self.kind}:{round(self.window * 1000)}:{self.scope}:{self.name}"

    @functools.cached_property
    def width_us(self) -> int:
        """One bucket's width in whole microseconds (what the Redis script
        computes with: Redis `TIME` is in microseconds)."""
        return max(1, round(self.window * 1_000_000 / BUCKETS))


# Standing and Admission are NamedTuples, not frozen dataclasses: one of each
# is made per requests limit and per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) cost ~3x as much; immutable all the same.
class Standing(NamedTuple):
    """Where a requests limit stands after a call, for the `RateLimit` header."""

    limit: Limit
    remaining: int
    reset: float  # seconds until the oldest counted bucket leaves the window (0: nothing counted)


class Admission(NamedTuple):
    """What `admit` decided for all the limits of a call at once."""

    allowed: bool
    refused: Limit | None  # the first limit that refused (None when allowed)
    retry_after: float  # seconds until `refused` would take this call (> 0 when refused, 0 when allowed)
    standings: tuple[Standing, ...]  # one per requests limit, in the order given
    lease: str  # the id of the concurrency slots taken ("" when none): pass it to `finish`


class StoreError(Exception):
    """The store did not answer: a timeout, a refused or lost connection, an
    error reply. Raised by the Redis store only; the memory store always answers.
    What a call does then is `limits.on_store_error`'s decision (the caller's)."""


class Store(Protocol):
    """A rate-limit store: aiwfd.store.memory.MemoryStore or aiwfd.store.redis.RedisStore."""

    description: str  # for the start-up log line: "memory" or "redis://127.0.0.1:6379/0" (never a password)
    shared: bool  # True when the limits hold for every instance using the store (Redis)

    async def admit(self, limits: Sequence[Limit], cost: int = 1, slots: int = 1,
                    lease_ttl: float = 120.0) -> Admission:
        """Count a call against every limit, or against none (all or nothing):
        `cost` requests on the requests limits, a pre-check on the tokens limits
        (refused when the window is already at or over the quota), `slots`
        in-flight slots on the concurrency limits, held until `finish` or, if
        this instance dies, until `lease_ttl` seconds pass. One round trip."""
        ...

    async def finish(self, lease: str, limits: Sequence[Limit], tokens: int, slots: int = 1) -> None:
        """The call is over: release its concurrency slots (`lease` from
        `admit`, "" for none) and add its `tokens` to the tokens limits.
        Records only and never suspends (Redis sends it with the next admit, or
        a flusher a few ms later), so a cancelled caller cannot lose it half-way."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; StoreError otherwise (`/health/ready`)."""
        ...

    async def close(self) -> None:
        ...
