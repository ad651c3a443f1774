#!/usr/bin/env python3
"""Start-up side by side (issue 13): how long `aiwfd serve` of the 200-agent
config takes from process start to its first 200 on /health, and `aiwfd
validate` of that config to its exit, against a bare aiohttp app's process
start to its first 200 on /health, measured in one run and given as ratios.

    python scripts/bench_startup.py                       # 7 interleaved runs of each
    python scripts/bench_startup.py --before /tmp/before  # also another tree's aiwfd (PYTHONPATH=that tree)
    python scripts/bench_startup.py --imports             # what serve's start-up imports cost (-X importtime)

The runs are interleaved (one of each case, then the next round), so a
neighbour's load spreads over every case alike; each figure is the median.
The measured process runs on CPU 0 and this script (the poller) on CPU 1 when
taskset and two CPUs are there. Targets: serve ≤ 2× the bare app, validate
≤ 1.5×. scripts/bench.py imports `side_by_side` for its start-up rows.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "bench"))
sys.path.insert(0, str(REPO))
from gen_agents import generate  # noqa: E402

from aiwfd.testing.processes import free_port, stop_process  # noqa: E402

N_AGENTS = 200
SERVE_TARGET = 2.0
VALIDATE_TARGET = 1.5
MEASURED_CPU, POLLER_CPU = 0, 1

# The least a process answering /health does: Python, aiohttp, a bind.
BARE_APP = """
import sys
from aiohttp import web

async def health(request):
    return web.json_response({"status": "ok"})

app = web.Application()
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def closed_port_url() -> str:
    """A base URL nobody listens on: start-up never calls the model."""
    return f"http://127.0.0.1:{free_port()}/v1"


