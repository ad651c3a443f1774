"""scripts/install.sh into a temporary prefix, and scripts/cluster.sh.

The install runs offline-friendly: a venv with --system-site-packages and
`pip install --no-deps` (the dependencies come from the interpreter running
the tests). The build backend is used from that interpreter too
(--no-build-isolation) when it has everything pyproject.toml asks for;
otherwise pip builds in isolation, fetching setuptools/wheel from the
configured index (a local one on the project's machines).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install.sh"
CLUSTER = ROOT / "scripts" / "cluster.sh"

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def _requirement_importable(req: str) -> bool:
    name = re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("-", "_")
    return importlib.util.find_spec(name) is not None


def offline_pip_args() -> str:
    """--no-deps, plus --no-build-isolation when the backend is here already."""
    args = ["--no-deps"]
    pyproject = ROOT / "pyproject.toml"
    requires = ["setuptools", "wheel"]
    if pyproject.exists():
        m = re.search(r"^\[build-system\][^\[]*?^requires\s*=\s*\[([^\]]*)\]", pyproject.read_text(), re.M | re.S)
        if m:
            requires = re.findall(r"[\"']([^\"']+)[\"']", m.group(1))
    # A venv made from inside a venv does not see the outer venv's packages.
    same_site = sys.prefix == sys.base_prefix
    if same_site and all(_requirement_importable(r) for r in requires):
        args.append("--no-build-isolation")
    return " ".join(args)


def run_install(prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [BASH, str(INSTALL), "--prefix", str(prefix), "--no-systemd", "--system-site-packages",
           "--python", sys.executable, "--pip-args", offline_pip_args(), *extra]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def source_listing() -> set[str]:
    return {p.name for p in ROOT.iterdir()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if not any((ROOT / f).exists() for f in ("pyproject.toml", "setup.cfg", "setup.py")):
        pytest.skip("the aiwfd package has no pyproject.toml/setup.cfg yet")
    prefix = tmp_path_factory.mktemp("prefix")
    before = source_listing()
    r = run_install(prefix)
    assert r.returncode == 0, f"install.sh failed\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    # Building from a copy leaves no build/ or *.egg-info in the checkout.
    assert source_listing() == before
    return prefix, r


def test_install_creates_the_venv_with_the_console_script(installed):
    prefix, r = installed
    venv = prefix / "opt/aiwfd/venv"
    aiwfd = venv / "bin/aiwfd"
    assert aiwfd.is_file() and os.access(aiwfd, os.X_OK)
    assert (venv / "bin/aiwf").is_file(), "the `aiwf` alias console script"
    shebang = aiwfd.read_text().splitlines()[0]
    assert shebang.startswith(f"#!{venv}/bin/python")
    assert "pip: installed aiwfd" in r.stdout
    if sys.prefix == sys.base_prefix:  # the venv sees this interpreter's packages
        help_run = subprocess.run([str(aiwfd), "--help"], capture_output=True, text=True, timeout=60)
        assert help_run.returncode == 0, help_run.stderr
        assert "serve" in help_run.stdout


def test_install_writes_units_with_the_prefix(installed):
    prefix, _ = installed
    units = prefix / "etc/systemd/system"
    for name in ("aiwfd.service", "aiwfd@.service"):
        text = (units / name).read_text()
        assert oct((units / name).stat().st_mode & 0o777) == "0o644"
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            # Every aiwfd path is below the prefix now.
            for path in re.findall(r"(?<![\w.+-])(/[^\s]*aiwfd[^\s]*)", line):
                assert path.startswith(str(prefix) + "/"), f"{name}: {line}"
        exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
        argv = shlex.split(exec_start.partition("=")[2])
        assert argv[0] == f"{prefix}/opt/aiwfd/venv/bin/aiwfd"
        assert argv[argv.index("-f") + 1] == f"{prefix}/etc/aiwfd/agents.yaml"
        assert argv[argv.index("--env-file") + 1] == f"{prefix}/etc/aiwfd/aiwfd.env"
        assert f"EnvironmentFile={prefix}/etc/aiwfd/aiwfd.env" in text
        assert f"WorkingDirectory={prefix}/etc/aiwfd" in text
        # Unchanged: relative to /var/lib, and the reload command.
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text
        # Writable paths exist, or the unit could not start (namespace setup).
        for line in text.splitlines():
            if line.startswith("ReadWritePaths="):
                for p in line.partition("=")[2].split():
                    assert Path(p.lstrip("-")).is_dir(), line


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_installed_units_verify_with_the_real_executable(installed, tmp_path):
    prefix, _ = installed
    units = prefix / "etc/systemd/system"
    shutil.copy(units / "aiwfd.service", tmp_path / "aiwfd.service")
    shutil.copy(units / "aiwfd@.service", tmp_path / "aiwfd@.service")
    (tmp_path / "aiwfd@8082.service").symlink_to("aiwfd@.service")
    for name in ("aiwfd.service", "aiwfd@8082.service"):
        r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_install_writes_the_configuration(installed):
    prefix, r = installed
    etc = prefix / "etc/aiwfd"
    env = etc / "aiwfd.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert env.read_text() == (ROOT / "systemd/aiwfd.env.example").read_text()
    for key in ("OPENAI_API_KEY", "API_KEY", "HOST", "PORT", "AIWF_LOG_FORMAT", "AIWF_LOG_LEVEL"):
        assert re.search(rf"^{key}=", env.read_text(), re.M), key
    agents = etc / "agents.yaml"
    assert (ROOT / "config.example.yaml").exists(), "config.example.yaml is missing from the repo"
    assert agents.read_text() == (ROOT / "config.example.yaml").read_text()
    assert stat.S_IMODE(agents.stat().st_mode) == 0o640
    assert (prefix / "var/lib/aiwfd").is_dir()
    assert "daemon-reload: skipped (--no-systemd)" in r.stdout


def test_install_is_idempotent_and_keeps_the_configuration(installed):
    prefix, _ = installed
    env = prefix / "etc/aiwfd/aiwfd.env"
    agents = prefix / "etc/aiwfd/agents.yaml"
    env.write_text("OPENAI_API_KEY=sk-mine\n")
    env.chmod(0o600)
    agents.write_text("version: 0.3\n# mine\n")
    r = run_install(prefix)
    assert r.returncode == 0, r.stderr
    assert env.read_text() == "OPENAI_API_KEY=sk-mine\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert agents.read_text() == "version: 0.3\n# mine\n"
    assert "exists, reusing it" in r.stdout
    assert r.stdout.count("left untouched") == 2


def test_install_rejects_bad_arguments(tmp_path):
    r = subprocess.run([BASH, str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown argument" in r.stderr
    r = subprocess.run([BASH, str(INSTALL), "--prefix", str(tmp_path), "--source", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a Python project" in r.stderr
    assert not (tmp_path / "opt").exists()


def test_install_help():
    r = subprocess.run([BASH, str(INSTALL), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--prefix", "--no-systemd", "--source", "--pip-args", "--system-site-packages"):
        assert flag in r.stdout


# ---------------------------------------------------------------------------
# cluster.sh, with a stand-in for aiwfd so that it tests the script alone

FAKE_AIWFD = r'''
import http.server, json, signal, sys
argv = sys.argv[1:]
assert argv[0] == "serve", argv
port = int(argv[argv.index("-p") + 1])
assert argv[argv.index("--host") + 1] == "127.0.0.1"
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = json.dumps({"port": port, "argv": argv}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = _answer
    def log_message(self, *a):
        pass
def stop(*_):
    print("drained", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _free_ports(n: int) -> list[int]:
    """n consecutive free loopback ports (best effort)."""
    for base in range(20000 + os.getpid() % 20000, 60000, 97):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_cluster_starts_instances_behind_nginx_and_stops_them(tmp_path):
    fake = tmp_path / "fake_aiwfd.py"
    fake.write_text(FAKE_AIWFD)
    agents = tmp_path / "agents.yaml"
    agents.write_text("version: 0.3\n")
    *instances, front = _free_ports(3)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [BASH, str(CLUSTER), "--instances", "2", "--base-port", str(instances[0]), "--port", str(front),
         "-f", str(agents), "--mock", "--keep", "--aiwfd", f"{sys.executable} {fake}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()  # printed once everything listens
        assert url == f"http://127.0.0.1:{front}/", proc.stderr.read() if not url else url
        seen = set()
        for _ in range(4):
            req = urllib.request.Request(url + "agent/greeter", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer = json.loads(resp.read())
            seen.add(answer["port"])
            assert "--mock" in answer["argv"] and "-o" in answer["argv"]
        assert seen == set(instances)
    finally:
        proc.terminate()  # SIGTERM: the trap stops nginx and the instances
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise
    assert proc.returncode == 143, err
    kept = list(tmp_path.glob("aiwfd-cluster.*"))
    assert len(kept) == 1, err
    for port in instances:
        assert "drained" in (kept[0] / f"aiwfd-{port}.log").read_text()
    for port in [*instances, front]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
