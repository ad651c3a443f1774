"""systemd's notify protocol (SPEC §5), spoken by a real `aiwfd serve` process.

The test plays systemd: it binds a unix datagram socket, passes it as
NOTIFY_SOCKET and reads what the daemon sends, with the time each arrived.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest

from tests.utils import CONFIGS, LISTEN_RE, AiwfdProcess, run_cli

LIFE = str(CONFIGS / "life_basic.yaml")
# Not contacted: the agents are never called, but the provider needs a key and a URL.
OFFLINE = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
# Event-driven waits: generous, they cost nothing when things go well (busy CI machines).
START_TIMEOUT = 60.0

Message = dict[str, str]
BAD_PROVIDER = (CONFIGS / "life_bad_provider.yaml").read_text(encoding="utf-8")


class NotifySocket:
    """A NOTIFY_SOCKET: a thread receives the datagrams and stamps their arrival."""

    def __init__(self, address: str, on_message: Callable[[Message], None] | None = None) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)  # lets close() stop the thread
        self.messages: list[Message] = []
        self.times: list[float] = []
        self.on_message = on_message
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            if self.on_message is not None:
                self.on_message(msg)
            with self._cond:
                self.messages.append(msg)
                self.times.append(arrived)
                self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(self, key: str, start: int = 0, timeout: float = START_TIMEOUT) -> int:
        """Index of the first message from `start` that sets `key`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.messages):
                    if key in self.messages[i]:
                        return i
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {key} datagram; got {self.messages[start:]}")
                self._cond.wait(remaining)

    def wait_count(self, key: str, n: int, start: int = 0, timeout: float = START_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [i for i in range(start, len(self.messages)) if key in self.messages[i]]
                if len(found) >= n:
                    return found[:n]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(found)} of {n} {key} datagrams")
                self._cond.wait(remaining)

    def states(self, start: int = 0) -> list[str]:
        """The protocol states sent, in order, without the watchdog pings."""
        with self._cond:
            return [k for m in self.messages[start:] for k in m
                    if k in ("READY", "RELOADING", "STOPPING")]

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100, "AF_UNIX path too long"
    sock = NotifySocket(path)
    yield sock
    sock.close()


def env_for(notify_socket: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**OFFLINE, "NOTIFY_SOCKET": notify_socket, "TMPDIR": str(tmp_path), **extra}


def health(base: str) -> dict[str, object]:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200
        return orjson.loads(r.read())


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------- the life cycle


def test_ready_reloading_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    cfg = tmp_path / "agents.yaml"
    cfg.write_text((CONFIGS / "life_basic.yaml").read_text())
    with AiwfdProcess(["serve", "-f", str(cfg), "-p", "0"], env=env_for(notify.env_value, tmp_path),
                      timeout=START_TIMEOUT) as proc:
        i = notify.wait_for("READY")
        assert notify.messages[i]["READY"] == "1"
        assert f"pid {proc.pid}" in notify.messages[i].get("STATUS", "")
        assert health(proc.base)["status"] == "ok"  # READY means listening

        # A good reload: RELOADING=1 with the time it began, then READY=1.
        mark = len(notify)
        before = monotonic_usec()
        proc.send(signal.SIGHUP)
        r = notify.wait_for("RELOADING", mark)
        after_ready = notify.wait_for("READY", r)
        assert notify.messages[r]["RELOADING"] == "1"
        usec = notify.messages[r]["MONOTONIC_USEC"]
        assert re.fullmatch(r"\d+", usec)
        assert before <= int(usec) <= monotonic_usec()  # CLOCK_MONOTONIC, microseconds
        assert notify.states(mark) == ["RELOADING", "READY"]
        proc.wait_for_log("reloaded ")
        assert after_ready > r

        # A failed reload also ends in READY=1: the old config is still being served.
        cfg.write_text((CONFIGS / "life_invalid.yaml").read_text())
        mark = len(notify)
        proc.send(signal.SIGHUP)
        notify.wait_for("READY", notify.wait_for("RELOADING", mark))
        assert notify.states(mark) == ["RELOADING", "READY"]
        proc.wait_for_log("reload failed")
        assert health(proc.base)["status"] == "ok"

        # So does a reload that fails after the file loaded (a provider that cannot be built).
        cfg.write_text(BAD_PROVIDER)
        mark, logs = len(notify), len(proc.lines)
        proc.send(signal.SIGHUP)
        notify.wait_for("READY", notify.wait_for("RELOADING", mark))
        assert notify.states(mark) == ["RELOADING", "READY"]
        proc.wait_for_log("reload failed", start=logs)

        mark = len(notify)
        proc.send(signal.SIGTERM)
        notify.wait_for("STOPPING", mark)
        assert proc.wait(15) == 0
    assert notify.states() == ["READY"] + ["RELOADING", "READY"] * 3 + ["STOPPING"]
    assert "Traceback" not in proc.stderr
    assert all(m[k] == "1" for m in notify.messages for k in ("READY", "RELOADING", "STOPPING") if k in m)


