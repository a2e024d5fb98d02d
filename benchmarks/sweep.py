"""Expiry at scale: ``SessionStore.sweep()`` against one raw DELETE, with a writer running.

Measured on each database (SQLite and PostgreSQL), all reported in one table:

* **sweep vs raw DELETE**: E expired sessions among N (PostgreSQL 500,000 among
  1,000,000; SQLite 100,000 among 200,000), each session with two namespaces of
  small JSON and the ``expires_at`` its store would have written
  (``last_active`` + TTL + touch interval). The database is populated with
  set-based SQL, then analysed (PostgreSQL: ``VACUUM ANALYZE``; SQLite:
  ``ANALYZE``), then copied (PostgreSQL: ``CREATE DATABASE ... TEMPLATE``;
  SQLite: the file, after a WAL checkpoint with no connection open). One copy
  gets one raw ``DELETE FROM silo_sessions WHERE sweep_after < now AND expires_at < now`` in one
  transaction (namespaces go by the foreign keys' cascade); the other gets
  ``SessionStore(storage=SQLStorage(url), ttl=...).sweep(batch_size=B)`` with the
  store's clock set to that ``now``, so that exactly those E sessions are due
  (B: the store's default, 500, unless ``--batch-size`` gives others; each gets
  its own copy). Both use engines from
  :func:`flask_silo_sql.sql.engine.make_engine` (SQLite: WAL,
  ``synchronous=NORMAL``, busy timeout, foreign keys on; PostgreSQL: psycopg 3),
  and each starts after a checkpoint with the database in the OS cache. This is
  done for two layouts (``--layout``): due rows stored in no relation to when
  they expire (``scattered``, the worst case for a sweep, which visits them in
  ``(sweep_after, sid)`` order) and in that order (``ordered``); see
  :func:`populate`. A third copy gets plain DELETE statements of the first B due
  sessions in ``(sweep_after, sid)`` order, one transaction per batch
  (:func:`run_batched`): the floor of any batched expiry, which tells the cost
  of short transactions apart from the sweep's own work. Both floors find the
  due rows through the sweep's ``(sweep_after, sid)`` index, as their plans are
  checked to do (PostgreSQL's planner would rather scan the whole table for
  the one big DELETE, so sequential scans are off for it).
* **a concurrent writer**: during each of those operations a separate process
  (its own engine, so neither the GIL nor the sweep's Python work adds to its
  latency) loops over live sessions doing what a request that changes state
  does: ``store.request(sid)``, read a namespace (one SELECT, with the session
  row), change it, ``commit()`` (one transaction: the session's ``last_active``
  and ``expires_at``, and the namespace, versioned). Each write is timed; the
  table gives the worst and the 99th percentile of the writes that overlapped
  the operation, and the 99th percentile while idle just before it.
* **cost follows the expired count**: a sweep of 10,000 expired sessions among
  10,000 live ones against 10,000 expired among 1,000,000 live (SQLite:
  200,000), each database populated once and copied fresh for every round; the
  medians of ``--rounds`` rounds are compared.
* **flask-silo 0.1.6** (the original, in memory): its ``SessionStore.cleanup()``
  on 100,000 sessions, all expired and half expired, with a writer thread
  calling ``store.get()`` and ``save()`` meanwhile (cleanup holds the store's
  lock throughout).

Targets, on each database and layout, for the first batch size: sweep time at
most 2 x the raw DELETE; worst writer latency during the sweep under 100 ms;
and sweep time among many live sessions at most 1.5 x among few. PostgreSQL is
a private server started for the run with ``fsync=on`` and
``synchronous_commit=on`` (``tests/pgserver.py``, otherwise its defaults), or
the server named by ``SILO_TEST_PG_URL``. Below the table, each sweep's time is
split by statement (candidate SELECT, DELETE with its cascade, expired-SID
INSERT, prune, commit; the rest is Python and round trips), timed around the
driver calls of silo's executor, so the sweep runs on its default path (the
DBAPI cursor). The exit status is 0 whatever the verdicts: this is a report. A
full run takes about 8 minutes on 2 CPUs.

Run: ``python benchmarks/sweep.py [--only sqlite|postgresql] [--scale F]
[--batch-size B [B ...]] [--layout scattered|ordered|both] [--rounds R]``;
``--scale 0.05`` is a quick run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial
from importlib.metadata import version
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, and_, delete, func, select, text

from flask_silo_sql import schema
from flask_silo_sql.sql import SQLStorage
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import sessions
from flask_silo_sql.store import SessionStore

REPO = Path(__file__).resolve().parent.parent


def to_datetime(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)

DATABASES = ("sqlite", "postgresql")
DB_TITLES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "memory": "memory"}

TTL = 3600
"""The stores' TTL; their touch interval is the default, min(60, TTL / 20)."""
LIVE_SPREAD = TTL // 2
"""Live sessions were last active within this many seconds of "now"."""
EXPIRED_SPREAD = 86_400
"""Due sessions expired up to this many seconds before now."""


def new_cart() -> dict[str, Any]:
    return {"items": [1, 2, 3], "total": 12.5}


def new_prefs() -> dict[str, Any]:
    return {"theme": "dark", "lang": "en"}


NAMESPACES: dict[str, Callable[[], dict[str, Any]]] = {"cart": new_cart, "prefs": new_prefs}
CART_JSON = '{"items":[1,2,3],"total":12.5}'
PREFS_JSON = '{"theme":"dark","lang":"en"}'