@dataclass
class Case:
    name: str
    argv: list[str]  # "{port}" is replaced by a free port
    env: dict[str, str]
    health: bool  # timed to the first 200 on /health (else: to the exit, which must be 0)
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def env_for(tree: Path | None, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("OPENAI_", "AIWF_", "GROK_", "PYTHON")) or k in ("API_KEY", "PORT", "HOST"))}
    env.update(TMPDIR=str(workdir), OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=closed_port_url(),
               API_KEY="bench-key")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def pinned(argv: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", str(MEASURED_CPU), *argv] if pin else argv


def wait_health(proc: subprocess.Popen[bytes], port: int, timeout: float = 60.0) -> float:
    """Poll GET /health every 2 ms until it answers 200; the monotonic time of that answer."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.monotonic()
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"exited {proc.returncode} before answering /health:\n{err[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"/health not 200 within {timeout:g} s")
        time.sleep(0.002)


def measure_once(case: Case, workdir: Path, pin: bool) -> float:
    port = free_port()
    argv = pinned([a.replace("{port}", str(port)) for a in case.argv], pin)
    if not case.health:
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=workdir, env=case.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{case.name}: exit {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
        return elapsed
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, env=case.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return wait_health(proc, port) - t0
    finally:
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()


def cases_for(config: Path, workdir: Path, before: Path | None) -> list[Case]:
    py = sys.executable
    cases = [Case("bare aiohttp app", [py, "-c", BARE_APP, "{port}"], env_for(None, workdir), True)]
    trees = [("", REPO)] + ([(" (before)", before)] if before is not None else [])
    for label, tree in trees:
        env = env_for(tree, workdir)
        cases.append(Case(f"aiwfd serve{label}", [py, "-m", "aiwfd", "serve", "-f", str(config), "-p", "{port}",
                                                   "--host", "127.0.0.1"], env, True))
    for label, tree in trees:
        cases.append(Case(f"aiwfd validate{label}", [py, "-m", "aiwfd", "validate", "-f", str(config)],
                          env_for(tree, workdir), False))
    cases.append(Case("python -c 'import aiohttp'", [py, "-c", "import aiohttp"], env_for(None, workdir), False))
    return cases


def can_pin() -> bool:
    try:
        return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # pragma: no cover - not Linux
        return False


def side_by_side(config: Path, runs: int, before: Path | None = None, pin: bool | None = None,
                 log: bool = False, warm: bool = True) -> list[Case]:
    """Every case measured `runs` times, interleaved; cases[0] is the bare app.

    warm: one unmeasured round first, so the page cache and the .pyc files are
    warm for every case alike."""
    pin = can_pin() if pin is None else pin
    workdir = Path(tempfile.mkdtemp(prefix="aiwfd-startup-"))
    old_affinity = os.sched_getaffinity(0) if pin else None
    try:
        if pin:
            os.sched_setaffinity(0, {POLLER_CPU})
        cases = cases_for(config, workdir, before)
        for case in cases if warm else []:
            measure_once(case, workdir, pin)
        for i in range(runs):
            for case in cases:
                case.times.append(measure_once(case, workdir, pin))
            if log:
                print(f"  round {i + 1}/{runs}: " + ", ".join(f"{c.name} {c.times[-1] * 1000:.0f}"
                                                             for c in cases) + " ms", file=sys.stderr)
        return cases
    finally:
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
        shutil.rmtree(workdir, ignore_errors=True)


def table(cases: Sequence[Case]) -> str:
    bare = cases[0].median
    lines = ["| process | to | median ms | runs (ms) | ÷ bare aiohttp app | target |",
             "|---|---|---:|---|---:|---|"]
    for c in cases:
        target = ""
        if c.name.startswith("aiwfd serve"):
            target = f"≤ {SERVE_TARGET:g}×"
        elif c.name.startswith("aiwfd validate"):
            target = f"≤ {VALIDATE_TARGET:g}×"
        if target and not c.name.endswith("(before)"):
            limit = SERVE_TARGET if c.name.startswith("aiwfd serve") else VALIDATE_TARGET
            target += " PASS" if c.median <= limit * bare else " FAIL"
        lines.append(f"| {c.name} | {'first 200 on /health' if c.health else 'exit'} | {c.median * 1000:.0f} | "
                     f"{' '.join(f'{t * 1000:.0f}' for t in c.times)} | {c.median / bare:.2f}× | {target} |")
    return "\n".join(lines)


# -- what the serve start-up imports cost

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
WATCHED = ("openai", "jsonschema", "prometheus_client", "importlib.metadata", "aiohttp", "yaml", "orjson",
           "dotenv", "uvloop", "multidict", "yarl")


def import_costs(config: Path, tree: Path, runs: int = 3) -> dict[str, float]:
    """Cumulative ms of each watched top-level import during `aiwfd serve`'s start (median of runs)."""
    workdir = Path(tempfile.mkdtemp(prefix="aiwfd-imports-"))
    seen: dict[str, list[float]] = {}
    try:
        for _ in range(runs):
            port = free_port()
            err = workdir / "importtime.txt"
            with err.open("wb") as f:
                proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "aiwfd", "serve", "-f",
                                         str(config), "-p", str(port), "--host", "127.0.0.1"],
                                        cwd=workdir, env=env_for(tree, workdir), stdout=subprocess.DEVNULL, stderr=f)
                try:
                    wait_health(proc, port)
                finally:
                    proc.terminate()
                    proc.wait(timeout=15)
            run: dict[str, float] = {}
            for line in err.read_text(errors="replace").splitlines():
                m = IMPORT_LINE.match(line)
                if m and m.group(4) in WATCHED and m.group(4) not in run:
                    run[m.group(4)] = int(m.group(2)) / 1000
            for name in WATCHED:
                seen.setdefault(name, []).append(run.get(name, 0.0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {name: statistics.median(v) for name, v in seen.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="measured rounds (default 7)")
    p.add_argument("--before", type=Path, default=None, help="another tree's aiwfd to measure beside this one")
    p.add_argument("--imports", action="store_true", help="also the cumulative import times of serve's start")
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aiwfd-startup-cfg-") as d:
        config = Path(d) / "agents200.yaml"
        config.write_text(generate(N_AGENTS), encoding="utf-8")
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
        cases = side_by_side(config, args.runs, args.before, pin=False if args.no_pin else None, log=True)
        print(f"{N_AGENTS}-agent config (scripts/bench/gen_agents.py), median of {args.runs} interleaved runs, "
              f"load average {load} → {' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
        print(table(cases))
        if args.imports:
            trees = [("after", REPO)] + ([("before", args.before)] if args.before is not None else [])
            costs = {label: import_costs(config, tree) for label, tree in trees}
            print("\n| cumulative import ms during `aiwfd serve`'s start | " + " | ".join(costs) + " |")
            print("|---|" + "---:|" * len(costs))
            for name in WATCHED:
                print(f"| {name} | " + " | ".join(f"{c[name]:.1f}" for c in costs.values()) + " |")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
