"""Idempotency keys (SPEC §9.4): the store's interface and its embedded backend, SQLite.

A key's life, in the store::

    claim ──absent or expired──→ running (owned by a token, until the lease ends)
      │                            ├── complete(token, answer) → done (kept `ttl`, 24 h)
      │                            └── release(token)          → absent (a 5xx: the next try runs)
      ├── running, same body  → Running   (the caller answers 409)
      ├── done, same body     → Done      (the caller replays the stored answer)
      └── another body        → Mismatch  (the caller answers 422)

The in-progress lease is what frees the key of a request whose instance was
killed: nobody completes or releases it, and once the lease (the call's
deadline plus a margin) has passed, the next claim finds it expired. A
`complete` or `release` by a token whose lease has passed and been taken
over does nothing, so a late first request never overwrites the answer of
the one that took its key over.

What is stored is an `Answer`: status, the headers worth replaying
(`Location` of a job, the content type) and the body bytes. A job submission
stores its 202 with `Location` and the job document the same way a call
stores its 200.

Two backends: `SqliteIdempotency` here (a file in the state directory; the
instances of one host that share the directory share the keys) and
aiwfd/store/redis_idempotency.py (`REDIS_URL`: the whole fleet). `open_idempotency`
picks one. Every failure is raised as StoreError, as the limits store does.

SQLite runs on one thread of its own per store (the stdlib `sqlite3`): the
connection is only ever used by that thread (sqlite3 objects are not safe to
share between threads at once), each operation is one short transaction, and
the event loop only awaits a future. aiosqlite is the same design (a thread
per connection and a queue) as a dependency; the stdlib needs none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, TypeVar

from aiwfd.store.base import StoreError

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "FILE_NAME",
    "Answer",
    "Claim",
    "IdempotencyStore",
    "SqliteIdempotency",
    "StoreError",
    "open_idempotency",
]

FILE_NAME = "idempotency.sqlite3"
# How long one instance waits for another's write lock on the file: each
# transaction holds it for well under a millisecond, so this is only reached
# when the disk stalls; then the request gets a 503 (StoreError), not a hang.
BUSY_TIMEOUT = 5.0
# Expired rows are deleted at most this often (by a claim): the table stays
# the size of the last 24 h of keys without a sweeper task of its own.
PURGE_EVERY = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """The answer stored for a key, replayed as it was sent."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def meta(self) -> str:
        """Status and headers as one line of JSON (the stored form of both backends)."""
        return json.dumps({"status": self.status, "headers": [list(h) for h in self.headers]},
                          separators=(",", ":"))

    @classmethod
    def from_meta(cls, meta: str | bytes, body: bytes) -> "Answer":
        doc = json.loads(meta)
        return cls(int(doc["status"]), tuple((str(k), str(v)) for k, v in doc["headers"]), bytes(body))


@dataclass(frozen=True)
class Claim:
    """What `claim` found.

    - acquired: the key is this request's now; `token` completes or releases it;
    - running: another request holds it (its lease ends in `retry_after` s);
    - done: `answer` is the stored answer (same body);
    - mismatch: the key was used with another body.
    """

    state: Literal["acquired", "running", "done", "mismatch"]
    token: str = ""
    answer: Answer | None = None
    retry_after: float = 0.0


class IdempotencyStore(Protocol):
    """SqliteIdempotency or aiwfd.store.redis_idempotency.RedisIdempotency.
    Keys are opaque strings (the caller makes them per client and route);
    every operation is one round trip (one transaction)."""

    description: str

    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        """Take `key` for `lease` seconds if it is free (absent or expired), else say who has it."""
        ...

    async def complete(self, key: str, token: str, answer: Answer, ttl: float) -> bool:
        """Store `answer` for `ttl` seconds; False when `token` no longer holds the key."""
        ...

    async def release(self, key: str, token: str) -> None:
        """Free `key` (nothing stored: the next claim runs); nothing when `token` no longer holds it."""
        ...

    async def close(self) -> None:
        ...


def new_token() -> str:
    return secrets.token_hex(16)


