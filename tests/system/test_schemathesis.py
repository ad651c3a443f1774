"""Property-based testing of the whole API from its own OpenAPI document
(SPEC §7.1): schemathesis against real `aiwfd serve --mock` processes.

Every operation of /openapi.json is exercised with schemathesis' coverage
phase (boundary values, and invalid bodies, headers and path parameters:
negative testing) and its fuzzing phase (random valid and invalid bodies;
`--mode all` is both),
with every check it has: no 5xx, every status code documented, every body
valid against the documented schema, documented headers present, invalid data
rejected, valid data accepted, undocumented methods answered 405, and (where
a key is sent) the key actually enforced.

Four runs go at once, each against its own server, and each test waits for
its run:

    server with API_KEY,  the key as X-API-Key           every operation
    server with API_KEY,  the key as Authorization: Bearer  the agents (own server:
                                                          its request log is its own)
    server with API_KEY,  no key                         the agents (all 401)
    server without API_KEY, no key                       every operation

The examples per operation are bounded (`-n`), so the lot takes ~20 s. A
fixed seed keeps CI reproducible; AIWFD_ST_SEED=random (or a number) explores.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess
from tests.conftest import CONFIGS

pytest.importorskip("schemathesis", reason="schemathesis is in the [test] extra")

API_MOCK = CONFIGS / "api_mock.yaml"
HERE = Path(__file__).resolve().parent  # schemathesis_hooks.py
KEYS = ("st-key-one", "st-key-two")
_seed = os.environ.get("AIWFD_ST_SEED", "20261126")
SEED = str(random.randrange(2**31)) if _seed == "random" else _seed


@dataclass
class Run:
    name: str
    server: AiwfdProcess
    proc: subprocess.Popen[str]
    output: str = ""

    def finish(self, timeout: float = 150.0) -> str:
        if self.proc.returncode is None:
            try:
                self.output, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output, _ = self.proc.communicate()
                raise AssertionError(f"schemathesis run {self.name} took over {timeout}s:\n{self.output[-5000:]}") from None
        return self.output

    def check(self, at_least: int) -> str:
        out = self.finish()
        assert self.proc.returncode == 0, f"schemathesis ({self.name}, seed {SEED}) found problems:\n{out[-15000:]}"
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m, out[-3000:]
        assert int(m.group(1)) >= at_least and m.group(1) == m.group(2), m.group(0)
        return out


def st(url: str, *args: str, examples: int, phases: str = "examples,coverage,fuzzing",
       credential: str = "") -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url,
           "--checks", "all", "--phases", phases, "--mode", "all",
           "--max-examples", str(examples), "--seed", SEED, "--max-failures", "10",
           "--request-timeout", "10", "--suppress-health-check", "too_slow,filter_too_much",
           *args]
    env = dict(os.environ, NO_COLOR="1", COLUMNS="160", SCHEMATHESIS_HOOKS="schemathesis_hooks",
               AIWFD_ST_CONFIG=str(API_MOCK),  # the hooks' valid chat completion inputs
               AIWFD_ST_CREDENTIAL=credential,  # the hooks' filter_failure
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, env=env)


def agent_statuses(server: AiwfdProcess) -> list[int]:
    """Statuses of the agent calls (plain, stream, batch and job submissions) in a server's request log."""
    rx = re.compile(r" POST /agent/\S+ .* status=(\d+)")
    return [int(m.group(1)) for ln in server.stderr.splitlines() if (m := rx.search(ln))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    # The idempotency keys schemathesis sends are kept in a directory of the test's, not ./.aiwfd.
    state = tmp_path_factory.mktemp("st-state")
    args = ["serve", "-f", str(API_MOCK), "--mock", "-p", "0", "--state-dir", str(state)]
    servers = {  # started together, then waited for
        "keyed": AiwfdProcess(args, env={"API_KEY": ",".join(KEYS)}, wait_ready=False),
        "keyed-bearer": AiwfdProcess(args, env={"API_KEY": ",".join(KEYS)}, wait_ready=False),
        "keyed-nokey": AiwfdProcess(args, env={"API_KEY": KEYS[0]}, wait_ready=False),
        "open": AiwfdProcess(args, wait_ready=False),
    }
    for s in servers.values():
        m = LISTEN_RE.search(s.wait_for_log(LISTEN_RE.pattern))
        assert m
        s.host, s.port = m.group(1), int(m.group(2))
    spec = {name: s.url("/openapi.json") for name, s in servers.items()}
    started = {
        "x-api-key": Run("x-api-key", servers["keyed"],
                         st(spec["keyed"], "-H", f"X-API-Key: {KEYS[1]}", examples=10, credential="x-api-key")),
        # The other credential and no credential: random valid and invalid bodies are enough.
        "bearer": Run("bearer", servers["keyed-bearer"],
                      st(spec["keyed-bearer"], "-H", f"Authorization: Bearer {KEYS[0]}",
                         "--include-tag-regex", "^(agents|jobs)$", examples=4, phases="fuzzing")),
        "no-key": Run("no-key", servers["keyed-nokey"],
                      st(spec["keyed-nokey"], "--include-tag-regex", "^(agents|jobs)$", examples=4,
                         phases="fuzzing")),
        "open": Run("open", servers["open"], st(spec["open"], examples=10)),
    }
    try:
        yield started
    finally:
        for r in started.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        for s in servers.values():
            s.stop()


def every_operation(out: str) -> None:
    assert re.search(r"Operations:\s+(\d+) selected / \1 total", out), out[:2000]


def other_calls(server: AiwfdProcess) -> dict[str, list[int]]:
    """Statuses of the calls of /mcp and /v1 in a server's request log, by path."""
    rx = re.compile(r" (?:GET|POST) (/mcp|/v1/\S+) .* status=(\d+)")
    out: dict[str, list[int]] = {}
    for ln in server.stderr.splitlines():
        if m := rx.search(ln):
            out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


def jobs_ran(server: AiwfdProcess) -> None:
    """Jobs were submitted (202) and read, listed and canceled without a 5xx."""
    rx = re.compile(r" (GET|DELETE) /jobs\S* .* status=(\d+)")
    seen = [(m.group(1), int(m.group(2))) for ln in server.stderr.splitlines() if (m := rx.search(ln))]
    assert {"GET", "DELETE"} <= {method for method, _ in seen}, seen[:20]
    assert all(s < 500 for _, s in seen)
    assert ("GET", 200) in seen


def test_with_the_key_as_x_api_key(runs: dict[str, Run]) -> None:
    out = runs["x-api-key"].check(at_least=300)
    every_operation(out)
    assert "ignored_auth" not in out  # no failure of that check
    statuses = agent_statuses(runs["x-api-key"].server)
    assert 200 in statuses and 202 in statuses and 422 in statuses and 400 in statuses
    assert all(s < 500 for s in statuses)
    jobs_ran(runs["x-api-key"].server)
    # The agents as MCP tools and OpenAI models answered, and the hooks' valid chat inputs ran the agents.
    other = other_calls(runs["x-api-key"].server)
    assert 200 in other["/mcp"] and 200 in other["/v1/models"], other
    assert 200 in other["/v1/chat/completions"] and 422 in other["/v1/chat/completions"], other
    assert all(s < 500 for statuses in other.values() for s in statuses)


def test_with_the_key_as_bearer(runs: dict[str, Run]) -> None:
    runs["bearer"].check(at_least=30)
    # The key in the Bearer header let calls through: answers (200) and input
    # errors (422, past the key check), not only the 401s of schemathesis'
    # own no-credential probes (ignored_auth).
    statuses = agent_statuses(runs["bearer"].server)
    assert len(statuses) >= 30
    assert 200 in statuses and 422 in statuses, sorted(set(statuses))
    assert all(s < 500 for s in statuses)


def test_without_the_key_every_agent_call_is_401(runs: dict[str, Run]) -> None:
    runs["no-key"].check(at_least=30)
    statuses = agent_statuses(runs["no-key"].server)
    assert len(statuses) >= 30
    assert set(statuses) == {401}, sorted(set(statuses))


def test_without_api_key_configured(runs: dict[str, Run]) -> None:
    out = runs["open"].check(at_least=300)
    every_operation(out)
    statuses = agent_statuses(runs["open"].server)
    assert 200 in statuses and 202 in statuses and 401 not in statuses
    jobs_ran(runs["open"].server)
    assert all(s < 500 for s in statuses)
    for run in runs.values():  # no traceback anywhere
        assert "Traceback" not in run.server.stderr
