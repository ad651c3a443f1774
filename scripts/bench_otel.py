"""`scripts/bench.py --otel [--quick]`: what OpenTelemetry tracing costs per agent call (issue 18, SPEC §11.2).

Everything on 127.0.0.1: the fake model of the main table (aiwfd.testing.fakeopenai
as a process, 0 ms), and two `aiwfd serve` instances (aiohttp transport) on
scripts/bench/bench.yaml with API_KEY set, started side by side:

  off   no OTEL_* variable at all: nothing of the SDK is imported
  on    OTEL_EXPORTER_OTLP_ENDPOINT at a loopback OTLP/HTTP receiver,
        OTEL_TRACES_SAMPLER=always_on, the batches with their defaults
        (no OTEL_BSP_*): every call exports its spans

The receiver is this file run as a process (`python scripts/bench_otel.py
--receiver`): a small aiohttp app (uvloop when installed) that answers
`POST /v1/traces` 200 with an empty ExportTraceServiceResponse, as a collector
does, and counts the spans of each export (decoded with opentelemetry-proto),
so that the report can say how many spans per call arrived. `GET /stats`
gives its counters. It shares CPU 1 with the fake and the load generator.

Both instances are pinned to CPU 0 from the start (taskset), so whatever
the export costs is in the instance's user+sys. The load: wrk (scripts/bench/post.lua) or scripts/bench_load.py at
c16 on `POST /agent/greeter`, interleaved rounds (off, on; then on, off; …),
each round on a fresh process of each variant; the verdict is the median of
the rounds' on ÷ off, the tables show medians per variant. "CPU ms/req" is the instance's user+sys during the cell
divided by the calls answered; "with the export tail" also counts the CPU it
spent until it went idle after the cell (the spans still queued being sent).

Also, in this process: the µs per call of a call's three spans, encoded,
with aiwfd.telemetry and with the OpenTelemetry SDK and its OTLP encoder
(the reference, when the test extra has installed it): why aiwfd has its own.

Target (issue 18): req/s with tracing on ≥ 0.8 × off at c16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BEGIN = "<!-- otel:begin (written by scripts/bench.py --otel) -->"
END = "<!-- otel:end -->"

C = 16
RATIO = 0.8


# ----------------------------------------------------------------------------- the receiver (its own process)

def receiver_main(argv: list[str]) -> None:  # pragma: no cover - runs in the child
    import asyncio

    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    p = argparse.ArgumentParser()
    p.add_argument("--receiver", action="store_true")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    stats = {"exports": 0, "spans": 0, "bytes": 0, "bad": 0}
    empty = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes gzip / deflate
        stats["exports"] += 1
        stats["bytes"] += len(body)
        try:
            msg = ExportTraceServiceRequest.FromString(body)
        except Exception:
            stats["bad"] += 1
            return web.Response(status=400)
        stats["spans"] += sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
        return web.Response(body=empty, content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", traces)
        app.router.add_get("/stats", get_stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"LISTENING {port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__" and "--receiver" in sys.argv[1:]:
    receiver_main(sys.argv[1:])
    sys.exit(0)

import bench  # noqa: E402  the running scripts/bench.py (it registers itself under this name)


# ----------------------------------------------------------------------------- the measurement

@dataclass
class Variant:
    name: str
    what: str
    otel: bool
    proc: bench.Proc | None = None
    runs: list[bench.LoadResult] = field(default_factory=list)
    cpu_tail_ms: list[float] = field(default_factory=list)  # CPU ms/req including the time to idle after the cell
    spans: list[float] = field(default_factory=list)  # spans received per call answered, per cell


@dataclass
class OtelPlan:
    quick: bool
    runs: int
    duration: float
    warmup: float


def plan_for(args: argparse.Namespace) -> OtelPlan:
    p = OtelPlan(True, 1, 2, 0) if args.quick else OtelPlan(False, 5, 5, 2)
    if args.runs:
        p.runs = args.runs
    if args.duration:
        p.duration = args.duration
    return p


def get_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None or v != v else fmt.format(v)


class OtelBench:
    def __init__(self, procs: bench.Procs, loader: bench.Loader, plan: OtelPlan, log: Callable[[str], None]) -> None:
        self.procs = procs
        self.loader = loader
        self.plan = plan
        self.log = log
        self.variants = [Variant("off", "no OTEL_* variable", False),
                         Variant("on", "OTLP/HTTP to the loopback receiver, always_on, batch processor defaults",
                                 True)]
        self.receiver: bench.Proc | None = None
        self.notes: list[str] = []
        self.per_call: dict[str, float] = {}
        self.upstream, self.receiver_port = "", 0
        self.versions: dict[str, str] = {}

    def start_receiver(self) -> int:
        argv = [sys.executable, str(Path(__file__).resolve()), "--receiver", "--port", "0"]
        self.receiver = self.procs.start("otlp-receiver", argv, cpu=bench.LOAD_CPU, env=bench.base_env())
        m, _ = self.receiver.wait_for(r"LISTENING (\d+)", stream="out")
        self.receiver.port = int(m.group(1))
        return self.receiver.port

    def env_for(self, v: Variant, upstream: str, receiver_port: int) -> dict[str, str]:
        env = {k: val for k, val in bench.base_env().items() if not k.startswith("OTEL_")}
        env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=upstream, API_KEY=bench.API_KEY,
                   AIWF_TRANSPORT="aiohttp")
        if v.otel:
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver_port}",
                       OTEL_TRACES_SAMPLER="always_on")
        return env

    def start(self, upstream: str, receiver_port: int) -> None:
        self.upstream, self.receiver_port = upstream, receiver_port
        for v in self.variants:
            self.spawn(v)
        for v in self.variants:
            self.ready(v)

    def spawn(self, v: Variant) -> None:
        port = bench.free_port()
        argv = [sys.executable, "-m", "aiwfd", "serve", "-f", str(bench.CONFIG), "-p", str(port),
                "--host", "127.0.0.1", "--shutdown-timeout", "2"]
        v.proc = self.procs.start(f"aiwfd-otel-{v.name}", argv, cpu=bench.SERVER_CPU,
                                  env=self.env_for(v, self.upstream, self.receiver_port), port=port)

    def ready(self, v: Variant) -> None:
        assert v.proc is not None
        bench.wait_health(v.proc, v.proc.port or 0, interval=0.02)
        if v.otel:  # its start-up line may follow the first /health
            v.proc.wait_for("exporting traces to", timeout=30)
        elif "exporting traces to" in v.proc.output():
            raise RuntimeError(f"{v.proc.name} exports traces: an OTEL_* variable leaked into its environment")

    def restart(self, v: Variant) -> None:
        """A fresh process for the next round: one process keeps its memory
        layout's luck, a few µs per call, all its life (see the limits block)."""
        assert v.proc is not None
        self.procs.stop(v.proc)
        self.spawn(v)
        self.ready(v)
        self.warm(v)

    def by_name(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def warm(self, v: Variant) -> None:
        assert v.proc is not None
        port = v.proc.port or 0
        s0 = self.spans_received()
        for _ in range(5 if self.plan.quick else 20):
            status, text = bench.http_post(port, "/agent/greeter", bench.GREETER_BODY, {"X-API-Key": bench.API_KEY})
            if status != 200:
                raise RuntimeError(f"{v.proc.name}: POST /agent/greeter answered {status}: {text[:300]!r}")
        n = 5 if self.plan.quick else 20
        if self.plan.warmup > 0:
            r = self.loader.run(f"http://127.0.0.1:{port}/agent/greeter", bench.GREETER_BODY, C, self.plan.warmup,
                                headers=[bench.AUTH_HEADER], target=v.proc)
            n += r.requests - r.errors
        if v.otel:  # the warm-up's spans arrive before the first cell counts any
            deadline = time.monotonic() + 8
            while self.spans_received() - s0 < 3 * n and time.monotonic() < deadline:
                time.sleep(0.1)

    def spans_received(self) -> int:
        assert self.receiver is not None
        return int(get_json(self.receiver.port or 0, "/stats")["spans"])

    def measure(self) -> None:
        for run in range(self.plan.runs):
            if run:
                for v in self.variants:
                    self.restart(v)
            order = self.variants if run % 2 == 0 else list(reversed(self.variants))
            for v in order:
                assert v.proc is not None
                s0 = self.spans_received()
                c0 = v.proc.cpu_seconds()
                r = self.loader.run(f"http://127.0.0.1:{v.proc.port}/agent/greeter", bench.GREETER_BODY, C,
                                    self.plan.duration, headers=[bench.AUTH_HEADER], target=v.proc)
                ok = r.requests - r.errors
                if v.otel:
                    # the last spans wait for the batch processor's 5 s schedule: until they arrive
                    deadline = time.monotonic() + 8
                    while self.spans_received() - s0 < 3 * ok and time.monotonic() < deadline:
                        time.sleep(0.1)
                tail = v.proc.cpu_seconds() - c0
                v.runs.append(r)
                v.cpu_tail_ms.append(tail * 1000 / ok if ok > 0 else float("nan"))
                v.spans.append((self.spans_received() - s0) / ok if ok > 0 else float("nan"))
                self.log(f"  run {run + 1}/{self.plan.runs} c{C} {v.name:<4} {r.rps:8.0f} req/s  "
                         f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  err {r.errors}  "
                         f"cpu {r.cpu_ms_per_req:.3f} ms/req ({r.busy:.0%} busy), with tail "
                         f"{v.cpu_tail_ms[-1]:.3f}; spans/call {v.spans[-1]:.2f}")


# ----------------------------------------------------------------------------- in-process: one call's spans

_SERVER = {"http.request.method": "POST", "url.path": "/agent/greeter", "http.route": "/agent/{name}"}
_AGENT = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "greeter"}
_CHAT = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
         "gen_ai.request.max_tokens": 300, "gen_ai.request.temperature": 0.2, "gen_ai.output.type": "json",
         "aiwfd.attempt": 1, "aiwfd.provider": "openai", "server.address": "127.0.0.1", "server.port": 8000}