@pytest.mark.parametrize("sig, abstract", [(signal.SIGHUP, True), (signal.SIGTERM, False)],
                         ids=["SIGHUP-abstract-socket", "SIGTERM-path-socket"])
def test_signal_right_after_ready_is_handled(tmp_path: Path, sig: signal.Signals, abstract: bool) -> None:
    """Handlers are installed before READY=1: a signal sent the instant it arrives is handled.

    The SIGHUP case also shows the abstract-namespace form of NOTIFY_SOCKET (`@name`).
    """
    holder: dict[str, AiwfdProcess] = {}
    sent = threading.Event()

    def on_message(msg: Message) -> None:
        if "READY" in msg and not sent.is_set():
            sent.set()
            holder["proc"].send(sig)  # from the receiving thread, at once

    address = (f"@aiwfd-test-{os.getpid()}-{uuid.uuid4().hex[:12]}" if abstract
               else str(tmp_path / "notify.sock"))
    ns = NotifySocket(address, on_message)
    try:
        proc = AiwfdProcess(["serve", "-f", LIFE, "-p", "0"], env=env_for(ns.env_value, tmp_path), wait_ready=False,
                            timeout=START_TIMEOUT)
        holder["proc"] = proc
        with proc:
            first = ns.wait_for("READY")
            assert sent.wait(10)
            if sig == signal.SIGHUP:
                ns.wait_for("READY", ns.wait_for("RELOADING", first + 1))
                proc.wait_for_log("reloaded ")
                assert proc.proc.poll() is None
                m = LISTEN_RE.search(proc.wait_for_log(LISTEN_RE.pattern))
                assert m
                assert health(f"http://{m.group(1)}:{m.group(2)}")["status"] == "ok"
                proc.send(signal.SIGTERM)
            assert proc.wait(15) == 0
            ns.wait_for("STOPPING", first)
        expected = ["READY", "RELOADING", "READY", "STOPPING"] if sig == signal.SIGHUP else ["READY", "STOPPING"]
        assert ns.states() == expected
        assert "Traceback" not in proc.stderr
    finally:
        ns.close()


def test_watchdog_pings_at_half_the_interval(tmp_path: Path, notify: NotifySocket) -> None:
    with AiwfdProcess(["serve", "-f", LIFE, "-p", "0"],
                      env=env_for(notify.env_value, tmp_path, WATCHDOG_USEC="400000"),
                      timeout=START_TIMEOUT) as proc:
        ready = notify.wait_for("READY")
        # ~2 s of pings, with reloads (compiling, building clients) going on in the second half.
        first = notify.wait_count("WATCHDOG", 6, ready)
        for _ in range(3):
            mark = len(proc.lines)
            proc.send(signal.SIGHUP)
            proc.wait_for_log("reloaded ", start=mark)
        pings = notify.wait_count("WATCHDOG", 11, ready)
        assert pings[:6] == first
        proc.send(signal.SIGTERM)
        assert proc.wait(15) == 0
    times = [notify.times[i] for i in pings]
    assert all(notify.messages[i]["WATCHDOG"] == "1" for i in pings)
    assert times[0] - notify.times[ready] < 0.4
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Every 0.2 s (half of WATCHDOG_USEC); 0.4 s would be a missed deadline.
    assert max(gaps) < 0.4, gaps
    assert 0.15 < statistics.median(gaps) < 0.3, gaps


# ---------------------------------------------------------------- start-up failures


@pytest.mark.parametrize("case", ["invalid config", "missing key", "port in use"])
def test_failed_start_never_sends_ready(tmp_path: Path, case: str) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    listener = socket.socket()
    try:
        env = env_for(path, tmp_path)
        args = ["serve", "-f", LIFE, "-p", "0"]
        if case == "invalid config":
            args[2] = str(CONFIGS / "life_invalid.yaml")
            expect = r"life_invalid\.yaml:17: assistants\.broken: missing key 'model'"
        elif case == "missing key":
            del env["OPENAI_API_KEY"]
            expect = r"OPENAI_API_KEY not set"
        else:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            args[4] = str(listener.getsockname()[1])
            expect = r"already in use"
        done = run_cli(args, env=env, timeout=30)
        assert done.returncode != 0
        assert re.search(expect, done.stderr), done.stderr
        assert "Traceback" not in done.stderr
        # The process is gone: whatever it sent is already queued.
        sock.setblocking(False)
        sent = []
        while True:
            try:
                sent.append(sock.recv(65536).decode())
            except BlockingIOError:
                break
        assert not any("READY=1" in s for s in sent), sent
        assert list(tmp_path.glob("aiwfd-*")) == []  # no ephemeral directory left behind
    finally:
        listener.close()
        sock.close()
