"""The batch exporter: finished spans to an OTLP/HTTP collector, from the event loop.

    exporter = Exporter(settings); exporter.start()
    tracer = Tracer(settings.sampler, exporter.add)     # add: encode, queue
    ...
    await exporter.close(1.5)                           # what is queued, then stop

A span is encoded when it ends (aiwfd.telemetry.otlp, a few µs) and queued as
bytes; one task POSTs a batch when `max_batch` are queued or every
`schedule_delay`, as the SDK's BatchSpanProcessor does, but without its
thread: no lock per span, no GIL handed back and forth with the loop, and
the POST is aiohttp's, async. A collector that is slow or down never holds up
a request: one POST is in flight at a time, the queue is bounded, and what
does not fit is dropped and counted (logged once a minute, not per span).
Retries follow the OTLP/HTTP rules: 429, 502, 503 and 504 and connection
errors, with exponential backoff or the collector's Retry-After, within
`export_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import random
import time
from typing import TYPE_CHECKING

import aiohttp

from aiwfd import __version__
from aiwfd.telemetry.otlp import Batch, encode
from aiwfd.telemetry.settings import TraceSettings, redacted

if TYPE_CHECKING:
    from aiwfd.telemetry.spans import Span

__all__ = ["Exporter"]

logger = logging.getLogger("aiwfd")

_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 6
_WARN_EVERY = 60.0  # s: a collector that is down must not flood the log


class Exporter:
    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self._batch = Batch(settings.resource, "aiwfd", __version__)
        self._queue: list[bytes] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()  # set by close(): ends a retry's backoff
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exported = 0
        self.dropped = 0
        self._unreported = 0  # dropped since the last warning
        self._warned_at = -_WARN_EVERY
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": f"aiwfd/{__version__}",
                         **settings.headers}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="aiwfd-otlp-export")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The export task ended: said when it was not by close() (what is queued from now on is lost)."""
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            logger.error("traces: the export task failed (%r); no more spans will be exported", e, exc_info=e)
            self._closing = True

    def add(self, span: Span) -> None:
        """The tracer's sink: a finished sampled span. Never raises (it runs in a request)."""
        if self._closing:  # ended after stop(), or the task is gone: nobody would send it
            self.dropped += 1
            return
        if len(self._queue) >= self.settings.max_queue:
            self._lost(1, f"the queue is full (OTEL_BSP_MAX_QUEUE_SIZE={self.settings.max_queue})")
            return
        try:
            self._queue.append(encode(span))
        except Exception as e:  # a value the encoder cannot write: that span, not the request
            self._lost(1, f"a span could not be encoded ({e!r})")
            return
        if len(self._queue) >= self.settings.max_batch:
            self._wake_up()

    def _wake_up(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:  # a span that ended in another loop (or thread): the Event is the exporter loop's
            loop.call_soon_threadsafe(self._wake.set)

    async def close(self, timeout: float) -> bool:
        """Export what is queued within `timeout`; False when that did not finish.
        From another loop than start()'s (an in-process server's tests), what is
        queued is sent from this one."""
        task = self._task
        if task is None or task.done():
            was_closing, self._closing = self._closing, True
            if not self._queue or (task is not None and was_closing):
                return not self._queue
            return await self._flush_here(timeout)
        if task.get_loop() is not asyncio.get_running_loop():
            self._closing = True
            if not task.get_loop().is_closed():
                task.get_loop().call_soon_threadsafe(task.cancel)
            self._task = None
            return await self._flush_here(timeout)
        self._closing = True
        self._wake.set()
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
            return True
        except asyncio.TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False

    async def _flush_here(self, timeout: float) -> bool:
        """What is queued, from the running loop (the export task is gone or in another loop)."""
        self._closing = True
        self._wake, self._stopping = asyncio.Event(), asyncio.Event()  # the old ones may be bound to a closed loop
        try:
            await asyncio.wait_for(self._run(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        s = self.settings
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, ssl=s.ssl or True),
                                         auto_decompress=True) as session:
            while True:
                if not self._closing:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), s.schedule_delay)
                self._wake.clear()
                while self._queue:
                    batch, self._queue = self._queue[:s.max_batch], self._queue[s.max_batch:]
                    try:
                        await self._send(session, batch)
                    except Exception as e:  # a bug or an odd URL must not end tracing for the process
                        self._lost(len(batch), f"the export failed ({e!r})")
                    if len(self._queue) < s.max_batch and not self._closing:
                        break  # a partial batch waits for the next tick
                if self._closing and not self._queue:
                    return

    async def _send(self, session: aiohttp.ClientSession, spans: list[bytes]) -> None:
        s = self.settings
        body = self._batch.request(spans)
        if s.gzip:
            body = await asyncio.to_thread(gzip.compress, body, 6)  # zlib lets go of the GIL: off the loop
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.export_timeout
        problem = ""
        for attempt in range(_MAX_ATTEMPTS):
            retry_after = None
            left = deadline - loop.time()
            try:
                async with session.post(s.endpoint, data=body, headers=self._headers,
                                        timeout=aiohttp.ClientTimeout(total=min(s.timeout, max(left, 0.001)))) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        self.exported += len(spans)
                        return
                    problem, retryable = f"HTTP {r.status}", r.status in _RETRYABLE
                    retry_after = _seconds(r.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                problem, retryable = _describe(e), True
            backoff = retry_after if retry_after is not None else (2 ** attempt) * random.uniform(0.8, 1.2)
            if not retryable or self._closing or loop.time() + backoff > deadline or attempt + 1 == _MAX_ATTEMPTS:
                break
            # close() must not wait out a backoff (a Retry-After of 20 s): it ends the wait.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._closing:
                break
        self._lost(len(spans), f"the export to {redacted(s.endpoint)} failed ({problem})")

    def _lost(self, n: int, why: str) -> None:
        self.dropped += n
        self._unreported += n
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            logger.warning("traces: %s; %d span(s) dropped since the last warning", why, self._unreported)
            self._warned_at, self._unreported = now, 0


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (the date form is not worth parsing for a collector)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
