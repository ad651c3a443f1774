"""The embedded job store: SQLite in WAL mode in the state directory (SPEC §9.2).

Every instance on the host that shares the state directory opens the same
file, so they share the jobs: a claim is one `UPDATE … RETURNING` inside
`BEGIN IMMEDIATE`, which takes SQLite's one write lock first, so two
instances' claims serialize and never take the same job while its lease
holds. Leases are wall-clock times (`time.time()`): the instances share the
host's clock.

The stdlib `sqlite3` runs in one thread of its own per store (a connection is
used by one thread only, and the event loop never waits on the disk or on
another process's lock). `synchronous=FULL`: a commit is on disk before
submit returns, so a 202 survives a power loss too, not just kill -9 (WAL
with NORMAL only survives the latter). A lock held past `timeout` seconds
(SQLite's busy timeout) and every other sqlite3 failure raise StoreError.

WAL needs the file on a local file system (not NFS): docs/deploy.md says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, TypeVar

import orjson

from aiwfd.jobs.store import (
    dumps,
    loads,
    DEFAULT_MAX_ATTEMPTS,
    Job,
    JobFinished,
    Delivery,
    DeliveryOutcome,
    JobStatus,
    StoreError,
    WebhookStatus,
    check_delivery_result,
    dead_letter_error,
    decode_cursor,
    has_webhook,
    encode_cursor,
    new_job_id,
)

__all__ = ["FILENAME", "SQLiteJobStore"]

FILENAME = "jobs.sqlite3"

T = TypeVar("T")

# seq: the insertion order (AUTOINCREMENT: never reused, even after a purge),
# which claims (oldest first) and list pages (newest first) follow.
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  client TEXT NOT NULL,
  agent TEXT NOT NULL,
  state TEXT NOT NULL,
  created REAL NOT NULL,
  started REAL,
  finished REAL,
  attempts INTEGER NOT NULL DEFAULT 0,
  body BLOB NOT NULL,
  result BLOB,
  error BLOB,
  webhook_url TEXT,
  owner TEXT,
  lease_until REAL,
  -- the webhook of SPEC §9.1's document; wh_status NULL: the job has none
  wh_status TEXT,
  wh_attempts INTEGER NOT NULL DEFAULT 0,
  wh_last INTEGER,
  -- the token of the claim that started the latest run (claim's retry)
  claim_token TEXT,
  -- the submitting request's W3C traceparent (the run's trace links to it)
  traceparent TEXT
);
-- what claim scans: only the unfinished jobs, oldest first
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(seq) WHERE state IN ('queued', 'running');
-- the dead-letter check of every claim: the running jobs by lease
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs(lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_client ON jobs(client, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished) WHERE finished IS NOT NULL;
-- Pending webhook deliveries, one per job end (job_id: at most one per job).
-- `due`: when it may be claimed, next_at while free, the lease's end while
-- leased, so a claim is one index look-up whatever the state.
CREATE TABLE IF NOT EXISTS deliveries (
  job_id TEXT PRIMARY KEY,
  type TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  first_at REAL NOT NULL,
  next_at REAL NOT NULL,
  due REAL NOT NULL,
  owner TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(due);
"""

# Columns added to `jobs` since the first release, with their types: a file
# made before one of them gets it when opened (CREATE TABLE IF NOT EXISTS
# leaves an existing table as it was).
ADDED_COLUMNS: dict[str, str] = {"claim_token": "TEXT", "traceparent": "TEXT"}

COLUMNS = ("id, client, agent, state, created, started, finished, attempts, body, result, error, webhook_url, "
           "wh_status, wh_attempts, wh_last, traceparent")
# What list() reads: the documents without the bodies (they may be large, and no listing shows them).
LIST_COLUMNS = COLUMNS.replace("body", "NULL")

# claim's query; {agents}: "" for any agent, else a filter on the JSON array
# of the known agents (one parameter whatever their number: SQLite's
# variable limit never matters).
CLAIM = ("UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, attempts = attempts + 1, "
         "started = ?, claim_token = ? WHERE seq = (SELECT seq FROM jobs WHERE state IN ('queued', 'running') "
         "AND (state = 'queued' OR lease_until < ?){agents} ORDER BY seq LIMIT 1) "
         f"RETURNING {COLUMNS}")
