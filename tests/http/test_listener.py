"""GreedyTCPSite: every waiting connection is accepted at once, on asyncio and on uvloop.

uvloop's own listener accepts one connection per loop iteration, which left a
burst of new clients seconds in the accept queue of a busy server. These tests
run a real aiohttp app on each loop and real client sockets.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from aiwfd.daemon.listener import GreedyTCPSite, Listener

uvloop = pytest.importorskip("uvloop")

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def hello(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def with_site(body: Callable[[GreedyTCPSite], Awaitable[Any]], host: str = "127.0.0.1", port: int = 0) -> Any:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = GreedyTCPSite(runner, host, port, backlog=1024, reuse_address=True)
    try:
        await site.start()
        return await body(site)
    finally:
        await runner.cleanup()


def listener(site: GreedyTCPSite) -> Listener:
    server = site._server
    assert isinstance(server, Listener)
    return server


async def get(port: int, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.parametrize("loop", LOOPS)
def test_one_readiness_event_accepts_the_whole_queue(loop: str) -> None:
    async def body(site: GreedyTCPSite) -> None:
        lst = listener(site)
        sock = lst.sockets[0]
        # The kernel completes these handshakes on its own; they wait in the
        # accept queue until the loop runs the listener's callback.
        clients = [socket.create_connection(("127.0.0.1", site.port)) for _ in range(64)]
        try:
            lst._accept(sock)
            with pytest.raises(BlockingIOError):  # nothing left waiting
                sock.accept()
            for c in clients:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = await asyncio.gather(*(asyncio.to_thread(read_all, c) for c in clients))
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        finally:
            for c in clients:
                c.close()

    LOOPS[loop](with_site(body))


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("loop", LOOPS)
def test_serves_then_refuses_after_stop(loop: str) -> None:
    async def body(site: GreedyTCPSite) -> None:
        port = site.port
        assert port != 0
        assert b'{"ok": true}' in await get(port)
        await site.stop()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    LOOPS[loop](with_site(body))


def test_burst_of_connections_all_answered_on_uvloop() -> None:
    async def body(site: GreedyTCPSite) -> None:
        answers = await asyncio.gather(*(get(site.port) for _ in range(300)))
        assert sum(a.startswith(b"HTTP/1.1 200") for a in answers) == 300

    uvloop.run(with_site(body))


def test_localhost_binds_every_family_it_resolves_to() -> None:
    families = {ai[0] for ai in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}

    async def body(site: GreedyTCPSite) -> None:
        socks = listener(site).sockets
        assert {s.family for s in socks} == families
        for s in socks:
            host = "::1" if s.family == socket.AF_INET6 else "127.0.0.1"
            assert b"200 OK" in await get(s.getsockname()[1], host)

    asyncio.run(with_site(body, host="localhost"))


def test_port_in_use_is_an_oserror_with_its_errno() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def body(_site: GreedyTCPSite) -> None:
            raise AssertionError("the site started on a port in use")

        with pytest.raises(OSError) as info:
            asyncio.run(with_site(body, port=port))
        assert info.value.errno == errno.EADDRINUSE