SWEEP_TARGET = 2.0
STALL_TARGET_MS = 100.0
RATIO_TARGET = 1.5
IDLE_WINDOW_S = 1.0
"""The writer runs alone this long before each operation (its idle baseline)."""
WRITER_SIDS = 1000
"""Live sessions the writer cycles through."""


@dataclass(frozen=True)
class Sizes:
    total: int
    expired: int
    ratio_expired: int
    ratio_live_few: int
    ratio_live_many: int

    def scaled(self, factor: float) -> Sizes:
        def s(n: int) -> int:
            return max(50, round(n * factor))

        return Sizes(*(s(n) for n in (self.total, self.expired, self.ratio_expired,
                                       self.ratio_live_few, self.ratio_live_many)))


SIZES = {
    "sqlite": Sizes(200_000, 100_000, 10_000, 10_000, 200_000),
    "postgresql": Sizes(1_000_000, 500_000, 10_000, 10_000, 1_000_000),
}
MEMORY_SESSIONS = 100_000


class BenchError(RuntimeError):
    """A measurement did not do what it should: its numbers would mean nothing."""


class PgServerLike(Protocol):
    """What the benchmark uses of ``tests/pgserver.py``'s servers."""

    admin_url: str

    def create_database(self, name: str | None = None) -> str: ...

    def drop_database(self, name: str) -> None: ...

    def url(self, database: str) -> str: ...

    def destroy(self) -> None: ...


# -- the clock ----------------------------------------------------------------------

NOW = float(int(time.time()))
"""The stores' "now" (a whole second, so SQLite's text timestamps compare exactly)."""


@cache
def lifetime() -> int:
    """How long a session written by the stores of :func:`make_store` lives, in seconds.

    A store over SQL storage writes ``expires_at = last_active + ttl + touch
    interval``; those stores have ``ttl=TTL`` and the default touch interval.
    """
    storage = SQLStorage("sqlite://")
    try:
        seconds = TTL + SessionStore(storage=storage, ttl=TTL).touch_interval
    finally:
        storage.dispose()
    if seconds != int(seconds):
        raise BenchError(f"a session's lifetime of {seconds} s is not whole seconds")
    return int(seconds)


def due(now: float = NOW) -> Any:
    """A due session: ``sweep_after < now`` (its index) and ``expires_at < now``.

    The benchmark's rows have ``sweep_after = expires_at``, as a session that was never
    looked at by a sweep has (migration 0007)."""
    moment = to_datetime(now)
    return and_(sessions.c.sweep_after < moment, sessions.c.expires_at < moment)


# -- databases ----------------------------------------------------------------------


class Databases(Protocol):
    """Where the benchmark's databases live, and how to copy and drop them."""

    db: str

    def new(self, name: str) -> str:
        """An empty database migrated to the silo schema; its URL."""
        ...

    def copy(self, source: str, name: str) -> str:
        """A copy of database *source* (no connection to it may be open); its URL."""
        ...

    def drop(self, url: str) -> None: ...

    def settle(self, url: str) -> None:
        """Before an operation: flush what is pending and warm the caches alike."""
        ...

    def server_version(self) -> str: ...


class SQLiteDatabases:
    db = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, url: str) -> Path:
        return Path(url.removeprefix("sqlite:///"))

    def new(self, name: str) -> str:
        url = f"sqlite:///{self.root / (name + '.db')}"
        engine = make_engine(url)
        try:
            schema.upgrade(engine)
        finally:
            engine.dispose()
        return url

    def _checkpoint(self, path: Path) -> None:
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def copy(self, source: str, name: str) -> str:
        src = self.path(source)
        self._checkpoint(src)  # every page in the main file, then no connection open
        for suffix in ("-wal", "-shm"):
            wal = Path(str(src) + suffix)
            if wal.exists() and wal.stat().st_size:
                raise BenchError(f"{wal} is not empty after a checkpoint")
        url = f"sqlite:///{self.root / (name + '.db')}"
        shutil.copyfile(src, self.path(url))
        return url

    def drop(self, url: str) -> None:
        path = self.path(url)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)

    def settle(self, url: str) -> None:
        path = self.path(url)
        self._checkpoint(path)
        with path.open("rb") as f:  # the whole file in the page cache
            while f.read(1 << 20):
                pass

    def server_version(self) -> str:
        return sqlite3.sqlite_version


class PostgreSQLDatabases:
    db = "postgresql"

    def __init__(self, server: PgServerLike) -> None:
        self.server = server
        import psycopg

        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
            version_row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        assert version_row is not None
        self._version_num = int(row[0])
        self._version = str(version_row[0])
        self._names: dict[str, str] = {}
        self._prefix = "silo_sweep_" + uuid.uuid4().hex[:8] + "_"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.server.admin_url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def new(self, name: str) -> str:
        name = self._prefix + name
        url = self.server.create_database(name)
        self._names[url] = name
        engine = make_engine(url)
        try:
            schema.upgrade(engine)
        finally:
            engine.dispose()
        return url

    def copy(self, source: str, name: str) -> str:
        name = self._prefix + name
        # FILE_COPY (PostgreSQL 15+) copies the files as they are, like the default
        # strategy of earlier versions, and without writing the copy to the WAL.
        strategy = " STRATEGY FILE_COPY" if self._version_num >= 150000 else ""
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._names[source]}"{strategy}')
        url = self.server.url(name)
        self._names[url] = name
        return url

    def drop(self, url: str) -> None:
        self.server.drop_database(self._names.pop(url))

    def settle(self, url: str) -> None:
        engine = make_engine(url)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("CHECKPOINT"))
                for table in ("silo_sessions", "silo_namespaces"):
                    conn.execute(text(f"SELECT count(*) FROM {table}"))  # OS cache, alike
        finally:
            engine.dispose()

    def server_version(self) -> str:
        return self._version


