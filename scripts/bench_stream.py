"""`python scripts/bench.py --stream [--quick]`: what a streamed answer costs (issue 14, items 4 and 5).

The fake model (aiwfd.testing.fakeopenai, `--answer`, `--chunk-chars 4`)
streams generated answers of ~1k, ~4k and ~16k tokens (4 characters a token:
~4, 16 and 64 KB of JSON, valid for the `Out {items: Item[]}` type of
scripts/bench/stream.yaml, so that aiwfd answers `result` with no re-ask) in
4-character pieces as fast as it can. For each size, `aiwfd serve` on
`/agent/stream_<size>/stream` and the `stream-raw` forwarder of
scripts/bench_refs.py (content deltas as events, nothing else) are measured
over a batch of sequential streams (scripts/bench_stream_load.py, one at a
time): the body bytes the client received, the server's CPU (utime+stime of
/proc/PID/stat over the batch) per stream, per KB of answer and per model
chunk, and the time from sending the request to the first `delta`. Then 100
streams of the 4k answer at once against a fresh server: all complete, and
aiwfd's peak RSS (VmHWM). Servers on CPU 0; the fake, the client and this
script on CPU 1, as for the main benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import bench  # the running scripts/bench.py (it registers itself under this name)

CONFIG = bench.BENCH_DIR / "stream.yaml"
CLIENT = bench.REPO / "scripts" / "bench_stream_load.py"
SIZES = (("1k", 1024), ("4k", 4096), ("16k", 16384))  # label, tokens (the fake counts 4 characters a token)
CHUNK_CHARS = 4
BODY = '{"topic":"the spring release"}'
CONCURRENT = 100
CONCURRENT_SIZE = "4k"
BEGIN = "<!-- stream:begin (written by scripts/bench.py --stream) -->"
END = "<!-- stream:end -->"
AIWFD = bench.Server("aiwfd", "aiwfd", "aiohttp")
REF = bench.Server("stream-raw", "ref", "stream-raw")

_VERBS = ("Review", "Draft", "Ship", "Test", "Plan", "Fix", "Document", "Migrate")
_NOUNS = ("login flow", "billing page", "search index", "release notes", "café menu", "API keys", "dashboard")
_TAGS = ("backend", "frontend", "ux", "docs", "infra", "urgent", "später")


def answer(tokens: int) -> str:
    """A deterministic `Out` answer of at least `tokens` × 4 characters (a little unicode and escapes)."""
    items: list[dict[str, Any]] = []
    size = len('{"items":[]}')
    i = 0
    while size < tokens * 4:
        item = {
            "id": i + 1,
            "title": f"{_VERBS[i % len(_VERBS)]} the {_NOUNS[i % len(_NOUNS)]}",
            "done": i % 3 == 0,
            "estimate": (i * 37) % 100 + 1,
            "tags": [_TAGS[(i + k) % len(_TAGS)] for k in range(1 + i % 3)],
            "note": f"step {i + 1}: see \"{_NOUNS[(i + 2) % len(_NOUNS)]}\" — owner #{i % 9}",
        }
        items.append(item)
        size += len(json.dumps(item, separators=(",", ":"), ensure_ascii=False)) + (1 if i else 0)
        i += 1
    return json.dumps({"items": items}, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StreamPlan:
    quick: bool
    batch: dict[str, int]  # sequential streams per size (the 1k batch also gives the time to first delta)
    warm: int


def plan_for(quick: bool) -> StreamPlan:
    if quick:
        return StreamPlan(True, {"1k": 30, "4k": 5, "16k": 2}, 1)
    return StreamPlan(False, {"1k": 200, "4k": 40, "16k": 8}, 5)


def start_fake(procs: bench.Procs, answers: dict[str, Path]) -> tuple[bench.Proc, str]:
    argv = [sys.executable, "-m", bench.FAKE_MODULE, "--port", "0", "--chunk-chars", str(CHUNK_CHARS)]
    for label, path in answers.items():
        argv += ["--answer", f"bench-stream-{label}={path}"]
    if bench.has_module("uvloop"):
        argv.append("--uvloop")
    proc = procs.start("fake-stream", argv, cpu=bench.LOAD_CPU, env=bench.base_env())
    m, _ = proc.wait_for(r"LISTENING (\d+)", stream="out")
    proc.port = int(m.group(1))
    return proc, f"http://127.0.0.1:{proc.port}/v1"


def client(procs: bench.Procs, proc: bench.Proc, label: str, expect: Path, n: int, c: int) -> dict[str, Any]:
    """Run n streams (c at a time) against `proc`; the client's summary plus the server's CPU seconds."""
    argv = [sys.executable, str(CLIENT), "--url", f"http://127.0.0.1:{proc.port}/agent/stream_{label}/stream",
            "--body", BODY, "-n", str(n), "-c", str(c), "--expect", str(expect), "-H", bench.AUTH_HEADER]
    cpu0 = proc.cpu_seconds()
    cp = subprocess.run(procs.cmd(argv, bench.LOAD_CPU), capture_output=True, text=True, timeout=900,
                        cwd=procs.workdir, preexec_fn=bench._die_with_parent)
    cpu = proc.cpu_seconds() - cpu0
    if cp.returncode != 0 or not cp.stdout.strip():
        raise RuntimeError(f"stream client failed ({cp.returncode}):\n{cp.stderr[-2000:]}\n{proc.tail()}")
    d: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    d["cpu_s"] = cpu
    return d


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class StreamBench:
    def __init__(self, procs: bench.Procs, plan: StreamPlan, log: Callable[[str], None]) -> None:
        self.procs = procs
        self.plan = plan
        self.log = log
        self.results: dict[str, dict[str, float]] = {AIWFD.name: {}, REF.name: {}}
        self.events: dict[str, dict[str, dict[str, int]]] = {AIWFD.name: {}, REF.name: {}}
        self.failures: dict[str, dict[str, int]] = {}
        self.sizes: dict[str, tuple[int, int]] = {}  # label -> (answer bytes, model chunks)
        self.fake_cpu: dict[str, float] = {}
        self.expect: dict[str, Path] = {}

    def put(self, srv: bench.Server, key: str, value: float) -> None:
        self.results[srv.name][key] = value

    def prepare(self) -> str:
        for label, tokens in SIZES:
            text = answer(tokens)
            path = self.procs.workdir / f"answer-{label}.json"
            path.write_text(text, encoding="utf-8")
            self.expect[label] = path
            self.sizes[label] = (len(text.encode()), math.ceil(len(text) / CHUNK_CHARS))
        self.fake, upstream = start_fake(self.procs, self.expect)
        return upstream

    def sequential(self, upstream: str) -> None:
        started: dict[str, bench.Proc] = {}
        try:
            started = {s.name: bench.start_server(self.procs, s, upstream, config=CONFIG, pin_late=True)
                       for s in (REF, AIWFD)}
            for srv in (REF, AIWFD):  # the 1k answer only: with `partial` a 16k stream costs seconds
                client(self.procs, started[srv.name], "1k", self.expect["1k"], self.plan.warm, 1)
            self.log("  servers ready and warmed up")
            for label, _ in SIZES:
                n = self.plan.batch[label]
                answer_bytes, chunks = self.sizes[label]
                for srv in (REF, AIWFD):
                    fake0 = self.fake.cpu_seconds()
                    d = client(self.procs, started[srv.name], label, self.expect[label], n, 1)
                    self.fake_cpu[f"{srv.name}:{label}"] = (self.fake.cpu_seconds() - fake0) / n
                    self.record(srv, label, d, n, answer_bytes, chunks)
        finally:
            self.procs.stop_many(list(started.values()))

    def record(self, srv: bench.Server, label: str, d: dict[str, Any], n: int, answer_bytes: int,
               chunks: int) -> None:
        cpu = d["cpu_s"] / n
        self.put(srv, f"bytes_{label}", median(d["bytes"]))
        self.put(srv, f"cpu_ms_{label}", cpu * 1000)
        self.put(srv, f"cpu_kb_{label}", cpu * 1000 / (answer_bytes / 1024))
        self.put(srv, f"cpu_chunk_{label}", cpu * 1e6 / chunks)
        self.put(srv, f"failed_seq_{label}", d["failed"])
        ok = max(1, d["ok"])
        self.events[srv.name][label] = {k: round(v / ok) for k, v in sorted(d["events"].items())}
        for name in ("patch", "partial", "delta"):
            self.put(srv, f"ev_{name}_{label}", d["events"].get(name, 0) / ok)
        if label == "1k":
            ttfd = sorted(d["ttfd_ms"])
            self.put(srv, "ttfd_p50", median(ttfd))
            self.put(srv, "ttfd_p90", ttfd[min(len(ttfd) - 1, int(0.9 * len(ttfd)))] if ttfd else float("nan"))
        if d["failures"]:
            self.failures[f"{srv.name} {label} sequential"] = d["failures"]
        self.log(f"  {label:>3} x{n:<4} {srv.name:<10} {median(d['bytes']):>12,.0f} B/stream  "
                 f"cpu {cpu * 1000:8.2f} ms/stream  {cpu * 1e6 / chunks:6.1f} us/chunk  "
                 f"failed {d['failed']}  events {self.events[srv.name][label]}")

    def concurrent(self, upstream: str) -> None:
        label = CONCURRENT_SIZE
        for srv in (REF, AIWFD):
            proc = bench.start_server(self.procs, srv, upstream, config=CONFIG, pin_late=True)
            try:
                d = client(self.procs, proc, label, self.expect[label], CONCURRENT, CONCURRENT)
                hwm = proc.status_kb("VmHWM") / 1024
            finally:
                self.procs.stop(proc)
            self.put(srv, "conc_failed", d["failed"])
            self.put(srv, "conc_rss", hwm)
            self.put(srv, "conc_s", d["seconds"])
            self.put(srv, "conc_cpu", d["cpu_s"])
            if d["failures"]:
                self.failures[f"{srv.name} {CONCURRENT} at once"] = d["failures"]
            self.log(f"  {CONCURRENT} x {label} at once {srv.name:<10} ok {d['ok']}/{CONCURRENT} in "
                     f"{d['seconds']:.2f} s, server CPU {d['cpu_s']:.2f} s, peak RSS {hwm:.1f} MB "
                     f"{d['failures'] or ''}")


Check = Callable[[dict[str, float], dict[str, float]], bool]  # (aiwfd, stream-raw) -> ok


def at_most(key: str, limit: float) -> Check:
    return lambda a, r: a[key] <= limit


def within_of_1k(key: str, factor: float) -> Check:
    return lambda a, r: 1 / factor <= a[key] / a["cpu_kb_1k"] <= factor


def times_ref(key: str, factor: float, plus: float = 0.0) -> Check:
    return lambda a, r: a[key] <= factor * r[key] + plus


def rows(sb: StreamBench) -> list[bench.Row]:
    out: list[bench.Row] = []
    for label, _ in SIZES:
        answer_bytes, chunks = sb.sizes[label]
        limit = 4 * answer_bytes + 150 * chunks
        per_kb = bench.Row(f"cpu_kb_{label}", f"server CPU ms per KB of answer, {label}", "{:.3f}")
        if label != "1k":
            per_kb = bench.Row(per_kb.key, per_kb.label, per_kb.fmt, "within 1.5× of 1k",
                               within_of_1k(per_kb.key, 1.5))
        out += [
            bench.Row(f"bytes_{label}", f"bytes received per stream, {label}", "{:,.0f}",
                      f"≤ 4×answer + 150×chunks = {limit:,}", at_most(f"bytes_{label}", limit)),
            bench.Row(f"cpu_ms_{label}", f"server CPU ms per stream, {label}", "{:.2f}"),
            per_kb,
            bench.Row(f"cpu_chunk_{label}", f"server CPU µs per model chunk, {label}", "{:.1f}",
                      "≤ 2× stream-raw", times_ref(f"cpu_chunk_{label}", 2.0)),
            bench.Row(f"ev_patch_{label}", f"`patch` events per stream, {label}", "{:.0f}", ratio=False),
            bench.Row(f"ev_partial_{label}", f"`partial` events per stream, {label}", "{:.0f}", ratio=False),
            bench.Row(f"failed_seq_{label}", f"failed of the sequential streams, {label}", "{:.0f}", "0",
                      at_most(f"failed_seq_{label}", 0), ratio=False),
        ]
    out += [
        bench.Row("ttfd_p50", "time to first delta ms, c1, p50 (1k)", "{:.2f}", "≤ stream-raw + 1 ms",
                  times_ref("ttfd_p50", 1.0, 1.0)),
        bench.Row("ttfd_p90", "time to first delta ms, c1, p90 (1k)", "{:.2f}"),
        bench.Row("conc_failed", f"failed of {CONCURRENT} concurrent streams ({CONCURRENT_SIZE})", "{:.0f}", "0",
                  at_most("conc_failed", 0), ratio=False),
        bench.Row("conc_rss", f"peak RSS MB, {CONCURRENT} concurrent streams ({CONCURRENT_SIZE})", "{:.1f}",
                  "< 150 MB", lambda a, r: a["conc_rss"] < 150),
        bench.Row("conc_s", f"seconds for the {CONCURRENT} concurrent streams", "{:.2f}"),
        bench.Row("conc_cpu", f"server CPU s for the {CONCURRENT} concurrent streams", "{:.2f}"),
    ]
    return out


def render(sb: StreamBench) -> tuple[str, list[tuple[str, bool]]]:
    a, r = sb.results[AIWFD.name], sb.results[REF.name]
    lines = [f"| metric | {REF.name} | **{AIWFD.name}** | ÷{REF.name} | target | verdict |",
             "|---|---:|---:|---:|---|---|"]
    verdicts: list[tuple[str, bool]] = []
    for row in rows(sb):
        av, rv = a.get(row.key), r.get(row.key)
        ratio = f"{av / rv:.2f}×" if row.ratio and av is not None and rv and av == av and rv == rv else "—"
        mark = ""
        if row.check is not None:
            try:
                ok = bool(row.check(a, r))
                mark = "PASS" if ok else "FAIL"
                verdicts.append((row.label, ok))
            except (KeyError, ZeroDivisionError, TypeError):
                mark = "n/a"
        lines.append(f"| {row.label} | {bench.fmt_value(row, rv)} | **{bench.fmt_value(row, av)}** | {ratio} | "
                     f"{row.target} | {mark} |")
    return "\n".join(lines), verdicts


def report(sb: StreamBench, machine: list[str], command: str, elapsed: float, loadavg: tuple[str, str]) -> str:
    table, verdicts = render(sb)
    p = sb.plan
    sizes = ", ".join(f"{label}: {b:,} bytes in {c:,} chunks" for label, (b, c) in sb.sizes.items())
    events = "; ".join(f"{label}: " + ", ".join(f"{v:,} {k}" for k, v in ev.items())
                       for label, ev in sb.events[AIWFD.name].items())
    fake = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in sb.fake_cpu.items())
    out = [
        f"## Streaming: latest run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"Command: `{command}` ({'quick' if p.quick else 'full'} run; sequential streams per size: "
        + ", ".join(f"{k} ×{v}" for k, v in p.batch.items()) + f"; took {elapsed:.0f} s)",
        "",
        *machine,
        f"- load average before / after: {loadavg[0]} / {loadavg[1]} (other work shares the machine)",
        "",
        table,
        "",
        "Notes:",
        f"- answers (`Out {{items: Item[]}}`, scripts/bench/stream.yaml, generated by scripts/bench_stream.py), "
        f"streamed by the fake in {CHUNK_CHARS}-character chunks as fast as it can: {sizes}.",
        "- columns: the `stream-raw` forwarder of scripts/bench_refs.py (the same upstream call with "
        "`\"stream\": true`, each content delta written as `event: delta`, then `event: result` with the "
        "joined text; no validation, no parsing), then `aiwfd serve` (AIWF_TRANSPORT=aiohttp) on "
        "`/agent/stream_<size>/stream`, and aiwfd ÷ forwarder.",
        "- server CPU: utime+stime of the server process (/proc/PID/stat) over the batch of sequential "
        "streams, divided by the streams; per KB of answer and per model chunk from that. Bytes: the response "
        "body the client read (median per stream).",
        "- time to first delta: from sending the request to reading the end of the first `delta` event, "
        "over the 1k batch at concurrency 1. Both servers call the same fake, which starts streaming at once, "
        "so aiwfd − forwarder is what aiwfd adds (auth, input validation, the `start` event, its stream reader). "
        "The ~4 ms both show is mostly not the servers (measured by hand on this machine: the fake called "
        "directly sends its first content chunk within ~0.5 ms, the forwarder writes its first delta ~0.8 ms "
        "after its response started); "
        "the rest is loopback hops and wake-ups on a 2-CPU machine where the fake's burst shares CPU 1 with "
        "the client.",
        f"- {CONCURRENT} concurrent: {CONCURRENT} streams of the {CONCURRENT_SIZE} answer at once against a "
        "freshly started server; peak RSS is its VmHWM. A stream counts as failed unless it ends with a "
        "`result` equal to the answer and its deltas join to the answer (scripts/bench_stream_load.py).",
        f"- aiwfd's events per stream: {events or '—'}.",
        f"- the fake's CPU per stream (CPU 1): {fake or '—'}.",
    ]
    if sb.failures:
        out.append("- failures: " + "; ".join(f"{k}: {v}" for k, v in sb.failures.items()) + ".")
    if verdicts:
        failed = [label for label, ok in verdicts if not ok]
        out += ["", f"Targets: {sum(ok for _, ok in verdicts)}/{len(verdicts)} PASS"
                + (f"; FAIL: {'; '.join(failed)}" if failed else "")]
    return "\n".join(out) + "\n"


def run(procs: bench.Procs, args: argparse.Namespace, log: Callable[[str], None], command: str,
        machine: list[str], loadavg_before: str, began: float) -> str:
    """The whole --stream mode; returns the report (bench.py prints and writes it)."""
    sb = StreamBench(procs, plan_for(args.quick), log)
    upstream = sb.prepare()
    log(f"[1/2] sequential streams of {', '.join(label for label, _ in SIZES)} tokens at c1")
    sb.sequential(upstream)
    log(f"[2/2] {CONCURRENT} concurrent streams of the {CONCURRENT_SIZE} answer")
    sb.concurrent(upstream)
    return report(sb, machine, command, time.monotonic() - began, (loadavg_before, bench._loadavg()))
