"""The Redis store: the limits of SPEC §8.2 held for the whole fleet.

Imported only when REDIS_URL is set (aiwfd.store.limits.open_store), so an
install without the `redis` package runs the memory store.

Each `admit` is one EVALSHA of ADMIT below, for all the limits of a call, and
each `finish` one of FINISH: Redis runs a script atomically, so the check and
the count cannot interleave with another instance's, and the decision is all
or nothing. The scripts read the time with Redis `TIME`, so instances whose
clocks disagree still count in the same buckets.

Keys (`prefix` + Limit.key): requests and tokens windows are HASHes, field =
bucket index (now // width), value = the count, expiring ~2 windows after the
last write; a concurrency limit is a ZSET of `lease:slot` members scored by
their expiry (now + lease_ttl), so the slots of an instance killed with -9
free themselves after lease_ttl. The keys of one call are not in one hash
slot: Redis Cluster would need hash tags (one Redis, or Sentinel, is what
SPEC §8 asks for).

Every failure of Redis or redis-py becomes StoreError in one place
(`_mapped`), within about `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from typing import AsyncIterator, Sequence
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiwfd.compat import timeout as deadline
from aiwfd.store.base import BUCKETS, SPAN, Admission, Limit, Standing, StoreError

__all__ = ["ADMIT", "FINISH", "RedisStore", "redacted"]

# KEYS: one per limit. ARGV: cost, slots, lease_ttl (µs), lease, then per limit
# kind ("r", "t" or "c"), quota, bucket width (µs). Times are µs from Redis
# TIME (exact in Lua's doubles until year 2255).
# Returns: allowed (0/1), the 1-based index of the first limit that refused
# (0), retry_after (µs), then remaining and reset (µs) per requests limit.
ADMIT = f"""
-- Redis 3.2-4 refuse writes after TIME unless the script replicates its effects (the default since 5).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local lease = ARGV[4]
local n = #KEYS
local refused = 0
local retry = 0
local totals, oldest, curs = {{}}, {{}}, {{}}
for i = 1, n do
  local key, b = KEYS[i], 4 + 3 * (i - 1)
  local kind, quota, width = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if refused == 0 and redis.call('ZCARD', key) + slots > quota then
      refused, retry = i, 1000000
    end
  else
    local cur = math.floor(now / width)
    local lo = cur - {BUCKETS}
    local h = redis.call('HGETALL', key)
    local total, low, stale, kept = 0, cur + 1, {{}}, {{}}
    for j = 1, #h, 2 do
      local idx, c = tonumber(h[j]), tonumber(h[j + 1])
      if idx < lo then
        stale[#stale + 1] = h[j]
      else
        total = total + c
        kept[#kept + 1] = {{idx, c}}
        if c > 0 and idx < low then low = idx end
      end
    end
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    totals[i], oldest[i], curs[i] = total, low, cur
    if refused == 0 and ((kind == 'r' and total + cost > quota) or (kind == 't' and total >= quota)) then
      refused = i
      -- the time until enough of the oldest buckets have left the window
      table.sort(kept, function(x, y) return x[1] < y[1] end)
      retry = {SPAN} * width
      local left = total
      for _, e in ipairs(kept) do
        left = left - e[2]
        if (kind == 'r' and left + cost <= quota) or (kind == 't' and left < quota) then
          retry = math.max((e[1] + {SPAN}) * width - now, 1)
          break
        end
      end
    end
  end
end
local out = {{refused == 0 and 1 or 0, refused, retry}}
for i = 1, n do
  local key, b = KEYS[i], 4 + 3 * (i - 1)
  local kind, quota, width = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if refused == 0 then
    if kind == 'c' then
      for s = 1, slots do redis.call('ZADD', key, now + ttl, lease .. ':' .. s) end
      if redis.call('PTTL', key) < ttl / 1000 then redis.call('PEXPIRE', key, math.ceil(ttl / 1000) + 1000) end
    elseif kind == 'r' and cost > 0 then
      redis.call('HINCRBY', key, curs[i], cost)
      redis.call('PEXPIRE', key, math.ceil(2 * {SPAN} * width / 1000))
      totals[i] = totals[i] + cost
      if curs[i] < oldest[i] then oldest[i] = curs[i] end
    end
  end
  if kind == 'r' then
    local reset = 0
    if oldest[i] <= curs[i] then reset = (oldest[i] + {SPAN}) * width - now end
    out[#out + 1] = math.max(quota - totals[i], 0)
    out[#out + 1] = reset
  end
end
return out
"""

# KEYS: the concurrency and tokens limits of a call. ARGV: lease, slots,
# tokens, then per key kind ("c" or "t") and bucket width (µs).
FINISH = """
-- Redis 3.2-4 refuse writes after TIME unless the script replicates its effects (the default since 5).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease, slots, tokens = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS do
  local kind, width = ARGV[2 + 2 * i], tonumber(ARGV[3 + 2 * i])
  if kind == 'c' then
    for s = 1, slots do redis.call('ZREM', KEYS[i], lease .. ':' .. s) end
  elseif tokens > 0 then
    redis.call('HINCRBY', KEYS[i], math.floor(now / width), tokens)
    redis.call('PEXPIRE', KEYS[i], math.ceil(2 * %d * width / 1000))
  end
end
return 0
""" % SPAN

_KIND = {"requests": "r", "tokens": "t", "concurrency": "c"}


def redacted(url: str) -> str:
    """The URL for a log line: scheme, host, port and database; never the
    user, the password or the query (`?password=` is a redis-py option)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path or ("" if parts.scheme == "unix" else "/0")
    return f"{parts.scheme}://{netloc}{path}"


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole (EVAL, which also
    caches it in Redis) when Redis does not know it: after a restart or a
    SCRIPT FLUSH. One round trip either way, but the first after a restart."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: "redis.asyncio.Redis", keys: list[str], args: list[str | int]) -> object:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


_ADMIT = _Script(ADMIT)
_FINISH = _Script(FINISH)


class RedisStore:
    """Limits in Redis, shared by every instance that uses the same URL (SPEC §8)."""

    shared = True

    def __init__(self, url: str, *, timeout: float = 0.5, prefix: str = "aiwfd:") -> None:
        self.description = redacted(url)
        self.timeout = timeout
        self.prefix = prefix
        # One retry, at once, on a connection error only: a pooled connection
        # that a Redis restart closed is replaced without the caller seeing it,
        # but a Redis that is down fails within `timeout` (redis-py's default
        # retries with back-off for seconds). Not on a timeout: the script may
        # have run, and running it twice would count the call twice.
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0,
        )

    @contextlib.asynccontextmanager
    async def _mapped(self) -> AsyncIterator[None]:
        """Every way a call to Redis fails, as StoreError: the one place that
        knows redis-py's exceptions. The deadline bounds the whole call, the
        retry included (the socket timeouts bound each read and connect)."""
        try:
            async with deadline(self.timeout):
                yield
        except StoreError:
            raise
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreError(f"redis ({self.description}): {type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def _key(self, limit: Limit) -> str:
        return self.prefix + limit.key

    async def admit(self, limits: Sequence[Limit], cost: int = 1, slots: int = 1,
                    lease_ttl: float = 120.0) -> Admission:
        if not limits:
            return Admission(True, None, 0.0, (), "")
        keys: list[str] = []
        args: list[str | int] = [cost, slots, round(lease_ttl * 1_000_000), ""]
        concurrency = False
        for limit in limits:
            keys.append(self.prefix + limit.key)
            kind = _KIND[limit.kind]
            concurrency = concurrency or kind == "c"
            args += (kind, limit.quota, limit.width_us)
        # The lease's members are `lease:slot`: a random id, so two instances never share one.
        lease = secrets.token_hex(8) if concurrency else ""
        args[3] = lease
        async with self._mapped():
            reply = await _ADMIT(self._client, keys, args)
        try:
            assert isinstance(reply, list)
            values = [int(v) for v in reply]
        except (AssertionError, TypeError, ValueError) as exc:
            raise StoreError(f"redis ({self.description}): unexpected reply {reply!r}") from exc
        allowed, refused_at, retry_us = values[0] == 1, values[1], values[2]
        standings: list[Standing] = []
        i = 3
        for limit in limits:
            if limit.kind == "requests":
                standings.append(Standing(limit, values[i], values[i + 1] / 1_000_000))
                i += 2
        return Admission(
            allowed,
            limits[refused_at - 1] if refused_at else None,
            retry_us / 1_000_000 if not allowed else 0.0,
            tuple(standings),
            lease if allowed else "",
        )

    async def finish(self, lease: str, limits: Sequence[Limit], tokens: int, slots: int = 1) -> None:
        keys: list[str] = []
        args: list[str | int] = [lease, slots, tokens]
        for limit in limits:
            if (limit.kind == "concurrency" and lease) or (limit.kind == "tokens" and tokens > 0):
                keys.append(self.prefix + limit.key)
                args += (_KIND[limit.kind], limit.width_us)
        if not keys:
            return  # nothing held, nothing to add: no round trip
        async with self._mapped():
            await _FINISH(self._client, keys, args)

    async def ping(self) -> None:
        async with self._mapped():
            await self._client.ping()

    async def close(self) -> None:
        # Closing a pool whose Redis is gone must not fail a shutdown.
        with contextlib.suppress(Exception):
            await self._client.aclose()
