"""The rate-limit store's entry points (SPEC §8.2): `parse_rate` for the
config's `600/min`, `open_store` for the store `REDIS_URL` names, and the
types of aiwfd/store/base.py re-exported, so callers import from one place."""

from __future__ import annotations

# One parser for the config and the store: the spec layer's (spec.access).
from aiwfd.spec.access import parse_rate
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
