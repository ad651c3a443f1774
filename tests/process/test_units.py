"""The deployment files: systemd units (systemd/) and the nginx example (deploy/nginx/).

The units are checked with systemd's own tools when they are installed
(`systemd-analyze verify` must print nothing, `systemd-analyze security` must
rate them 2.5 or better) and parsed for the keys the contract requires. The
nginx example must pass `nginx -t` and, served for real in front of two
stand-in upstreams, retry a POST that got a 503 and pass X-Request-ID through.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from aiwfd.cli import EXIT_CONFIG
from aiwfd.testing.nginxconf import NGINX, SHIPPED, main_conf, shipped_conf
from aiwfd.testing.processes import stop_process

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "systemd"
SHIPPED_EXEC = "/opt/aiwfd/venv/bin/aiwfd"
SECURITY_MAX = 2.5

# (unit file, name to check it under: a template is checked as an instance)
UNITS = [("aiwfd.service", "aiwfd.service"), ("aiwfd@.service", "aiwfd@8081.service")]

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")


# ---------------------------------------------------------------------------
# Parsing


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert found, f"[{section}] {key}= is missing"
    return found[-1]


def seconds(value: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def load(name: str) -> dict:
    return parse_unit((UNIT_DIR / name).read_text())


# ---------------------------------------------------------------------------
# Required keys


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
    "DevicePolicy": "closed",
}


@pytest.mark.parametrize("name", [u for u, _ in UNITS])
def test_unit_has_required_keys(name):
    unit = load(name)
    svc = "Service"
    assert one(unit, svc, "Type") == "notify"
    assert one(unit, svc, "NotifyAccess") == "main"
    assert one(unit, svc, "User") == "aiwfd"
    assert one(unit, svc, "Group") == "aiwfd"
    assert one(unit, svc, "WorkingDirectory") == "/etc/aiwfd"
    assert one(unit, svc, "EnvironmentFile").lstrip("-") == "/etc/aiwfd/aiwfd.env"
    assert one(unit, svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, svc, "Restart") == "always"
    assert seconds(one(unit, svc, "RestartSec")) > 0
    # An invalid config exits 1 (SPEC §5): restarting into it would only loop.
    assert one(unit, svc, "RestartPreventExitStatus").split() == [str(EXIT_CONFIG)]
    assert one(unit, svc, "KillMode") in ("mixed", "main")

    argv = shlex.split(one(unit, svc, "ExecStart"))
    assert argv[:2] == [SHIPPED_EXEC, "serve"]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts["-f"] == "/etc/aiwfd/agents.yaml"
    # The daemon reads the same file systemd does (see the unit's comment).
    assert opts["--env-file"] == "/etc/aiwfd/aiwfd.env"
    # SIGKILL must not come before the daemon's drain is over.
    shutdown = float(opts.get("--shutdown-timeout", 30))
    assert seconds(one(unit, svc, "TimeoutStopSec")) > shutdown >= 30

    # -o writes into the state directory, which is the only writable place.
    state = one(unit, svc, "StateDirectory").split()
    assert opts["-o"].startswith(f"/var/lib/{state[-1]}/")
    assert any(opts["-o"].startswith(p.lstrip("-") + "/") for p in values(unit, svc, "ReadWritePaths"))

    for key, expected in HARDENING.items():
        assert one(unit, svc, key) == expected, key
    assert one(unit, svc, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    filters = values(unit, svc, "SystemCallFilter")
    assert "@system-service" in filters
    denied = {f for v in filters if v.startswith("~") for f in v[1:].split()}
    assert {"@privileged", "@resources"} <= denied
    # It must reach the model provider: no IP allow list.
    assert not values(unit, svc, "IPAddressDeny")
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_template_runs_one_instance_per_port():
    unit = load("aiwfd@.service")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts["-p"] == "%i"
    assert opts["--host"] == "127.0.0.1"
    assert "%i" in opts["-o"]
    # The first state directory ($STATE_DIRECTORY's first entry: the jobs and
    # idempotency databases) is the one every instance shares; the second is its own.
    assert one(unit, "Service", "StateDirectory").split() == ["aiwfd", "aiwfd/%i"]
    # Everything but the per-instance bits is the same as the single unit.
    single = load("aiwfd.service")
    ignore = {"Description", "ExecStart", "StateDirectory", "ReadWritePaths", "SyslogIdentifier"}
    strip = lambda u: {s: [kv for kv in kvs if kv[0] not in ignore] for s, kvs in u.items()}  # noqa: E731
    assert strip(unit) == strip(single)


# ---------------------------------------------------------------------------
# systemd-analyze


def runnable_copy(tmp: Path, name: str, check_as: str) -> Path:
    """The unit in tmp/, ExecStart pointed at an executable that exists here.

    `systemd-analyze verify` insists that ExecStart exists, and
    /opt/aiwfd/venv does not in a test; the shipped file keeps the real path.
    """
    true = shutil.which("true") or "/bin/true"
    text = (UNIT_DIR / name).read_text().replace(SHIPPED_EXEC, true)
    (tmp / name).write_text(text)
    if check_as != name:
        (tmp / check_as).symlink_to(name)
    return tmp / check_as


def analyze(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=120
    )


def our_lines(stderr: str) -> list[str]:
    """stderr lines that are not about the host's own unrelated units."""
    host = ("/etc/systemd/", "/lib/systemd/", "/usr/lib/systemd/", "/run/systemd/")
    return [ln for ln in stderr.splitlines() if ln.strip() and not any(h in ln for h in host)]


