"""`scripts/bench.py --compat [--quick]`: MCP and the OpenAI-compatible API against the plain call (issue 17).

Everything on 127.0.0.1: the fake model of the main table (aiwfd.testing.fakeopenai
as a process, 0 ms) and one `aiwfd serve` (aiohttp transport) on
scripts/bench/bench.yaml with API_KEY set (X-API-Key on every request), pinned
to CPU 0. The same greeter call through three routes of that one instance:

  agent   `POST /agent/greeter`, body {"name":"Alice","language":"fr"}: the baseline
  mcp     `POST /mcp`, one JSON-RPC `tools/call` of the tool greeter with the same
          arguments, `Accept: application/json, text/event-stream`,
          `MCP-Protocol-Version: 2025-06-18` (stateless: no initialize needed)
  chat    `POST /v1/chat/completions`, non-streaming, {"model":"greeter",
          "messages":[{"role":"user","content":"<the same JSON as a string>"}]}

Each route is checked once before the load (an MCP result with
`structuredContent` and no `isError`, a `chat.completion` whose content is the
greeter's JSON) and its answers are counted in /metrics after it
(`aiwfd_agent_calls_total{agent="greeter"}` by outcome: a tool error is an HTTP
200 that wrk would not see). The load: wrk (scripts/bench/post.lua) or
scripts/bench_load.py at c16, rounds interleaved (agent, mcp, chat; the next
round rotated), medians.

Targets (issue 17): req/s of mcp and of chat each ≥ 0.85 × agent at c16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import bench  # the running scripts/bench.py (it registers itself under this name)

BEGIN = "<!-- compat:begin (written by scripts/bench.py --compat) -->"
END = "<!-- compat:end -->"

C = 16
RATIO = 0.85
ARGS = json.loads(bench.GREETER_BODY)
MCP_BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "greeter", "arguments": ARGS}}, separators=(",", ":"))
CHAT_BODY = json.dumps({"model": "greeter", "messages": [{"role": "user", "content": bench.GREETER_BODY}]},
                       separators=(",", ":"))
MCP_HEADERS = ("Accept: application/json, text/event-stream", "MCP-Protocol-Version: 2025-06-18")


@dataclass
class Route:
    name: str
    path: str
    body: str
    headers: tuple[str, ...]
    what: str
    runs: list[bench.LoadResult] = field(default_factory=list)
    calls: dict[str, float] = field(default_factory=dict)  # outcome -> agent calls counted during its cells


ROUTES = (
    Route("agent", "/agent/greeter", bench.GREETER_BODY, (), "`POST /agent/greeter`"),
    Route("mcp", "/mcp", MCP_BODY, MCP_HEADERS, "`POST /mcp` `tools/call` greeter"),
    Route("chat", "/v1/chat/completions", CHAT_BODY, (), "`POST /v1/chat/completions`, model greeter"),
)


@dataclass
class CompatPlan:
    quick: bool
    runs: int
    duration: float
    warmup: float


def plan_for(args: argparse.Namespace) -> CompatPlan:
    p = CompatPlan(True, 1, 2, 0) if args.quick else CompatPlan(False, 5, 5, 2)
    if args.runs:
        p.runs = args.runs
    if args.duration:
        p.duration = args.duration
    return p


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None or v != v else fmt.format(v)


def greeter_calls(port: int) -> dict[str, float]:
    """aiwfd_agent_calls_total{agent="greeter"} by outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("aiwfd_agent_calls_total{") and 'agent="greeter"' in line:
            series, _, value = line.rpartition(" ")
            outcome = series.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def headers_of(route: Route) -> dict[str, str]:
    h = {"X-API-Key": bench.API_KEY}
    for line in route.headers:
        k, _, v = line.partition(": ")
        h[k] = v
    return h


