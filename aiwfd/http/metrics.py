"""Prometheus metrics (SPEC §7.2): one registry per Runtime, recorded by the
`core` middleware, exposed at `GET /metrics` in the text format by
prometheus-client.

Label values are bounded whatever a client sends:

- `route` is the route template (`/agent/{name}`), never the raw path; a
  request that matches no route (404, 405, a CORS preflight) is `unmatched`;
- `method` is one of the usual methods, anything else is `other`;
- `agent` is only ever the name of a configured agent (a request for an
  unknown agent has no agent to record), `outcome` is `ok` or an error type.

Cost: every request goes through `Metrics.record`. prometheus-client's own
Counter and Histogram take a lock per update (about 1 µs for a counter, 2 µs
for a histogram); here every update happens on the event loop's thread, so
the per-request metrics are plain numbers in dicts (`LoopCounter`,
`LoopHistogram`) that a collector turns into metric families when
`/metrics` is scraped: about 1.5 µs per request, 2.5 µs for an agent call
with its agent metrics. `aiwfd_inflight_requests` costs nothing per request:
it is read from the runtime's set of running requests at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from aiwfd.http.keys import AGENT, CLIENT, RUNTIME, STATS, route_template

if TYPE_CHECKING:
    from aiwfd.engine import CallStats
    from aiwfd.spec.compiler import CompiledAgent

UNMATCHED = "unmatched"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class LoopCounter:
    """A labelled counter updated only from the event loop's thread (no lock)."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[object, ...], float] = {}

    def inc(self, key: tuple[object, ...], amount: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            fam.add_metric([str(k) for k in key], value)
        return fam


class LoopHistogram:
    """A labelled histogram updated only from the event loop's thread (no lock)."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self.le = tuple(str(float(b)) for b in buckets) + ("+Inf",)
        # key -> [count in bucket 0, …, count above the last bound, sum]
        self.cells: dict[tuple[object, ...], list[float]] = {}

    def observe(self, key: tuple[object, ...], value: float) -> None:
        cells = self.cells.get(key)
        if cells is None:
            cells = self.cells[key] = [0] * (len(self.buckets) + 1) + [0.0]
        cells[bisect_left(self.buckets, value)] += 1  # the first bound >= value: `le` semantics
        cells[-1] += value

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, cells in list(self.cells.items()):
            buckets, total = [], 0.0
            for le, n in zip(self.le, cells[:-1], strict=True):  # cells[-1] is the sum
                total += n
                buckets.append((le, total))
            fam.add_metric([str(k) for k in key], buckets, cells[-1])
        return fam


class _LoopCollector(Collector):
    def __init__(self, metrics: list[LoopCounter | LoopHistogram]) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return [m.family() for m in self.metrics]

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()


class Metrics:
    def __init__(self) -> None:
        self.mock = False
        # The templates of the routes whose request is one agent call (aiwfd.http.app.ROUTES).
        self.agent_routes: frozenset[str] = frozenset()
        self.http_requests = LoopCounter(
            "aiwfd_http_requests", "HTTP requests answered, by route template, method and status",
            ("route", "method", "status"))
        self.http_duration = LoopHistogram(
            "aiwfd_http_request_duration_seconds", "Time to answer an HTTP request, by route template",
            ("route",), HTTP_BUCKETS)
        self.agent_calls = LoopCounter(
            "aiwfd_agent_calls", "Calls of a configured agent, by outcome (ok or the error type) and client "
            "(a configured key's name, jwt or anonymous)", ("agent", "outcome", "client"))
        self.agent_attempts = LoopCounter(
            "aiwfd_agent_attempts", "Model calls made for an agent (re-asks and retries included)", ("agent",))
        self.tokens = LoopCounter(
            "aiwfd_tokens", "Tokens reported by the provider, by kind (prompt or completion)",
            ("agent", "model", "kind"))
        self.upstream_duration = LoopHistogram(
            "aiwfd_upstream_duration_seconds", "Duration of one model call (one attempt)",
            ("agent", "provider"), UPSTREAM_BUCKETS)
        self.store_errors = LoopCounter(
            "aiwfd_store_errors", "Calls the limits store did not answer for, by what was done: allow "
            "(passed uncounted), deny (503), finish (tokens and slots not recorded)", ("decision",))
        self.jobs = LoopCounter(
            "aiwfd_jobs", "Job runs this instance ended, by agent and how: succeeded, failed, canceled, "
            "released (back to the queue at shutdown) or lost (its lease went to another instance)",
            ("agent", "outcome"))
        self.fallbacks = LoopCounter(
            "aiwfd_fallbacks", "Calls a model failed and handed on to the agent's next fallback, by agent and "
            "the model that failed", ("agent", "model"))
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_LoopCollector([self.http_requests, self.http_duration, self.agent_calls,
                                   self.agent_attempts, self.tokens, self.upstream_duration,
                                   self.store_errors, self.jobs, self.fallbacks]))
        self.inflight = Gauge("aiwfd_inflight_requests", "HTTP requests being answered (this scrape included)",
                              registry=r)
        self.config_reloads = Counter(
            "aiwfd_config_reloads", "Config reloads (SIGHUP), by result", ("result",), registry=r)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)

    def configure(self, inflight: Callable[[], float], mock: bool, agent_routes: frozenset[str]) -> None:
        """Read the in-flight count from the runtime; `mock`: every provider label is
        `mock` (--mock); `agent_routes`: the route templates that are one agent call."""
        self.inflight.set_function(inflight)
        self.mock = mock
        self.agent_routes = agent_routes

    # ------------------------------------------------------------ recording

    def record(self, request: web.Request, status: int, seconds: float, error_type: str | None) -> None:
        """One answered request (called by the core middleware)."""
        route = route_template(request) or UNMATCHED
        method = request.method
        if method not in METHODS:
            method = "other"
        self.http_requests.inc((route, method, status))
        self.http_duration.observe((route,), seconds)
        if route in self.agent_routes:
            agent = request.get(AGENT)
            if agent is not None:
                client = request.get(CLIENT)
                self.record_agent(agent, request.get(STATS), status, error_type,
                                  client.label if client is not None else "anonymous")

    def record_rejected(self, status: int) -> None:
        """A request the HTTP protocol answered itself (malformed, or its head too slow)."""
        self.http_requests.inc((UNMATCHED, "other", status))

    def record_agent(self, agent: "CompiledAgent", stats: "CallStats | None", status: int,
                     error_type: str | None, client: str = "anonymous") -> None:
        name = agent.assistant.name
        self.agent_calls.inc((name, error_type or ("ok" if status < 400 else f"http_{status}"), client))
        if stats is None or not stats.attempts:
            return
        self.agent_attempts.inc((name,), stats.attempts)
        model = agent.assistant.model
        if stats.prompt_tokens:
            self.tokens.inc((name, model, "prompt"), stats.prompt_tokens)
        if stats.completion_tokens:
            self.tokens.inc((name, model, "completion"), stats.completion_tokens)
        for model, _, _ in stats.fallbacks:
            self.fallbacks.inc((name, model))
        provider = "mock" if self.mock else agent.provider.name
        for seconds in stats.upstream_seconds:
            self.upstream_duration.observe((name, provider), seconds)

    def reload(self, ok: bool) -> None:
        self.config_reloads.labels("ok" if ok else "error").inc()

    # ------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def handler(request: web.Request) -> web.Response:
    """`GET /metrics`: the text exposition format, no auth."""
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
