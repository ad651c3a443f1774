"""The client examples of examples/ against a real `aiwfd serve --mock` (issue #8, item 2).

One server for the module (config.example.yaml, `--mock`, API_KEY set), and
every example is run as a user would run it: `AIWFD_URL` and `AIWFD_API_KEY`
in the environment, the agent and its JSON input as arguments.

- success: exit 0, `data: <JSON>` equal to what the server answers for the
  same input, and a `trace:` line with the agent, attempts and request id;
- aiwfd's error shape: 422 with every detail, 401 for a wrong key, 404 for an
  unknown agent: exit 1, `error: <status> <type>: …` and the request id;
- an answer that is not aiwfd's shape (an HTML 502 from a proxy): exit 1;
- no answer (connection refused): exit 2.

Python `requests` and `httpx` (or its successor `httpx2`, which the openai
SDK installs) are skipped when not importable; Node when `node` (18+, for
fetch) is missing; Go when `go` is missing. The Go example is built once per
module, offline (GOPROXY=off: it uses the standard library only).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from aiwfd.testing.processes import AiwfdProcess, free_port
from tests.conftest import REPO

EXAMPLES = REPO / "examples"
KEY = "examples-test-key"
GREETER_INPUT = {"name": "Alice"}
REVIEW_INPUT = {"product": "Kettle", "review": "Boils fast, but the lid sticks.", "rating": 4}

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _node_version() -> tuple[int, ...] | None:
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def _skip_reason(client: str) -> str | None:
    if client == "requests" and importlib.util.find_spec("requests") is None:
        return "requests is not installed (pip install requests)"
    if client == "httpx" and importlib.util.find_spec("httpx") is None and importlib.util.find_spec("httpx2") is None:
        return "neither httpx nor httpx2 is installed (pip install httpx)"
    if client == "node":
        version = _node_version()
        if version is None:
            return "node is not installed (apt-get install nodejs)"
        if version < (18, 0):
            return f"node {version} has no built-in fetch (Node 18 or later)"
    if client == "go" and shutil.which("go") is None:
        return "go is not installed (apt-get install golang-go)"
    return None


CLIENTS = ["requests", "httpx", "node", "go"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("API_KEY", "AIWFD_URL", "AIWFD_API_KEY") and not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AiwfdProcess]:
    cwd = tmp_path_factory.mktemp("examples-server")
    with AiwfdProcess(["serve", "-f", str(REPO / "config.example.yaml"), "--mock", "-p", "0"],
                      env={"API_KEY": KEY}, cwd=cwd) as proc:
        yield proc


class _HTMLBadGateway(http.server.BaseHTTPRequestHandler):
    """What a proxy answers when no instance is up: not aiwfd's error shape."""

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def html_proxy() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTMLBadGateway)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason("go")
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("go")
    out = tmp / "aiwfd-client"
    # Offline: no module downloads (the example uses the standard library
    # only). Go's build cache stays where it is (a warm one saves ~6 s),
    # unless there is no HOME to put it in.
    env = clean_env(GOTOOLCHAIN="local", GOPROXY="off", GOFLAGS="-mod=mod", CGO_ENABLED="0")
    if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
        env["GOCACHE"] = str(tmp / "cache")
    if not (env.get("GOPATH") or env.get("HOME")):
        env["GOPATH"] = str(tmp / "gopath")
    done = subprocess.run(["go", "build", "-o", str(out), "."], cwd=EXAMPLES / "go", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"go build failed:\n{done.stdout}{done.stderr}"
    return out


def command(client: str, request: pytest.FixtureRequest) -> list[str]:
    reason = _skip_reason(client)
    if reason:
        pytest.skip(reason)
    if client == "requests":
        return [sys.executable, str(EXAMPLES / "python" / "requests_client.py")]
    if client == "httpx":
        return [sys.executable, str(EXAMPLES / "python" / "httpx_client.py")]
    if client == "node":
        return [shutil.which("node") or "node", str(EXAMPLES / "node" / "fetch_client.mjs")]
    return [str(request.getfixturevalue("go_binary"))]


def run(cmd: list[str], url: str, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(AIWFD_URL=url)
    if key is not None:
        env["AIWFD_API_KEY"] = key
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def direct(server: AiwfdProcess, agent: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(server.url(f"/agent/{agent}"), data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-API-Key": KEY})
    with _OPENER.open(req, timeout=30) as r:
        return json.loads(r.read())


def parse_success(out: str) -> tuple[Any, dict[str, str]]:
    lines = out.splitlines()
    data_lines = [ln for ln in lines if ln.startswith("data: ")]
    trace_lines = [ln for ln in lines if ln.startswith("trace: ")]
    assert len(data_lines) == 1 and len(trace_lines) == 1, out
    fields = dict(kv.split("=", 1) for kv in trace_lines[0][len("trace: "):].split())
    return json.loads(data_lines[0][len("data: "):]), fields


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("agent,body", [("greeter", GREETER_INPUT), ("review-analyzer", REVIEW_INPUT)])
def test_calls_the_agent_and_reads_data_and_trace(client: str, agent: str, body: dict[str, Any],
                                                  server: AiwfdProcess, request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), server.base, KEY, agent, json.dumps(body))
    assert done.returncode == 0, done.stderr
    data, trace = parse_success(done.stdout)
    assert data == direct(server, agent, body)["data"]  # --mock answers are deterministic
    assert trace["step_name"] == agent
    assert trace["attempts"] == "1"
    assert trace["model"] == "gpt-4o-mini"
    assert int(trace["tokens"]) > 0
    assert re.fullmatch(r"[A-Za-z0-9._:@/+=-]{1,128}", trace["request_id"])
    # The request id the client printed is the one in the server's log.
    server.wait_for_log(rf"POST /agent/{agent} .* status=200 request_id={re.escape(trace['request_id'])}", timeout=10)


@pytest.mark.parametrize("client", CLIENTS)
def test_default_call_needs_no_arguments(client: str, server: AiwfdProcess, request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), server.base, KEY)
    assert done.returncode == 0, done.stderr
    data, trace = parse_success(done.stdout)
    assert data == direct(server, "greeter", GREETER_INPUT)["data"]
    assert trace["step_name"] == "greeter"


@pytest.mark.parametrize("client", CLIENTS)
def test_invalid_input_shows_every_detail(client: str, server: AiwfdProcess, request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), server.base, KEY, "greeter", json.dumps({"name": "", "nmae": "x"}))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert re.search(r"^error: 422 invalid_input: request body does not match GreetingRequest "
                     r"\(request_id [A-Za-z0-9]+\)$", done.stderr, re.M), done.stderr
    assert "  name: must be at least 1 characters long" in done.stderr
    assert "  nmae: unknown field (did you mean 'name'?)" in done.stderr


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("key", ["wrong-key", None])
def test_missing_or_wrong_key_is_401(client: str, key: str | None, server: AiwfdProcess,
                                     request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), server.base, key)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"^error: 401 unauthorized: .* \(request_id [A-Za-z0-9]+\)$", done.stderr, re.M), done.stderr
    assert KEY not in done.stderr + done.stdout


