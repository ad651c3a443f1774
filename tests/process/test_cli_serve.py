"""`aiwfd serve` as a real process (SPEC §3 auth, §4, §4.1, §6; issue #3 items 6 and 8).

- No key ever reaches stderr or stdout: client keys (`API_KEY="k1,k2"`), the
  OpenAI key, and wrong keys sent by clients, across 401s, 422s, 200s and a
  provider error that echoes the upstream key, at the default log level,
  with `--log-level debug`, and with `--log-level debug --log-format json`.
- Precedence flag > process environment > `.env` > default for PORT and HOST;
  `--env-file` is read instead of `./.env`; `.env` values (OPENAI_API_KEY,
  OPENAI_BASE_URL, API_KEY) take effect.
- `--mock` serves config.example.yaml with schema-valid answers, no key and
  no network; the `aiwf` alias serves too; `python -m aiwfd --version`.
- Every start-up failure of §4.1 is one line on stderr (an invalid config:
  one line per error, each with file:line and key path), no traceback, and no
  ephemeral directory left behind; its exit code is SPEC §5's: 1 an invalid
  config or environment, 2 a usage error (a flag or setting variable out of
  range, named with the range, the same for a flag and a variable), 3 what
  may pass on retry (a busy port, an address that cannot be bound).
- A warning when API_KEY is unset and the address is not loopback.

Independent start-ups run concurrently (module fixtures, one thread per
process) to keep the module fast; every process is stopped before the tests
look at what it did.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from jsonschema import Draft202012Validator

from aiwfd import __version__
from aiwfd.testing.fakeopenai import FakeOpenAI, Status, sample_for_schema
from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess, free_port, run_cli
from tests.conftest import CONFIGS, REPO

MOCK_CFG = str(CONFIGS / "cli_mock.yaml")
OPENAI_CFG = str(CONFIGS / "cli_openai.yaml")
INVALID_CFG = str(CONFIGS / "cli_invalid.yaml")
EXAMPLE_CFG = str(REPO / "config.example.yaml")

GOOD = {"name": "Alice"}

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, bytes]:
    """One request with the standard library (usable from a thread): (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports and p != 8080:
            ports.append(p)
    return ports


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiwfd binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listening(proc: AiwfdProcess, timeout: float = 60.0) -> AiwfdProcess:
    """Wait for the "on http://HOST:PORT" line (generous: start-ups run concurrently);
    a process that does not get there is stopped before the error propagates."""
    try:
        m = LISTEN_RE.search(proc.wait_for_log(LISTEN_RE.pattern, timeout=timeout))
        assert m, proc.stderr
    except BaseException:
        proc.stop()
        raise
    proc.host, proc.port = m.group(1), int(m.group(2))
    return proc


def launch(args: list[str], env: dict[str, str], cwd: Path) -> AiwfdProcess:
    """`python -m aiwfd ARGS`, once it listens."""
    return listening(AiwfdProcess(args, env=env, cwd=cwd, wait_ready=False))


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# --------------------------------------------------------------------------
# 6. No key in the output, whatever the log settings

K1 = "k1-ClientKeyAlpha7f3"
K2 = "k2-ClientKeyBravo9d1"
WRONG = "wrong-ClientKeyCharlie5e8"
OPENAI_KEY = "sk-secret-OpenAIKeyDelta0c6e2b"

# (flags, AIWF_TRANSPORT): aiwfd's own aiohttp call path logs nothing at debug;
# through the SDK, the SDK and its HTTP stack log every step at debug.
LOG_MODES = {
    "default": ([], "aiohttp"),
    "debug": (["--log-level", "debug"], "aiohttp"),
    "debug-sdk": (["--log-level", "debug"], "sdk"),
    "debug-json-sdk": (["--log-level", "debug", "--log-format", "json"], "sdk"),
}


@pytest.mark.parametrize("mode", list(LOG_MODES))
async def test_keys_never_reach_stderr_or_stdout(tmp_path: Path, mode: str) -> None:
    flags, transport = LOG_MODES[mode]
    # The fake insists on the real key, so a 200 shows it was sent.
    async with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        env = {"API_KEY": f"{K1},{K2}", "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": fake.base_url,
               "AIWF_TRANSPORT": transport, "TMPDIR": str(tmp_path)}
        proc = await asyncio.to_thread(launch, ["serve", "-f", OPENAI_CFG, "-p", "0", *flags], env, tmp_path)
        answers: list[tuple[int, bytes]] = []
        try:
            agent = proc.url("/agent/greeter")

            async def call(body: Any, headers: dict[str, str] | None = None) -> int:
                status, raw = await asyncio.to_thread(http, "POST", agent, body, headers)
                answers.append((status, raw))
                return status

            assert await call(GOOD) == 401
            assert await call(GOOD, {"X-API-Key": WRONG}) == 401
            assert await call(GOOD, {"Authorization": f"Bearer {WRONG}"}) == 401
            assert await call({"name": 5}, {"X-API-Key": K1}) == 422
            assert await call({"nam": "typo"}, {"Authorization": f"Bearer {K2}"}) == 422
            assert await call(GOOD, {"X-API-Key": K1}) == 200
            assert await call(GOOD, {"Authorization": f"Bearer {K2}"}) == 200
            # A provider error whose message quotes the upstream key (the worst case).
            fake.script(Status(401, body={"error": {
                "message": f"Incorrect API key provided: {OPENAI_KEY}. You can find your API key at "
                           "https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}))
            assert await call(GOOD, {"X-API-Key": K2}) == 502
            for path in ("/health", "/agents"):
                status, raw = await asyncio.to_thread(http, "GET", proc.url(path))
                answers.append((status, raw))
                assert status == 200
        finally:
            rc = await asyncio.to_thread(proc.stop)
        assert rc == 0, proc.stderr
        assert fake.calls == 3
        assert all(r.headers.get("authorization") == f"Bearer {OPENAI_KEY}" for r in fake.requests)

    output = proc.stderr + "\n" + proc.stdout
    # The run really logged: one request line per request, and debug output in debug mode.
    assert len(re.findall(r"/agent/greeter", output)) >= 8, output
    if transport == "sdk":  # the level took effect
        assert re.search(r'debug: |"level": "debug"', output), output
    if "--log-format" in flags:
        for line in proc.stderr.splitlines():
            json.loads(line)  # every line is one JSON object, none is a bare traceback
    no_traceback(output)
    for secret in (K1, K2, WRONG, OPENAI_KEY):
        core = secret.split("-", 1)[1]
        assert core not in output, f"{secret} leaked ({mode}):\n{output}"
        for status, raw in answers:
            assert core.encode() not in raw, f"{secret} reached a client: {status} {raw!r}"


# --------------------------------------------------------------------------
# 8. Servers that start: precedence, --env-file, the non-loopback warning


@dataclass
class Run:
    """What one `aiwfd serve` did, collected before it was stopped."""

    listen: tuple[str, int] | None  # (host, port) from the "on http://…" line
    health: int | None  # GET /health on that address
    probe: dict[str, Any]
    rc: int
    stderr: str


def serve_and_probe(args: list[str], env: dict[str, str], cwd: Path, health: bool = True,
                    probe: Callable[[AiwfdProcess], dict[str, Any]] | None = None) -> Run:
    proc = AiwfdProcess(args, env=env, cwd=cwd, wait_ready=False)
    listen = None
    status = None
    result: dict[str, Any] = {}
    try:
        try:
            listening(proc)
        except AssertionError:  # it exited (or never listened): stopped, the tests say why
            pass
        else:
            assert proc.host is not None and proc.port is not None
            listen = (proc.host, proc.port)
            if health:
                status = http("GET", proc.url("/health"))[0]
            if probe:
                result = probe(proc)
    finally:
        rc = proc.stop()
    return Run(listen, status, result, rc, proc.stderr)


DOTENV_HOST, ENV_HOST, FLAG_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@dataclass
class Started:
    runs: dict[str, Run]
    ports: dict[str, int]
    default_skip: str | None = None


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Started:
    """Every start-up that listens, run concurrently, each stopped before the tests look."""
    dotenv_port, env_port, flag_port, other_port, ignored_port = distinct_ports(5)
    ports = {"dotenv": dotenv_port, "env": env_port, "flag": flag_port, "env_file": other_port}
    dotenv = f"PORT={dotenv_port}\nHOST={DOTENV_HOST}\n"
    proc_env = {"PORT": str(env_port), "HOST": ENV_HOST}
    args = ["serve", "-f", MOCK_CFG]

    def workdir(name: str, files: dict[str, str]) -> Path:
        d = tmp_path_factory.mktemp(name)
        (d / "tmp").mkdir()
        for fname, text in files.items():
            (d / fname).write_text(text, encoding="utf-8")
        return d

    def env_file_probe(proc: AiwfdProcess) -> dict[str, Any]:
        url = proc.url("/agent/greeter")
        return {"no key": http("POST", url, GOOD)[0],
                "./.env key": http("POST", url, GOOD, {"X-API-Key": "key-from-dot-env"})[0],
                "other.env key": http("POST", url, GOOD, {"X-API-Key": "key-from-other-env"})[0]}

    jobs: dict[str, tuple[list[str], dict[str, str], Path, dict[str, Any]]] = {}
    d = workdir("flag", {".env": dotenv})
    jobs["flag"] = (args + ["-p", str(flag_port), "--host", FLAG_HOST], proc_env, d, {})
    d = workdir("env", {".env": dotenv})
    jobs["env"] = (args, proc_env, d, {})
    d = workdir("dotenv", {".env": dotenv})
    jobs["dotenv"] = (args, {}, d, {})
    default_skip = None
    if port_free("127.0.0.1", 8080):
        jobs["default"] = (args, {}, workdir("default", {}), {})
    else:
        default_skip = "port 8080 is in use on this machine: the default port cannot be shown"
    d = workdir("env_file", {
        ".env": f"PORT={ignored_port}\nAPI_KEY=key-from-dot-env\n",
        "other.env": f"PORT={other_port}\nAPI_KEY=key-from-other-env\n",
    })
    jobs["env_file"] = (args + ["--env-file", "other.env"], {}, d, {"probe": env_file_probe})
    # Not loopback, no API_KEY: only the warning is looked at, no traffic is sent.
    jobs["open_host"] = (args + ["--host", "0.0.0.0", "-p", "0"], {}, workdir("open", {}), {"health": False})

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            name: pool.submit(serve_and_probe, a, {**e, "TMPDIR": str(cwd / "tmp")}, cwd, **kw)
            for name, (a, e, cwd, kw) in jobs.items()
        }
        runs = {name: f.result() for name, f in futures.items()}
    return Started(runs, ports, default_skip)


@pytest.mark.parametrize("case, expect", [
    ("flag", (FLAG_HOST, "flag")),      # flag beats process env beats .env
    ("env", (ENV_HOST, "env")),         # process env beats .env
    ("dotenv", (DOTENV_HOST, "dotenv")),  # .env beats the default
])
def test_listen_address_precedence(started: Started, case: str, expect: tuple[str, str]) -> None:
    run = started.runs[case]
    host, port_of = expect
    assert run.listen == (host, started.ports[port_of]), run.stderr
    assert run.health == 200, run.stderr
    assert run.rc == 0, run.stderr
    # 127.0.0.0/8 is loopback: no warning about a missing API_KEY.
    assert "API_KEY" not in run.stderr, run.stderr
    no_traceback(run.stderr)


def test_listen_address_default(started: Started) -> None:
    if started.default_skip:
        pytest.skip(started.default_skip)
    run = started.runs["default"]
    if run.listen is None and "already in use" in run.stderr:
        pytest.skip("port 8080 was taken by another process while the test ran")
    assert run.listen == ("127.0.0.1", 8080), run.stderr
    assert "on http://127.0.0.1:8080" in run.stderr
    assert run.health == 200, run.stderr
    assert run.rc == 0, run.stderr


def test_env_file_is_read_instead_of_dot_env(started: Started) -> None:
    run = started.runs["env_file"]
    assert run.listen == ("127.0.0.1", started.ports["env_file"]), run.stderr
    # API_KEY comes from other.env; ./.env is not read at all.
    assert run.probe == {"no key": 401, "./.env key": 401, "other.env key": 200}, run.stderr
    assert run.rc == 0, run.stderr


def test_warning_when_not_loopback_and_no_api_key(started: Started) -> None:
    run = started.runs["open_host"]
    assert run.listen is not None and run.listen[0] == "0.0.0.0", run.stderr
    warning = [line for line in run.stderr.splitlines() if "API_KEY" in line]
    assert len(warning) == 1 and "warning" in warning[0] and "0.0.0.0" in warning[0], run.stderr
    assert run.rc == 0, run.stderr


async def test_dot_env_values_take_effect(tmp_path: Path) -> None:
    """OPENAI_API_KEY, OPENAI_BASE_URL and API_KEY from ./.env: the daemon starts
    (the key is there), calls the fake with that key, and wants the client key."""
    async with FakeOpenAI(api_key="sk-from-dot-env") as fake:
        (tmp_path / ".env").write_text(
            f"OPENAI_API_KEY=sk-from-dot-env\nOPENAI_BASE_URL={fake.base_url}\n"
            "API_KEY=client-key-from-dot-env\n", encoding="utf-8")
        env = {"TMPDIR": str(tmp_path)}
        proc = await asyncio.to_thread(launch, ["serve", "-f", OPENAI_CFG, "-p", "0"], env, tmp_path)
        try:
            url = proc.url("/agent/greeter")
            assert (await asyncio.to_thread(http, "POST", url, GOOD))[0] == 401
            status, raw = await asyncio.to_thread(http, "POST", url, GOOD, {"X-API-Key": "client-key-from-dot-env"})
            assert status == 200, raw
        finally:
            rc = await asyncio.to_thread(proc.stop)
        assert rc == 0, proc.stderr
        assert fake.calls == 1
        assert fake.last.headers["authorization"] == "Bearer sk-from-dot-env"


async def test_mock_serves_the_example_with_no_key_and_no_network(tmp_path: Path) -> None:
    # OPENAI_BASE_URL points at a fake that must see no call; there is no OPENAI_API_KEY.
    async with FakeOpenAI() as fake:
        env = {"OPENAI_BASE_URL": fake.base_url, "TMPDIR": str(tmp_path)}
        proc = await asyncio.to_thread(launch, ["serve", "-f", EXAMPLE_CFG, "--mock", "-p", "0"], env, tmp_path)
        try:
            status, raw = await asyncio.to_thread(http, "GET", proc.url("/agents"))
            assert status == 200
            agents = json.loads(raw)["agents"]
            assert len(agents) >= 2
            for agent in agents:
                body = sample_for_schema(agent["input_schema"])
                status, raw = await asyncio.to_thread(http, "POST", proc.url(agent["endpoint"]), body)
                assert status == 200, (agent["name"], raw)
                answer = json.loads(raw)
                validator = Draft202012Validator(agent["output_schema"],
                                                 format_checker=Draft202012Validator.FORMAT_CHECKER)
                errors = [e.message for e in validator.iter_errors(answer["data"])]
                assert not errors, (agent["name"], answer["data"], errors)
                assert answer["trace"]["step_name"] == agent["name"]
        finally:
            rc = await asyncio.to_thread(proc.stop)
        assert rc == 0, proc.stderr
        assert fake.calls == 0
    assert "mock provider" in proc.stderr
    assert "OPENAI_API_KEY" not in proc.stderr
    no_traceback(proc.stderr)


def test_aiwf_alias_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's `aiwf serve` (here with the default -f config.yaml)."""
    aiwf = shutil.which("aiwf")
    if aiwf is None:
        pytest.skip("the aiwf console script is not installed on PATH")
    shutil.copy(EXAMPLE_CFG, tmp_path / "config.yaml")
    real_popen = subprocess.Popen

    def popen_aiwf(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        assert argv[:3] == [sys.executable, "-m", "aiwfd"]
        return real_popen([aiwf, *argv[3:]], **kw)

    with monkeypatch.context() as m:  # AiwfdProcess starts `python -m aiwfd`; start `aiwf` instead
        m.setattr(subprocess, "Popen", popen_aiwf)
        proc = AiwfdProcess(["serve", "--mock", "-p", "0"], env={"TMPDIR": str(tmp_path)},
                            cwd=tmp_path, wait_ready=False)
    with listening(proc):
        assert proc.proc.args[0] == aiwf
        assert http("GET", proc.url("/health"))[0] == 200
        status, raw = http("POST", proc.url("/agent/greeter"), GOOD)
        assert status == 200, raw
        assert "config.yaml" in proc.stderr
        rc = proc.stop()
    assert rc == 0, proc.stderr


# --------------------------------------------------------------------------
# 8. --version and the start-up failures of §4.1


@dataclass
class Failures:
    results: dict[str, subprocess.CompletedProcess[str]]
    dirs: dict[str, Path]
    busy_port: int


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failures]:
    """Every start-up failure (and --version), run concurrently to completion."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    mock = ["serve", "-f", MOCK_CFG]
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {
        "version": (["--version"], {}),
        "missing config": (["serve", "-p", "0"], {}),  # default -f config.yaml, absent from cwd
        "invalid config": (["serve", "-f", INVALID_CFG, "-p", "0"], {}),
        "no openai key": (["serve", "-f", OPENAI_CFG, "-p", "0"], {}),
        "port in use": (mock + ["-p", str(busy_port)], {}),
        "host not bindable": (mock + ["--host", "192.0.2.1", "-p", "0"], {}),  # TEST-NET-1: bind fails
        "port not a number": (mock + ["-p", "abc"], {}),
        "port out of range": (mock + ["-p", "70000"], {}),
        "PORT out of range": (mock, {"PORT": "70000"}),
        "missing env file": (mock + ["-p", "0", "--env-file", "nowhere.env"], {}),
        "deadline negative": (mock + ["-p", "0", "--deadline", "-5"], {}),
        "body timeout nan": (mock + ["-p", "0", "--body-timeout", "nan"], {}),
        "shutdown timeout negative": (mock + ["-p", "0", "--shutdown-timeout", "-1"], {}),
        "header timeout zero": (mock + ["-p", "0", "--header-timeout", "0"], {}),
        "keepalive timeout too long": (mock + ["-p", "0", "--keepalive-timeout", "1e9"], {}),
        "log level unknown": (mock + ["-p", "0"], {"AIWF_LOG_LEVEL": "verbose"}),
        "SSE keep-alive zero": (mock + ["-p", "0"], {"AIWF_SSE_KEEPALIVE": "0"}),
        "SSE keep-alive in .env": (mock + ["-p", "0", "--env-file", "bad.env"], {}),
    }
    dirs = {}
    for name in jobs:
        d = tmp_path_factory.mktemp(name.replace(" ", "_"))
        (d / "tmp").mkdir()
        dirs[name] = d
    (dirs["SSE keep-alive in .env"] / "bad.env").write_text("AIWF_SSE_KEEPALIVE=soon\n", encoding="utf-8")
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {name: pool.submit(run_cli, a, {**e, "TMPDIR": str(dirs[name] / "tmp")}, dirs[name])
                       for name, (a, e) in jobs.items()}
            results = {name: f.result() for name, f in futures.items()}
    finally:
        busy.close()
    yield Failures(results, dirs, busy_port)


def test_version(failures: Failures) -> None:
    done = failures.results["version"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"aiwfd {__version__}"


DURATION = "expected seconds, more than 0 and at most 86400$"
SSE_KEEPALIVE = "expected seconds, more than 0 and at most 3600$"
ONE_LINE_FAILURES = {
    "missing config": r"config\.yaml.*not found",
    "no openai key": r"OPENAI_API_KEY not set",
    "port in use": r"port {busy} already in use.*--port",
    "host not bindable": r"192\.0\.2\.1.*(--host|cannot)",
    "port not a number": r"^aiwfd: invalid --port 'abc': expected a whole number from 0 to 65535$",
    "port out of range": r"^aiwfd: invalid --port '70000': expected a whole number from 0 to 65535$",
    "PORT out of range": r"^aiwfd: invalid PORT '70000': expected a whole number from 0 to 65535$",
    "missing env file": r"env file.*nowhere\.env",
    "deadline negative": r"^aiwfd: invalid --deadline '-5': " + DURATION,
    "body timeout nan": r"^aiwfd: invalid --body-timeout 'nan': " + DURATION,
    "shutdown timeout negative": r"^aiwfd: invalid --shutdown-timeout '-1': expected seconds, from 0 to 86400$",
    "header timeout zero": r"^aiwfd: invalid --header-timeout '0': " + DURATION,
    "keepalive timeout too long": r"^aiwfd: invalid --keepalive-timeout '1e9': " + DURATION,
    "log level unknown": r"^aiwfd: invalid AIWF_LOG_LEVEL 'verbose': expected debug, info, warning or error$",
    "SSE keep-alive zero": r"^aiwfd: invalid AIWF_SSE_KEEPALIVE '0': " + SSE_KEEPALIVE,
    "SSE keep-alive in .env": r"^aiwfd: invalid AIWF_SSE_KEEPALIVE 'soon': " + SSE_KEEPALIVE,
}

# SPEC §5: 1 invalid config or environment (systemd does not restart into it),
# 2 usage, 3 may pass on retry.
EXIT_CODES = {
    "missing config": 1, "invalid config": 1, "no openai key": 1, "missing env file": 1,
    "port in use": 3, "host not bindable": 3,
    "port not a number": 2, "port out of range": 2, "PORT out of range": 2, "deadline negative": 2,
    "body timeout nan": 2, "shutdown timeout negative": 2, "header timeout zero": 2,
    "keepalive timeout too long": 2, "log level unknown": 2, "SSE keep-alive zero": 2, "SSE keep-alive in .env": 2,
}


def test_every_failure_has_its_exit_code(failures: Failures) -> None:
    assert set(EXIT_CODES) == set(failures.results) - {"version"}
    assert set(ONE_LINE_FAILURES) == set(EXIT_CODES) - {"invalid config"}


@pytest.mark.parametrize("case", list(EXIT_CODES))
def test_startup_failure_exit_code(failures: Failures, case: str) -> None:
    done = failures.results[case]
    assert done.returncode == EXIT_CODES[case], (done.returncode, done.stderr)


@pytest.mark.parametrize("case", list(ONE_LINE_FAILURES))
def test_startup_failure_is_one_line(failures: Failures, case: str) -> None:
    done = failures.results[case]
    assert done.returncode in (1, 2, 3), done.stderr
    no_traceback(done.stderr + done.stdout)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert re.search(ONE_LINE_FAILURES[case].format(busy=failures.busy_port), lines[0]), lines[0]
    assert "listening" not in done.stderr and "on http://" not in done.stderr
    # Nothing listened, so nothing is left in the temp dir.
    assert list((failures.dirs[case] / "tmp").iterdir()) == []


def test_invalid_config_reports_every_error_with_file_and_line(failures: Failures) -> None:
    done = failures.results["invalid config"]
    assert done.returncode != 0
    no_traceback(done.stderr + done.stdout)
    lines = done.stderr.splitlines()
    errors = [line for line in lines if re.search(r"cli_invalid\.yaml:\d+:", line)]
    # Lines 6, 8, 15, 17 of tests/configs/cli_invalid.yaml, each with the key's path.
    expected = {6: "types.Req.name", 8: "types.Resp.count",
                15: "assistants.greeter.output_type", 17: "assistants.greeter.temprature"}
    found = {int(re.search(r"cli_invalid\.yaml:(\d+):", line).group(1)): line for line in errors}  # type: ignore[union-attr]
    assert sorted(found) == sorted(expected), done.stderr
    for n, path in expected.items():
        assert path in found[n], found[n]
    assert "did you mean 'temperature'" in found[17]
    # At most a one-line count besides the errors.
    assert len(lines) - len(errors) <= 1, done.stderr
    assert list((failures.dirs["invalid config"] / "tmp").iterdir()) == []
