"""The daemon's life: start, serve, reload on SIGHUP, drain on SIGTERM/SIGINT.

Start-up problems raise ConfigError/StartupError before anything listens;
`cli.py` turns them into one line and an exit code, and ends the process
with the code of how the daemon stopped (`run` returns a `Stop`). Signal handlers are
installed before READY=1, so an early SIGHUP can never kill the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import gc
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Coroutine, Iterator

import aiohttp
from aiohttp import web

from aiwfd import __version__, telemetry
from aiwfd.http import quota
from aiwfd.http.app import create_app
from aiwfd.spec.compiler import Compiled, Memo, load_and_compile
from aiwfd.errors import ConfigError, RetryableStartupError, StartupError
from aiwfd.daemon.listener import GreedyTCPSite
from aiwfd.providers.base import transport_from_env
from aiwfd.logs import ProtocolErrorLogger, RequestLog
from aiwfd.http.middlewares import new_request_id
from aiwfd.daemon.notify import Notifier, watchdog_interval
from aiwfd.http.protocol import ConnectionFactory
from aiwfd.http.runtime import Phase, Runtime, Snapshot, build_snapshot
from aiwfd.settings import Settings
from aiwfd.http.job_runner import JobRunner
from aiwfd.jobs import open_job_store
from aiwfd.jobs.store import StoreError
from aiwfd.store.idempotency import open_idempotency
from aiwfd.store.limits import open_store

logger = logging.getLogger("aiwfd")

# How long a reload that changed auth.jwt waits for the new issuer's keys before it swaps.
VERIFIER_GRACE = 2.0

EPHEMERAL_PREFIX = "aiwfd-"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def ephemeral_root() -> Path:
    return Path(tempfile.gettempdir())


def remove_stale_ephemeral_dirs(root: Path | None = None) -> list[Path]:
    """Remove `aiwfd-<pid>-*` directories whose process is gone (a kill -9 leaves them)."""
    removed = []
    for d in (root or ephemeral_root()).glob(f"{EPHEMERAL_PREFIX}*-*"):
        pid_s = d.name[len(EPHEMERAL_PREFIX):].split("-", 1)[0]
        if not pid_s.isdigit() or int(pid_s) == os.getpid() or not d.is_dir():
            continue
        if _alive(int(pid_s)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Server:
    def __init__(self, settings: Settings, *, install_signals: bool = True,
                 request_log: RequestLog | None = None) -> None:
        self.settings = settings
        self.install_signals = install_signals
        self.request_log = request_log
        # What the process inherited (everything not read from the .env file);
        # a reload merges it with the file read again (Settings.reread_env).
        self._base_env = {k: v for k, v in settings.env.items()
                          if settings.env_file_values.get(k) != v}
        self.notifier = Notifier()
        self.transport = transport_from_env(settings.env)
        # What a reload reuses of the last compile (parsed types, schemas, validators).
        self.memo = Memo()
        self.runtime: Runtime | None = None
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ephemeral: Path | None = None
        self.stopped = asyncio.Event()
        self.interrupted = asyncio.Event()  # a second SIGINT: leave without finishing the drain
        self._stop_signals = 0
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._watchdog: asyncio.Task[None] | None = None
        self.port: int | None = None

    # ---------------------------------------------------------------- start

    async def start(self) -> None:
        s = self.settings
        compiled = load_and_compile(s.file, self.memo)
        # Before anything is served: its first request is traced too. A missing SDK is a start-up error.
        telemetry.start(s.env)
        for w in compiled.warnings:
            logger.warning("%s", w)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            json_serialize=None,  # type: ignore[arg-type]
        )
        try:
            snapshot = build_snapshot(compiled, s, self.session, self.transport)
        except StartupError:
            await self.session.close()
            await telemetry.stop()
            raise
        artifacts_dir = await asyncio.to_thread(self._prepare_artifacts_dir)
        # Written in a thread (openapi.json is built there, off the loop) while
        # the listener starts: 600 files of a 200-agent config take ~0.5 s on a
        # busy disk. The "serving" line and READY=1 wait for them.
        writing = asyncio.ensure_future(asyncio.to_thread(_write_artifacts, snapshot, artifacts_dir))
        self.runtime = Runtime(settings=s, snapshot=snapshot, artifacts_dir=str(artifacts_dir),
                               request_log=self.request_log or RequestLog(s.log_format),
                               store=open_store(s.redis_url),
                               # SPEC §8: the same store as the limits (Redis), else SQLite in the
                               # state directory, created at the first request with a key.
                               idempotency=open_idempotency(s.redis_url, s.state_path))
        rt = self.runtime
        shared: Any = rt.store  # the Redis store; the memory one has no deferred work
        if hasattr(shared, "on_finish_error"):
            # Redis sends finishes in batches after the call answered: their failures
            # are counted and logged as a failed finish was (quota.store_failed).
            shared.on_finish_error = lambda e: quota.store_failed(rt, "finish", e)
        await self._check_store(compiled)
        rt.jobs = open_job_store(s.redis_url, s.state_path, max_attempts=compiled.config.jobs.max_attempts)
        await self._check_jobs()
        if snapshot.verifier is not None:
            await snapshot.verifier.start()
        app = create_app(self.runtime)
        # auto_decompress off: aiwfd.http.body inflates bodies itself, within the size limit.
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    shutdown_timeout=1.0, logger=ProtocolErrorLogger(),
                                    keepalive_timeout=s.keepalive_timeout, auto_decompress=False)
        await self.runner.setup()
        assert self.runner.server is not None
        connections = ConnectionFactory(self.runner.server, header_timeout=s.header_timeout,
                                        new_id=new_request_id, report=self._report_rejected)
        site = GreedyTCPSite(self.runner, s.host, s.port, backlog=1024, reuse_address=True,
                             connections=connections)
        try:
            await site.start()
        except OSError as e:
            await asyncio.gather(writing, return_exceptions=True)
            await self._close_resources()
            raise RetryableStartupError(_bind_error(s.host, s.port, e)) from None
        self.port = _bound_port(site)
        if self.install_signals:
            self._install_signal_handlers()
        # Unique per process: a restarted instance must not take over the
        # leases of the one it replaced (they run out; then anyone claims them).
        owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        rt.job_runner = JobRunner(rt, rt.jobs, owner)
        rt.job_runner.start()
        try:
            await writing
        except OSError as e:
            await self._close_resources()
            raise RetryableStartupError(f"cannot write the compiled artifacts to {artifacts_dir}: "
                               f"{e.strerror or e}") from None
        if not snapshot.auth_required and not _is_loopback(s.host):
            logger.warning("neither API_KEY nor auth: is set and %s is not a loopback address: anyone "
                           "who can reach this port can call the agents", s.host)
        n = len(compiled.agents)
        store = self.runtime.store
        jobs = self.runtime.jobs
        # The jobs' store when it is not the limits' (Redis holds both): the SQLite file.
        own_jobs = f", jobs {jobs.description}" if jobs is not None and not jobs.shared else ""
        logger.info("aiwfd %s serving %s (%d agent%s%s, store %s%s) on http://%s:%d", __version__, s.file,
                    n, "" if n == 1 else "s", ", mock provider" if s.mock else "",
                    store.description if store is not None else "memory", own_jobs, _url_host(s.host), self.port)
        self.notifier.ready()
        interval = watchdog_interval()
        if interval:
            self._watchdog = asyncio.get_running_loop().create_task(self._watchdog_loop(interval))

    async def _check_store(self, compiled: Compiled) -> None:
        """Say what the limits will be worth. A Redis that does not answer is not
        fatal: the instance starts unready (/health/ready 503) and
        `limits.on_store_error` decides for the calls, as for a Redis lost later;
        exiting would only turn a Redis outage into a restart loop of every instance."""
        rt = self.runtime
        assert rt is not None and rt.store is not None
        limited = compiled.config.limits.default is not None or any(
            a.limits for a in compiled.config.assistants.values()) or any(
            k.limits for k in compiled.config.auth.keys) or bool(
            compiled.config.auth.jwt and compiled.config.auth.jwt.limits)
        if not rt.store.shared:
            if limited:
                logger.warning("limits are configured but REDIS_URL is not set: each instance counts "
                               "alone, so N instances behind one proxy let through N times the limits")
            return
        problem = await rt.store_problem()
        if problem is not None:
            logger.error("%s; starting unready (/health/ready answers 503) until it does", problem)

    async def _check_jobs(self) -> None:
        """The embedded job store must open: a state directory that cannot be
        written is the operator's to fix before a 202 can be a promise (exit 3,
        as for the artifacts directory). Redis is checked like the limits': an
        instance starts unready rather than restart in a loop."""
        rt = self.runtime
        assert rt is not None and rt.jobs is not None
        if rt.jobs.shared:  # the Redis of the limits, which _check_store just asked
            return
        try:
            await rt.jobs.ping()
        except StoreError as e:
            await self._close_resources()
            raise RetryableStartupError(f"cannot open the job store in {self.settings.state_path} ({e}); "
                                        "check --state-dir (AIWF_STATE_DIR) and its permissions") from None

    def _report_rejected(self, status: int, request_id: str, error_type: str) -> None:
        """A request the protocol refused before the app saw it: log and count it like any other."""
        rt = self.runtime
        if rt is not None:
            rt.request_log.write("-", "-", 0.0, status, request_id, error=error_type)
            rt.metrics.record_rejected(status)

    def _prepare_artifacts_dir(self) -> Path:
        if self.settings.output_dir:
            path = Path(self.settings.output_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        for d in remove_stale_ephemeral_dirs():
            logger.info("removed %s left by a process that no longer runs", d)
        self.ephemeral = Path(tempfile.mkdtemp(prefix=f"{EPHEMERAL_PREFIX}{os.getpid()}-"))
        return self.ephemeral

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self.on_stop_signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self.on_sighup)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ---------------------------------------------------------------- signals

    def on_stop_signal(self, signum: int) -> None:
        """Only sets state: `run` acts on it (the drain, or leaving at once)."""
        self._stop_signals += 1
        if self._stop_signals > 1:
            if signum == signal.SIGINT:
                logger.warning("second interrupt: exiting now")
                self.interrupted.set()
            return
        logger.info("%s: draining and shutting down", signal.Signals(signum).name)
        self.stopped.set()

    def on_sighup(self) -> None:
        if self.stopped.is_set():
            logger.info("SIGHUP while shutting down: not reloading")
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True  # coalesce a burst of SIGHUPs into one more reload
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again or self.stopped.is_set():
                return

    async def reload(self) -> bool:
        """Load the config again and swap it in; on any problem keep the old one."""
        ok = await self._reload()
        assert self.runtime is not None
        self.runtime.metrics.reload(ok)
        return ok

    async def _reload(self) -> bool:
        rt = self.runtime
        assert rt is not None
        self.notifier.reloading()
        started = asyncio.get_running_loop().time()
        try:
            settings = self.settings.reread_env(self._base_env)
            # Off the loop: compiling 200 agents is ~0.1 s of CPU that would
            # stall requests and the watchdog.
            compiled, snapshot = await asyncio.to_thread(self._build, settings)
        except ConfigError as e:
            for p in e.problems:
                logger.error("reload: %s", p)
            logger.error("reload failed: %d errors in %s; still serving the previous config",
                         len(e.problems), self.settings.file)
            self.notifier.ready()
            return False
        except StartupError as e:
            logger.error("reload failed: %s; still serving the previous config", e)
            self.notifier.ready()
            return False
        except Exception:  # a bug must not leave systemd waiting after RELOADING=1
            logger.exception("reload failed; still serving the previous config")
            self.notifier.ready()
            return False
        self.settings = settings
        rt.settings = settings
        fresh = snapshot.verifier if snapshot.verifier is not rt.snapshot.verifier else None
        if fresh is not None:
            # auth.jwt changed: give the new verifier a moment to load its keys
            # before it answers, so token calls are not 503 just after a reload.
            await fresh.start()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fresh.wait_ready(), VERIFIER_GRACE)
        old = rt.swap(snapshot)
        if rt.job_runner is not None:
            rt.job_runner.configure(snapshot)
            removed = set(old.compiled.agents) - set(snapshot.compiled.agents)
            if removed:
                await rt.job_runner.agents_removed(removed)
        for w in compiled.warnings:
            logger.warning("%s", w)
        live_ms = (asyncio.get_running_loop().time() - started) * 1000
        # New requests already use the new config; the files on disk follow
        # (openapi.json of 200 agents takes ~50 ms to build), then the log line
        # and READY=1 say that everything is done.
        try:
            await asyncio.to_thread(_write_artifacts, snapshot, rt.artifacts_dir)
        except OSError as e:
            logger.error("reload: could not write artifacts to %s: %s", rt.artifacts_dir, e)
        logger.info("reloaded %s: %d agents", settings.file, len(compiled.agents))
        logger.debug("reload: new config live after %.0f ms, artifacts written after %.0f ms",
                      live_ms, (asyncio.get_running_loop().time() - started) * 1000)
        self.notifier.ready()
        return True

    def _build(self, settings: Settings) -> tuple[Compiled, Snapshot]:
        """The config and the clients of a reload (in a thread, with the collector paused).

        Building a config allocates ~10^5 containers; with the collector on,
        the young collections they trigger cost ~80 ms of a 200-agent reload.
        """
        with collector_paused():
            compiled = self._load_if_changed(settings.file)
            assert self.runtime is not None
            return compiled, build_snapshot(compiled, settings, self.session, self.transport,
                                            previous=self.runtime.snapshot)

    # ---------------------------------------------------------------- stop

    def _load_if_changed(self, file: str) -> Compiled:
        """The running config again when no file it was read from changed (a
        SIGHUP to rotate a key in .env): a 200-agent compile is skipped."""
        assert self.runtime is not None
        current = self.runtime.snapshot.compiled
        if current.config.path == file and current.config.unchanged_on_disk():
            return current
        return load_and_compile(file, self.memo)

    async def drain(self) -> None:
        """Stop listening, finish in-flight requests, answer 503 to what is left."""
        rt, runner = self.runtime, self.runner
        assert rt is not None and runner is not None
        self.notifier.stopping()
        rt.enter(Phase.DRAINING)
        for site in list(runner.sites):
            await site.stop()
        # Keep-alive connections are closed politely: every answer from now on
        # carries `Connection: close` (middlewares.core), and idle ones close
        # at cleanup. aiohttp's RequestHandler.close() is not polite: it makes
        # the connection ignore further requests without answering them.
        timeout = self.settings.effective_shutdown_timeout(rt.snapshot.compiled.config)
        deadline = asyncio.get_running_loop().time() + timeout
        if rt.inflight_tasks:
            logger.info("waiting up to %gs for %d in-flight requests", timeout, len(rt.inflight_tasks))
        # Running jobs get the same deadline, then go back to the queue (SPEC §9.2).
        jobs = asyncio.ensure_future(rt.job_runner.drain(deadline)) if rt.job_runner is not None else None
        await self._wait_inflight(deadline)
        # Nothing runs now, but connections a proxy still has pooled stay open
        # until cleanup: an agent call arriving on one is answered 503 before
        # any model is called (nginx passes it on for free), instead of being
        # started and cut off unanswered by the runner's cleanup. One that
        # started between the wait above and this line gets the rest of the budget.
        rt.enter(Phase.CLOSING)
        await self._wait_inflight(deadline)
        if jobs is not None:
            await jobs

    async def _wait_inflight(self, deadline: float) -> None:
        """Wait for in-flight requests until `deadline`, then answer 503 to what is left."""
        rt = self.runtime
        assert rt is not None
        if not rt.inflight_tasks or rt.phase is Phase.ABORTING:
            return
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(rt.idle.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            logger.warning("shutdown timeout: answering 503 to %d requests still running",
                           len(rt.inflight_tasks))
            rt.enter(Phase.ABORTING)
            for task in list(rt.inflight_tasks):
                task.cancel()
            try:
                await asyncio.wait_for(rt.idle.wait(), 2.0)
            except asyncio.TimeoutError:
                pass

    async def _close_resources(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self.runtime is not None and self.runtime.job_runner is not None:
            # Already drained on a stop (then this returns at once); on a failed start, stopped now.
            await self.runtime.job_runner.drain(asyncio.get_running_loop().time())
        if self.runner is not None:
            await self.runner.cleanup()
        if self.runtime is not None:
            await self.runtime.close()
        if self.session is not None:
            await self.session.close()
        self._remove_ephemeral()
        await telemetry.stop()
        self.notifier.close()

    def _remove_ephemeral(self) -> None:
        if self.ephemeral is not None:
            shutil.rmtree(self.ephemeral, ignore_errors=True)
            self.ephemeral = None

    async def stop(self) -> None:
        """Drain and release everything (what SIGTERM does)."""
        try:
            await self.drain()
        finally:
            await self._close_resources()
        logger.info("stopped")

    async def serve(self) -> int:
        await self.start()
        # What is loaded by now (the SDKs' modules, the first config) lives as
        # long as the process: keep it out of the collector, whose full passes
        # over it stall the loop ~200 ms (requests, and the watchdog ping).
        # `aiwfd serve` starts with the collector off (cli.serve): on from here.
        gc.freeze()
        gc.enable()
        await self.stopped.wait()
        await self.stop()
        return 0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """gc.disable() for a burst of allocations that are all kept (or all freed by refcount)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_artifacts(snapshot: Snapshot, directory: str | Path) -> None:
    with collector_paused():  # the same burst of containers as a compile (openapi.json)
        snapshot.write_artifacts(directory)


