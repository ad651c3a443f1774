"""The fleet's job store: Redis Streams with one consumer group (SPEC §9.2).

Imported only when REDIS_URL is set (aiwfd.jobs.open_job_store). Our own
small layer on purpose (issue 16): arq, saq and taskiq-redis each failed a
crash-recovery case measured here.

Keys (`prefix` = "aiwfd:" by default):

- `jobs:queue`: the stream; one entry (`job`, `agent`) per queued run of a
  job, read by the consumer group `aiwfd`, one consumer per owner.
- `job:<id>`: a hash, the job's document (`status`, `owner`, `lease_until`,
  `msg` = the id of its current stream entry, times in ms of Redis `TIME`;
  `traceparent`: the submitting request's, absent when tracing was off).
- `jobs:client:<client>`: a sorted set of the client's job ids by their
  insertion number (`jobs:seq`): the list pages, newest first.
- `jobs:finished`: a sorted set of finished job ids by their end (retention).
- `jobs:dead`: a stream of the dead letters' ids (jobs whose runs were lost
  max_attempts times), for an operator to look at.
- `jobs:reclaim`: where the XAUTOCLAIM scan of the pending entries goes on.
- `jobs:parked`: a set of the agents whose entries a claim parked: a claim
  with `agents` (an instance whose config lacks the agent, during a rolling
  reload) does not take another agent's job, it moves the entry to the
  consumer `~parked:<agent>` (no attempt counted, the hash untouched), where
  the next claim that knows the agent (or names none) finds it first.
- `jobs:claim:<owner>:<token>`: the job a claim with a token took (for the
  lease's time), so that a retry of a claim whose reply timed out gets it
  back instead of leaving it stranded under the owner.
- `delivery:<id>`: a hash per pending webhook delivery (`id` = the job's):
  `type`, `attempts`, `first`, `next`, `owner`. Deleted when it is done; the
  job hash's `wh_status`, `wh_attempts`, `wh_last` keep the result (and
  `wh_status` = pending from submission marks a job that has a webhook).
- `deliveries:due`: a sorted set of the pending deliveries by when they may
  be claimed: `next` while free, the lease's end while leased, so a claim
  is one ZRANGEBYSCORE up to now whatever the state.

Every operation is one Lua script (one round trip, atomic, timed by Redis
`TIME` so that the instances' clocks never matter): submit is HSET + ZADD +
XADD; claim first XAUTOCLAIMs entries idle longer than the lease (their owner
stopped renewing: killed), then takes a parked entry of an agent it knows
(`jobs:parked`), then XREADGROUPs a new one, and in every case
takes the job only if its hash says it is queued or its lease ran out, so a
job never runs twice at the same time; renew extends the lease and resets the
entry's idle time (XCLAIM JUSTID); finish writes the result, XACKs and XDELs
in the same script, only for the lease holder. Because claim itself reclaims,
a job lost on an idle queue is run again by the next claim, with no new job
needed to wake anything up (taskiq-redis's failure).

The scripts build the job hashes' keys from the prefix, so every key must
live on one Redis (not Cluster; one Redis or Sentinel is what SPEC §8-9 ask
for). Durable only as far as Redis is: `appendonly yes`, `noeviction`
(docs/deploy.md).
"""

from __future__ import annotations

import builtins
import contextlib
from typing import Any, Collection, Sequence

import orjson
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiwfd.jobs.store import (
    dumps,
    loads,
    DEFAULT_MAX_ATTEMPTS,
    Job,
    JobFinished,
    Delivery,
    DeliveryOutcome,
    JobStatus,
    WebhookStatus,
    check_delivery_result,
    dead_letter_error,
    decode_cursor,
    has_webhook,
    encode_cursor,
    new_job_id,
)
# The limits store's script runner (EVALSHA, EVAL after a Redis restart) and log-safe URL.
from aiwfd.store.redis import _Script, mapped, redacted

__all__ = ["GROUP", "RedisJobStore"]

