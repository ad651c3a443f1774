"""The Redis store: the limits of SPEC §8.2 held for the whole fleet.

Imported only when REDIS_URL is set (aiwfd.store.limits.open_store), so an
install without the `redis` package runs the memory store.

One round trip per call (§8.2): each `admit` is one EVALSHA of ADMIT below,
for all the limits of a call, sent on the store's one pipelined connection
(`_Link`): the admits of one event-loop pass leave in one write and their
replies come back together, at ~15 µs of CPU per admit instead of the ~65
µs a call through redis-py's pool cost (scripts/bench/store_cpu.py). `finish` sends nothing itself: it records what
it must do (the ZREM of the lease's slots, the HINCRBY of the tokens, summed
per key) in a pending batch, and the next `admit` of this store object carries
that batch in its own script, applied before the admission check, so a slot
released here is free for this instance's next call. When no admit comes
along, a background flusher sends the batch FLUSH_DELAY later (the same
script with no limits to check), so the other instances see the slots freed
within milliseconds; `close` sends what is still pending. A deferred finish
that fails cannot raise into its request any more: it goes to
`on_finish_error` (see `_failed` for what is kept for the next attempt).

Redis runs a script atomically, so the check and the count cannot interleave
with another instance's, and the decision is all or nothing. The script reads
the time with Redis `TIME`, so instances whose clocks disagree still count in
the same buckets (a deferred finish's tokens land in the bucket of the moment
they are sent, at most FLUSH_DELAY or one admit later).

Keys (`prefix` + Limit.key): requests and tokens windows are HASHes, field =
bucket index (now // width), value = the count, expiring ~2 windows after the
last write; a concurrency limit is a ZSET of `lease:slot` members scored by
their expiry (now + lease_ttl), so the slots of an instance killed with -9
(its pending finishes lost with it) free themselves after lease_ttl. The keys
of one call are not in one hash slot: Redis Cluster would need hash tags (one
Redis, or Sentinel, is what SPEC §8 asks for).

Every failure of Redis or redis-py becomes StoreError in one place
(`store_error`, through `mapped` or `_send`), within about `timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import secrets
from typing import Any, AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiwfd.compat import timeout as deadline
from aiwfd.store.base import BUCKETS, SPAN, Admission, Limit, Standing, StoreError

__all__ = ["ADMIT", "FLUSH_DELAY", "MAX_CONNECTIONS", "RedisStore", "client_for", "mapped", "redacted"]

logger = logging.getLogger(__name__)

# How long a finish waits for an admit to carry it before the flusher sends it
# alone: short enough that another instance sees a freed slot at once (a
# request lasts far longer), long enough that a busy instance never sends one.
FLUSH_DELAY = 0.005
# The flusher's pause after a failed send, doubling between these bounds: a
# Redis that is down is asked about once a second, not in a tight loop.
RETRY_MIN, RETRY_MAX = 0.1, 1.0
# redis-py 8's asyncio ConnectionPool allows 100 connections by default and
# raises ("Too many connections") beyond them instead of waiting: at 256
# concurrent calls most failed as StoreError. The idempotency and jobs stores
# take one connection per call in flight (the limits store needs two: its
# `_Link` and `ping`'s); `?max_connections=` in REDIS_URL still wins
# (redis-py lets the URL's options override the keyword arguments).
MAX_CONNECTIONS = 4096
# Slots of timed-out admits queued for release, per key, at most (a stalled Redis
# under load would otherwise grow one send without bound).
MAX_ORPHANS = 1000

# KEYS: the pending finishes' keys (nf of them), then one per limit.
# ARGV: one string of space-separated fields (no field holds a space):
# nf, cost, slots, lease_ttl (µs), lease, then per limit kind ("r", "t"
# or "c"), quota, bucket width (µs), then per finish key either "c", m and the
# m lease members to remove, or "t", bucket width (µs) and the tokens to add.
# Times are µs from Redis TIME (exact in Lua's doubles until year 2255).
# The finishes are applied first, so a slot they free counts as free.
# Returns, as one space-separated string: allowed (0/1), the 1-based index of
# the first limit that refused (0), retry_after (µs), then remaining and reset
# (µs) per requests limit. With no limits (a flush alone): "1 0 0".
ADMIT = f"""
-- Redis 3.2-4 refuse writes after TIME unless the script replicates its effects (the default since 5).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- a[1] holds all the arguments, space-separated: one string for redis-py
-- to encode instead of dozens (its per-argument cost is most of a call's CPU).
local a = {{}}
for w in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = w end
local nf = tonumber(a[1])
local cost = tonumber(a[2])
local slots = tonumber(a[3])
local ttl = tonumber(a[4])
local lease = a[5]
local n = #KEYS - nf
local p = 6 + 3 * n
for i = 1, nf do
  local key = KEYS[i]
  if a[p] == 'c' then
    local last = p + 1 + tonumber(a[p + 1])
    local s = p + 2
    -- unpack in chunks: Lua's C stack holds ~8000 values
    while s <= last do
      local e = math.min(s + 999, last)
      redis.call('ZREM', key, unpack(a, s, e))
      s = e + 1
    end
    p = last + 1
  else
    local width = tonumber(a[p + 1])
    redis.call('HINCRBY', key, math.floor(now / width), a[p + 2])
    redis.call('PEXPIRE', key, math.ceil(2 * {SPAN} * width / 1000))
    p = p + 3
  end
end
if n == 0 then return '1 0 0' end
local refused = 0
local retry = 0
local totals, oldest, curs = {{}}, {{}}, {{}}
for i = 1, n do
  local key, b = KEYS[nf + i], 5 + 3 * (i - 1)
  local kind, quota, width = a[b + 1], tonumber(a[b + 2]), tonumber(a[b + 3])
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
local out = {{refused == 0 and 1 or 0, refused, string.format('%d', retry)}}
for i = 1, n do
  local key, b = KEYS[nf + i], 5 + 3 * (i - 1)
  local kind, quota, width = a[b + 1], tonumber(a[b + 2]), tonumber(a[b + 3])
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
    -- %d: tostring would print a large count as 1e+15
    out[#out + 1] = string.format('%d', math.max(quota - totals[i], 0))
    out[#out + 1] = string.format('%d', reset)
  end
end
-- one string, one line for redis-py to parse rather than one per value
return table.concat(out, ' ')
"""

_KIND = {"requests": "r", "tokens": "t", "concurrency": "c"}


def redacted(url: str) -> str:
    """The URL for a log line: scheme, host, port and database; never the
    user, the password or the query (`?password=` is a redis-py option)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path or ("" if parts.scheme == "unix" else "/0")
    return f"{parts.scheme}://{netloc}{path}"


def client_for(url: str, timeout: float, **options: Any) -> redis.asyncio.Redis:
    """The redis-py client every Redis store of aiwfd uses (limits, idempotency keys, jobs).

    One retry, at once, on a connection error only: a pooled connection that a
    Redis restart closed is replaced without the caller seeing it, but a Redis
    that is down fails within `timeout` (redis-py's default retries with
    back-off for seconds). Not on a timeout: the script may have run, and
    running it twice would count it twice. `max_connections` is large because
    redis-py 8's default pool raises past 100; `?max_connections=` in the URL
    still wins. `options` go to from_url as they are.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        "health_check_interval": 0,
        "max_connections": MAX_CONNECTIONS,
        **options,
    }
    return redis.asyncio.Redis.from_url(url, **kwargs)


@contextlib.asynccontextmanager
async def mapped(description: str, timeout: float) -> AsyncIterator[None]:
    """Every way a call to Redis fails, as StoreError: the one place that knows
    redis-py's exceptions. The deadline bounds the whole call, the retry
    included (the socket timeouts bound each read and connect)."""
    try:
        async with deadline(timeout):
            yield
    except StoreError:
        raise
    except _FAILURES as exc:
        raise store_error(description, exc) from exc


# Every exception a call to Redis raises when Redis fails (not a bug of ours).
_FAILURES = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


def store_error(description: str, exc: BaseException) -> StoreError:
    """The StoreError for `exc` (raise it `from exc`: `_failed` reads the cause)."""
    return StoreError(f"redis ({description}): {type(exc).__name__}: {exc}".rstrip(": "))


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


def _bulk(value: str) -> bytes:
    """One RESP bulk string."""
    data = value.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


# The loop passes the watchdog waits before a verdict: one for the socket's
# read, one for the reader task's wake-up, one for its callers' (see _Link).
_SETTLE_PASSES = 3
# A caller's own deadline, in timeouts: later than the link's (no reply at all
# for one timeout), so that a Redis that answers is waited for a while.
_PATIENCE = 3


class _Link:
    """One connection to Redis that every admit and flush of a store shares, pipelined.

    Why not redis-py's pool: a call through it costs ~50 µs of CPU (a pooled
    connection taken and given back, the command packed argument by
    argument, one write syscall, its reply parser's coroutines, a timeout
    scope), about half of what limits cost an agent call. Here a command is
    bytes appended to `_out`, and `_write`, run once per event-loop pass
    (call_soon), sends all the commands of that pass in one write; Redis
    answers them in order, in as few reads, and `_reader` hands each reply to
    its caller's future. Redis runs a client's commands one after another, so
    one connection loses nothing to the pool's many (no Redis runs two scripts
    at once anyway).

    redis-py still opens the connection (`make_connection` + `connect`: the
    URL's TLS, AUTH, SELECT and CLIENT SETINFO exactly as its pool would),
    then its StreamReader and StreamWriter are used directly. The replies
    the store's commands get are simple strings, errors, integers and bulk
    strings; anything else is a protocol error that ends the link.

    Failures end the link: every caller waiting on it gets the error (a
    redis-py ConnectionError or TimeoutError, which `_failed` tells apart)
    and the store opens a new link for its next call. Timeouts are kept by
    one watchdog timer per link, not one per call (`_check`): no reply at all
    for `timeout` while commands wait means a Redis that hangs, and ends the
    link (every caller waiting gets a TimeoutError within about `timeout`),
    as redis-py disconnects when a read times out. Before either verdict the
    reader gets a few loop passes to hand out replies that are already in: a process held up past `timeout` (a starved CPU) runs its
    timers before its reads, and must not fail 256 answered calls. A Redis
    that answers, but too slowly for some caller, fails that caller alone,
    after _PATIENCE timeouts (the reply, when it comes, goes nowhere): a
    loaded aiwfd's own loop adds its passes to every call, and that alone
    must not turn calls into store errors. A lost connection
    is seen at once: `_reader` is always reading, so a Redis restart does
    not wait for the next call to find its socket dead (redis-py's one retry
    on a pooled connection was for that).
    """

    def __init__(self, pool: "redis.asyncio.ConnectionPool", timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._conn = pool.make_connection()
        self._out: list[bytes] = []  # commands not written yet (this pass's, or all while connecting)
        # One (future, deadline) per command queued or written, in their order: the replies'.
        self._waiting: collections.deque[tuple[asyncio.Future[bytes | None], float]] = collections.deque()
        self._writer: asyncio.StreamWriter | None = None  # set once connected
        self._scheduled = False  # a _write is due this pass
        self._timer: asyncio.TimerHandle | None = None
        self._patience = (_PATIENCE - 1) * timeout  # a caller's deadline past the stored one (`_dues`)
        self._replied = 0  # replies handed out so far: what the watchdog sees progress by
        self._heard = self._loop.time()  # when the last of them came (or the link was opened)
        self.dead = False  # failed or closed: never used again
        self._task = self._loop.create_task(self._reader())

    def call(self, command: bytes) -> "asyncio.Future[bytes | None]":
        """Queue one command (RESP bytes); the future gets its reply or its error."""
        loop = self._loop
        fut: asyncio.Future[bytes | None] = loop.create_future()
        self._out.append(command)
        self._waiting.append((fut, loop.time() + self._timeout))
        if not self._scheduled and self._writer is not None:
            self._scheduled = True
            loop.call_soon(self._write)
        if self._timer is None:
            self._timer = loop.call_later(self._timeout, self._check)
        return fut

    def _write(self) -> None:
        self._scheduled = False
        out = self._out
        if self.dead or not out or self._writer is None:
            return
        self._out = []
        try:
            self._writer.write(b"".join(out) if len(out) > 1 else out[0])
        except Exception as exc:  # a transport already closed: the reader reports why
            self._fail(redis.exceptions.ConnectionError(f"write failed: {exc}"))

    def _dues(self) -> tuple[float, float]:
        """When the first caller still waiting is overdue, and when the link is
        (no reply for `timeout` since the oldest command went, or the last reply)."""
        waiting = self._waiting
        first = next((due for fut, due in waiting if not fut.done()), float("inf")) + self._patience
        hung = max(self._heard + self._timeout, waiting[0][1]) if waiting else float("inf")
        return first, hung

    def _check(self) -> None:
        """The watchdog's timer: something overdue goes to `_settle`, else wait for it."""
        self._timer = None
        if self.dead or not self._waiting:
            return
        due = min(self._dues())
        if self._loop.time() >= due:
            self._settle(_SETTLE_PASSES, self._replied)
        else:
            self._timer = self._loop.call_at(due, self._check)

    def _settle(self, passes: int, replied: int) -> None:
        """The verdict, `passes` loop passes later (the reader reads, parses and
        resolves in between): a link that handed out no reply is hung and ends;
        otherwise only the callers still past their deadline time out."""
        if self.dead:
            return
        if passes:
            self._loop.call_soon(self._settle, passes - 1, replied)
            return
        if not self._waiting:
            return
        now = self._loop.time()
        first, hung = self._dues()
        if self._replied == replied and now >= hung:
            self._fail(redis.exceptions.TimeoutError(f"no reply within {self._timeout:g} s"))
            return
        if now >= first:
            for fut, due in self._waiting:
                if due + self._patience > now:
                    break
                if not fut.done():
                    fut.set_exception(redis.exceptions.TimeoutError(f"no reply within {self._timeout:g} s"))
        if self._timer is None:
            self._timer = self._loop.call_at(max(min(self._dues()), now), self._check)

    async def _reader(self) -> None:
        try:
            await self._conn.connect()
            reader, self._writer = self._conn._reader, self._conn._writer
            assert reader is not None and self._writer is not None
            self._write()  # what was queued while connecting
            buf = b""
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                buf = self._replies(buf + data if buf else data)
        except asyncio.CancelledError:
            pass  # _fail or close: the callers have their answer
        except redis.exceptions.RedisError as exc:
            # Connecting raises redis-py's own errors (AuthenticationError is a ConnectionError)
            self._fail(exc if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
                       else redis.exceptions.ConnectionError(str(exc)))
        except (OSError, ValueError, IndexError, AssertionError) as exc:
            # reset or refused (OSError), a reply we cannot read or did not ask for
            self._fail(redis.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}"))

    def _replies(self, buf: bytes) -> bytes:
        """Hand every complete reply in `buf` to its caller; what is left (a partial reply)."""
        waiting = self._waiting
        pos, end = 0, len(buf)
        while pos < end:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            kind = buf[pos]
            error: redis.exceptions.RedisError | None = None
            value: bytes | None
            if kind == 36:  # $: a bulk string (the scripts' replies)
                size = int(buf[pos + 1:eol])
                if size < 0:
                    value, nxt = None, eol + 2
                else:
                    nxt = eol + 4 + size
                    if nxt > end:
                        break
                    value = buf[eol + 2:nxt - 2]
            elif kind == 43 or kind == 58:  # + or : (a simple string, an integer)
                value, nxt = buf[pos + 1:eol], eol + 2
            elif kind == 45:  # -: an error reply
                text = buf[pos + 1:eol].decode(errors="replace")
                error = (redis.exceptions.NoScriptError if text.startswith("NOSCRIPT")
                         else redis.exceptions.ResponseError)(text)
                value, nxt = None, eol + 2
            else:
                raise ValueError(f"unexpected reply type {chr(kind)!r}")
            pos = nxt
            self._replied += 1
            fut = waiting.popleft()[0]  # IndexError: a reply nobody asked for
            if not fut.done():  # done: its caller was cancelled
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)
        if pos:
            self._heard = self._loop.time()
            return buf[pos:]
        return buf

    def _fail(self, exc: redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) -> None:
        """End the link: every caller still waiting gets `exc`'s kind of error."""
        if self.dead:
            return
        self.dead = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = []
        waiting, self._waiting = self._waiting, collections.deque()
        for fut, _ in waiting:
            if not fut.done():
                fut.set_exception(type(exc)(*exc.args))  # one exception object per caller
        if self._task is not asyncio.current_task():
            self._task.cancel()
        self._conn._close()  # the socket (sync: no await in a callback)

    async def close(self) -> None:
        self._fail(redis.exceptions.ConnectionError("closed"))
        await asyncio.wait([self._task])


_ADMIT = _Script(ADMIT)
# The start of ADMIT's two commands on a _Link, after the array's length.
_EVALSHA = _bulk("EVALSHA") + _bulk(_ADMIT.sha)
_EVAL = _bulk("EVAL") + _bulk(ADMIT)

# What finishes leave to send: the lease members to ZREM, by key; the tokens
# to HINCRBY, by (key, bucket width), summed.
_Releases = dict[str, list[str]]
_Tokens = dict[tuple[str, int], int]


def _encoded(releases: _Releases, tokens: _Tokens) -> tuple[list[str], str]:
    """The finishes' part of ADMIT's KEYS and of its one ARGV (with a leading space)."""
    keys: list[str] = []
    parts: list[str] = []
    for key, members in releases.items():
        keys.append(key)
        parts.append(f" c {len(members)} {' '.join(members)}")
    for (key, width), n in tokens.items():
        keys.append(key)
        parts.append(f" t {width} {n}")
    return keys, "".join(parts)


class RedisStore:
    """Limits in Redis, shared by every instance that uses the same URL (SPEC §8)."""

    shared = True

    def __init__(self, url: str, *, timeout: float = 0.5, prefix: str = "aiwfd:") -> None:
        self.description = redacted(url)
        self.timeout = timeout
        self.prefix = prefix
        # Called with the error each time deferred finishes could not be sent
        # by the flusher, `ping` or `close`, or were dropped (see `_failed`):
        # `finish` itself no longer talks to Redis, so it cannot raise it.
        self.on_finish_error: Callable[[StoreError], None] | None = None
        # For `ping`, and the options every connection is opened with (the
        # admits' and flushes' one, `_link`, included).
        self._client = client_for(url, timeout)
        self._link: _Link | None = None  # opened by the first call, again after a failure
        self._releases: _Releases = {}
        self._tokens: _Tokens = {}
        self._flusher: asyncio.Task[None] | None = None
        self._napping = False  # the flusher is in its sleep (safe to cancel: it holds no batch)
        self._closed = False

    def _mapped(self) -> contextlib.AbstractAsyncContextManager[None]:
        return mapped(self.description, self.timeout)

    def _key(self, limit: Limit) -> str:
        return self.prefix + limit.key

    async def admit(self, limits: Sequence[Limit], cost: int = 1, slots: int = 1,
                    lease_ttl: float = 120.0) -> Admission:
        if not limits:
            return Admission(True, None, 0.0, (), "")
        keys: list[str] = []
        parts: list[str] = []
        concurrency = False
        for limit in limits:
            keys.append(self.prefix + limit.key)
            kind = _KIND[limit.kind]
            concurrency = concurrency or kind == "c"
            parts.append(f" {kind} {limit.quota} {limit.width_us}")
        # The lease's members are `lease:slot`: a random id, so two instances never share one.
        lease = secrets.token_hex(8) if concurrency else ""
        # The pending finishes ride along, first in KEYS and last in ARGV.
        releases, tokens = self._take()
        nf, fargs = 0, ""
        if releases or tokens:
            fkeys, fargs = _encoded(releases, tokens)
            nf, keys = len(fkeys), fkeys + keys
        # An empty lease is "-": split on spaces, an empty field would vanish.
        arg = f"{nf} {cost} {slots} {round(lease_ttl * 1_000_000)} {lease or '-'}{''.join(parts)}{fargs}"
        try:
            reply = await self._send(keys, arg, releases, tokens, carried=True)
        except StoreError as exc:
            if lease and isinstance(exc.__cause__, (asyncio.TimeoutError, redis.exceptions.TimeoutError)):
                # A timeout is ambiguous: the script may still run and take slots
                # nobody will finish. Release them with the next send, or they
                # would lock the limit until their lease_ttl (ZREM of members that
                # were never added does nothing). Not on a refused connection:
                # the script never ran, and an outage must not grow the batch.
                self.finish_nowhere(lease, limits, slots)
            raise
        except asyncio.CancelledError:
            # The caller went away (a client that disconnected): the script runs
            # all the same, and its slots would wait for lease_ttl.
            if lease:
                self.finish_nowhere(lease, limits, slots)
            raise
        try:
            assert isinstance(reply, bytes)
            values = [int(v) for v in reply.split()]
            assert len(values) >= 3
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
        """Record the release and the tokens; the next admit or the flusher sends them (no round trip here)."""
        pending = False
        for limit in limits:
            if limit.kind == "concurrency" and lease:
                members = self._releases.setdefault(self.prefix + limit.key, [])
                members += (f"{lease}:{s}" for s in range(1, slots + 1))
                pending = True
            elif limit.kind == "tokens" and tokens > 0:
                at = (self.prefix + limit.key, limit.width_us)
                self._tokens[at] = self._tokens.get(at, 0) + tokens
                pending = True
        if pending and self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def finish_nowhere(self, lease: str, limits: Sequence[Limit], slots: int) -> None:
        """Queue the release of `lease`'s slots without a flusher's urgency:
        the next admit or flush sends it."""
        for limit in limits:
            if limit.kind == "concurrency":
                members = self._releases.setdefault(self.prefix + limit.key, [])
                if len(members) < MAX_ORPHANS:  # past that, lease_ttl frees them
                    members += (f"{lease}:{s}" for s in range(1, slots + 1))

    async def flush(self) -> None:
        """Send the pending finishes now (one round trip; none when nothing is
        pending). StoreError when Redis does not answer, after `_failed`."""
        releases, tokens = self._take()
        if not releases and not tokens:
            return
        keys, fargs = _encoded(releases, tokens)
        await self._send(keys, f"{len(keys)} 0 0 0 -{fargs}", releases, tokens, carried=False)

    def _take(self) -> tuple[_Releases, _Tokens]:
        """The pending batch, now the caller's: fresh dicts take its place
        (even when it is empty: the caller's batch must never be the live one,
        which other calls add to while it is in flight)."""
        releases, tokens = self._releases, self._tokens
        self._releases, self._tokens = {}, {}
        return releases, tokens

    async def _send(self, keys: list[str], arg: str, releases: _Releases, tokens: _Tokens,
                    carried: bool) -> object:
        try:
            try:
                return await self._eval(keys, arg)
            except _FAILURES as exc:
                raise store_error(self.description, exc) from exc
        except StoreError as exc:
            if releases or tokens:
                self._failed(releases, tokens, exc, carried)
            raise
        except asyncio.CancelledError:
            # The caller went away mid-call (a client that disconnected): as
            # ambiguous as a timeout.
            if releases or tokens:
                self._failed(releases, tokens, None, carried)
            raise

    async def _eval(self, keys: list[str], arg: str) -> bytes | None:
        """ADMIT on the link: by its SHA1, whole when Redis does not know it (see _Script)."""
        body = b"".join([_bulk(str(len(keys))), *map(_bulk, keys), _bulk(arg)])
        count = b"*%d\r\n" % (len(keys) + 4)
        try:
            return await self._call(count + _EVALSHA + body)
        except redis.exceptions.NoScriptError:
            return await self._call(count + _EVAL + body)

    def _call(self, command: bytes) -> "asyncio.Future[bytes | None]":
        link = self._link
        if link is None or link.dead:
            link = self._link = _Link(self._client.connection_pool, self.timeout)
        return link.call(command)

    def _failed(self, releases: _Releases, tokens: _Tokens, exc: StoreError | None, carried: bool) -> None:
        """Finishes that did not reach Redis, or may not have: what to keep for the next attempt.

        A connection error (refused, reset: Redis down or restarting): all of
        it is kept. A timeout or a cancel is ambiguous, the script may have
        run: the slot releases are kept (ZREM twice is harmless) but the tokens
        are dropped, since a HINCRBY sent twice would count them twice and
        under-counting a few calls' tokens is the lesser error. An error reply
        (or one we cannot read): the script ran, or never will; nothing kept.
        Nothing here grows without bound: while Redis is down no admit
        succeeds, so no new lease is taken, and the tokens are summed per key.
        """
        cause = exc.__cause__ if exc is not None else None
        if exc is None or isinstance(cause, (asyncio.TimeoutError, redis.exceptions.TimeoutError)):
            keep_releases, keep_tokens = True, False  # (TimeoutError is an OSError: tested first)
        elif isinstance(cause, (redis.exceptions.ConnectionError, OSError)):
            keep_releases, keep_tokens = True, True
        else:
            keep_releases, keep_tokens = False, False
        if keep_releases:
            for key, members in releases.items():
                self._releases.setdefault(key, []).extend(members)
        if keep_tokens:
            for at, n in tokens.items():
                self._tokens[at] = self._tokens.get(at, 0) + n
        dropped = (releases and not keep_releases) or (tokens and not keep_tokens)
        if self._releases or self._tokens:
            if self._flusher is None and not self._closed:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
        # An admit that carried the batch raised its own StoreError to its
        # caller: report it again only when something was lost.
        if not carried or dropped:
            self._report(exc or StoreError(f"redis ({self.description}): cancelled while sending finishes"))

    def _report(self, exc: StoreError) -> None:
        if self.on_finish_error is not None:
            try:
                self.on_finish_error(exc)
            except Exception:  # a faulty callback must not stop the flusher
                logger.exception("on_finish_error failed")

    async def _flush_soon(self) -> None:
        """The flusher: sends what no admit carried, FLUSH_DELAY after it was
        recorded; after a failure it tries again, less and less often."""
        delay = FLUSH_DELAY
        try:
            while (self._releases or self._tokens) and not self._closed:
                self._napping = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._napping = False
                try:
                    await self.flush()
                    delay = FLUSH_DELAY
                except StoreError:
                    delay = min(max(2 * delay, RETRY_MIN), RETRY_MAX)  # reported by _failed
        finally:
            self._flusher = None

    async def ping(self) -> None:
        # Pending finishes make a round trip anyway: they are the ping.
        if self._releases or self._tokens:
            await self.flush()
            return
        async with self._mapped():
            await self._client.ping()

    async def close(self) -> None:
        """Send the pending finishes (nothing is lost on a clean shutdown), then close the pool."""
        self._closed = True
        task = self._flusher
        if task is not None:
            if self._napping:
                task.cancel()  # asleep: it holds no batch
            await asyncio.wait([task])  # sending: let it finish (within `timeout`)
        with contextlib.suppress(StoreError):  # reported through on_finish_error
            await self.flush()
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        # Closing a pool whose Redis is gone must not fail a shutdown.
        with contextlib.suppress(Exception):
            await self._client.aclose()