_DONE = {"gen_ai.response.model": "gpt-4o-mini-2024-07-18", "gen_ai.response.finish_reasons": ["stop"],
         "gen_ai.usage.input_tokens": 52, "gen_ai.usage.output_tokens": 9}


def per_call_us(n: int = 20_000) -> dict[str, float]:
    """µs per call for the three spans of a call (SERVER, invoke_agent, CLIENT
    chat with the attributes aiwfd sets), started, made current, propagated,
    ended and encoded as OTLP protobuf: aiwfd.telemetry, and the OpenTelemetry
    SDK with its exporter's encoder (what aiwfd used before). One core, this process."""
    from aiwfd.telemetry import otlp
    from aiwfd.telemetry import spans as ours

    encoded: list[bytes] = []
    tracer = ours.Tracer(ours.Sampler(1.0, True), lambda sp: encoded.append(otlp.encode(sp)))

    def aiwfd_call(i: int) -> None:
        remote = ours.parse_traceparent(None)
        s = tracer.start_span("POST /agent/{name}", ours.SERVER, dict(_SERVER), remote=remote)
        t1 = ours.attach(s)
        a = tracer.start_span("invoke_agent greeter", ours.INTERNAL, dict(_AGENT))
        t2 = ours.attach(a)
        c = tracer.start_span("chat gpt-4o-mini", ours.CLIENT, dict(_CHAT))
        t3 = ours.attach(c)
        c.traceparent()
        ours.detach(t3)
        c.attributes.update(_DONE)
        c.set_attribute("gen_ai.response.id", f"chatcmpl-{i}")
        c.end()
        ours.detach(t2)
        a.set_attribute("aiwfd.attempts", 1)
        a.end()
        ours.detach(t1)
        s.set_attribute("http.response.status_code", 200)
        s.end()
        if len(encoded) >= 512:
            encoded.clear()

    out = {"aiwfd": _time_it(aiwfd_call, n)}
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.trace import SpanKind
    except ImportError:
        return out
    done: list[Any] = []

    class Keep(SpanExporter):  # type: ignore[misc]
        def export(self, batch: Any) -> Any:
            done.extend(batch)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Keep()))
    sdk = provider.get_tracer("aiwfd")

    def sdk_call(i: int) -> None:
        s = sdk.start_span("POST /agent/{name}", context=propagate.extract({}), kind=SpanKind.SERVER,
                           attributes=_SERVER)
        t1 = context.attach(trace.set_span_in_context(s))
        a = sdk.start_span("invoke_agent greeter", kind=SpanKind.INTERNAL, attributes=_AGENT)
        t2 = context.attach(trace.set_span_in_context(a))
        c = sdk.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT, attributes=_CHAT)
        t3 = context.attach(trace.set_span_in_context(c))
        propagate.inject({})
        context.detach(t3)
        c.set_attributes(_DONE)
        c.set_attribute("gen_ai.response.id", f"chatcmpl-{i}")
        c.end()
        context.detach(t2)
        a.set_attribute("aiwfd.attempts", 1)
        a.end()
        context.detach(t1)
        s.set_attribute("http.response.status_code", 200)
        s.end()
        if len(done) >= 510:
            encode_spans(done).SerializePartialToString()  # the exporter's work, per batch
            done.clear()

    out["sdk"] = _time_it(sdk_call, n)
    provider.shutdown()
    return out