GROUP = "aiwfd"

# The longest lease (10 days): the idle time a stream entry reaches when its lease runs out.
MAX_LEASE_MS = 10 * 24 * 3600 * 1000

# Shared by the scripts: the time in ms from Redis (every instance, one clock),
# ms written as integers (a Lua number would be written as 1.76e+12), and
# the removal of a stream entry that is done with.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(x) return string.format('%d', x) end
-- A running job's entry reaches EXPIRED ms of idle time exactly when its
-- lease runs out: XAUTOCLAIM's one min-idle-time then finds the runs whose
-- lease ran out, whatever lease each owner asked for.
local EXPIRED = @EXPIRED@
local function idle_until_expiry(stream, group, owner, msg, lease)
  redis.call('XCLAIM', stream, group, owner, 0, msg, 'IDLE', EXPIRED - lease, 'JUSTID')
end
-- The delivery task of a job that just ended, if it has a webhook; every
-- script that ends a job calls it in the same script (both, or neither).
local function end_delivery(prefix, due, id, key)
  local h = redis.call('HMGET', key, 'wh_status', 'status')
  if not h[1] or h[1] == '' then return end
  redis.call('HSET', prefix .. 'delivery:' .. id, 'type', 'job.' .. h[2], 'attempts', 0,
    'first', ms(now), 'next', ms(now), 'owner', '')
  redis.call('ZADD', due, now, id)
end
local function drop(stream, msg)
  if msg and msg ~= '' then
    redis.call('XACK', stream, ARGV[1], msg)
    redis.call('XDEL', stream, msg)
  end
end
""".replace("@EXPIRED@", str(MAX_LEASE_MS))

# KEYS: stream, seq, job hash, client index. ARGV: group, id, client, agent, body, webhook_url ('' none),
# webhook status ('pending', or '' for a job without a webhook), traceparent ('' none: no field).
# A job hash that exists already (a given id, a retry whose first write was
# done): nothing written, that job returned as it is.
SUBMIT = _PRELUDE + """
if redis.call('EXISTS', KEYS[3]) == 1 then return redis.call('HGETALL', KEYS[3]) end
local seq = redis.call('INCR', KEYS[2])
local msg = redis.call('XADD', KEYS[1], '*', 'job', ARGV[2], 'agent', ARGV[4])
redis.call('HSET', KEYS[3], 'id', ARGV[2], 'client', ARGV[3], 'agent', ARGV[4], 'status', 'queued',
  'created', ms(now), 'attempts', 0, 'body', ARGV[5], 'webhook_url', ARGV[6], 'seq', seq, 'msg', msg,
  'wh_status', ARGV[7], 'wh_attempts', 0)
if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], 'traceparent', ARGV[8]) end
redis.call('ZADD', KEYS[4], seq, ARGV[2])
return redis.call('HGETALL', KEYS[3])
"""

# KEYS: stream, dead letters, reclaim cursor, finished, due deliveries, parked agents.
# ARGV: group, prefix, owner, lease (ms), max attempts, the dead letter's error (JSON,
# %d = attempts), '1' when the agents follow ('0': any agent), token ('' none), agents...
# Returns the claimed job's hash, or nil.
CLAIM = _PRELUDE + """
local stream, group, prefix, owner = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lease, max_attempts = tonumber(ARGV[4]), tonumber(ARGV[5])
local parked, token = KEYS[6], ARGV[8]
local known = nil  -- nil: any agent; else the set of the agents this claim may take
if ARGV[7] == '1' then
  known = {}
  for i = 9, #ARGV do known[ARGV[i]] = true end
end
local PARKED = '~parked:'
-- The group once per stream (BUSYGROUP afterwards; a Redis that lost its data gets it back).
redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')