@needs_systemd_analyze
@pytest.mark.parametrize("name,check_as", UNITS)
def test_systemd_analyze_verify_is_clean(tmp_path, name, check_as):
    path = runnable_copy(tmp_path, name, check_as)
    r = analyze("verify", "--man=no", str(path))
    # verify exits 0 on warnings (unknown keys, bad values): stderr tells.
    assert r.returncode == 0, r.stderr
    assert our_lines(r.stderr) == [], r.stderr


@needs_systemd_analyze
def test_verify_would_catch_a_mistake(tmp_path):
    """The check above is not vacuous: a misspelt key is reported on stderr."""
    path = runnable_copy(tmp_path, "aiwfd.service", "aiwfd.service")
    path.write_text(path.read_text().replace("ProtectClock=", "ProtectClocks="))
    r = analyze("verify", "--man=no", str(path))
    assert "ProtectClocks" in r.stderr


def exposure(tmp_path: Path, name: str, check_as: str) -> tuple[float, str]:
    path = runnable_copy(tmp_path, name, check_as)
    r = analyze("security", "--offline=yes", "--no-pager", str(path))
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)", out)
    assert m, f"no exposure level in:\n{out}"
    assert m.group(1) == check_as
    return float(m.group(2)), out


@needs_systemd_analyze
@pytest.mark.parametrize("name,check_as", UNITS)
def test_systemd_analyze_security_score(tmp_path, name, check_as):
    score, out = exposure(tmp_path, name, check_as)
    assert score <= SECURITY_MAX, out


# ---------------------------------------------------------------------------
# nginx


def test_nginx_example_has_the_contract():
    text = SHIPPED.read_text()
    code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())  # comments out
    squash = re.sub(r"\s+", " ", code)
    assert re.search(r"upstream aiwfd \{", squash)
    assert "keepalive 32;" in squash
    for port in (8081, 8082, 8083):
        assert re.search(rf"server 127\.0\.0\.1:{port}\b", squash)
    # Never marked down: a rolling restart must not leave nginx "no live upstreams" (issue 12).
    assert len(re.findall(r"server 127\.0\.0\.1:\d+ max_fails=0;", squash)) == 3
    assert "proxy_http_version 1.1;" in squash
    assert 'proxy_set_header Connection "";' in squash
    # The client's X-Request-ID when it sent one, nginx's $request_id when not.
    m = re.search(r"map \$http_x_request_id \$(\w+) \{([^}]*)\}", squash)
    assert m, "no map on $http_x_request_id"
    assert '"" $request_id;' in m.group(2)
    assert f"proxy_set_header X-Request-ID ${m.group(1)};" in squash
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in squash
    nu = re.search(r"proxy_next_upstream ([^;]*);", squash).group(1).split()
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(nu)
    assert "proxy_next_upstream_tries" in squash and "proxy_next_upstream_timeout" in squash
    assert "client_max_body_size 1m;" in squash
    # Below nginx's read timeout: the daemon's --deadline default (55 s).
    read = re.search(r"server \{.*?proxy_read_timeout (\d+)s;", squash).group(1)
    assert int(read) >= 60
    stream = re.search(r"location ~ \^/agent/\[\^/\]\+/stream\$ \{([^}]*)\}", squash)
    assert stream and "proxy_buffering off;" in stream.group(1)
    # The comments explain the trade-offs.
    assert "SECOND MODEL CALL" in text and "BEFORE any model is called" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_test_config(dirpath: Path, listen: int, upstreams: list[int] | None = None) -> Path:
    """A main nginx.conf in dirpath that includes a copy of the example."""
    (dirpath / "aiwfd.conf").write_text(shipped_conf(listen, dirpath / "access.log", upstreams))
    (dirpath / "nginx.conf").write_text(main_conf(dirpath, workers=1, connections=64))
    return dirpath / "nginx.conf"


