"""Standard Webhooks 1.0 for finished jobs (SPEC §9.3): signing, the target
check, one delivery attempt, and the retry schedule.

Self-contained on purpose: no job store, no routes. The caller (the delivery
task on the job store) keeps the attempt count and the time of the first
attempt, calls `deliver` once per attempt and acts on its `Outcome`:

    outcome = await deliver(session, url, event, msg_id, secrets, attempt=n, allow_private=False)
    delivered / gone / failed  -> done (record it)
    retry                      -> wait outcome.delay, unless should_give_up(first, now + outcome.delay)

Signing is a few lines of our own, not the `standardwebhooks` package: it
builds a wrong signature for a non-UTC datetime and raises a bare ValueError
on malformed headers (issue 16); the tests verify what we send with it.

Nothing here logs: the caller logs an outcome's `reason`, which never holds a
secret, the body, or the URL's path, query or credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import ipaddress
import math
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from aiwfd.errors import AiwfdError

__all__ = [
    "BACKOFF_BASE",
    "GuardedResolver",
    "BACKOFF_CAP",
    "DEFAULT_TIMEOUT",
    "RETRY_FOR",
    "SECRET_PREFIX",
    "Outcome",
    "TargetRefused",
    "TargetUnresolvable",
    "WebhookError",
    "backoff",
    "check_target",
    "deliver",
    "open_session",
    "parse_secrets",
    "retry_after",
    "should_give_up",
    "sign",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TIMEOUT = 10.0       # seconds, one attempt, connect to last byte (SPEC §9.3)
BACKOFF_BASE = 1.0           # the first retry waits about this long
BACKOFF_CAP = 3600.0         # retries are at most 1 h apart
RETRY_FOR = 24 * 3600.0      # jobs.webhook.retry_for's default
# 2**12 s already exceeds the cap: clamping the exponent keeps a huge attempt
# count from overflowing a float, and at 2**12 the jitter's low end (3072 s)
# is still under the cap, so late retries stay spread too.
_MAX_EXPONENT = 12


class WebhookError(AiwfdError):
    """A webhook could not be attempted. Messages are safe to log and to show
    in a job document: the host at most, never a secret, path or query."""


class TargetRefused(WebhookError):
    """The URL is not one we may call (scheme, or an address the SSRF rule
    refuses): permanent, retrying cannot help."""


class TargetUnresolvable(WebhookError):
    """The host did not resolve: DNS may come back, so a delivery retries."""


# --------------------------------------------------------------------------
# Secrets and signatures


def _key(secret: str, index: int = 0) -> bytes:
    """The HMAC key of one "whsec_<base64>" secret. The error names the
    secret's position, never its text: these messages reach logs and stderr."""
    where = f"webhook secret {index + 1}"
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f'{where} does not start with "{SECRET_PREFIX}" (Standard Webhooks: "whsec_" + base64)')
    text = secret[len(SECRET_PREFIX):]
    # Unpadded base64 is common in the wild (and accepted by the reference
    # verifier): pad it rather than refuse a secret every receiver takes.
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f'{where} is not valid base64 after "{SECRET_PREFIX}"') from None
    if not key:
        raise ValueError(f'{where} is empty after "{SECRET_PREFIX}"')
    return key


def parse_secrets(text: str) -> tuple[str, ...]:
    """`AIWF_WEBHOOK_SECRET`: one secret, or two comma-separated while rotating.

    Each must be "whsec_" + base64; a ValueError otherwise, whose message
    says which one is wrong and how, without quoting any of them."""
    secrets = tuple(part.strip() for part in text.split(","))
    if not text.strip():
        raise ValueError('no webhook secret: expected "whsec_" + base64, two comma-separated while rotating')
    for i, secret in enumerate(secrets):
        if not secret:
            raise ValueError(f"webhook secret {i + 1} is empty (a stray comma?)")
        _key(secret, i)
    return secrets


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: "v1,<base64 HMAC-SHA256 of id.timestamp.body>"
    per secret, space-separated, so a receiver holding either secret of a
    rotation verifies the same delivery."""
    if not secrets:
        raise ValueError("no webhook secret to sign with")
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    sigs = []
    for i, secret in enumerate(secrets):
        digest = hmac.new(_key(secret, i), signed, hashlib.sha256).digest()
        sigs.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(sigs)


# --------------------------------------------------------------------------
# The target (SSRF)


def _refused_kind(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be called, or None for a public one."""
    # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address it maps to
    # (Python before 3.13 does not do that for every property).
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind in ("loopback", "link-local", "unspecified", "multicast", "reserved", "private"):
        if getattr(addr, "is_" + kind.replace("-", "_")):
            return kind
    # What is left and still not global (100.64.0.0/10, carrier-grade NAT, and
    # the like) is no more a public webhook receiver than a private address.
    if not addr.is_global:
        return "non-public"
    return None


