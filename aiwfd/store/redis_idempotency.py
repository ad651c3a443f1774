"""Idempotency keys in Redis (SPEC §9.4), for a fleet that shares `REDIS_URL`.

Imported only when REDIS_URL is set (aiwfd.store.idempotency.open_idempotency).

One key per idempotency key (`prefix` + "idem:" + the caller's key), a
string that holds the whole record:

    running:  fingerprint (64 hex) "R" token (32 hex)                PX = the lease
    done:     fingerprint (64 hex) "D" meta (one JSON line) "\\n" body  PX = the retention (24 h)

Each operation is one script (one round trip, atomic): CLAIM is `SET NX PX`
with the lease, and when the key is taken, what it holds; COMPLETE and
RELEASE replace or delete the record only while it is still the caller's
running record, so an owner whose lease ran out and was taken over changes
nothing. Expiry is Redis's own (PX), on Redis's clock.

Every failure of Redis or redis-py becomes StoreError in one place (`_mapped`).
A claim that times out may still have run: its key is then held by nobody
and frees itself when the lease ends.
"""

from __future__ import annotations

import contextlib
from typing import Any


from aiwfd.store.base import StoreError
from aiwfd.store.idempotency import Answer, Claim, new_token
from aiwfd.store.redis import _Script, client_for, mapped, redacted

__all__ = ["CLAIM", "COMPLETE", "RELEASE", "RedisIdempotency"]

FP = 64  # a SHA-256 in hex

# KEYS: the key. ARGV: the running record, the lease (ms).
# Returns {1} taken; {2} another body; {3, pttl} running; {4, record} done.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local v = redis.call('GET', KEYS[1])
if not v then
  -- unreachable (SET NX failed, so the key exists); taken all the same
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
if string.sub(v, 1, %(fp)d) ~= string.sub(ARGV[1], 1, %(fp)d) then return {2} end
if string.sub(v, %(fp)d + 1, %(fp)d + 1) == 'R' then return {3, redis.call('PTTL', KEYS[1])} end
return {4, v}
""" % {"fp": FP}

# KEYS: the key. ARGV: the caller's running record, the done record, the retention (ms).
COMPLETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: the key. ARGV: the caller's running record.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_CLAIM = _Script(CLAIM)
_COMPLETE = _Script(COMPLETE)
_RELEASE = _Script(RELEASE)


class RedisIdempotency:
    """Idempotency keys in Redis, shared by every instance that uses the same URL."""

    def __init__(self, url: str, *, timeout: float = 0.5, prefix: str = "aiwfd:") -> None:
        self.description = redacted(url)
        self.timeout = timeout
        self.prefix = prefix + "idem:"
        self._client = client_for(url, timeout)
        # fingerprint + token of the records this instance holds, by key: what
        # COMPLETE and RELEASE compare with (the caller has only the token).
        self._running: dict[tuple[str, str], bytes] = {}

    def _mapped(self) -> contextlib.AbstractAsyncContextManager[None]:
        return mapped(self.description, self.timeout)

    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        if len(fingerprint) != FP:
            raise ValueError("the fingerprint is a SHA-256 in hex")
        token = new_token()
        record = f"{fingerprint}R{token}".encode()
        async with self._mapped():
            args: list[Any] = [record, max(1, round(lease * 1000))]
            reply = await _CLAIM(self._client, [self.prefix + key], args)
        try:
            assert isinstance(reply, list) and reply
            code = int(reply[0])
            if code == 1:
                self._running[(key, token)] = record
                return Claim("acquired", token=token)
            if code == 2:
                return Claim("mismatch")
            if code == 3:
                return Claim("running", retry_after=max(0, int(reply[1])) / 1000)
            assert code == 4
            value = bytes(reply[1])
            meta, _, body = value[FP + 1:].partition(b"\n")
            return Claim("done", answer=Answer.from_meta(meta, body))
        except (AssertionError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise StoreError(f"redis ({self.description}): unexpected reply {reply!r:.200}") from exc

    async def complete(self, key: str, token: str, answer: Answer, ttl: float) -> bool:
        record = self._running.pop((key, token), None)
        if record is None:
            return False
        done = record[:FP] + b"D" + answer.meta().encode() + b"\n" + answer.body
        async with self._mapped():
            args: list[Any] = [record, done, max(1, round(ttl * 1000))]
            reply = await _COMPLETE(self._client, [self.prefix + key], args)
        return reply == 1

    async def release(self, key: str, token: str) -> None:
        record = self._running.pop((key, token), None)
        if record is None:
            return
        async with self._mapped():
            args: list[Any] = [record]
            await _RELEASE(self._client, [self.prefix + key], args)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()