def _time_it(call: Callable[[int], None], n: int) -> float:
    for i in range(n // 10):
        call(i)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(n):
            call(i)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for mod in ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http",
                "opentelemetry-proto"):
        try:
            out[mod] = version(mod)
        except Exception:
            out[mod] = "not installed"
    return out


def report(ob: OtelBench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    p = ob.plan
    off, on = ob.by_name("off"), ob.by_name("on")

    def med(v: Variant, key: str) -> float:
        return median([getattr(r, key) for r in v.runs])

    rows = [("req/s", "{:.0f}", lambda v: med(v, "rps")),
            ("p50 ms", "{:.2f}", lambda v: med(v, "p50_ms")),
            ("p99 ms", "{:.2f}", lambda v: med(v, "p99_ms")),
            ("server CPU ms/req (during the cell)", "{:.3f}", lambda v: med(v, "cpu_ms_per_req")),
            ("server CPU ms/req, with the export tail", "{:.3f}", lambda v: median(v.cpu_tail_ms)),
            ("server busy (CPU s ÷ wall s)", "{:.0%}", lambda v: med(v, "busy")),
            ("req/s if CPU-bound (1000 ÷ CPU ms/req with tail)", "{:.0f}", lambda v: 1000 / median(v.cpu_tail_ms)),
            ("errors (all runs)", "{:.0f}", lambda v: float(sum(r.errors for r in v.runs))),
            ("spans received per call answered", "{:.2f}", lambda v: median(v.spans))]
    lines = ["| c16, `POST /agent/greeter` | off | on | on ÷ off |", "|---|---:|---:|---:|"]
    for label, fmt, get in rows:
        a, b = get(off), get(on)
        cell = "" if label.startswith(("errors", "spans")) or not a else _f(b / a, "{:.2f}×")
        lines.append(f"| {label} | {_f(a, fmt)} | {_f(b, fmt)} | {cell} |")
    per_run = ["| run | off req/s | on req/s | on ÷ off |", "|---:|---:|---:|---:|"]
    for i, (ra, rb) in enumerate(zip(off.runs, on.runs, strict=True)):
        per_run.append(f"| {i + 1} | {ra.rps:.0f} | {rb.rps:.0f} | {rb.rps / ra.rps:.2f}× |")
    # The verdict: the median over rounds of on ÷ off in the same round (a pair measured
    # back to back, each on fresh processes); the table shows each variant's own medians.
    pairs = [b.rps / a.rps for a, b in zip(off.runs, on.runs, strict=True) if a.rps]
    ratio = median(pairs) if pairs else float("nan")
    errs = sum(r.errors for v in ob.variants for r in v.runs)
    ok = ratio == ratio and ratio >= RATIO and errs == 0
    extra_us = (med(on, "cpu_ms_per_req") - med(off, "cpu_ms_per_req")) * 1000
    vs = ob.versions
    out = [
        f"## OpenTelemetry tracing: latest run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run: {p.runs} interleaved round(s) of "
        f"{p.duration:g} s per variant at c{C}, warm-up {p.warmup:g} s each, medians; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- tracer: aiwfd.telemetry (its own spans and OTLP encoder, exported from the loop); the receiver "
        f"decodes with opentelemetry-proto {vs.get('opentelemetry-proto')}; the reference below is "
        f"opentelemetry-sdk {vs.get('opentelemetry-sdk')} with -exporter-otlp-proto-http "
        f"{vs.get('opentelemetry-exporter-otlp-proto-http')}'s encoder",
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine: numbers are noisy)",
        "",
        "Variants (both `aiwfd serve`, aiohttp transport, greeter at 0 ms model latency, API_KEY): "
        + "; ".join(f"**{v.name}**: {v.what}" for v in ob.variants) + ". The receiver: "
        "`python scripts/bench_otel.py --receiver`, its own process on CPU "
        f"{bench.LOAD_CPU} (aiohttp, answers `POST /v1/traces` 200, decodes each export to count its spans).",
        "",
        *lines,
        "",
        *per_run,
        "",
        "In-process, one core, the three spans of one call started, made current, propagated, ended and "
        "encoded as OTLP protobuf (best of 3 × 20,000 calls):",
        "",
        "| tracer | µs per call |",
        "|---|---:|",
        *[f"| {name} | {us:.1f} |" for name, us in (("aiwfd.telemetry", ob.per_call.get("aiwfd")),
                                                   ("OpenTelemetry SDK + its OTLP encoder", ob.per_call.get("sdk")))
          if us is not None],
        "",
        "| target | value | verdict |",
        "|---|---:|---|",
        f"| req/s on ≥ {RATIO}× off at c{C}, no errors | {_f(ratio, '{:.2f}×')} | {'PASS' if ok else 'FAIL'} |",
        "",
        "Notes:",
        f"- tracing costs about {_f(extra_us, '{:.0f}')} µs of server CPU per call (on − off, during the cell); "
        "it includes the encoding (at each span's end) and the exports' HTTP POSTs, all on the instance's loop.",
        "- rounds alternate the order (off, on; then on, off) so that drift in the machine's load falls on both, "
        "and each round runs on a fresh process of each variant (a process keeps its memory layout's luck, a few "
        "µs per call, all its life); the verdict is the median of the rounds' on ÷ off, the table's ratios "
        "divide the variants' medians.",
        "- spans per call: three are expected (SERVER `POST /agent/{name}`, `invoke_agent greeter`, CLIENT "
        "`chat gpt-4o-mini`); fewer means the export queue (2048 spans by default) overflowed and dropped "
        "spans under load.",
        *[f"- {n}" for n in ob.notes],
    ]
    return "\n".join(out) + "\n"


def run(procs: bench.Procs, args: argparse.Namespace, log: Callable[[str], None], command: str,
        machine: list[str], loadavg_before: str, began: float) -> str:
    """The whole --otel mode; returns the report (bench.py prints and writes it)."""
    loader = bench.Loader(procs, args.loader)
    ob = OtelBench(procs, loader, plan_for(args), log)
    ob.versions = versions()
    ob.per_call = per_call_us()
    log("  in-process µs per call: " + ", ".join(f"{k} {v:.1f}" for k, v in ob.per_call.items()))
    _, upstream = bench.start_fake(procs, 0)
    rport = ob.start_receiver()
    ob.start(upstream, rport)
    for v in ob.variants:
        ob.warm(v)
    log("  servers ready and warmed up: " + ", ".join(f"{v.name} pid {v.proc.pid}" for v in ob.variants
                                                      if v.proc is not None) + f"; receiver port {rport}")
    log(f"[1/1] c{C}, {ob.plan.runs} interleaved round(s) of {ob.plan.duration:g} s")
    ob.measure()
    procs.stop_many([v.proc for v in ob.variants if v.proc is not None])
    return report(ob, machine, command, time.monotonic() - began, (loadavg_before, bench._loadavg()))