-- 0. A retry of a claim that already ran (its reply timed out): the job it took, if still ours.
local tkey = nil
if token ~= '' then
  tkey = prefix .. 'jobs:claim:' .. owner .. ':' .. token
  local id = redis.call('GET', tkey)
  if id then
    local key = prefix .. 'job:' .. id
    local h = redis.call('HMGET', key, 'status', 'owner', 'msg', 'token')
    if h[1] == 'running' and h[2] == owner and h[4] == token then
      redis.call('HSET', key, 'lease_until', ms(now + lease))
      idle_until_expiry(stream, group, owner, h[3], lease)
      return redis.call('HGETALL', key)
    end
  end
end

-- The job of entry `msg`, taken by `owner` if it may run now; else nil
-- (and the entry dropped when it has nothing left to run, given back to its
-- lease holder, or parked when it is the job of an agent not `known`: then
-- nil, true).
local function consider(msg, fields)
  if not fields then drop(stream, msg) return nil end  -- the entry was deleted (Redis < 7 lists it)
  local id = fields[2]
  local key = prefix .. 'job:' .. id
  local h = redis.call('HMGET', key, 'status', 'lease_until', 'attempts', 'msg', 'owner', 'agent')
  local status = h[1]
  if (status ~= 'queued' and status ~= 'running') or h[4] ~= msg then
    drop(stream, msg)  -- finished, canceled, purged, or a stale entry of a job queued again
    return nil
  end
  if status == 'running' then
    local left = tonumber(h[2]) - now
    if left >= 0 then  -- its lease still holds (a ms of rounding): back to its owner, as idle as it was
      redis.call('XCLAIM', stream, group, h[5], 0, msg, 'IDLE', math.max(EXPIRED - left, 0), 'JUSTID')
      return nil
    end
    local attempts = tonumber(h[3])
    if attempts >= max_attempts then
      redis.call('HSET', key, 'status', 'failed', 'error', string.format(ARGV[6], attempts),
        'finished', ms(now), 'owner', '', 'lease_until', '')
      redis.call('ZADD', KEYS[4], now, id)
      end_delivery(prefix, KEYS[5], id, key)
      redis.call('XADD', KEYS[2], '*', 'job', id, 'attempts', attempts)
      drop(stream, msg)
      return nil
    end
  end
  local agent = h[6] or ''
  if known and not known[agent] then
    -- Another agent's job: not ours to run nor to count. Pending under the
    -- agent's parking consumer (idle 0: no XAUTOCLAIM takes it for 10 days)
    -- until a claim that knows the agent takes it (step 2).
    redis.call('XCLAIM', stream, group, PARKED .. agent, 0, msg, 'JUSTID')
    redis.call('SADD', parked, agent)
    return nil, true
  end
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'status', 'running', 'owner', owner, 'lease_until', ms(now + lease), 'started', ms(now),
    'token', token)
  idle_until_expiry(stream, group, owner, msg, lease)
  if tkey then redis.call('SET', tkey, id, 'PX', lease) end
  return redis.call('HGETALL', key)
end

-- 1. Runs whose lease ran out (entries idle EXPIRED ms or more: their owner
-- stopped renewing), one entry per XAUTOCLAIM so that none is moved to us
-- without being looked at.
local cursor = redis.call('GET', KEYS[3]) or '0-0'
for i = 1, 8 do
  local r = redis.call('XAUTOCLAIM', stream, group, owner, EXPIRED, cursor, 'COUNT', 1)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    local job = consider(e[1], e[2])
    if job then redis.call('SET', KEYS[3], cursor) return job end
  end
  if cursor == '0-0' then break end
end
redis.call('SET', KEYS[3], cursor)

-- 2. Jobs that claims of instances without their agent parked, if we know it.
for _, agent in ipairs(redis.call('SMEMBERS', parked)) do
  if not known or known[agent] then
    for i = 1, 16 do
      local p = redis.call('XPENDING', stream, group, '-', '+', 1, PARKED .. agent)
      if #p == 0 then redis.call('SREM', parked, agent) break end
      local msg = p[1][1]
      redis.call('XCLAIM', stream, group, owner, 0, msg, 'JUSTID')
      local e = redis.call('XRANGE', stream, msg, msg)
      local job = consider(msg, e[1] and e[1][2])
      if job then return job end
    end
  end