LAYOUTS = ("scattered", "ordered")
"""Where idle sessions are stored, relative to when they went idle (see :func:`populate`)."""


def populate(dbs: Databases, url: str, expired: int, live: int, layout: str) -> None:
    """*expired* idle sessions spread evenly among *live* ones, two namespaces each.

    Set-based SQL in one transaction. SIDs are 43 characters, random with
    respect to everything else. Each session's ``expires_at`` is what the
    benchmark's stores would have written when it was last active
    (``last_active`` + :func:`lifetime`). Idle sessions were last active up to
    a day before the last moment that leaves them due by now (so they expired
    up to a day ago), live ones within ``TTL / 2`` of now. Rows are stored
    interleaved (one idle every N / E rows), namespaces in the order of their
    sessions; *layout* says how idle rows' ``expires_at`` relates to where they
    are stored:

    * ``scattered``: unrelated (pseudo-random), the worst case for a sweep,
      which visits them in ``(sweep_after, sid)`` order;
    * ``ordered``: rising with storage order, as when sessions go idle in the
      order they were created (SQLite appends rows) or last written
      (PostgreSQL writes each updated row's new version where there is room).
    """
    total = expired + live
    params = {"n": total, "e": expired, "old": int(NOW) - lifetime() - 1, "now": int(NOW),
              "old_spread": EXPIRED_SPREAD, "live_spread": LIVE_SPREAD,
              "lifetime": lifetime(), "created": int(NOW) - 3 * 86_400}
    pg = dbs.db == "postgresql"
    p = {k: f"%({k})s" if pg else f":{k}" for k in params}
    mod = "%%" if pg else "%"
    # Row i is idle when floor(i * e / n) steps: exactly e rows, evenly spread.
    is_idle = f"(i * {p['e']}) / {p['n']} <> ((i - 1) * {p['e']}) / {p['n']}"
    idle_ago = (f"(i * 7919) {mod} {p['old_spread']}" if layout == "scattered"
                else f"{p['old_spread']} - (i * {p['old_spread']}) / {p['n']}")
    idle_at = f"{p['old']} - ({idle_ago})"
    live_at = f"{p['now']} - (i * 7919) {mod} {p['live_spread']}"
    last_active = f"CASE WHEN {is_idle} THEN {idle_at} ELSE {live_at} END"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if pg:
                # The rows are consistent by construction: skip the per-row FK checks.
                conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
                conn.exec_driver_sql(
                    "INSERT INTO silo_sessions "
                    "(sid, created_at, last_active, expires_at, sweep_after) "
                    "SELECT sid, to_timestamp(created), to_timestamp(active), "
                    f"to_timestamp(active + {p['lifetime']}), "
                    f"to_timestamp(active + {p['lifetime']}) "
                    "FROM (SELECT md5(i::text) || substr(md5((-i)::text), 1, 11) AS sid, "
                    f"{p['created']} AS created, {last_active} AS active "
                    f"FROM generate_series(1::bigint, {p['n']}::bigint) AS i) AS seeded",
                    params,
                )
                conn.exec_driver_sql(
                    "INSERT INTO silo_namespaces (sid, name, data, version, updated_at) "
                    "SELECT s.sid, ns.name, ns.data::jsonb, 1, s.last_active "
                    "FROM silo_sessions AS s CROSS JOIN (VALUES "
                    "('cart', %(cart)s), ('prefs', %(prefs)s)) AS ns(name, data)",
                    {"cart": CART_JSON, "prefs": PREFS_JSON},
                )
            else:
                # SQLAlchemy's text form of a UTC timestamp, as silo's statements bind it.
                stamp = "strftime('%Y-%m-%d %H:%M:%S', {}, 'unixepoch') || '.000000'"
                conn.exec_driver_sql(
                    "INSERT INTO silo_sessions "
                    "(sid, created_at, last_active, expires_at, sweep_after) "
                    "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq "
                    f"WHERE i < {p['n']}), "
                    f"seeded(i, active) AS (SELECT i, {last_active} FROM seq) "
                    "SELECT substr(lower(hex(randomblob(22))), 1, 43), "
                    f"{stamp.format(p['created'])}, {stamp.format('active')}, "
                    f"{stamp.format('active + ' + p['lifetime'])}, "
                    f"{stamp.format('active + ' + p['lifetime'])} FROM seeded",
                    params,
                )
                conn.exec_driver_sql(
                    "INSERT INTO silo_namespaces (sid, name, data, version, updated_at) "
                    "SELECT s.sid, ns.name, ns.data, 1, s.last_active "
                    "FROM silo_sessions AS s CROSS JOIN (SELECT 'cart' AS name, :cart AS data "
                    "UNION ALL SELECT 'prefs', :prefs) AS ns",
                    {"cart": CART_JSON, "prefs": PREFS_JSON},
                )
        if pg:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        count_rows = select(func.count()).select_from(sessions)
        with engine.connect() as conn:
            idle = conn.execute(count_rows.where(due())).scalar_one()
            count = conn.execute(count_rows).scalar_one()
            # expires_at = last_active + lifetime on every row, as the stores write it
            expected = (f"last_active + interval '{lifetime()} seconds'" if pg else
                        f"strftime('%Y-%m-%d %H:%M:%S', last_active, '+{lifetime()} seconds')"
                        " || '.000000'")
            skewed = conn.exec_driver_sql(
                f"SELECT count(*) FROM silo_sessions WHERE expires_at <> {expected}"
            ).scalar_one()
        if (idle, count, skewed) != (expired, total, 0):
            raise BenchError(f"populated {count} sessions, {idle} due, {skewed} with "
                             f"expires_at != last_active + {lifetime()} s; wanted {total}, "
                             f"{expired} due, 0")
    finally:
        engine.dispose()