def check(port: int, route: Route) -> str:
    """One call through the route; what it answered (raises unless it is the greeter's answer)."""
    status, raw = bench.http_post(port, route.path, route.body, headers_of(route))
    if status != 200:
        raise RuntimeError(f"{route.name}: {route.path} answered {status}: {raw[:400]!r}")
    doc = json.loads(raw)
    if route.name == "agent":
        data = doc["data"]
    elif route.name == "mcp":
        res = doc.get("result") or {}
        if res.get("isError") or "structuredContent" not in res:
            raise RuntimeError(f"mcp: tools/call did not succeed: {raw[:400]!r}")
        data = res["structuredContent"]
    else:
        content = doc["choices"][0]["message"]["content"]
        data = json.loads(content)
    if not isinstance(data, dict) or "message" not in data:
        raise RuntimeError(f"{route.name}: not the greeter's output: {raw[:400]!r}")
    return json.dumps(data)


class CompatBench:
    def __init__(self, procs: bench.Procs, loader: bench.Loader, plan: CompatPlan, log: Callable[[str], None]) -> None:
        self.procs = procs
        self.loader = loader
        self.plan = plan
        self.log = log
        self.routes = [Route(r.name, r.path, r.body, r.headers, r.what) for r in ROUTES]
        self.proc: bench.Proc | None = None
        self.answers: dict[str, str] = {}
        self.notes: list[str] = []

    def start(self, upstream: str) -> None:
        srv = bench.Server("aiwfd[aiohttp]", "aiwfd", "aiohttp")
        self.proc = bench.start_server(self.procs, srv, upstream)

    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port or 0

    def warm(self) -> None:
        for r in self.routes:
            for _ in range(5 if self.plan.quick else 20):
                self.answers[r.name] = check(self.port(), r)
            if self.plan.warmup > 0:
                self.loader.run(f"http://127.0.0.1:{self.port()}{r.path}", r.body, C, self.plan.warmup,
                                headers=[bench.AUTH_HEADER, *r.headers], target=self.proc)

    def measure(self) -> None:
        n = len(self.routes)
        for run in range(self.plan.runs):
            order = self.routes[run % n:] + self.routes[:run % n]
            for r in order:
                before = greeter_calls(self.port())
                res = self.loader.run(f"http://127.0.0.1:{self.port()}{r.path}", r.body, C, self.plan.duration,
                                      headers=[bench.AUTH_HEADER, *r.headers], target=self.proc)
                after = greeter_calls(self.port())
                for k, v in after.items():
                    r.calls[k] = r.calls.get(k, 0.0) + v - before.get(k, 0.0)
                r.runs.append(res)
                self.log(f"  run {run + 1}/{self.plan.runs} c{C} {r.name:<5} {res.rps:8.0f} req/s  "
                         f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms  err {res.errors}  "
                         f"cpu {res.cpu_ms_per_req:.3f} ms/req ({res.busy:.0%} busy)")


