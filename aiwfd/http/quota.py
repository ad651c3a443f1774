"""Limits on agent calls (SPEC §8.2): which apply, admitting a call, its headers.

    async with admitted(request, rt, snap, agent, cost=1, slots=1):
        ... the model call ...

Every call counts against its client's limits (its own, else
`limits.default`) and its agent's, all in one `Store.admit` (one round trip).
Refused: 429 `rate_limited` naming the limit, with `Retry-After`. Leaving the
block gives the store the call's tokens and frees its concurrency slots,
whatever happened inside, cancellation included.

When the store does not answer, `limits.on_store_error` decides (allow: the
call goes on uncounted; deny: 503), the decision is counted in
`aiwfd_store_errors_total` and logged at most once a minute.

The `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-
headers-10) of the requests limits are put on the request, and the
on_prepare hook writes them on the answer, streamed or not, refused or not.
"""

from __future__ import annotations

import logging
import math

from aiohttp import web

from aiwfd.auth.clients import Client
from aiwfd.errors import RateLimited, Unavailable
from aiwfd.http.keys import RATE_HEADERS, STATS
from aiwfd.http.runtime import Runtime, Snapshot
from aiwfd.spec.access import LimitSet
from aiwfd.spec.compiler import CompiledAgent
from aiwfd.store.base import Admission, Limit, Scope, StoreError

logger = logging.getLogger("aiwfd")

# How long a crashed instance's concurrency slots outlive it (Redis): past any call's deadline.
LEASE_MARGIN = 30.0
_ceil = math.ceil


class Plan:
    """The limits of calls by one client to one agent, with what their answers
    need that does not change from call to call (built once per snapshot)."""

    __slots__ = ("limits", "policy", "state", "narrowest", "own_timeout", "lease_extra", "deny")

    def __init__(self, limits: tuple[Limit, ...], agent: CompiledAgent, deny: bool) -> None:
        self.limits = limits
        # A call may outlive the deadline by the agent's own timeout (engine.call_agent;
        # a batch's last input), and its slots must not expire while it runs.
        self.own_timeout = agent.assistant.timeout or agent.provider.timeout or 0.0
        self.lease_extra = self.own_timeout + LEASE_MARGIN  # a lease lives the deadline + this
        # limits.on_store_error of the snapshot the plan belongs to (the request's config, not the newest).
        self.deny = deny
        requests = [lim for lim in limits if lim.kind == "requests"]
        self.policy = ", ".join(f'"{lim.scope}";q={lim.quota};w={_whole(lim.window)}' for lim in requests)
        # Per requests limit, in the order of the admission's standings: the
        # constant parts of its `RateLimit` item (rate_headers formats the rest).
        self.state = tuple((f'"{lim.scope}";r=', _whole(lim.window)) for lim in requests)
        self.narrowest = min((lim.quota for lim in limits if lim.kind == "concurrency"), default=1 << 30)


def plan_for(snap: Snapshot, client: Client, agent: CompiledAgent) -> Plan:
    """The plan of a call by `client` to `agent` (computed once per snapshot, client and agent)."""
    # id(): the LimitSet objects live as long as the snapshot (config or auth.jwt's),
    # and hashing the frozen dataclass on every call cost a few µs.
    key = (client.name, id(client.limits), agent.name)
    cached = snap.limit_cache.get(key)
    if cached is not None:
        return cached
    own = client.limits if client.limits is not None else snap.compiled.config.limits.default
    plan = Plan(_limits(own, "client", client.identity) + _limits(agent.assistant.limits, "agent", agent.name),
                agent, snap.compiled.config.limits.on_store_error == "deny")
    if len(snap.limit_cache) < 10_000:  # JWT clients are unbounded in number: so is not the cache
        snap.limit_cache[key] = plan
    return plan


def narrowest(snap: Snapshot, client: Client, agent: CompiledAgent) -> int:
    """The smallest concurrency limit of such a call (a large number when none)."""
    return plan_for(snap, client, agent).narrowest


def _limits(limits: LimitSet | None, scope: Scope, name: str) -> tuple[Limit, ...]:
    if limits is None:
        return ()
    out = []
    if limits.requests is not None:
        out.append(Limit("requests", scope, name, limits.requests.quota, limits.requests.window))
    if limits.tokens is not None:
        out.append(Limit("tokens", scope, name, limits.tokens.quota, limits.tokens.window))
    if limits.concurrency is not None:
        out.append(Limit("concurrency", scope, name, limits.concurrency, 0.0))
    return tuple(out)