end

-- 3. New entries: at most 16 looked at, besides up to 256 parked.
local looked, skipped = 0, 0
while looked < 16 and skipped < 256 do
  local r = redis.call('XREADGROUP', 'GROUP', group, owner, 'COUNT', 1, 'STREAMS', stream, '>')
  if not r then return nil end
  local e = r[1][2][1]
  local job, was_parked = consider(e[1], e[2])
  if job then return job end
  if was_parked then skipped = skipped + 1 else looked = looked + 1 end
end
return nil
"""

# KEYS: stream, job hash. ARGV: group, owner, lease (ms). 1: renewed, 0: not ours.
RENEW = _PRELUDE + """
local h = redis.call('HMGET', KEYS[2], 'status', 'owner', 'msg')
if h[1] ~= 'running' or h[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'lease_until', ms(now + tonumber(ARGV[3])))
idle_until_expiry(KEYS[1], ARGV[1], ARGV[2], h[3], tonumber(ARGV[3]))
return 1
"""

# KEYS: stream, job hash, finished, due deliveries. ARGV: group, owner, status, result, error
# ('' for none), id, prefix. 1: written, 0: not ours (nothing written, no delivery).
FINISH = _PRELUDE + """
local h = redis.call('HMGET', KEYS[2], 'status', 'owner', 'msg')
if h[1] ~= 'running' or h[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'status', ARGV[3], 'finished', ms(now), 'owner', '', 'lease_until', '')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'result', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
drop(KEYS[1], h[3])
redis.call('ZADD', KEYS[3], now, ARGV[6])
end_delivery(ARGV[7], KEYS[4], ARGV[6], KEYS[2])
return 1
"""

# KEYS: stream, job hash. ARGV: group, owner, id. Back to the queue: a new
# entry, so that the next XREADGROUP of any instance takes it.
RELEASE = _PRELUDE + """
local h = redis.call('HMGET', KEYS[2], 'status', 'owner', 'msg', 'agent')
if h[1] ~= 'running' or h[2] ~= ARGV[2] then return 0 end
drop(KEYS[1], h[3])
local msg = redis.call('XADD', KEYS[1], '*', 'job', ARGV[3], 'agent', h[4])
redis.call('HSET', KEYS[2], 'status', 'queued', 'owner', '', 'lease_until', '', 'msg', msg)
return 1
"""

# KEYS: stream, job hash, finished, due deliveries. ARGV: group, client, id, prefix.
# {0}: not found; {1, hash}: canceled now; {2, hash}: had finished.
CANCEL = _PRELUDE + """
local h = redis.call('HMGET', KEYS[2], 'status', 'client', 'msg')
if not h[1] or h[2] ~= ARGV[2] then return {0} end
if h[1] ~= 'queued' and h[1] ~= 'running' then return {2, redis.call('HGETALL', KEYS[2])} end
redis.call('HSET', KEYS[2], 'status', 'canceled', 'finished', ms(now), 'owner', '', 'lease_until', '')
drop(KEYS[1], h[3])
redis.call('ZADD', KEYS[3], now, ARGV[3])
end_delivery(ARGV[4], KEYS[4], ARGV[3], KEYS[2])
return {1, redis.call('HGETALL', KEYS[2])}
"""

# KEYS: stream, finished, due deliveries, parked agents. ARGV: group, prefix, agent, error,
# first entry, count. One batch of the stream: {failed, last entry id seen ('' at the end)}.
# Parked entries (claim) are in the stream like any other: failed alike.
FAIL_AGENT = _PRELUDE + """
local entries = redis.call('XRANGE', KEYS[1], ARGV[5], '+', 'COUNT', tonumber(ARGV[6]))
local n, last = 0, ''
for _, e in ipairs(entries) do
  last = e[1]
  local f = e[2]
  if f[4] == ARGV[3] then
    local key = ARGV[2] .. 'job:' .. f[2]
    local h = redis.call('HMGET', key, 'status', 'msg')
    if h[1] == 'queued' and h[2] == e[1] then
      redis.call('HSET', key, 'status', 'failed', 'error', ARGV[4], 'finished', ms(now))
      drop(KEYS[1], e[1])
      redis.call('ZADD', KEYS[2], now, f[2])
      end_delivery(ARGV[2], KEYS[3], f[2], key)
      n = n + 1
    end
  end