def report(cb: CompatBench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    p = cb.plan
    base = cb.routes[0]

    def med(r: Route, key: str) -> float:
        return median([getattr(x, key) for x in r.runs])

    head = "| c16, greeter at 0 ms | " + " | ".join(r.name for r in cb.routes) + " |"
    lines = [head, "|---|" + "---:|" * len(cb.routes)]
    rows: list[tuple[str, Callable[[Route], str]]] = [
        ("req/s", lambda r: _f(med(r, "rps"), "{:.0f}")),
        ("÷ agent (req/s)", lambda r: _f(med(r, "rps") / med(base, "rps"), "{:.2f}×")),
        ("p50 / p99 ms", lambda r: f"{_f(med(r, 'p50_ms'), '{:.2f}')} / {_f(med(r, 'p99_ms'), '{:.2f}')}"),
        ("server CPU ms/req", lambda r: _f(med(r, "cpu_ms_per_req"), "{:.3f}")),
        ("… extra µs per call vs agent", lambda r: _f((med(r, "cpu_ms_per_req") - med(base, "cpu_ms_per_req"))
                                                        * 1000, "{:+.0f}")),
        ("agent's CPU ms/req ÷ the route's (the req/s ratio on a CPU of its own)",
         lambda r: _f(med(base, "cpu_ms_per_req") / med(r, "cpu_ms_per_req"), "{:.2f}×")),
        ("server busy (CPU s ÷ wall s)", lambda r: _f(med(r, "busy"), "{:.0%}")),
        ("HTTP errors (all runs)", lambda r: str(sum(x.errors for x in r.runs))),
        ("requests (all runs) / greeter calls ok in /metrics", lambda r: f"{sum(x.requests for x in r.runs)} / "
                                                                         f"{r.calls.get('ok', 0):.0f}"),
        ("greeter calls not ok in /metrics", lambda r: f"{sum(v for k, v in r.calls.items() if k != 'ok'):.0f}"),
    ]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in cb.routes) + " |")
    per_run = ["| round | " + " | ".join(f"{r.name} req/s" for r in cb.routes) + " |",
               "|---:|" + "---:|" * len(cb.routes)]
    for i in range(p.runs):
        per_run.append(f"| {i + 1} | " + " | ".join(f"{r.runs[i].rps:.0f}" for r in cb.routes) + " |")
    targets = ["| target | value | verdict |", "|---|---:|---|"]
    verdicts = []
    for r in cb.routes[1:]:
        ratio = med(r, "rps") / med(base, "rps")
        bad = sum(x.errors for x in r.runs) + sum(v for k, v in r.calls.items() if k != "ok")
        ok = ratio >= RATIO and bad == 0
        verdicts.append(ok)
        targets.append(f"| {r.name} req/s ≥ {RATIO}× agent at c{C}, every call ok | {ratio:.2f}× | "
                       f"{'PASS' if ok else 'FAIL'} |")
    out = [
        f"## MCP and OpenAI-compatible API: latest run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run: {p.runs} round(s) of {p.duration:g} s per "
        f"route at c{C}, warm-up {p.warmup:g} s each, rounds rotated, medians; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine: numbers are noisy)",
        "",
        "One `aiwfd serve` (aiohttp transport, API_KEY, X-API-Key on every request), the greeter at 0 ms model "
        "latency, three routes: " + "; ".join(f"**{r.name}**: {r.what}" for r in cb.routes) + ".",
        "",
        *lines,
        "",
        *per_run,
        "",
        *targets,
        "",
        "Notes:",
        f"- mcp body: `{MCP_BODY}` with `{MCP_HEADERS[0]}` and `{MCP_HEADERS[1]}`; chat body: `{CHAT_BODY}`.",
        "- every route answered the greeter's output before the load (the MCP `structuredContent`, the chat "
        "`message.content` parsed as JSON); a tool error is an HTTP 200, so success is also read from "
        "`aiwfd_agent_calls_total{agent=\"greeter\"}` by outcome, before and after each cell.",
        "- the machine is shared: when the server is far from 100% busy, req/s follows what else runs on "
        "CPU 0 more than the route; the CPU ms/req row (user+sys of the server ÷ calls answered) is the steadier "
        "comparison, and its ratio row is what req/s would be if the server had its CPU to itself.",
        "- the ratio divides medians of the same run on the same instance; rounds rotate the order "
        "(agent, mcp, chat; mcp, chat, agent; …).",
        *[f"- {n}" for n in cb.notes],
        "",
        f"Targets: {sum(verdicts)}/{len(verdicts)} PASS",
    ]
    return "\n".join(out) + "\n"


def run(procs: bench.Procs, args: argparse.Namespace, log: Callable[[str], None], command: str,
        machine: list[str], loadavg_before: str, began: float) -> str:
    """The whole --compat mode; returns the report (bench.py prints and writes it)."""
    loader = bench.Loader(procs, args.loader)
    cb = CompatBench(procs, loader, plan_for(args), log)
    _, upstream = bench.start_fake(procs, 0)
    cb.start(upstream)
    cb.warm()
    log(f"  server ready and warmed up: pid {cb.proc.pid if cb.proc else '?'}; answers: "
        + "; ".join(f"{k} {v}" for k, v in cb.answers.items()))
    log(f"[1/1] c{C}, {cb.plan.runs} round(s) of {cb.plan.duration:g} s per route, rotated")
    cb.measure()
    if cb.proc is not None:
        procs.stop(cb.proc)
    return report(cb, machine, command, time.monotonic() - began, (loadavg_before, bench._loadavg()))