# -- the concurrent writer -------------------------------------------------------------

Sample = tuple[float, float, bool]
"""One write: (start, end) on the monotonic clock, and whether it succeeded."""


def writer_main(pipe: Pipe) -> None:
    """The writer process: per command, loop over live sessions until told to stop."""
    while True:
        command = pipe.recv()
        if command is None:
            return
        write_until_stopped(pipe, command)


def write_until_stopped(pipe: Pipe, url: str) -> None:
    """Writes on *url*'s live sessions, timed, until the pipe says stop; then the samples.

    Each write is what a request that changes state does (the extension's
    path): ``store.request(sid)`` (one connection for the request), read a
    namespace (one SELECT, with the session row), change it, ``commit()`` (one
    transaction: the session row touched, the namespace written under its
    version guard; touch interval 0, so every write touches), ``close()``.
    """
    storage = SQLStorage(url)
    store = SessionStore(storage=storage, ttl=TTL, clock=lambda: NOW, touch_interval=0)
    for name, factory in NAMESPACES.items():
        store.register_namespace(name, factory)
    recreated: list[str] = []
    store.on_create(recreated.append)  # a live session that was gone would be created anew
    try:
        with storage.engine.connect() as conn:
            sids = list(conn.execute(
                select(sessions.c.sid).where(~due()).order_by(sessions.c.sid).limit(WRITER_SIDS)
            ).scalars())
        if not sids:
            raise BenchError("the writer found no live session")
        samples: list[Sample] = []
        count = 0

        def write() -> None:
            nonlocal count
            sid = sids[count % len(sids)]
            count += 1
            unit = store.request(sid)
            try:
                unit.namespace("cart")["total"] = count
                unit.commit()
            finally:
                unit.close()
            if recreated:
                raise BenchError(f"live session {recreated[0]} was gone")

        for _ in range(20):  # warm: pool, statement caches
            write()
        pipe.send("ready")
        while not pipe.poll():
            start = time.monotonic()
            ok = True
            try:
                write()
            except BenchError:
                raise
            except Exception:  # e.g. SQLite's busy timeout: counted as a failed write
                ok = False
            samples.append((start, time.monotonic(), ok))
        pipe.recv()  # "stop"
        pipe.send(samples)
    finally:
        storage.dispose()