end
if #entries < tonumber(ARGV[6]) then
  last = ''
  if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, '~parked:' .. ARGV[3]) == 0 then
    redis.call('SREM', KEYS[4], ARGV[3])
  end
end
return {n, last}
"""

# KEYS: the client's index. ARGV: group (unused), prefix, top ("+inf" or
# "(<seq>"), limit, status and agent ('' for any), budget, the document's
# fields. One page as JSON {"jobs": [hash, ...], "next": "<seq>"} (no "next":
# the last page): one bulk string, which redis-py reads ~10x faster than 50
# hashes' fields one by one. Filtering needs every document looked at, but
# only its status and agent (HMGET: a body may be megabytes); the page's
# jobs are read without their bodies. After `budget` ids the page ends
# early (fewer than `limit`, with a next): bounded work per page even for a
# client with 100,000 jobs and none matching.
LIST = _PRELUDE + """
local prefix, top, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local status, agent, budget = ARGV[5], ARGV[6], tonumber(ARGV[7])
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
local found, seqs, scanned = {}, {}, 0
local batch = math.max(limit + 1, 50)
while true do
  local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], top, '-inf', 'WITHSCORES', 'LIMIT', 0, batch)
  for i = 1, #ids, 2 do
    local seq = ids[i + 1]
    top = '(' .. seq
    scanned = scanned + 1
    local key = prefix .. 'job:' .. ids[i]
    local h = redis.call('HMGET', key, 'status', 'agent')
    if h[1] and (status == '' or h[1] == status) and (agent == '' or h[2] == agent) then
      if #found == limit then return cjson.encode({jobs = found, next = seqs[#seqs]}) end
      local v = redis.call('HMGET', key, unpack(fields))
      local d = {}
      for j = 1, #fields do if v[j] then d[fields[j]] = v[j] end end
      found[#found + 1] = d
      seqs[#seqs + 1] = seq
    end
    if scanned >= budget and i + 1 < #ids then return cjson.encode({jobs = found, next = seq}) end
  end
  if #ids < 2 * batch then break end
end
return cjson.encode({jobs = found})
"""

# KEYS: finished, due deliveries. ARGV: group (unused), prefix, age (ms), count. One batch: how
# many deleted. A delivery still pending goes with its job: its event's data is gone.
PURGE = _PRELUDE + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ms(now - tonumber(ARGV[3])),
  'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  local key = ARGV[2] .. 'job:' .. id
  local client = redis.call('HGET', key, 'client')
  if client then redis.call('ZREM', ARGV[2] .. 'jobs:client:' .. client, id) end
  redis.call('DEL', key, ARGV[2] .. 'delivery:' .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #ids
"""

# KEYS: stream. ARGV: group, idle (ms). Each owner is a consumer of the group
# (an instance's owner names are its own), so a fleet that restarts leaves
# consumers behind: those without pending entries, idle that long, go. In
# one script: a consumer deleted with an entry pending would lose that run
# (no XAUTOCLAIM sees it again), so the check and the delete cannot interleave.
FORGET_CONSUMERS = """
local r = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(r) ~= 'table' or r.err then return 0 end  -- no stream or no group yet
local n = 0
for _, c in ipairs(r) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"""

# KEYS: due deliveries. ARGV: group (unused), prefix, owner, lease (ms).
# {delivery hash, job hash, now} of the delivery due first, now leased; nil: none due.
CLAIM_DELIVERY = _PRELUDE + """
local prefix = ARGV[2]
for i = 1, 16 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
  if #ids == 0 then return nil end
  local id = ids[1]
  local dkey, jkey = prefix .. 'delivery:' .. id, prefix .. 'job:' .. id
  if redis.call('EXISTS', dkey) == 1 and redis.call('EXISTS', jkey) == 1 then
    redis.call('HSET', dkey, 'owner', ARGV[3])
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), id)
    return {redis.call('HGETALL', dkey), redis.call('HGETALL', jkey), ms(now)}
  end
  -- a member without its task or its job (deleted by hand, a partial restore): nothing to deliver
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', dkey)
end
return nil
"""

# KEYS: due deliveries, delivery hash, job hash. ARGV: group (unused), owner,
# outcome, HTTP status ('' none), delay (ms), id. 1: recorded, 0: not ours.
DELIVERY_RESULT = _PRELUDE + """
local d = redis.call('HMGET', KEYS[2], 'owner', 'attempts')
if not d[1] or d[1] ~= ARGV[2] then return 0 end
local attempts = tonumber(d[2]) + 1
local wh = 'pending'
if ARGV[3] == 'retry' then
  local at = now + tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], 'attempts', attempts, 'next', ms(at), 'owner', '')
  redis.call('ZADD', KEYS[1], at, ARGV[6])
else
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[6])
  if ARGV[3] == 'delivered' then wh = 'delivered' else wh = 'failed' end
end
redis.call('HSET', KEYS[3], 'wh_status', wh, 'wh_attempts', attempts, 'wh_last', ARGV[4])
return 1
"""

(_SUBMIT, _CLAIM, _RENEW, _FINISH, _RELEASE, _CANCEL, _LIST, _FAIL_AGENT, _PURGE, _FORGET_CONSUMERS,
 _CLAIM_DELIVERY, _DELIVERY_RESULT) = (
    _Script(s) for s in (SUBMIT, CLAIM, RENEW, FINISH, RELEASE, CANCEL, LIST, FAIL_AGENT, PURGE,
                         FORGET_CONSUMERS, CLAIM_DELIVERY, DELIVERY_RESULT))

# A live instance claims (or renews) far more often than this.
CONSUMER_IDLE = 3600.0

# What list() reads of a job hash: its document, not its body.
_LIST_FIELDS = ("id", "client", "agent", "status", "created", "started", "finished", "attempts", "result", "error",
                "webhook_url", "wh_status", "wh_attempts", "wh_last", "traceparent")

_BATCH = 500  # stream entries or job ids per script call of fail_agent and purge: Redis never blocks long


def _lease_ms(lease: float) -> int:
    if not 0 < lease * 1000 < MAX_LEASE_MS:
        raise ValueError(f"lease {lease!r} s: more than 0, less than {MAX_LEASE_MS // 1000} s")
    return max(1, round(lease * 1000))


def _seconds(value: str | None) -> float | None:
    return int(value) / 1000 if value else None


def _job(reply: Any) -> Job:
    """A job hash (HGETALL's flat list, or a dict) as a Job."""
    h = _hash(reply)
    created = _seconds(h["created"])
    assert created is not None
    return Job(
        id=h["id"], client=h["client"], agent=h["agent"], status=h["status"],  # type: ignore[arg-type]
        created_at=created, started_at=_seconds(h.get("started")), finished_at=_seconds(h.get("finished")),
        attempts=int(h.get("attempts") or 0), body=loads(h["body"]) if "body" in h else None,
        result=loads(h["result"]) if h.get("result") else None,
        error=loads(h["error"]) if h.get("error") else None,
        webhook_url=h.get("webhook_url") or None,
        webhook=WebhookStatus(h["wh_status"], int(h.get("wh_attempts") or 0),  # type: ignore[arg-type]
                              int(h["wh_last"]) if h.get("wh_last") else None) if h.get("wh_status") else None,
        traceparent=h.get("traceparent") or None,
    )


def _hash(reply: Any) -> dict[str, str]:
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


class RedisJobStore:
    """Jobs in Redis, shared by every instance that uses the same URL (SPEC §9)."""

    shared = True
    list_budget = 1000  # documents a filtered page looks at, at most (see LIST)

    def __init__(self, url: str, *, timeout: float = 0.5, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 prefix: str = "aiwfd:") -> None:
        self.description = redacted(url)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.prefix = prefix
        self.stream = prefix + "jobs:queue"
        self.dead = prefix + "jobs:dead"
        self._finished = prefix + "jobs:finished"
        self._reclaim = prefix + "jobs:reclaim"
        self._seq = prefix + "jobs:seq"
        self._parked = prefix + "jobs:parked"
        self.due = prefix + "deliveries:due"
        # The dead letter's error with %d for the attempts (what the script formats).
        self._dead_error = orjson.dumps(dead_letter_error(0)).decode().replace("%", "%%").replace(
            "lost 0 times", "lost %d times")
        # As the limits store: one immediate retry on a connection error (a
        # pooled connection a Redis restart closed), none on a timeout (the
        # script may have run). A Redis that is down fails within `timeout`.
        # A blocking pool: a burst of submissions beyond `max_connections`
        # waits for a connection (within `timeout`) instead of failing at
        # once as redis-py's default pool does (MaxConnectionsError at 100).
        # `?max_connections=` in the URL overrides the 64.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0,
            decode_responses=True,
        )
        self._client = redis.asyncio.Redis.from_pool(pool)  # its aclose() closes the pool too

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _index(self, client: str) -> str:
        return f"{self.prefix}jobs:client:{client}"

    def _mapped(self) -> contextlib.AbstractAsyncContextManager[None]:
        return mapped(self.description, self.timeout)

    async def _script(self, script: _Script, keys: list[str], args: Sequence[str | int]) -> Any:
        async with self._mapped():
            return await script(self._client, keys, [GROUP, *args])

    # -- the protocol --------------------------------------------------------

    async def submit(self, client: str, agent: str, body: Any, webhook_url: str | None = None,
                     *, webhook: bool | None = None, traceparent: str | None = None,
                     job_id: str | None = None) -> Job:
        if job_id is None:
            job_id = new_job_id()
        reply = await self._script(_SUBMIT, [self.stream, self._seq, self._key(job_id), self._index(client)],
                                   [job_id, client, agent, dumps(body).decode(), webhook_url or "",
                                    "pending" if has_webhook(webhook_url, webhook) else "", traceparent or ""])
        return _job(reply)

    async def claim(self, owner: str, lease: float, *, agents: Collection[str] | None = None,
                    token: str | None = None) -> Job | None:
        if isinstance(agents, str):
            raise TypeError("claim: agents is a collection of names, not one")
        known = ["0", token or ""] if agents is None else ["1", token or "", *sorted(agents)]
        reply = await self._script(
            _CLAIM, [self.stream, self.dead, self._reclaim, self._finished, self.due, self._parked],
            [self.prefix, owner, _lease_ms(lease), self.max_attempts, self._dead_error, *known])
        return _job(reply) if reply else None

    async def renew(self, job_id: str, owner: str, lease: float) -> bool:
        reply = await self._script(_RENEW, [self.stream, self._key(job_id)], [owner, _lease_ms(lease)])
        return reply == 1

    async def finish(self, job_id: str, owner: str, status: JobStatus,
                     result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        if status not in ("succeeded", "failed", "canceled"):
            raise ValueError(f"finish: {status!r} is not a finished status")
        reply = await self._script(
            _FINISH, [self.stream, self._key(job_id), self._finished, self.due],
            [owner, status, dumps(result).decode() if result is not None else "",
             dumps(error).decode() if error is not None else "", job_id, self.prefix])
        return reply == 1

    async def release(self, job_id: str, owner: str) -> None:
        await self._script(_RELEASE, [self.stream, self._key(job_id)], [owner, job_id])

    async def get(self, job_id: str, client: str) -> Job | None:
        async with self._mapped():
            h = await self._client.hgetall(self._key(job_id))
        if not h or h.get("client") != client:
            return None
        return _job(h)

    async def list(self, client: str, status: str | None = None, agent: str | None = None,
                   limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        top = f"({decode_cursor(cursor)}" if cursor else "+inf"
        reply = await self._script(_LIST, [self._index(client)],
                                   [self.prefix, top, limit, status or "", agent or "",
                                    max(self.list_budget, 10 * limit), *_LIST_FIELDS])
        page = orjson.loads(reply)
        nxt = page.get("next")
        # cjson writes an empty list as {}
        return [_job(h) for h in page["jobs"] or ()], encode_cursor(int(nxt)) if nxt is not None else None

    async def cancel(self, job_id: str, client: str) -> Job | None:
        reply = await self._script(_CANCEL, [self.stream, self._key(job_id), self._finished, self.due],
                                   [client, job_id, self.prefix])
        if reply[0] == 0:
            return None
        job = _job(reply[1])
        if reply[0] == 2:
            raise JobFinished(job)
        return job

    async def fail_agent(self, agent: str, error: dict[str, Any]) -> int:
        total, start = 0, "-"
        err = orjson.dumps(error).decode()
        while True:
            n, last = await self._script(_FAIL_AGENT, [self.stream, self._finished, self.due, self._parked],
                                         [self.prefix, agent, err, start, _BATCH])
            total += int(n)
            if not last:
                return total
            start = f"({last}"  # exclusive (Redis 6.2+)

    async def purge(self, older_than: float, consumer_idle: float = CONSUMER_IDLE) -> int:
        """Retention, and the group's consumers left by instances gone for
        `consumer_idle` seconds (with nothing pending)."""
        total = 0
        while True:
            n = int(await self._script(_PURGE, [self._finished, self.due],
                                       [self.prefix, round(older_than * 1000), _BATCH]))
            total += n
            if n < _BATCH:
                break
        await self._script(_FORGET_CONSUMERS, [self.stream], [round(consumer_idle * 1000)])
        return total

    async def claim_delivery(self, owner: str, lease: float) -> Delivery | None:
        reply = await self._script(_CLAIM_DELIVERY, [self.due], [self.prefix, owner, _lease_ms(lease)])
        if not reply:
            return None
        d, job, now = _hash(reply[0]), _job(reply[1]), int(reply[2]) / 1000
        return Delivery(id=job.id, type=d["type"], attempts=int(d["attempts"]),  # type: ignore[arg-type]
                        first_at=int(d["first"]) / 1000, next_at=int(d["next"]) / 1000, claimed_at=now, job=job)

    async def delivery_result(self, delivery_id: str, owner: str, outcome: DeliveryOutcome,
                              status: int | None = None, delay: float | None = None) -> bool:
        check_delivery_result(outcome, delay)
        reply = await self._script(
            _DELIVERY_RESULT, [self.due, f"{self.prefix}delivery:{delivery_id}", self._key(delivery_id)],
            [owner, outcome, "" if status is None else int(status), round((delay or 0) * 1000), delivery_id])
        return reply == 1

    async def dead_letters(self) -> builtins.list[str]:  # `list` is the method above, here
        """The ids of the dead letters, oldest first (for an operator, and the tests)."""
        async with self._mapped():
            entries: Any = await self._client.xrange(self.dead)
        return [fields["job"] for _, fields in entries]

    async def ping(self) -> None:
        async with self._mapped():
            await self._client.ping()

    async def close(self) -> None:
        # Closing a pool whose Redis is gone must not fail a shutdown.
        with contextlib.suppress(Exception):
            await self._client.aclose()
