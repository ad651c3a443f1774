"""systemd's notify protocol (sd_notify), spoken only when NOTIFY_SOCKET is set.

Sending never blocks the event loop (SPEC §5). The manager's socket queues at
most `net.unix.max_dgram_qlen` unread datagrams (10 by default); a manager busy
with a `daemon-reload`, or a box under memory pressure, reads it late, and a
blocking send would then freeze every request until it does. So the socket is
non-blocking, and a message the socket does not take waits in one of two
slots: the newest state (READY=1, RELOADING=1, STOPPING=1: a newer one replaces
it, so systemd is never left believing a stale RELOADING=1) and a watchdog
ping (which must never displace READY=1). Both go out, state first, as soon as
the socket is writable (`loop.add_writer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Mapping

logger = logging.getLogger("aiwfd")

WATCHDOG = b"WATCHDOG=1"


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):  # abstract namespace
            path = "\0" + path[1:]
        self.address = path or None
        self._sock: socket.socket | None = None
        # Connected, not sendto(): poll() on an unconnected unix datagram
        # socket says "writable" while the peer's queue is full, and the
        # writer would spin; a connected one waits for the peer to read.
        self._connected = False
        self._state: bytes | None = None  # the newest state the socket has not taken
        self._ping: bytes | None = None  # a watchdog ping the socket has not taken
        self._waiting: asyncio.AbstractEventLoop | None = None  # the loop our writer is on
        self._full_since = 0.0
        self._warned_full = False  # once per process: a late manager tends to stay late
        self._last_errno: int | None = None  # one error line per cause, until a send succeeds
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX,
                                       socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        data = "\n".join(fields).encode()
        # Into its slot first, then out: while anything waits, a new message
        # must not overtake it with a direct send.
        if data == WATCHDOG:
            self._ping = data
        else:
            self._state = data
        self._flush()

    def _flush(self, wait: bool = True) -> None:
        """Send what waits, state first; on a full socket wait for it to be writable (`wait`)."""
        sock, address = self._sock, self.address
        while sock is not None and address is not None and (self._state is not None or self._ping is not None):
            is_state = self._state is not None
            data = self._state if is_state else self._ping
            assert data is not None
            try:
                if not self._connected:
                    sock.connect(address)
                    self._connected = True
                sock.send(data)
            except BlockingIOError:
                if not self._full_since:
                    self._full_since = time.monotonic()
                    log = logger.debug if self._warned_full else logger.warning
                    self._warned_full = True
                    log("sd_notify: NOTIFY_SOCKET is full (the service manager reads it late); "
                        "the newest state goes out when it takes it")
                if wait:
                    self._wait_writable()
                return
            except OSError as e:  # systemd gone (ECONNREFUSED, ENOENT): never fatal
                if e.errno != self._last_errno:
                    self._last_errno = e.errno
                    logger.error("sd_notify %s failed: %s", data.split(b"\n", 1)[0].decode(), e)
                # Nobody to tell: drop what waits; the next message connects again
                # (a manager restarted on the same path).
                self._connected = False
                self._state = self._ping = None
                break
            if is_state:
                self._state = None
            else:
                self._ping = None
            self._last_errno = None
            if self._full_since:
                logger.debug("sd_notify: the socket took the waiting messages after %.1f s",
                             time.monotonic() - self._full_since)
                self._full_since = 0.0
        self._stop_waiting()

    def _wait_writable(self) -> None:
        if self._waiting is not None or self._sock is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off a loop: the next send tries again
            return
        loop.add_writer(self._sock.fileno(), self._flush)
        self._waiting = loop

    def _stop_waiting(self) -> None:
        if self._waiting is not None and self._sock is not None:
            self._waiting.remove_writer(self._sock.fileno())
        self._waiting = None

    def ready(self) -> None:
        self.send("READY=1", f"STATUS=serving, pid {os.getpid()}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is None:
            return
        self._stop_waiting()
        # STOPPING=1 may still wait: one last try, without waiting. If the
        # socket is still full, the manager learns of the exit from SIGCHLD.
        self._flush(wait=False)
        self._sock.close()
        self._sock = None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1e6
    except ValueError:
        return None