@pytest.mark.parametrize("client", CLIENTS)
def test_unknown_agent_is_404(client: str, server: AiwfdProcess, request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), server.base, KEY, "greeterr", json.dumps(GREETER_INPUT))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"^error: 404 not_found: unknown agent 'greeterr'.*greeter", done.stderr, re.M), done.stderr


@pytest.mark.parametrize("client", CLIENTS)
def test_an_answer_that_is_not_aiwfds_shape(client: str, html_proxy: str, request: pytest.FixtureRequest) -> None:
    done = run(command(client, request), html_proxy, KEY)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"^error: 502 http_error: .*502 Bad Gateway", done.stderr, re.M), done.stderr


@pytest.mark.parametrize("client", CLIENTS)
def test_no_answer_at_all(client: str, request: pytest.FixtureRequest) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run(command(client, request), url, KEY)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"error: no answer from {url}"), done.stderr


def test_go_example_is_gofmt_clean() -> None:
    if shutil.which("gofmt") is None:
        pytest.skip("gofmt is not installed (apt-get install golang-go)")
    done = subprocess.run(["gofmt", "-l", "."], cwd=EXAMPLES / "go", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_examples_read_the_documented_variables() -> None:
    """Every example takes AIWFD_URL and AIWFD_API_KEY, as examples/README.md says."""
    files = [EXAMPLES / "python" / "requests_client.py", EXAMPLES / "python" / "httpx_client.py",
             EXAMPLES / "node" / "fetch_client.mjs", EXAMPLES / "go" / "main.go"]
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "AIWFD_URL" in text and "AIWFD_API_KEY" in text, f
        assert str(f.relative_to(EXAMPLES)) in readme, f"{f.name} is not in examples/README.md"