def _parse_target(url: str) -> URL:
    try:
        u = URL(url)
    except (ValueError, TypeError):
        raise TargetRefused("webhook target refused: not a valid URL") from None
    if u.scheme not in ("http", "https"):
        # The scheme alone: an unknown scheme's "URL" may be anything.
        raise TargetRefused(f"webhook target refused: scheme {u.scheme!r} is not http or https"[:200])
    if not u.host:
        raise TargetRefused("webhook target refused: the URL has no host")
    return u


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse what a webhook may not call (SPEC §9.3): a scheme other than
    http(s), and unless `allow_private`, a host any of whose addresses is
    loopback, link-local, private, unspecified, multicast or reserved.

    Every address counts: a name resolving to one public and one private
    address is refused, since the connection may take either. The name is
    resolved with the loop's getaddrinfo (a thread), never blocking the loop.
    Raises TargetRefused (permanent) or TargetUnresolvable (DNS failed)."""
    u = _parse_target(url)
    if allow_private:
        return
    host = u.raw_host or ""
    host = host.strip("[]")
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        literal = None
    if literal is not None:
        addrs = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, u.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError):
            raise TargetUnresolvable(f"webhook target {host!r} does not resolve") from None
        addrs = []
        for info in infos:
            # IPv6 link-local answers carry a zone: "fe80::1%eth0".
            text = str(info[4][0]).split("%")[0]
            try:
                addrs.append(ipaddress.ip_address(text))
            except ValueError:
                raise TargetRefused(f"webhook target refused: {host!r} resolves to an unusable address") from None
        if not addrs:
            raise TargetUnresolvable(f"webhook target {host!r} does not resolve")
    for addr in addrs:
        kind = _refused_kind(addr)
        if kind is not None:
            via = "" if literal is not None else f"{host!r} resolves to "
            raise TargetRefused(
                f"webhook target refused: {via}a {kind} address ({addr}); "
                "jobs.webhook.allow_private: true allows it"
            )


class GuardedResolver(AbstractResolver):
    """The resolver of the webhook session: refuses, at connect time, the
    addresses check_target refuses.

    check_target resolves before the request and aiohttp resolves again to
    connect; a name whose answer changes in between (DNS rebinding, a TTL of
    0) would pass the first look and connect to 127.0.0.1. Judging the very
    addresses aiohttp connects to closes that gap. (IP literals never reach a
    resolver: check_target has judged them, and they cannot change.)"""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            try:
                addr = ipaddress.ip_address(str(r["host"]).split("%")[0])
            except ValueError:
                raise TargetRefused(f"webhook target refused: {host!r} resolves to an unusable address") from None
            kind = _refused_kind(addr)
            if kind is not None:
                # Not an OSError: aiohttp lets it through as it is, rather
                # than as a DNS failure (which would be retried).
                raise TargetRefused(
                    f"webhook target refused: {host!r} resolves to a {kind} address ({addr}) when connecting; "
                    "jobs.webhook.allow_private: true allows it"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


def open_session(allow_private: bool, *, resolver: AbstractResolver | None = None,
                 limit: int = 100) -> aiohttp.ClientSession:
    """A client session for webhook deliveries only (the providers' session
    may have to reach loopback: a local model). Unless `allow_private`, its
    resolver is a GuardedResolver. No proxy from the environment
    (trust_env=False): the connection must go where the check looked. Call
    within a running loop; the caller closes it."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        resolver=resolver if allow_private else GuardedResolver(resolver),
    )
    return aiohttp.ClientSession(connector=connector, trust_env=False)


# --------------------------------------------------------------------------
# The schedule


