"""systemd's notify protocol (SPEC §5), spoken by a real `aiwfd serve` process.

The test plays systemd: it binds a unix datagram socket, passes it as
NOTIFY_SOCKET and reads what the daemon sends, with the time each arrived.
It can also play a late systemd (one busy with a `daemon-reload`), which
leaves its socket unread while the daemon keeps serving. The Notifier's own
queueing is also tested in-process, on both event loops the daemon runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import logging
import math
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
import uvloop

from aiwfd.daemon.notify import Notifier
from aiwfd.testing.processes import LISTEN_RE, AiwfdProcess, run_cli
from tests.conftest import CONFIGS

LIFE = str(CONFIGS / "life_basic.yaml")
# Not contacted: the agents are never called, but the provider needs a key and a URL.
OFFLINE = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
# Event-driven waits: generous, they cost nothing when things go well (busy CI machines).
START_TIMEOUT = 60.0

Message = dict[str, str]
BAD_PROVIDER = (CONFIGS / "life_bad_provider.yaml").read_text(encoding="utf-8")


class NotifySocket:
    """A NOTIFY_SOCKET: a thread receives the datagrams and stamps their arrival."""

    def __init__(self, address: str, on_message: Callable[[Message], None] | None = None,
                 reading: threading.Event | None = None) -> None:
        """`reading`: the socket is left unread until it is set (a late manager)."""
        self.env_value = address
        self.reading = reading
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
            if self.reading is not None and not self.reading.wait(0.1):
                continue
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

    def wait_len(self, n: int, timeout: float = START_TIMEOUT) -> None:
        """Until `n` messages have arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(self.messages)} of {n} datagrams")
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


# ---------------------------------------------------------------- a manager that reads late


def fill(sock: socket.socket) -> int:
    """Fill the manager's queue from another socket, as other services would
    (systemd has one notify socket for all); how many datagrams it holds."""
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    n = 0
    try:
        while True:
            other.sendto(b"X=1", sock.getsockname())
            n += 1
    except BlockingIOError:
        return n
    finally:
        other.close()


def test_a_late_manager_never_stalls_requests(tmp_path: Path) -> None:
    """Issue 12: nobody reads the socket while 50 reloads and a load run.

    The manager's queue holds net.unix.max_dgram_qlen + 1 datagrams. A blocking
    send then froze the loop, and every request with it, until the socket was
    read. Now no request waits, and once the socket is read the newest state
    (READY=1) follows what was queued, not the stale RELOADING=1 after it.

    The socket is read once the 50 reloads are done, or after 5 s at the
    latest: a frozen loop (no reload gets done) still ends, in a >1 s request.
    """
    reading = threading.Event()
    ns = NotifySocket(str(tmp_path / "notify.sock"), reading=reading)
    # Room for three of the daemon's messages: READY=1, then the first reload's two.
    capacity = fill(ns.sock)
    for _ in range(3):
        ns.sock.recv(65536)
    stop_load = threading.Event()
    latencies: list[tuple[str, float]] = []  # (request, seconds), from every load thread
    errors: list[str] = []

    def load(port: int, path: str, body: bytes | None) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while not stop_load.is_set():
                started = time.monotonic()
                try:
                    conn.request("POST" if body else "GET", path, body=body,
                                 headers={"Content-Type": "application/json"} if body else {})
                    with conn.getresponse() as r:
                        r.read()
                        if r.status != 200:
                            errors.append(f"{path}: {r.status}")
                except (OSError, http.client.HTTPException) as e:
                    errors.append(f"{path}: {e!r} after {time.monotonic() - started:.1f}s")
                    latencies.append((path, math.inf))
                    conn.close()
                    continue
                latencies.append((path, time.monotonic() - started))
        finally:
            conn.close()

    try:
        with AiwfdProcess(["serve", "-f", LIFE, "--mock", "-p", "0"], env=env_for(ns.env_value, tmp_path),
                          timeout=START_TIMEOUT) as proc:
            assert proc.port is not None
            # The deliberate part: the socket stays unread until the reloads are
            # done, or for 5 s if they never are (a frozen loop), whatever happens meanwhile.
            late = threading.Timer(5.0, reading.set)
            late.start()
            threads = [threading.Thread(target=load, args=a, daemon=True) for a in
                       [(proc.port, "/health", None), (proc.port, "/agent/greeter", b'{"name": "Ann"}')]]
            for t in threads:
                t.start()
            try:
                for _ in range(50):  # one at a time: 100 state messages, none coalesced
                    mark = len(proc.lines)
                    proc.send(signal.SIGHUP)
                    proc.wait_for_log("reloaded ", start=mark, timeout=START_TIMEOUT)
                reloads_done_unread = not reading.is_set()
                assert len(ns) == 0  # nothing was read meanwhile
                late.cancel()
                reading.set()
                # Read at last: what was queued, then what the daemon kept for later.
                ns.wait_len(capacity + 1)
            finally:
                stop_load.set()
                late.cancel()
                reading.set()
                for t in threads:
                    t.join(15)
            mark = len(ns)
            proc.send(signal.SIGTERM)
            ns.wait_for("STOPPING", mark)
            assert proc.wait(15) == 0
        slowest = max(latencies, key=lambda x: x[1])
        assert slowest[1] < 1.0, f"slowest of {len(latencies)} requests: {slowest[0]} {slowest[1]:.2f}s"
        assert not errors, errors[:5]
        assert len(latencies) > 100 and any(p == "/agent/greeter" for p, _ in latencies)
        assert reloads_done_unread, "the 50 reloads took longer than 5 s: the socket was read before they were done"
        # What fitted, then the newest state (the 50th reload's READY=1), not the
        # second reload's RELOADING=1 that did not fit; then STOPPING=1.
        assert ns.states() == ["READY", "RELOADING", "READY", "READY", "STOPPING"], ns.states()
        assert "READY" in ns.messages[capacity]
        assert proc.stderr.count("NOTIFY_SOCKET is full") == 1  # one warning, not one per message
        assert "Traceback" not in proc.stderr and " error: " not in proc.stderr
    finally:
        ns.close()


