"""Resource attacks on a real `aiwfd serve` process (issue 12, items 3 and 4).

* A gzip bomb (49 KB expanding to 50 MiB) is refused with 413 without the
  process's peak RSS (VmHWM) growing by more than the body limit.
* Under `ulimit -n 256`, 300 connections that send nothing exhaust the
  descriptors; the header timeout drops them and `/health` answers again
  soon after it, instead of timing out for everyone as long as they stay.
"""

from __future__ import annotations

import gzip
import json
import resource
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aiwfd.testing.processes import AiwfdProcess
from tests.conftest import REPO

EXAMPLE = str(REPO / "config.example.yaml")
LIMIT = 1 << 20  # the default --max-body


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def first_agent(base: str) -> str:
    with urllib.request.urlopen(base + "/agents", timeout=10) as r:
        return str(json.loads(r.read())["agents"][0]["name"])


def post_gzip(url: str, data: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_gzip_bomb_never_raises_rss_by_more_than_the_limit(tmp_path: Path) -> None:
    bomb = gzip.compress(b" " * (50 << 20), 9)
    assert len(bomb) < 64 * 1024
    with AiwfdProcess(["serve", "-f", EXAMPLE, "-p", "0", "--mock"], env={"TMPDIR": str(tmp_path)},
                      timeout=60) as proc:
        url = proc.url("/agent/" + first_agent(proc.base))
        # Warm up every code path of a compressed call (imports, buffers) first.
        status, _ = post_gzip(url, gzip.compress(b'{"x": ' + b" " * 1000 + b"1}"))
        assert status in (200, 422)
        before = vm_hwm_kib(proc.pid)
        for _ in range(3):
            status, doc = post_gzip(url, bomb)
            assert status == 413, doc
            assert doc["error"]["type"] == "payload_too_large"  # type: ignore[index]
        grown = vm_hwm_kib(proc.pid) - before
        print(f"GZIP BOMB: peak RSS grew by {grown} KiB for a {len(bomb)} B bomb of 50 MiB "
              f"(limit {LIMIT >> 10} KiB)")
        assert grown * 1024 <= LIMIT, f"peak RSS grew by {grown} KiB"
        with urllib.request.urlopen(proc.url("/health"), timeout=10) as r:
            assert r.status == 200


@pytest.mark.parametrize("header_timeout", [1.0])
def test_idle_sockets_cannot_exhaust_descriptors(tmp_path: Path, header_timeout: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("this test opens 300 sockets of its own")
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    with AiwfdProcess(["serve", "-f", EXAMPLE, "-p", "0", "--mock", "--header-timeout", str(header_timeout)],
                      env={"TMPDIR": str(tmp_path)}, timeout=60) as proc:
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (256, 256))
        assert proc.port is not None
        idle: list[socket.socket] = []
        try:
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", proc.port), timeout=5))
            opened = time.monotonic()
            # The daemon is out of descriptors now; /health waits in the accept queue.
            with urllib.request.urlopen(proc.url("/health"), timeout=header_timeout + 15) as r:
                assert r.status == 200
            waited = time.monotonic() - opened
            print(f"IDLE SOCKETS: /health answered {waited:.2f}s after 300 idle sockets "
                  f"(header timeout {header_timeout:g}s, ulimit -n 256)")
            proc.wait_for_log(r"cannot accept connections \(Too many open files\)")
            # Before the header timeout: still waiting after 60 s. The bound is the
            # issue's (timeout + the listener's 1 s accept back-off) plus 2 s of slack
            # for a loaded CI machine; measured: the timeout itself.
            assert waited < header_timeout + 1 + 2
            # Every idle socket was closed by the daemon (EOF), none left hanging.
            for s in idle:
                s.settimeout(header_timeout + 10)
                assert s.recv(1) == b""
        finally:
            for s in idle:
                s.close()
