"""The rate-limit store's entry points (SPEC §8.2): `parse_rate` for the
config's `600/min`, `open_store` for the store `REDIS_URL` names, and the
types of aiwfd/store/base.py re-exported, so callers import from one place."""

from __future__ import annotations

import re

from aiwfd.store.base import (
    BUCKETS,
    Admission,
    Kind,
    Limit,
    Rate,
    Scope,
    Standing,
    Store,
    StoreError,
)

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
    "open_store",
    "parse_rate",
]

_UNITS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "day": 86400.0,
}
_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*([a-z]+)\s*", re.IGNORECASE)


def parse_rate(text: str) -> Rate | None:
    """`"600/min"` -> Rate(600, 60.0); units s|sec|second, min|minute, h|hour,
    day, and their plurals (`10/seconds`). None for anything else (a quota of
    0 too: an empty allowance is a refusal, which an allowlist says better),
    so the config reports the text where it found it."""
    if not isinstance(text, str):
        return None
    m = _RATE_RE.fullmatch(text)
    if m is None:
        return None
    unit = m.group(2).lower()
    window = _UNITS.get(unit)
    if window is None and len(unit) > 2 and unit.endswith("s"):
        window = _UNITS.get(unit[:-1])
    quota = int(m.group(1))
    if window is None or quota <= 0:
        return None
    return Rate(quota, window)


def open_store(redis_url: str | None, *, timeout: float = 0.5, prefix: str = "aiwfd:") -> Store:
    """The memory store when `redis_url` is None (or empty), else a Redis store
    (nothing connects yet: `ping` tells whether it answers; a URL redis-py
    cannot read is a ValueError). `timeout` bounds every call to Redis;
    `prefix` starts every key it writes. The `redis` package is imported
    here, only when a URL is given."""
    if not redis_url:
        from aiwfd.store.memory import MemoryStore

        return MemoryStore()
    try:
        from aiwfd.store.redis import RedisStore
    except ImportError as exc:  # the error names REDIS_URL, which is what the operator set
        raise ImportError(f"REDIS_URL is set but the redis package is missing ({exc}): pip install 'redis>=5'") from exc
    return RedisStore(redis_url, timeout=timeout, prefix=prefix)
