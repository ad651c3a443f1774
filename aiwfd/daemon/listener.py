"""A TCP site that accepts every waiting connection at once.

uvloop's listener (libuv ≥ 1.45, libuv#3696) accepts one connection per loop
iteration. On a saturated instance one iteration is long (it serves every
ready connection), so a burst of new connections waits in the kernel's accept
queue for seconds: with 256 fresh clients against a busy server, p99 was
1-4 s while p50 was 150 ms (BENCHMARKS.md). asyncio's own loop accepts up to
`backlog` connections per readiness event; this site does the same on any
loop, uvloop included, and hands each socket to aiohttp's protocol with
`connect_accepted_socket`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any, Callable

from aiohttp import web

logger = logging.getLogger("aiwfd")

# Out of file descriptors or memory: stop accepting for a moment, as asyncio
# does, instead of spinning on a listener that stays readable.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY_DELAY = 1.0


class Listener:
    """The listening sockets of one site; quacks like the asyncio.Server aiohttp keeps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 protocol_factory: Any, backlog: int) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = protocol_factory
        self._backlog = backlog
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        for sock in sockets:
            self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    logger.error("accept() failed: %s", e)
                    return
                logger.warning("cannot accept connections (%s); retrying in %gs", e.strerror, ACCEPT_RETRY_DELAY)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._watch, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the client left between accept() and here
            conn.close()

    def close(self) -> None:
        """Stop listening: new connections are refused from now on."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()


class GreedyTCPSite(web.TCPSite):
    """aiohttp's TCPSite, listening through `Listener` instead of loop.create_server.

    `connections` makes the protocol of each accepted socket (default: the
    runner's server, i.e. aiohttp's RequestHandler).
    """

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None, *,
                 connections: Callable[[], asyncio.Protocol] | None = None, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        sockets = await bind(loop, self._host, self._port, self._backlog, reuse_address=bool(self._reuse_address))
        factory = self._connections or self._runner.server
        self._server = Listener(loop, sockets, factory, self._backlog)  # type: ignore[assignment]
        self._bound_port = sockets[0].getsockname()[1]


async def bind(loop: asyncio.AbstractEventLoop, host: str | None, port: int, backlog: int, *,
               reuse_address: bool) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as loop.create_server binds them."""
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for af, socktype, proto, _canon, sa in dict.fromkeys(infos):
            sock = socket.socket(af, socktype, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            if af == socket.AF_INET6:
                # One socket per family, as asyncio does: no dual-stack surprise on "::".
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
            try:
                sock.bind(sa)
            except OSError as err:
                raise OSError(err.errno, f"error while attempting to bind on address {sa!r}: "
                                         f"{(err.strerror or '').lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"{host} resolves to no address")
    return sockets