def open_idempotency(redis_url: str | None, state_path: Path, *, timeout: float = 0.5,
                     prefix: str = "aiwfd:") -> IdempotencyStore:
    """The Redis backend when `redis_url` is set (the `redis` package imported
    only then), else SQLite in `state_path`. Nothing is opened yet: SQLite
    creates its directory and file on first use, Redis connects on first use."""
    if redis_url:
        from aiwfd.store.redis_idempotency import RedisIdempotency

        return RedisIdempotency(redis_url, timeout=timeout, prefix=prefix)
    return SqliteIdempotency(state_path / FILE_NAME)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    token TEXT,             -- the owner's while running; NULL once the answer is stored
    expires REAL NOT NULL,  -- epoch seconds: the lease's end while running, the answer's after
    status INTEGER,
    meta TEXT,
    body BLOB
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires);
"""


class SqliteIdempotency:
    """Idempotency keys in one SQLite file (WAL), shared by every process that opens it.

    Times are the host's wall clock (`time.time()`): every instance sharing
    the file is on this host. Each claim is a `BEGIN IMMEDIATE` transaction,
    so two instances claiming one key are serialised by SQLite's write lock:
    exactly one inserts the row.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self._clock = clock
        # One thread owns the connection: operations never run at once, and
        # the loop never waits on the disk or on another instance's lock.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiwfd-idem")
        self._conn: sqlite3.Connection | None = None
        self._purged = float("-inf")
        self._closed = False

    # -- on the store's thread ----------------------------------------------

    def _connection(self) -> "sqlite3.Connection":
        if self._conn is None:
            import sqlite3  # here: a start that never sees a key never loads it

            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level None: no implicit transactions; each operation opens its own.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # WAL with synchronous=NORMAL: a commit survives a crash of the
                # process (kill -9); only a power loss can lose the last ones.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        conn = self._connection()
        now = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if now - self._purged >= PURGE_EVERY:
                self._purged = now
                conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
            row = conn.execute("SELECT fingerprint, token, expires, status, meta, body FROM idempotency "
                               "WHERE key = ?", (key,)).fetchone()
            if row is not None and row[2] <= now:
                conn.execute("DELETE FROM idempotency WHERE key = ?", (key,))
                row = None
            if row is None:
                token = new_token()
                conn.execute("INSERT INTO idempotency (key, fingerprint, token, expires) VALUES (?, ?, ?, ?)",
                             (key, fingerprint, token, now + lease))
                conn.execute("COMMIT")
                return Claim("acquired", token=token)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        stored_fp, token, expires, _, meta, body = row
        if stored_fp != fingerprint:
            return Claim("mismatch")
        if token is not None:
            return Claim("running", retry_after=max(0.0, expires - now))
        return Claim("done", answer=Answer.from_meta(meta, body))

    def _complete(self, key: str, token: str, answer: Answer, ttl: float) -> bool:
        conn = self._connection()
        cur = conn.execute("UPDATE idempotency SET token = NULL, expires = ?, status = ?, meta = ?, body = ? "
                           "WHERE key = ? AND token = ?",
                           (self._clock() + ttl, answer.status, answer.meta(), answer.body, key, token))
        return cur.rowcount == 1

    def _release(self, key: str, token: str) -> None:
        self._connection().execute("DELETE FROM idempotency WHERE key = ? AND token = ?", (key, token))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- on the loop ----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreError(f"{self.description}: the store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except (OSError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{self.description}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # sqlite3.Error: its module is imported lazily
            if type(exc).__module__ == "sqlite3":
                raise StoreError(f"{self.description}: {type(exc).__name__}: {exc}") from exc
            raise

    async def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        return await self._run(self._claim, key, fingerprint, lease)

    async def complete(self, key: str, token: str, answer: Answer, ttl: float) -> bool:
        return await self._run(self._complete, key, token, answer, ttl)

    async def release(self, key: str, token: str) -> None:
        await self._run(self._release, key, token)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close)
        except Exception:  # a file that fails to close must not fail a shutdown
            pass
        # The thread has nothing left to do: it ends without being waited for.
        self._executor.shutdown(wait=False)