def _bound_port(site: web.TCPSite) -> int:
    server: Any = site._server  # aiohttp keeps the asyncio.Server here
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    return int(site._port)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} already in use on {host} (pick another with --port)"
    reason = os.strerror(e.errno) if e.errno and not isinstance(e, socket.gaierror) else (e.strerror or str(e))
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
        return f"cannot listen on {host}:{port}: {reason} (check --host)"
    if e.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port}: {reason}"


class Stop(enum.Enum):
    """How the daemon stopped; cli.py turns it into the exit code."""

    CLEAN = "clean"               # drained, everything released
    INTERRUPTED = "interrupted"   # a second SIGINT during the drain


async def _until_stopped(server: Server) -> Stop:
    serving = asyncio.ensure_future(server.serve())
    interrupted = asyncio.ensure_future(server.interrupted.wait())
    await asyncio.wait({serving, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        interrupted.cancel()
        serving.result()  # a start-up error raises here
        return Stop.CLEAN
    server._remove_ephemeral()
    return Stop.INTERRUPTED


def run(settings: Settings) -> Stop:
    """Run the daemon until it stops. Start-up problems raise (everything is
    released first); after a second SIGINT the loop is left as it is, the
    drain and any thread still running: the caller ends the process at once."""
    loop = _event_loop()
    asyncio.set_event_loop(loop)
    try:
        stop = loop.run_until_complete(_until_stopped(Server(settings)))
    except BaseException:
        _close(loop)
        raise
    if stop is Stop.CLEAN:
        _close(loop)
    return stop


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the [speed] extra
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does on its way out: cancel what still runs, wait for it, close."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    cleanup: list[Coroutine[Any, Any, None]] = [loop.shutdown_asyncgens(), loop.shutdown_default_executor()]
    for step in cleanup:
        loop.run_until_complete(step)
    asyncio.set_event_loop(None)
    loop.close()