def backoff(attempt: int, jitter: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, …): about 1 s,
    2 s, 4 s …, each spread ±25 % by `jitter` in [0, 1) so that receivers
    coming back from an outage are not hit by every sender at once; at most
    BACKOFF_CAP."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter is in [0, 1], got {jitter}")
    base = BACKOFF_BASE * 2.0 ** min(attempt - 1, _MAX_EXPONENT)
    return min(BACKOFF_CAP, base * (0.75 + 0.5 * jitter))


def should_give_up(first_attempt_at: float, now: float, retry_for: float = RETRY_FOR) -> bool:
    """True once `retry_for` seconds have passed since the first attempt.
    Pass as `now` the time the next attempt would start (now + the outcome's
    delay), so a delivery is not scheduled past its window."""
    return now - first_attempt_at >= retry_for


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` asks for: delay-seconds or an HTTP-date
    (RFC 9110 §10.2.3), clamped to [0, BACKOFF_CAP]; None when absent or
    unreadable (the backoff applies then). `now` is Unix time, for the date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110: an HTTP-date is GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    # A receiver asking for more than the cap gets the cap: its clock or its
    # config may be wrong, and the window of retry_for is short.
    return min(BACKOFF_CAP, max(0.0, seconds))


# --------------------------------------------------------------------------
# One attempt


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to.

    kind: "delivered" (2xx), "gone" (410: the receiver wants no more, stop),
    "retry" (a network error, a timeout, any other status; wait `delay`
    seconds), "failed" (the target is refused: permanent).
    status: the HTTP status answered, None when there was no answer.
    reason: one safe line for the log and the job document."""

    kind: Literal["delivered", "gone", "retry", "failed"]
    status: int | None
    delay: float | None
    reason: str

    @property
    def done(self) -> bool:
        """No further attempt: delivered, gone or failed."""
        return self.kind != "retry"


def _retry(status: int | None, reason: str, delay: float) -> Outcome:
    return Outcome("retry", status, delay, reason)


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    event: Mapping[str, Any],
    msg_id: str,
    secrets: Sequence[str],
    *,
    attempt: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private: bool,
    clock: Callable[[], float] = time.time,
    jitter: Callable[[], float] = random.random,
) -> Outcome:
    """One attempt to POST `event` ({"type", "timestamp", "data"}, sent as
    given) to `url`, signed with `secrets`, as webhook `msg_id` (the same on
    every attempt, so the receiver can drop duplicates: delivery is at least
    once).

    `attempt` (1, 2, …) sets the backoff of a retry outcome; `clock` (Unix
    seconds) stamps `webhook-timestamp` and reads HTTP-date `Retry-After`s;
    `jitter` spreads the backoff. Redirects are not followed: a 3xx is a
    failure, retried like any non-2xx (the Location may point anywhere,
    including where check_target would refuse).

    With a session from `open_session`, the addresses connected to are
    judged too (DNS rebinding); with another session, check_target's look
    before the request is the only one."""
    try:
        await check_target(url, allow_private)
    except TargetRefused as e:
        return Outcome("failed", None, None, str(e))
    except TargetUnresolvable as e:
        return _retry(None, str(e), backoff(attempt, jitter()))

    body = orjson.dumps(event)
    ts = int(clock())  # Unix seconds are UTC by definition
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secrets, msg_id, ts, body),
        "content-type": "application/json",
    }
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            status = resp.status
            wait = retry_after(resp.headers.get("Retry-After"), clock())
            # Read (a bounded amount of) the answer so the connection can be
            # reused; what it says does not matter.
            await resp.content.read(64 * 1024)
    except TargetRefused as e:  # GuardedResolver, at connect time
        return Outcome("failed", None, None, str(e))
    except asyncio.TimeoutError:
        return _retry(None, f"timed out after {timeout:g} s", backoff(attempt, jitter()))
    except (aiohttp.ClientError, OSError) as e:
        # The type only: aiohttp's messages may quote the URL in full.
        return _retry(None, f"network error ({type(e).__name__})", backoff(attempt, jitter()))

    if 200 <= status < 300:
        return Outcome("delivered", status, None, f"delivered ({status})")
    if status == 410:
        return Outcome("gone", status, None, "the receiver answered 410 Gone: no more attempts")
    what = f"redirect not followed ({status})" if 300 <= status < 400 else f"answered {status}"
    if wait is not None:
        return _retry(status, f"{what}; Retry-After {wait:g} s", wait)
    return _retry(status, what, backoff(attempt, jitter()))