class admitted:  # noqa: N801 - used as `async with quota.admitted(...)`, like a function
    """`async with admitted(request, rt, snap, client, agent, cost, slots):` the call,
    counted; 429 or 503 raised on entry. A class rather than @asynccontextmanager:
    it runs on every agent call, and the generator machinery cost ~10 µs."""

    __slots__ = ("request", "rt", "plan", "cost", "slots", "admission")

    def __init__(self, request: web.Request, rt: Runtime, snap: Snapshot, client: Client, agent: CompiledAgent,
                 cost: int = 1, slots: int = 1) -> None:
        self.request, self.rt, self.cost, self.slots = request, rt, cost, slots
        self.plan = plan_for(snap, client, agent)  # its `deny`: the request's config, not the newest
        self.admission: Admission | None = None

    async def __aenter__(self) -> None:
        rt, plan = self.rt, self.plan
        limits, store = plan.limits, rt.store
        if not limits or store is None or self.cost <= 0:
            return
        try:
            admission = await store.admit(limits, self.cost, self.slots, rt.settings.deadline + plan.lease_extra)
        except StoreError as e:
            deny = plan.deny
            store_failed(rt, "deny" if deny else "allow", e)
            if deny:
                raise Unavailable("the limits store does not answer; try again shortly",
                                  headers={"Retry-After": "1"}) from None
            return
        headers = self.request[RATE_HEADERS] = rate_headers(plan, admission)
        if not admission.allowed:
            raise refusal(admission, headers)
        self.admission = admission

    async def __aexit__(self, *exc: object) -> None:
        admission = self.admission
        if admission is None:
            return
        self.admission = None
        stats = self.request.get(STATS)
        tokens = stats.total_tokens if stats is not None else 0
        rt = self.rt
        assert rt.store is not None
        # No shield needed: a store's finish only records (Store.finish), it never
        # suspends, so a cancelled call cannot be interrupted before its slots are given back.
        try:
            await rt.store.finish(admission.lease, self.plan.limits, tokens, self.slots)
        except StoreError as e:
            store_failed(rt, "finish", e)


def store_failed(rt: Runtime, decision: str, error: StoreError) -> None:
    rt.metrics.store_errors.inc((decision,))
    if rt.store_log.ready():
        what = {"allow": "calls pass uncounted (on_store_error: allow)",
                "deny": "calls are refused with 503 (on_store_error: deny)",
                "finish": "a call's tokens and slots could not be recorded"}[decision]
        logger.error("the limits store (%s) does not answer: %s; %s (logged at most once a minute; "
                     "aiwfd_store_errors_total counts every one)", rt.store.description if rt.store else "?",
                     error, what)


def refusal(admission: Admission, headers: dict[str, str]) -> RateLimited:
    limit = admission.refused
    assert limit is not None
    wait = max(1, math.ceil(admission.retry_after))
    window = f" per {limit.window:g} s" if limit.kind != "concurrency" else " at once"
    what = {"requests": "requests", "tokens": "tokens", "concurrency": "calls"}[limit.kind]
    return RateLimited(
        f"rate limited: the {limit.scope} {limit.name!r} may make {limit.quota} {what}{window}; "
        f"retry after {wait} s",
        details=[{"limit": limit.kind, "scope": limit.scope, "quota": limit.quota,
                  "window": _seconds(limit.window) if limit.kind != "concurrency" else None}],
        headers={**headers, "Retry-After": str(wait)},
    )


def rate_headers(plan: Plan, admission: Admission) -> dict[str, str]:
    """`RateLimit-Policy` and `RateLimit` for the requests limits (Structured Fields lists)."""
    standings = admission.standings
    if not standings:
        return {}
    # The store counts the partly expired oldest bucket whole: its reset can pass the window by one bucket.
    # With the plan's constant parts, formatted once per snapshot: this runs on every agent call.
    # Unrolled max/min and unpacked tuples: half the cost of the plain expression
    # `max(0, remaining)`, `min(whole, max(0, ceil(reset)))`, which this computes.
    if len(standings) == len(plan.state):
        parts = []
        for (prefix, whole), (_, remaining, reset) in zip(plan.state, standings, strict=True):
            t = _ceil(reset)
            parts.append(f"{prefix}{remaining if remaining > 0 else 0};t={whole if t > whole else (t if t > 0 else 0)}")
        state = ", ".join(parts)
    else:  # not the plan's limits (never, from admitted)
        state = ", ".join(f'"{s.limit.scope}";r={max(0, s.remaining)};'
                          f't={min(_whole(s.limit.window), max(0, math.ceil(s.reset)))}'
                          for s in standings)
    return {"RateLimit-Policy": plan.policy, "RateLimit": state}


def _seconds(window: float) -> int | float:
    return int(window) if float(window).is_integer() else window


def _whole(seconds: float) -> int:
    return max(1, round(seconds))