CLAIM_ANY = CLAIM.format(agents="")
CLAIM_KNOWN = CLAIM.format(agents=" AND agent IN (SELECT value FROM json_each(?))")


def _job(row: tuple[Any, ...]) -> Job:
    (jid, client, agent, state, created, started, finished, attempts, body, result, error, webhook_url,
     wh_status, wh_attempts, wh_last, traceparent) = row
    return Job(
        id=jid, client=client, agent=agent, status=state, created_at=created, started_at=started,
        finished_at=finished, attempts=attempts, body=loads(body) if body is not None else None,
        result=loads(result) if result is not None else None,
        error=loads(error) if error is not None else None,
        webhook_url=webhook_url,
        webhook=WebhookStatus(wh_status, wh_attempts, wh_last) if wh_status is not None else None,
        traceparent=traceparent,
    )


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """ADDED_COLUMNS that the file's table lacks (a file from an older aiwfd),
    added inside the opening's transaction: two instances never both add one."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    for name, kind in ADDED_COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def _end_delivery(conn: sqlite3.Connection, job_id: str, now: float) -> None:
    """The delivery task of a job that just ended, if it has a webhook. Called
    inside the transaction that ended it: both, or neither. (The PRIMARY KEY
    would refuse a second one; the callers' state checks mean none is tried.)"""
    conn.execute(
        "INSERT INTO deliveries (job_id, type, first_at, next_at, due) "
        "SELECT id, 'job.' || state, ?, ?, ? FROM jobs WHERE id = ? AND wh_status IS NOT NULL",
        (now, now, now, job_id))


def _json(value: Any) -> bytes | None:
    return None if value is None else dumps(value)


class SQLiteJobStore:
    """Jobs in `<state_dir>/jobs.sqlite3`, shared by the instances of one host."""

    shared = False

    def __init__(self, state_dir: Path | str, *, timeout: float = 5.0,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, synchronous: str = "FULL") -> None:
        self.path = Path(state_dir) / FILENAME
        self.description = f"sqlite:{self.path}"
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        # One thread: the connection is only ever used by it, and the
        # operations of this store run in order.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aiwfd-jobs-sqlite")

    # -- plumbing ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """In the store's thread, at first use: nothing touches the disk before."""
        if self._conn is None:
            if sqlite3.sqlite_version_info < (3, 35):  # RETURNING; Python links the system's library
                raise sqlite3.NotSupportedError(f"SQLite {sqlite3.sqlite_version} is older than 3.35 (RETURNING)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Another instance recovering the WAL of one killed with -9 holds a
            # lock that SQLite reports at once ("database is locked"), without
            # waiting out the busy timeout: the opening is tried again until
            # the timeout has passed.
            give_up = time.monotonic() + self.timeout
            while True:
                try:
                    self._conn = self._open()
                    break
                except sqlite3.OperationalError as e:
                    transient = "locked" in str(e) or "busy" in str(e)
                    if not transient or time.monotonic() >= give_up:
                        raise
                    time.sleep(0.05)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """A connection in WAL mode with the schema in place."""
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            with _transaction(conn):
                for statement in _statements(SCHEMA):
                    conn.execute(statement)
                _add_missing_columns(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(connection)` in the store's thread; every sqlite3 failure as StoreError."""
        def call() -> T:
            return fn(self._connect())

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite ({self.path}): {type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # the state directory cannot be created or opened
            raise StoreError(f"sqlite ({self.path}): {exc}") from exc

    # -- the protocol --------------------------------------------------------

    async def submit(self, client: str, agent: str, body: Any, webhook_url: str | None = None,
                     *, webhook: bool | None = None, traceparent: str | None = None,
                     job_id: str | None = None) -> Job:
        jid = job_id if job_id is not None else new_job_id()
        data = dumps(body)
        hook = WebhookStatus("pending", 0, None) if has_webhook(webhook_url, webhook) else None

        def run(conn: sqlite3.Connection) -> Job:
            now = time.time()
            with _transaction(conn):
                # A given id that exists already (a retry whose first write
                # was done): nothing written, that job read in the same
                # transaction. A random id never collides (128 bits).
                cur = conn.execute(
                    "INSERT INTO jobs (id, client, agent, state, created, body, webhook_url, wh_status, "
                    "traceparent) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (jid, client, agent, now, data, webhook_url, hook.status if hook else None, traceparent))
                if cur.rowcount == 0:
                    row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (jid,)).fetchone()
                    return _job(row)
            return Job(jid, client, agent, "queued", now, None, None, 0, loads(data), None, None,
                       webhook_url, hook, traceparent)

        return await self._run(run)

    async def claim(self, owner: str, lease: float, *, agents: Collection[str] | None = None,
                    token: str | None = None) -> Job | None:
        if isinstance(agents, str):
            raise TypeError("claim: agents is a collection of names, not one")
        known = None if agents is None else orjson.dumps(sorted(agents)).decode()

        def run(conn: sqlite3.Connection) -> Job | None:
            now = time.time()
            with _transaction(conn):
                if token is not None:  # a retry of a claim that took a job: that job, if still ours
                    row = conn.execute(
                        "UPDATE jobs SET lease_until = ? WHERE state = 'running' AND owner = ? AND claim_token = ? "
                        f"RETURNING {COLUMNS}", (now + lease, owner, token)).fetchone()
                    if row is not None:
                        return _job(row)
                # Dead letters first: a lost run of a job already claimed
                # max_attempts times is not started again.
                for (jid, attempts) in conn.execute(
                        "SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_until < ? "
                        "AND attempts >= ?", (now, self.max_attempts)).fetchall():
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', finished = ?, error = ?, owner = NULL, "
                        "lease_until = NULL WHERE id = ?", (now, _json(dead_letter_error(attempts)), jid))
                    _end_delivery(conn, jid, now)
                args: tuple[str | float | None, ...] = (owner, now + lease, now, token, now)
                row = conn.execute(CLAIM_ANY if known is None else CLAIM_KNOWN,
                                   args if known is None else (*args, known)).fetchone()
            return _job(row) if row is not None else None

        return await self._run(run)

    async def renew(self, job_id: str, owner: str, lease: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND state = 'running' AND owner = ?",
                    (time.time() + lease, job_id, owner))
            return cur.rowcount == 1

        return await self._run(run)

    async def finish(self, job_id: str, owner: str, status: JobStatus,
                     result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        if status not in ("succeeded", "failed", "canceled"):
            raise ValueError(f"finish: {status!r} is not a finished status")
        res, err = _json(result), _json(error)

        def run(conn: sqlite3.Connection) -> bool:
            now = time.time()
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE jobs SET state = ?, result = ?, error = ?, finished = ?, owner = NULL, "
                    "lease_until = NULL WHERE id = ? AND state = 'running' AND owner = ?",
                    (status, res, err, now, job_id, owner))
                ended = cur.rowcount == 1
                if ended:  # a stale owner's finish ended nothing: no delivery
                    _end_delivery(conn, job_id, now)
            return ended

        return await self._run(run)

    async def release(self, job_id: str, owner: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "
                    "WHERE id = ? AND state = 'running' AND owner = ?", (job_id, owner))

        await self._run(run)

    async def get(self, job_id: str, client: str) -> Job | None:
        def run(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND client = ?",
                               (job_id, client)).fetchone()
            return _job(row) if row is not None else None

        return await self._run(run)

    async def list(self, client: str, status: str | None = None, agent: str | None = None,
                   limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        below = decode_cursor(cursor) if cursor else None
        where: list[str] = ["client = ?"]
        args: list[str | int] = [client]
        if status is not None:
            where.append("state = ?")
            args.append(status)
        if agent is not None:
            where.append("agent = ?")
            args.append(agent)
        if below is not None:
            where.append("seq < ?")
            args.append(below)
        sql = f"SELECT seq, {LIST_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"

        def run(conn: sqlite3.Connection) -> tuple[list[Job], str | None]:
            # One more than asked: whether there is a next page at all.
            rows = conn.execute(sql, (*args, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return [_job(r[1:]) for r in rows], encode_cursor(rows[-1][0]) if more else None

        return await self._run(run)

    async def cancel(self, job_id: str, client: str) -> Job | None:
        def run(conn: sqlite3.Connection) -> tuple[Job | None, bool]:
            now = time.time()
            with _transaction(conn):
                row = conn.execute(
                    "UPDATE jobs SET state = 'canceled', finished = ?, owner = NULL, lease_until = NULL "
                    "WHERE id = ? AND client = ? AND state IN ('queued', 'running') "
                    f"RETURNING {COLUMNS}", (now, job_id, client)).fetchone()
                if row is not None:
                    _end_delivery(conn, job_id, now)
                    return _job(row), False
                row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND client = ?",
                                   (job_id, client)).fetchone()
                return (_job(row), True) if row is not None else (None, False)

        job, finished = await self._run(run)
        if finished:
            assert job is not None
            raise JobFinished(job)
        return job

    async def fail_agent(self, agent: str, error: dict[str, Any]) -> int:
        err = _json(error)

        def run(conn: sqlite3.Connection) -> int:
            now = time.time()
            with _transaction(conn):
                ids = conn.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, finished = ? "
                    # the IN term lets SQLite scan the open jobs' index only
                    "WHERE state IN ('queued', 'running') AND state = 'queued' AND agent = ? RETURNING id",
                    (err, now, agent)).fetchall()
                for (jid,) in ids:
                    _end_delivery(conn, jid, now)
            return len(ids)

        return await self._run(run)

    async def purge(self, older_than: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                ids = conn.execute(
                    "DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ? "
                    "AND state IN ('succeeded', 'failed', 'canceled') RETURNING id",
                    (time.time() - older_than,)).fetchall()
                # A delivery still pending goes with its job: its event's data is gone.
                conn.executemany("DELETE FROM deliveries WHERE job_id = ?", ids)
            return len(ids)

        return await self._run(run)

    async def claim_delivery(self, owner: str, lease: float) -> Delivery | None:
        if not lease > 0:
            raise ValueError(f"lease {lease!r} s: more than 0")

        def run(conn: sqlite3.Connection) -> Delivery | None:
            now = time.time()
            # An idle delivery loop polls several times a second on every
            # instance: a read (WAL: no lock, never waits) answers most polls
            # without taking the write lock the instances' job claims need.
            if conn.execute("SELECT 1 FROM deliveries WHERE due <= ? LIMIT 1", (now,)).fetchone() is None:
                return None
            with _transaction(conn):
                row = conn.execute(
                    "UPDATE deliveries SET owner = ?, due = ? WHERE job_id = "
                    "(SELECT job_id FROM deliveries WHERE due <= ? ORDER BY due LIMIT 1) "
                    "RETURNING job_id, type, attempts, first_at, next_at", (owner, now + lease, now)).fetchone()
                if row is None:
                    return None
                job = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone()
            # purge deletes a job's delivery with it, so the job is there
            return Delivery(row[0], row[1], row[2], row[3], row[4], now, _job(job))

        return await self._run(run)

    async def delivery_result(self, delivery_id: str, owner: str, outcome: DeliveryOutcome,
                              status: int | None = None, delay: float | None = None) -> bool:
        check_delivery_result(outcome, delay)

        def run(conn: sqlite3.Connection) -> bool:
            now = time.time()
            with _transaction(conn):
                if outcome == "retry":
                    assert delay is not None
                    row = conn.execute(
                        "UPDATE deliveries SET attempts = attempts + 1, next_at = ?, due = ?, owner = NULL "
                        "WHERE job_id = ? AND owner = ? RETURNING attempts",
                        (now + delay, now + delay, delivery_id, owner)).fetchone()
                    final = "pending"
                else:
                    row = conn.execute(
                        "DELETE FROM deliveries WHERE job_id = ? AND owner = ? RETURNING attempts + 1",
                        (delivery_id, owner)).fetchone()
                    final = "delivered" if outcome == "delivered" else "failed"
                if row is None:
                    return False
                conn.execute("UPDATE jobs SET wh_status = ?, wh_attempts = ?, wh_last = ? WHERE id = ?",
                             (final, row[0], status, delivery_id))
            return True

        return await self._run(run)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._thread, run)
        self._thread.shutdown(wait=False)


def _statements(script: str) -> list[str]:
    """The schema's statements one by one: executescript would COMMIT first,
    outside the transaction that makes two instances' first start safe."""
    body = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on an error). IMMEDIATE takes the
    write lock first, waiting up to the busy timeout: a deferred transaction
    that reads and then writes fails at once with SQLITE_BUSY when another
    process wrote in between (WAL cannot upgrade a stale snapshot)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