class Writer:
    """The writer process, driven through a pipe."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=writer_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    @contextlib.contextmanager
    def running(self, url: str) -> Iterator[list[Sample]]:
        """Writes on *url*'s live sessions for the block (samples filled in after it)."""
        samples: list[Sample] = []
        self.pipe.send(url)
        if self.pipe.recv() != "ready":
            raise BenchError("the writer did not start")
        try:
            yield samples
        finally:
            self.pipe.send("stop")
            samples.extend(self.pipe.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()


@dataclass
class WriterStats:
    during: int
    failed: int
    max_ms: float
    p99_ms: float
    idle_p99_ms: float


def writer_stats(samples: list[Sample], start: float, end: float) -> WriterStats:
    """The writes that overlapped [start, end], and those before it (idle)."""
    during = [(e - s) * 1000 for s, e, _ in samples if s < end and e > start]
    idle = [(e - s) * 1000 for s, e, _ in samples if e <= start]
    failed = sum(1 for s, e, ok in samples if s < end and e > start and not ok)
    return WriterStats(len(during), failed, max(during, default=0.0), p99(during), p99(idle))


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- operations ------------------------------------------------------------------------


PHASES = ("candidates", "delete+cascade", "mark expired", "delete+cascade+mark", "prune",
          "commit", "other SQL")


def phase_of(statement: str) -> str:
    """The sweep's phase a statement (its SQL text, as silo sends it) belongs to."""
    if statement.startswith("SELECT silo_sessions.sid, silo_sessions.sweep_after"):
        return "candidates"
    if statement.startswith("WITH") and "DELETE FROM silo_sessions" in statement:
        return "delete+cascade+mark"  # PostgreSQL: one statement doing both
    if statement.startswith("DELETE FROM silo_sessions"):
        return "delete+cascade"
    if statement.startswith("INSERT INTO silo_expired_sids"):
        return "mark expired"
    if statement.startswith("DELETE FROM silo_expired_sids"):
        return "prune"
    return "other SQL"  # SQLite: PRAGMA foreign_keys, once per batch


def time_phases(storage: SQLStorage, phases: dict[str, float]) -> None:
    """Add the seconds *storage*'s statements spend, per phase (and in commits), to *phases*.

    Timed at the executor seam (:mod:`flask_silo_sql.sql.executor`): around the
    driver calls of every executor the storage's connector makes, so the sweep
    keeps its own path, the DBAPI cursor. (A ``before_cursor_execute``
    listener on the engine would switch it to SQLAlchemy Core.) A statement's
    time includes fetching its rows; an autocommitted statement's COMMIT
    (SQLite) counts as commit.
    """
    phases.update(dict.fromkeys(PHASES, 0.0))
    connector: Any = storage.connector
    make = connector._new
    clock = time.perf_counter

    def timed(method: Callable[..., Any], phase: Callable[[tuple[Any, ...]], str]
              ) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            t0 = clock()
            try:
                return method(*args)
            finally:
                phases[phase(args)] += clock() - t0

        return call

    def new() -> Any:
        ex = make()
        if ex.kind != "dbapi":
            raise BenchError(f"the sweep ran on the {ex.kind} executor, not the DBAPI cursor")
        ex._send = timed(ex._send, lambda args: phase_of(args[0]))
        ex._commit = timed(ex._commit, lambda _args: "commit")
        ex._end_statement = timed(ex._end_statement, lambda _args: "commit")
        return ex

    connector._new = new


@dataclass
class Result:
    db: str
    label: str
    expired: int
    total: int
    seconds: float
    writer: WriterStats | None = None
    batches: int = 0
    longest_batch_ms: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    kind: str = ""
    """``raw``, ``batched``, ``sweep``, ``ratio_few[_raw]``, ``ratio_many[_raw]``, ``memory``."""
    batch_size: int = 0
    rounds: list[float] = field(default_factory=list)
    layout: str = ""


SWEEP_INDEX = "ix_silo_sessions_sweep_after"
"""The ``(sweep_after, sid)`` index, through which the sweep and the floors find due sessions."""


def index_plan(conn: Connection, statement: Any) -> str:
    """The database's plan for *statement*, which must read *SWEEP_INDEX* (else BenchError)."""
    pg = conn.dialect.name == "postgresql"
    sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    rows = conn.exec_driver_sql(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + sql).all()
    plan = "; ".join(str(row[0] if pg else row[-1]).strip() for row in rows)
    if SWEEP_INDEX not in plan:
        raise BenchError(f"the floor does not read {SWEEP_INDEX}: {plan}")
    return plan


def run_raw(url: str, expected: int) -> float:
    """One ``DELETE`` of every due session (``sweep_after``, ``expires_at`` passed), at once.

    Through the sweep's ``(sweep_after, sid)`` index: on PostgreSQL, with
    sequential scans disabled for the statement's connection, as its planner
    would rather scan the whole table when a large share of it is due.
    """
    statement = delete(sessions).where(due())
    engine = make_engine(url)
    try:
        with engine.connect() as conn:  # connected before the clock starts, as the sweep's
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
            index_plan(conn, statement)
            conn.commit()
            gc.collect()
            start = time.perf_counter()
            with conn.begin():
                deleted = conn.execute(statement).rowcount
            seconds = time.perf_counter() - start
    finally:
        engine.dispose()
    if deleted != expected:
        raise BenchError(f"raw DELETE removed {deleted} sessions, expected {expected}")
    return seconds


def batch_delete(batch_size: int) -> Any:
    """The first *batch_size* due sessions in ``(sweep_after, sid)`` order, deleted."""
    return delete(sessions).where(sessions.c.sid.in_(
        select(sessions.c.sid).where(due())
        .order_by(sessions.c.sweep_after, sessions.c.sid).limit(batch_size).scalar_subquery()
    ))


def run_batched(url: str, expected: int, batch_size: int) -> tuple[float, int, float]:
    """The floor of any batched expiry: plain DELETEs of *batch_size* due sessions.

    Each batch is one transaction deleting the first due sessions in
    ``(sweep_after, sid)`` order (through the sweep's index), with nothing
    else: no expired-SID record, no row locks, no per-SID Python.
    """
    batch = batch_delete(batch_size)
    engine = make_engine(url)
    deleted, batches, longest = 0, 0, 0.0
    try:
        with engine.connect() as conn:
            index_plan(conn, batch)
        gc.collect()
        start = time.perf_counter()
        while True:
            began = time.perf_counter()
            with engine.begin() as conn:
                count = conn.execute(batch).rowcount
            longest = max(longest, time.perf_counter() - began)
            deleted += count
            batches += 1
            if count < batch_size:
                break
        seconds = time.perf_counter() - start
    finally:
        engine.dispose()
    if deleted != expected:
        raise BenchError(f"batched DELETE removed {deleted} sessions, expected {expected}")
    return seconds, batches, longest * 1000


def make_store(url: str) -> tuple[SessionStore, SQLStorage]:
    storage = SQLStorage(url)
    store = SessionStore(storage=storage, ttl=TTL, clock=lambda: NOW)
    for name, factory in NAMESPACES.items():
        store.register_namespace(name, factory)
    return store, storage


def run_sweep(url: str, expected: int, batch_size: int,
              phases: dict[str, float] | None = None) -> tuple[float, int, float]:
    """``store.sweep(batch_size=...)``: seconds, batches, longest batch (ms)."""
    store, storage = make_store(url)
    try:
        if phases is not None:
            time_phases(storage, phases)
        with storage.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        marks: list[float] = []
        gc.collect()
        start = time.perf_counter()
        result = store.sweep(batch_size=batch_size,
                             progress=lambda _done: marks.append(time.perf_counter()))
        seconds = time.perf_counter() - start
    finally:
        storage.dispose()
    if len(result.expired) != expected:
        raise BenchError(f"sweep expired {len(result.expired)} sessions, expected {expected}")
    gaps = [b - a for a, b in zip([start, *marks], marks, strict=False)]
    return seconds, result.batches, max(gaps, default=seconds) * 1000


def with_writer(writer: Writer, url: str, op: Callable[[], Any]) -> tuple[Any, WriterStats]:
    with writer.running(url) as samples:
        time.sleep(IDLE_WINDOW_S)
        start = time.monotonic()
        value = op()
        end = time.monotonic()
    return value, writer_stats(samples, start, end)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_database(dbs: Databases, sizes: Sizes, batch_sizes: list[int], layouts: list[str],
                   rounds: int, writer: Writer) -> list[Result]:
    results: list[Result] = []
    for layout in layouts:
        results += bench_layout(dbs, sizes, batch_sizes, layout, writer)
    results += bench_live_count(dbs, sizes, batch_sizes[0], rounds)
    return results


def bench_layout(dbs: Databases, sizes: Sizes, batch_sizes: list[int], layout: str,
                 writer: Writer) -> list[Result]:
    """Sweep against one raw DELETE of the same rows, each on a copy, the writer running."""
    db = dbs.db
    title = DB_TITLES[db]
    results: list[Result] = []
    started = time.perf_counter()
    log(f"{title}: populating {sizes.total:,} sessions ({sizes.expired:,} idle, {layout}) ...")
    original = dbs.new(f"{layout}_original")
    populate(dbs, original, sizes.expired, sizes.total - sizes.expired, layout)
    log(f"  {time.perf_counter() - started:.1f} s")
    raw_copy = dbs.copy(original, f"{layout}_raw")
    batched_copy = dbs.copy(original, f"{layout}_batched")
    sweep_urls = [original] + [dbs.copy(original, f"{layout}_sweep_{b}") for b in batch_sizes[1:]]

    dbs.settle(raw_copy)
    log(f"{title}: raw DELETE of {sizes.expired:,} ...")
    seconds, stats = with_writer(writer, raw_copy, partial(run_raw, raw_copy, sizes.expired))
    dbs.drop(raw_copy)
    log(f"  {seconds:.2f} s")
    results.append(Result(db, f"raw DELETE of the due sessions, {layout}",
                          sizes.expired, sizes.total, seconds, stats, 1, seconds * 1000,
                          kind="raw", layout=layout))

    dbs.settle(batched_copy)
    log(f"{title}: raw DELETE of {sizes.expired:,} in batches of {batch_sizes[0]} ...")
    (seconds, batches, longest), stats = with_writer(
        writer, batched_copy, partial(run_batched, batched_copy, sizes.expired, batch_sizes[0])
    )
    dbs.drop(batched_copy)
    log(f"  {seconds:.2f} s")
    results.append(Result(db, f"raw DELETE in batches of {batch_sizes[0]}, {layout}",
                          sizes.expired, sizes.total, seconds, stats, batches, longest,
                          kind="batched", batch_size=batch_sizes[0], layout=layout))

    for batch_size, url in zip(batch_sizes, sweep_urls, strict=True):
        dbs.settle(url)
        log(f"{title}: store.sweep(batch_size={batch_size}) of {sizes.expired:,} ...")
        phases: dict[str, float] = {}
        (seconds, batches, longest), stats = with_writer(
            writer, url, partial(run_sweep, url, sizes.expired, batch_size, phases)
        )
        dbs.drop(url)
        log(f"  {seconds:.2f} s")
        results.append(Result(db, f"store.sweep(batch_size={batch_size}), {layout}",
                              sizes.expired, sizes.total, seconds, stats, batches, longest,
                              phases, kind="sweep", batch_size=batch_size, layout=layout))
    return results


def bench_live_count(dbs: Databases, sizes: Sizes, batch_size: int,
                     rounds: int) -> list[Result]:
    """The same expired count among few and among many live sessions."""
    db = dbs.db
    title = DB_TITLES[db]
    results: list[Result] = []
    started = time.perf_counter()
    log(f"{title}: populating {sizes.ratio_expired:,} idle among {sizes.ratio_live_few:,} "
        f"and among {sizes.ratio_live_many:,} live ...")
    few = dbs.new("ratio_few")
    populate(dbs, few, sizes.ratio_expired, sizes.ratio_live_few, "scattered")
    many = dbs.new("ratio_many")
    populate(dbs, many, sizes.ratio_expired, sizes.ratio_live_many, "scattered")
    log(f"  {time.perf_counter() - started:.1f} s")
    timings: dict[str, list[float]] = {}
    phases: dict[str, dict[str, float]] = {}
    batches_seen: dict[str, tuple[int, float]] = {}
    for r in range(rounds):  # interleaved, so drift hits both alike
        for key, template in (("few", few), ("many", many)):
            url = dbs.copy(template, f"ratio_{key}_{r}")
            dbs.settle(url)
            timed: dict[str, float] = {}
            seconds, batches, longest = run_sweep(url, sizes.ratio_expired, batch_size, timed)
            dbs.drop(url)
            timings.setdefault(key, []).append(seconds)
            for phase, value in timed.items():
                phases.setdefault(key, {}).setdefault(phase, 0.0)
                phases[key][phase] += value / rounds
            batches_seen[key] = (batches, longest)
            # The same rows deleted by one raw DELETE: what the database itself charges.
            url = dbs.copy(template, f"ratio_{key}_raw_{r}")
            dbs.settle(url)
            timings.setdefault(f"{key}_raw", []).append(run_raw(url, sizes.ratio_expired))
            dbs.drop(url)
    dbs.drop(few)
    dbs.drop(many)
    for key, live in (("few", sizes.ratio_live_few), ("many", sizes.ratio_live_many)):
        log(f"  {key}: sweep " + " ".join(f"{t:.3f}" for t in timings[key]) + " s, raw "
            + " ".join(f"{t:.3f}" for t in timings[f"{key}_raw"]) + " s")
        batches, longest = batches_seen[key]
        results.append(Result(
            db, f"store.sweep(batch_size={batch_size}), {live:,} live, scattered",
            sizes.ratio_expired, sizes.ratio_expired + live,
            statistics.median(timings[key]), None, batches, longest, phases[key],
            kind=f"ratio_{key}", batch_size=batch_size, rounds=timings[key], layout="scattered",
        ))
        raw = timings[f"{key}_raw"]
        results.append(Result(
            db, f"raw DELETE of the due sessions, {live:,} live, scattered",
            sizes.ratio_expired, sizes.ratio_expired + live, statistics.median(raw), None,
            1, statistics.median(raw) * 1000, kind=f"ratio_{key}_raw", rounds=raw,
            layout="scattered",
        ))
    return results


# -- flask-silo 0.1.6, in memory ------------------------------------------------------


def silo_writer(store: Any, sids: list[str], samples: list[Sample],
                stop: threading.Event) -> None:
    """flask-silo's request path (``get``, change, ``save``), timed, until *stop*."""
    count = 0
    while not stop.is_set():
        sid = sids[count % len(sids)]
        count += 1
        start = time.monotonic()
        session = store.get(sid)
        session["cart"]["total"] = count
        store.save(sid, session)
        samples.append((start, time.monotonic(), True))
        time.sleep(0.0005)  # a request's worth of other work


def bench_flask_silo(total: int) -> list[Result]:
    import flask_silo

    results: list[Result] = []
    for label, expired in (("all expired", total), ("half expired", total // 2)):
        store: Any = flask_silo.SessionStore(ttl=TTL)
        for name, factory in NAMESPACES.items():
            store.register_namespace(name, factory)
        now = time.time()
        for i in range(total):
            sid = f"s{i:07d}"
            idle = (i * expired) // total != ((i + 1) * expired) // total
            store.storage.set_session(sid, {
                "cart": new_cart(), "prefs": new_prefs(),
                "_meta": {"created_at": now - 86_400, "sid": sid,
                          "last_active": now - TTL - 60 if idle else now},
            })
        writer_sids = [f"w{i}" for i in range(100)]
        for sid in writer_sids:
            store.get(sid)
        samples: list[Sample] = []
        stop = threading.Event()
        thread = threading.Thread(target=silo_writer, args=(store, writer_sids, samples, stop),
                                  daemon=True)
        thread.start()
        time.sleep(IDLE_WINDOW_S)
        gc.collect()
        start = time.monotonic()
        gone = store.cleanup()
        end = time.monotonic()
        time.sleep(0.05)
        stop.set()
        thread.join()
        if len(gone) != expired:
            raise BenchError(f"flask-silo cleanup expired {len(gone)}, expected {expired}")
        results.append(Result("memory", f"flask-silo 0.1.6 cleanup(), {label}", expired,
                              total + len(writer_sids), end - start,
                              writer_stats(samples, start, end), 1, (end - start) * 1000,
                              kind="memory"))
    return results


# -- report ---------------------------------------------------------------------------


@dataclass
class Verdict:
    db: str
    what: str
    value: float
    target: float
    unit: str
    strict: bool = False
    """True: value must be below target (not at)."""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.value < self.target if self.strict else self.value <= self.target

    def line(self) -> str:
        sign = "<" if self.strict else "<="
        return (f"  {'PASS' if self.ok else 'FAIL'}  {DB_TITLES[self.db]:<10}  {self.what:<50} "
                f"{self.value:8.2f}{self.unit}  (target {sign} {self.target:g}{self.unit})"
                + (f"  {self.note}" if self.note else ""))


def verdicts_for(db: str, results: list[Result]) -> list[Verdict]:
    mine = [r for r in results if r.db == db]
    verdicts: list[Verdict] = []
    for raw in (r for r in mine if r.kind == "raw"):
        sweep = next(r for r in mine if r.kind == "sweep" and r.layout == raw.layout)
        assert sweep.writer is not None
        verdicts += [
            Verdict(db, f"sweep (B={sweep.batch_size}) / raw DELETE, {raw.layout}",
                    sweep.seconds / raw.seconds, SWEEP_TARGET, "x"),
            Verdict(db, f"worst writer latency in the sweep, {raw.layout}",
                    sweep.writer.max_ms, STALL_TARGET_MS, " ms", strict=True),
        ]
    few, many, few_raw, many_raw = (
        next(r for r in mine if r.kind == kind)
        for kind in ("ratio_few", "ratio_many", "ratio_few_raw", "ratio_many_raw")
    )
    verdicts.append(Verdict(db, f"sweep among {many.total - many.expired:,} live / among "
                                f"{few.total - few.expired:,} live", many.seconds / few.seconds,
                            RATIO_TARGET, "x",
                            note=f"(raw DELETE of the same rows: "
                                 f"{many_raw.seconds / few_raw.seconds:.2f}x)"))
    return verdicts


def report(results: list[Result], dbs: list[str], skipped: dict[str, str], versions: dict[str, str],
           args: argparse.Namespace, load_before: float, elapsed: float) -> None:
    columns = ["database", "operation", "expired / total", "time s", "sessions/s", "vs raw",
               "batches", "longest batch ms", "writer max ms", "writer p99 ms",
               "writes (failed)", "idle p99 ms"]
    raw_by = {(r.db, r.layout): r for r in results if r.kind == "raw"}
    few_by = {(r.db, r.kind): r for r in results if r.kind in ("ratio_few", "ratio_few_raw")}
    rows: list[list[str]] = []
    for r in results:
        raw = raw_by.get((r.db, r.layout))
        if r.kind in ("sweep", "batched") and raw is not None:
            versus = f"{r.seconds / raw.seconds:.2f}x"
        elif (r.db, r.kind.replace("many", "few")) in few_by and "many" in r.kind:
            few = few_by[(r.db, r.kind.replace("many", "few"))]
            versus = f"({r.seconds / few.seconds:.2f}x few)"
        else:
            versus = ""
        w = r.writer
        rows.append([
            DB_TITLES[r.db], r.label, f"{r.expired:,} / {r.total:,}",
            f"{r.seconds:.3f}" if r.seconds < 10 else f"{r.seconds:.1f}",
            f"{r.expired / r.seconds:,.0f}", versus, str(r.batches),
            f"{r.longest_batch_ms:,.0f}",
            f"{w.max_ms:,.1f}" if w else "", f"{w.p99_ms:,.1f}" if w else "",
            f"{w.during:,} ({w.failed})" if w else "", f"{w.idle_p99_ms:.1f}" if w else "",
        ])
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return " | ".join(cells).rstrip()

    print()
    print(f"Expiry sweep at scale (scale {args.scale:g}; ttl {TTL} s; sizes scaled alike)")
    setup = [f"Python {platform.python_version()}", f"SQLAlchemy {version('sqlalchemy')}",
             f"flask-silo {version('flask-silo')}"]
    if "sqlite" in dbs:
        setup.append(f"SQLite {versions['sqlite']} (WAL, synchronous=NORMAL)")
    if "postgresql" in dbs:
        setup.append(f"PostgreSQL {versions['postgresql']} via psycopg {version('psycopg')} "
                     "(fsync=on, synchronous_commit=on)")
    setup.append(f"{os.cpu_count()} CPUs, load average {load_before:.2f} before / "
                 f"{os.getloadavg()[0]:.2f} after, {elapsed:.0f} s in all")
    print(", ".join(setup))
    print()
    print(fmt(columns))
    print("-+-".join("-" * w for w in widths))
    previous = None
    for r, row in zip(results, rows, strict=True):
        if previous is not None and r.db != previous:
            print("-+-".join("-" * w for w in widths))
        previous = r.db
        print(fmt(row))
    print()
    print("writer: a separate process doing request + read + change + commit on live "
          "sessions (flask-silo: a thread, get + save); max/p99 over the writes that overlapped "
          "the operation, idle p99 over the second before it. Sweep rows among N live: "
          f"median of {args.rounds} rounds, each on a fresh copy.")
    for r in results:
        if r.kind.startswith("ratio_"):
            print(f"  {DB_TITLES[r.db]} {r.label}: rounds "
                  + ", ".join(f"{t:.3f}" for t in r.rounds) + " s")
    print("Sweep time by statement (s; among N live: the mean of the rounds):")
    for r in results:
        if r.kind in ("sweep", "ratio_few", "ratio_many"):
            in_sql = sum(r.phases.values())
            seconds = statistics.mean(r.rounds) if r.rounds else r.seconds
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r.phases.items() if v >= 0.0005)
            where = r.layout if r.kind == "sweep" else f"{r.total - r.expired:,} live"
            print(f"  {DB_TITLES[r.db]:<10} B={r.batch_size:<5} {where:<13} {parts}, "
                  f"Python and the rest {seconds - in_sql:.3f}")
    verdicts = [v for db in dbs for v in verdicts_for(db, results)]
    if verdicts:
        print("Verdicts:")
        for verdict in verdicts:
            print(verdict.line())
        failed = sum(not v.ok for v in verdicts)
        print(f"RESULT: {failed} of {len(verdicts)} targets MISSED" if failed
              else f"RESULT: all {len(verdicts)} targets met")
    for db, reason in skipped.items():
        print(f"NOTE: {DB_TITLES[db]} was not measured ({reason}): its targets are unchecked.")


# -- main -----------------------------------------------------------------------------


def start_postgresql() -> PgServerLike:
    """A private server with fsync on, or the one named by ``SILO_TEST_PG_URL``."""
    sys.path.insert(0, str(REPO / "tests"))
    pgserver = importlib.import_module("pgserver")
    external = os.environ.get("SILO_TEST_PG_URL")
    server: PgServerLike = (
        pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
    )
    return server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", choices=DATABASES, help="measure one database only")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every size by this (e.g. 0.05 for a quick run)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="B",
                        help="sweep batch sizes; the first is judged by the targets "
                             "(default: the store's default)")
    parser.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both",
                        help="where idle rows are stored (see populate(); default both)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the live-count comparison (default 5)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip flask-silo's in-memory cleanup()")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = [SessionStore().sweep_batch_size]
    args.layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    if args.scale <= 0 or args.rounds < 1 or min(args.batch_size) < 1:
        parser.error("--scale, --rounds and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    wanted = [args.only] if args.only else list(DATABASES)
    tmp = Path(tempfile.mkdtemp(prefix="silo-sweep-"))
    results: list[Result] = []
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    measured: list[str] = []
    pg: PgServerLike | None = None
    writer = Writer()
    try:
        for db in wanted:
            dbs: Databases
            if db == "sqlite":
                dbs = SQLiteDatabases(tmp)
            else:
                try:
                    pg = start_postgresql()
                except Exception as exc:
                    skipped[db] = f"no PostgreSQL server: {exc}"
                    continue
                dbs = PostgreSQLDatabases(pg)
            versions[db] = dbs.server_version()
            results += bench_database(dbs, SIZES[db].scaled(args.scale), args.batch_size,
                                      args.layouts, args.rounds, writer)
            measured.append(db)
        if not args.skip_memory:
            log(f"flask-silo {version('flask-silo')}: cleanup() ...")
            results += bench_flask_silo(max(50, round(MEMORY_SESSIONS * args.scale)))
        report(results, measured, skipped, versions, args, load_before,
               time.perf_counter() - began)
    finally:
        writer.close()
        if pg is not None:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