def nginx_cmd(dirpath: Path, conf: Path) -> list[str]:
    cmd = [NGINX, "-p", str(dirpath), "-c", str(conf)]
    help_text = subprocess.run([NGINX, "-h"], capture_output=True, text=True).stderr
    if "-e filename" in help_text:  # nginx >= 1.19.5: no /var/log/nginx at all
        cmd[1:1] = ["-e", str(dirpath / "error.log")]
    return cmd


@pytest.fixture
def nginx_dir():
    d = Path(tempfile.mkdtemp(prefix="aiwfd-nginx-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_nginx
def test_nginx_example_passes_nginx_t(nginx_dir):
    conf = nginx_test_config(nginx_dir, _free_port())
    r = subprocess.run(nginx_cmd(nginx_dir, conf) + ["-t"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[warn]" not in r.stderr and "[emerg]" not in r.stderr, r.stderr


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int):
        self.status = status
        self.seen: list[dict] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        self.server.seen.append({"body": body, "rid": self.headers.get("X-Request-ID"),
                                 "xff": self.headers.get("X-Forwarded-For")})
        out = b'{"status":"draining"}' if self.server.status == 503 else b'{"data":"ok"}'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        rid = self.headers.get("X-Request-ID")
        if rid:
            self.send_header("X-Request-ID", rid)
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


# system: a real nginx in front of two `aiwfd serve` instances, one drained (~1 s); nginx
# under load is tests/system/test_nginx.py. The inner loop keeps `nginx -t` on the example.
@pytest.mark.system
@needs_nginx
def test_nginx_retries_a_draining_instance_and_keeps_the_request_id(nginx_dir):
    draining, healthy = _Upstream(503), _Upstream(200)
    for srv in (draining, healthy):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = _free_port()
    conf = nginx_test_config(nginx_dir, port, [draining.server_port, healthy.server_port])
    proc = subprocess.Popen(nginx_cmd(nginx_dir, conf), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)

        def post(headers):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/agent/greeter", data=b'{"name":"A"}',
                                         headers={"Content-Type": "application/json", **headers})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers.get("X-Request-ID"), resp.read()

        for _ in range(4):  # round robin: some of these hit the draining one first
            status, rid, body = post({"X-Request-ID": "client-id-1"})
            assert (status, rid, body) == (200, "client-id-1", b'{"data":"ok"}')
        assert draining.seen, "the 503 instance was never tried"
        # A POST that got a 503 went on to the healthy instance, body intact.
        assert all(s["body"] == b'{"name":"A"}' for s in healthy.seen)
        assert len(healthy.seen) == 4
        assert {s["rid"] for s in draining.seen + healthy.seen} == {"client-id-1"}
        assert healthy.seen[0]["xff"] == "127.0.0.1"

        # Without an id from the client, nginx makes one (32 hex digits).
        status, rid, _ = post({})
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", rid or "")
        assert healthy.seen[-1]["rid"] == rid
    finally:
        stop_process(proc, timeout=10)
        for srv in (draining, healthy):
            srv.shutdown()
            srv.server_close()