# ---------------------------------------------------------------- the Notifier in-process

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}  # `aiwfd serve` runs on uvloop when installed


@contextlib.contextmanager
def never_blocks(seconds: float = 10.0) -> Iterator[None]:
    """A send that blocks (as one to a full socket did) fails the test instead of hanging the run."""
    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def drain(sock: socket.socket) -> list[str]:
    """What sits in the manager's queue, first line of each message."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(65536).decode().split("\n", 1)[0])
        except BlockingIOError:
            return got


async def receive(sock: socket.socket) -> str:
    """The next message, waiting for it on the loop (the Notifier's writer runs meanwhile)."""
    sock.setblocking(False)
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), 10)
    return data.decode().split("\n", 1)[0]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The manager's socket, never read unless the test reads it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


class CountingNotifier(Notifier):
    """Counts the attempts to send (one per message, one per writer call)."""

    flushes = 0

    def _flush(self, wait: bool = True) -> None:
        self.flushes += 1
        super()._flush(wait)


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
def test_full_socket_keeps_the_newest_state_and_the_ping(manager: socket.socket, run: Callable[..., None],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "aiwfd")
    queued = fill(manager)
    notifier = CountingNotifier({"NOTIFY_SOCKET": manager.getsockname()})

    async def main() -> None:
        started = time.monotonic()
        notifier.ready()
        for _ in range(30):
            notifier.reloading()
            notifier.watchdog()
            notifier.ready()
        notifier.watchdog()
        assert time.monotonic() - started < 0.5  # never waited for the socket
        # A writer that fired while the queue is still full would spin: it waits instead.
        calls = notifier.flushes  # one per message so far
        for _ in range(100):
            await asyncio.sleep(0)
        assert notifier.flushes == calls
        # Read at last: the newest state, then one ping (it never displaced READY=1), then nothing.
        assert drain(manager) == ["X=1"] * queued
        assert [await receive(manager), await receive(manager)] == ["READY=1", "WATCHDOG=1"]
        assert notifier.flushes == calls + 1  # one writer call sent both
        assert notifier._waiting is None  # and removed the writer
        assert drain(manager) == []
        # Full again: a second episode is logged at debug level, not warned about again.
        queued2 = fill(manager)
        notifier.reloading()
        notifier.ready()
        assert drain(manager) == ["X=1"] * queued2
        assert await receive(manager) == "READY=1"
        notifier.close()

    with never_blocks():
        run(main())
    warnings = [r for r in caplog.records if "is full" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.DEBUG]


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
def test_close_tries_stopping_once_and_never_blocks(manager: socket.socket, run: Callable[..., None]) -> None:
    fill(manager)
    notifier = Notifier({"NOTIFY_SOCKET": manager.getsockname()})

    async def main() -> None:
        notifier.stopping()
        manager.recv(65536)  # room for one, but the loop never gets to run the writer
        started = time.monotonic()
        notifier.close()  # the last try sends it
        assert drain(manager)[-1] == "STOPPING=1"
        # Still full at close: given up at once, and no writer left on a closed socket.
        again = Notifier({"NOTIFY_SOCKET": manager.getsockname()})
        fill(manager)
        again.stopping()
        again.close()
        assert time.monotonic() - started < 0.5
        assert again._waiting is None and again._sock is None
        again.stopping()  # after close: nothing, no error

    with never_blocks():
        run(main())


def test_manager_gone_is_logged_once_then_found_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "notify.sock")
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(path)
    gone.close()  # the path is left behind, with nobody bound to it: ECONNREFUSED
    notifier = Notifier({"NOTIFY_SOCKET": path})

    async def main() -> None:
        for _ in range(5):
            notifier.watchdog()
            notifier.ready()
        assert notifier._waiting is None  # not waiting for a socket nobody reads
        # A manager back on the same path (restarted) gets the next message.
        os.unlink(path)
        back = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        back.bind(path)
        try:
            notifier.ready()
            assert drain(back) == ["READY=1"]
        finally:
            back.close()
        notifier.close()

    with never_blocks():
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert os.strerror(errno.ECONNREFUSED) in errors[0].getMessage()
