"""Per-request cost of session state: flask_silo_sql against its floors and its peers.

Two endpoints, the same handler code in every app:

* **write** ``POST /api/count`` increments a counter in the client's state;
* **read** ``GET /api/read`` returns the counter.

Configurations, each driven in-process through Flask's test client:

* bare Flask: no session state (the counter is a module-level dict);
* flask-silo 0.1.6 with its ``InMemoryStorage`` (the original, not durable);
* Flask-Session 0.8, SQLAlchemy backend, on SQLite and on PostgreSQL (its
  SQLite engine gets the same connection settings as flask_silo_sql's);
* flask_silo_sql on SQLite and on PostgreSQL: ``Silo(app, storage=SQLStorage(url),
  auto_cleanup=False)`` on a migrated database, one client SID reused;
* the same with OpenTelemetry's SQLAlchemy instrumentation attached to its
  engine (``tests/otel.py``'s ``EngineSpans``: the package's own listeners,
  spans exported to memory, cleared after every round), so silo runs its
  statements through SQLAlchemy Core, as it does while anything observes the
  engine;
* two floors on each database, no Flask, on a one-row table shaped like
  ``silo_namespaces`` (string key, JSON/JSONB document, version), with an
  engine from :func:`flask_silo_sql.sql.engine.make_engine`, so identical
  connection settings (SQLite WAL, ``synchronous=NORMAL``, busy timeout,
  foreign keys; psycopg 3 and the same pool on PostgreSQL):

  * the Core floor: one SQLAlchemy Core SELECT (read), and SELECT + UPDATE +
    commit in one ``engine.begin()`` block (write);
  * the DBAPI floor: no SQLAlchemy on the measured path, two pooled DBAPI
    connections taken once from ``engine.raw_connection()``, one cursor each.
    Read: one ``SELECT`` (one round trip; PostgreSQL in autocommit, as silo's
    reads are). Write: one versioned ``UPDATE`` of the document, then
    ``COMMIT`` (on PostgreSQL outside autocommit, so psycopg sends ``BEGIN``
    first: three round trips, where an autocommitted UPDATE, as silo sends a
    one-namespace write of a freshly touched session, is one); its write
    column is that alone, the read it would need is the read column;
  * the same DBAPI statements inside a bare Flask request (its write view runs
    the SELECT and then the UPDATE + COMMIT, its read view the SELECT): the sum
    "bare Flask + DBAPI floor" measured as one request, with the cache and
    scheduling costs a request pays and a tight loop of statements does not.

PostgreSQL is a private server started for the run with ``fsync=on`` and
``synchronous_commit=on`` (``tests/pgserver.py``), or the server named by
``SILO_TEST_PG_URL``. Every measurement is ``--iterations`` back-to-back calls
timed with :func:`time.perf_counter_ns` after a warm-up; rounds are interleaved
across configurations (in reverse order every other round) and the median round is reported.

Targets, on each database: a flask_silo_sql write costs at most 1.15 x (bare
Flask write + DBAPI SELECT + DBAPI UPDATE/COMMIT), a read at most 1.15 x (bare
Flask read + DBAPI SELECT), both sums measured as one request (the floor's
statements in a bare Flask view); against the Core floor, a write at most 1.25 x
(bare Flask write + Core write floor) and a read at most 1.25 x (bare Flask read
+ Core read floor); and Flask-Session costs at least 3 x flask_silo_sql for both.
The traced configuration's ratios to the same floors are reported, with no
target.

Idempotent requests: the same app with ``@silo.idempotent()`` on the write
view, on its own database, measured in the same interleaved rounds. Its write
is a first request (a new ``Idempotency-Key`` each time), its read a replay (one
key answered already). Targets: a first request costs at most 1.15 x the same
POST without the decorator and sends at most one statement more (counted at
the storage's statement hook), a replay at most 1.1 x a read request.

A Flask-SQLAlchemy host (``SQLStorage(db)``, its own table in silo's
database): its write request inserts one host row through ``db.session``
(``db.session.commit()`` in the view) and changes one namespace, its read
returns the counter. Three configurations, same rounds: today's two commits
(non-atomic: the host's commit, then silo's on its own connection), atomic
mode (``SQLStorage(db, atomic=True)``: one connection, one COMMIT; the view's
commit flushes), and atomic mode with ``@silo.idempotent()`` on the write view
(a new key each time). Targets: atomic <= 1.0 x two commits; idempotent atomic
<= 1.15 x atomic on PostgreSQL, <= 1.3 x on SQLite.

Encrypted namespaces: the same app with a 1 kB namespace (a counter beside 1,000
characters of text), plain and registered with ``encrypted=True`` (Fernet, one key),
each on its own database, in the same rounds. Target: the encrypted write and
read each cost at most 1.1 x the plain ones.

SIDs hashed at rest: every request hashes its SID into the session's key
(SHA-256; always on, so there is no configuration without it). The SHA-256s a
write and a read request compute are counted (``flask_silo_sql.keys.hashed``)
and one is timed on its own; target: together at most 3 % of the request.

The exit status is 0 whatever the verdicts: this is a report.

Run: ``python benchmarks/requests.py [--iterations N] [--rounds R] [--only sqlite|postgresql]
[--host-only | --encryption-only]`` (``--host-only``: the Flask-SQLAlchemy host
configurations alone; ``--encryption-only``: the 1 kB plain and encrypted ones alone).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from flask import Flask, Response, jsonify
from flask import session as flask_session
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    insert,
    select,
    update,
)

import flask_silo_sql
from flask_silo_sql import keys, schema
from flask_silo_sql.sids import SID_LENGTH
from flask_silo_sql.sql.engine import make_engine, sqlite_pragmas
from flask_silo_sql.sql.models import JSONDocument

REPO = Path(__file__).resolve().parent.parent
HEADER = "X-Session-ID"
WRITE_PATH = "/api/count"
READ_PATH = "/api/read"
DATABASES = ("sqlite", "postgresql")
DB_TITLES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}

IDEMPOTENT_FIRST_TARGET = 1.15
"""An idempotent POST (a new key) / the same POST without the decorator."""
IDEMPOTENT_REPLAY_TARGET = 1.1
"""A replay / a read request."""
IDEMPOTENT_EXTRA_STATEMENTS = 1
DBAPI_FLOOR_TARGET = 1.15
"""silo / (bare Flask + DBAPI floor), for writes and reads."""
CORE_FLOOR_TARGET = 1.25
"""silo / (bare Flask + Core floor), for writes and reads."""
HASHING_TARGET_PCT = 3.0
"""SIDs hashed at rest: the SHA-256s a request computes, at most this % of it."""
PEER_TARGET = 3.0
ATOMIC_TARGET = 1.0
"""Atomic mode's host write / the same write with two commits (non-atomic)."""
ATOMIC_IDEMPOTENT_TARGETS = {"sqlite": 1.3, "postgresql": 1.15}
"""An atomic idempotent POST (new key) / the same atomic POST without the decorator."""
HOST_ROLES = ("host_two_commits", "host_atomic", "host_atomic_idempotent")
ENCRYPTED_TARGET = 1.1
"""A request on a 1 kB encrypted namespace / the same on a plain one."""
PAD_CHARS = 1000
"""The text beside the counter in the 1 kB namespaces."""

Op = Callable[[], None]
State = Callable[[], MutableMapping[str, Any]]


class BenchError(RuntimeError):
    """A configuration answered wrongly: its numbers would mean nothing."""


class PgServerLike(Protocol):
    """What the benchmark uses of ``tests/pgserver.py``'s servers."""

    def create_database(self, name: str | None = None) -> str: ...

    def destroy(self) -> None: ...


@dataclass
class Bench:
    """One configuration: a write op, a read op, and how to check and close it."""

    label: str
    role: str
    """``bare``, ``silo``, ``floor`` (Core), ``dbapi_floor``, ``flask_session``, ``silo_sql``,
    ``silo_sql_traced`` or ``silo_sql_idempotent``."""
    db: str | None
    write: Op
    read: Op
    value: Callable[[], int]
    """The counter as the configuration itself reads it back."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    after_round: Callable[[], None] | None = None
    """Called after each timed round (outside the timing)."""
    server_version: str | None = None
    statements: dict[str, int] = field(default_factory=dict)
    """Statements one request sends, by kind (silo configurations)."""
    hashes: dict[str, int] = field(default_factory=dict)
    """SHA-256s of a SID (its key at rest) one request computes, by kind (silo_sql)."""
    writes_done: int = 0
    write_rounds: list[float] = field(default_factory=list)
    read_rounds: list[float] = field(default_factory=list)

    @property
    def write_us(self) -> float:
        return statistics.median(self.write_rounds)

    @property
    def read_us(self) -> float:
        return statistics.median(self.read_rounds)

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()


# -- apps ----------------------------------------------------------------------


View = Callable[[], Response]


def add_counter_routes(
    app: Flask, state: State, decorate: Callable[[View], View] | None = None
) -> None:
    """The two endpoints, identical in every app; *state* is the client's state.

    *decorate* wraps the write view (``silo.idempotent()``).
    """

    def count() -> Response:
        data = state()
        data["n"] = int(data.get("n", 0)) + 1
        return jsonify(n=data["n"])

    app.post(WRITE_PATH)(decorate(count) if decorate is not None else count)

    @app.get(READ_PATH)
    def read() -> Response:
        return jsonify(n=state().get("n", 0))


def client_ops(app: Flask, sid: str) -> tuple[Op, Op, Callable[[], int]]:
    """Write, read and value callables that drive *app* through its test client."""
    client = app.test_client()
    headers = {HEADER: sid}

    def write() -> None:
        response = client.post(WRITE_PATH, headers=headers)
        if response.status_code != 200:
            raise BenchError(f"{app.name}: write answered {response.status_code}")

    def read() -> None:
        response = client.get(READ_PATH, headers=headers)
        if response.status_code != 200:
            raise BenchError(f"{app.name}: read answered {response.status_code}")

    def value() -> int:
        body = client.get(READ_PATH, headers=headers).get_json()
        return int(body["n"])

    return write, read, value


def bare_bench(sid: str) -> Bench:
    app = Flask("bench_bare")
    counter: dict[str, Any] = {"n": 0}
    add_counter_routes(app, lambda: counter)
    write, read, value = client_ops(app, sid)
    return Bench("bare Flask (no state)", "bare", None, write, read, value)


def flask_silo_bench(sid: str) -> Bench:
    import flask_silo

    app = Flask("bench_flask_silo")
    silo = flask_silo.Silo(app, storage=flask_silo.InMemoryStorage(), auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    add_counter_routes(app, lambda: silo.state("counter"))
    write, read, value = client_ops(app, sid)
    return Bench("flask-silo 0.1.6, InMemoryStorage", "silo", None, write, read, value,
                 closers=[silo.stop])


def flask_session_bench(db: str, url: str, sid: str) -> Bench:
    from flask_session import Session
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(f"bench_flask_session_{db}")
    app.config.update(SESSION_TYPE="sqlalchemy", SQLALCHEMY_DATABASE_URI=url)
    sa = SQLAlchemy()
    sa.init_app(app)
    with app.app_context():
        engine = sa.engine
    if db == "sqlite":  # the same settings as flask_silo_sql's engines, before any connection
        event.listen(engine, "connect", sqlite_pragmas)
    app.config["SESSION_SQLALCHEMY"] = sa
    Session(app)
    add_counter_routes(app, lambda: flask_session)
    write, read, value = client_ops(app, sid)  # the test client keeps the session cookie
    return Bench("Flask-Session 0.8, SQLAlchemy", "flask_session", db, write, read, value,
                 closers=[engine.dispose])


def silo_sql_bench(db: str, url: str, sid: str, *, traced: bool = False) -> Bench:
    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    closers: list[Callable[[], None]] = [storage.dispose]
    after_round: Callable[[], None] | None = None
    label, role = "flask_silo_sql", "silo_sql"
    if traced:
        spans = engine_spans(storage.engine)
        spans.attach()
        closers.append(spans.detach)
        if not storage.connector.observed():
            raise BenchError("the traced engine is not observed: silo would not use Core")
        label, role = "flask_silo_sql, OpenTelemetry traced (Core)", "silo_sql_traced"

        def after_round() -> None:
            traced_sql = " ".join(spans.statements())
            if "silo_namespaces" not in traced_sql:
                raise BenchError("the tracer saw none of silo's statements")
            spans.clear()

    app = Flask(f"bench_silo_sql_{db}{'_traced' if traced else ''}")
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    add_counter_routes(app, lambda: silo.state("counter"))
    write, read, value = client_ops(app, sid)
    closers.append(silo.stop)
    bench = Bench(label, role, db, write, read, value, closers=closers, after_round=after_round)
    if not traced:
        write()  # the session's row: then a write is what the measured ones are
        bench.statements = {"write": count_statements(storage, write),
                            "read": count_statements(storage, read)}
        bench.hashes = {"write": count_hashes(write), "read": count_hashes(read)}
        bench.writes_done = 3
    return bench


def count_statements(storage: flask_silo_sql.SQLStorage, op: Op) -> int:
    """How many statements *op* sends, counted at the storage's statement hook."""
    seen: list[str] = []
    previous = storage.statement_hook
    storage.statement_hook = lambda name, sql, values: seen.append(name)
    try:
        op()
    finally:
        storage.statement_hook = previous
    return len(seen)


def count_hashes(op: Op) -> int:
    """How many times *op* hashes a SID into its key (``flask_silo_sql.keys.hashed``)."""
    real = keys.hashed
    calls = 0

    def counted(sid: str) -> keys.SessionKey:
        nonlocal calls
        calls += 1
        return real(sid)

    keys.hashed = counted
    try:
        op()
    finally:
        keys.hashed = real
    return calls


def hash_us(sid: str, calls: int = 20_000, rounds: int = 7) -> float:
    """Median time of one ``session_key(sid)`` (a SHA-256 of the SID), in µs."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            keys.session_key(sid)
        times.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(times)


def hashing_verdicts(db: str, benches: list[Bench], per_hash_us: float) -> list[Verdict]:
    """SIDs hashed at rest: the SHA-256s a request computes, as a share of that request."""
    silo = next(b for b in benches if b.db == db and b.role == "silo_sql")
    return [
        Verdict(db, f"SID hashing, % of a {kind} request ({silo.hashes[kind]} x SHA-256)",
                100 * silo.hashes[kind] * per_hash_us / request_us, HASHING_TARGET_PCT, True)
        for kind, request_us in (("write", silo.write_us), ("read", silo.read_us))
    ]


def silo_sql_idempotent_bench(db: str, url: str, sid: str) -> Bench:
    """flask_silo_sql with ``@silo.idempotent()`` on the write view.

    Its write is a first request (a new key each time), its read a replay of
    one key answered already.
    """
    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    app = Flask(f"bench_silo_sql_idempotent_{db}")
    # One session sends thousands of new keys here: no cap on the keys a session holds
    # (a real client's session holds a few, which the cap's count does not feel).
    app.config["SILO_IDEMPOTENCY_MAX_KEYS"] = None
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    add_counter_routes(app, lambda: silo.state("counter"), silo.idempotent())
    client = app.test_client()
    keys = iter(range(10**9))
    client.post(WRITE_PATH, headers={HEADER: sid})  # the session's row, without a key
    replayed = {HEADER: sid, "Idempotency-Key": "replayed"}
    if client.post(WRITE_PATH, headers=replayed).status_code != 200:
        raise BenchError("idempotent: the first request of the replayed key failed")

    def write() -> None:
        headers = {HEADER: sid, "Idempotency-Key": f"k{next(keys)}"}
        response = client.post(WRITE_PATH, headers=headers)
        if response.status_code != 200 or "Idempotent-Replayed" in response.headers:
            raise BenchError(f"idempotent write answered {response.status_code}")

    def read() -> None:
        response = client.post(WRITE_PATH, headers=replayed)
        if response.headers.get("Idempotent-Replayed") != "true":
            raise BenchError(f"idempotent replay answered {response.status_code} unreplayed")

    def value() -> int:
        body = client.get(READ_PATH, headers={HEADER: sid}).get_json()
        return int(body["n"]) - 2  # the two requests above

    bench = Bench("flask_silo_sql, @silo.idempotent", "silo_sql_idempotent", db, write, read,
                  value, closers=[silo.stop, storage.dispose])
    bench.statements = {
        "write": count_statements(storage, write),
        "read": count_statements(storage, read),
    }
    bench.writes_done = 1
    return bench


def silo_sql_1k_bench(db: str, url: str, sid: str, *, encrypted: bool) -> Bench:
    """flask_silo_sql on a 1 kB namespace, plain or encrypted (one Fernet key)."""
    from cryptography.fernet import Fernet

    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    app = Flask(f"bench_silo_sql_1k_{'encrypted_' if encrypted else ''}{db}")
    app.config["SILO_ENCRYPTION_KEYS"] = [Fernet.generate_key().decode()]
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    pad = secrets.token_hex(PAD_CHARS // 2)
    silo.register("counter", lambda: {"n": 0, "pad": pad}, encrypted=encrypted)
    add_counter_routes(app, lambda: silo.state("counter"))
    write, read, value = client_ops(app, sid)
    label = f"flask_silo_sql, 1 kB namespace{', encrypted' if encrypted else ''}"
    role = "silo_sql_1k_encrypted" if encrypted else "silo_sql_1k"
    bench = Bench(label, role, db, write, read, value, closers=[silo.stop, storage.dispose])
    write()  # the session's row and the namespace's
    bench.writes_done = 1
    return bench


def encryption_benches(db: str, new_url: Callable[[], str], sid: str) -> list[Bench]:
    return [silo_sql_1k_bench(db, new_url(), sid, encrypted=flag) for flag in (False, True)]


def encryption_verdicts(db: str, benches: list[Bench]) -> list[Verdict]:
    """The encrypted 1 kB namespace against the plain one, in the same run."""
    by_role = {b.role: b for b in benches if b.db == db}
    plain, sealed = by_role["silo_sql_1k"], by_role["silo_sql_1k_encrypted"]
    return [
        Verdict(db, "write, 1 kB encrypted namespace / plain",
                sealed.write_us / plain.write_us, ENCRYPTED_TARGET, True),
        Verdict(db, "read, 1 kB encrypted namespace / plain",
                sealed.read_us / plain.read_us, ENCRYPTED_TARGET, True),
    ]


def encryption_report(benches: list[Bench], dbs: list[str]) -> list[Verdict]:
    print("Encrypted namespaces (1 kB, Fernet; each on its own database, same rounds):")
    verdicts: list[Verdict] = []
    for db in dbs:
        by_role = {b.role: b for b in benches if b.db == db}
        plain, sealed = by_role["silo_sql_1k"], by_role["silo_sql_1k_encrypted"]
        print(f"  {DB_TITLES[db]:<10}  write {plain.write_us:.1f} µs plain, "
              f"{sealed.write_us:.1f} µs encrypted; read {plain.read_us:.1f} µs plain, "
              f"{sealed.read_us:.1f} µs encrypted")
        verdicts += encryption_verdicts(db, benches)
    return verdicts


def host_bench(db: str, url: str, sid: str, role: str) -> Bench:
    """A Flask-SQLAlchemy host whose write inserts a row of its own and changes one
    namespace (see the module docstring); *role* is one of :data:`HOST_ROLES`."""
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    app = Flask(f"bench_{role}_{db}")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, SILO_IDEMPOTENCY_MAX_KEYS=None)
    sa = SQLAlchemy(app, model_class=Base)

    class Order(sa.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_orders"
        id = mapped_column(Integer, primary_key=True)
        n = mapped_column(Integer, nullable=False)

    with app.app_context():
        engine = sa.engine
        if db == "sqlite":  # the same settings as flask_silo_sql's engines
            event.listen(engine, "connect", sqlite_pragmas)
        schema.upgrade(engine)
        sa.create_all()
    storage = flask_silo_sql.SQLStorage(sa, atomic=role != "host_two_commits")
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})

    def count() -> Response:
        sa.session.add(Order(n=1))
        sa.session.commit()  # the host's commit (atomic mode: a flush; one COMMIT at the end)
        data = silo.state("counter")
        data["n"] += 1
        return jsonify(n=data["n"])

    idempotent = role == "host_atomic_idempotent"
    app.post(WRITE_PATH)(silo.idempotent()(count) if idempotent else count)

    @app.get(READ_PATH)
    def read() -> Response:
        return jsonify(n=silo.state("counter")["n"])

    client = app.test_client()
    keys = iter(range(10**9))

    def write() -> None:
        headers = {HEADER: sid}
        if idempotent:
            headers["Idempotency-Key"] = f"k{next(keys)}"
        response = client.post(WRITE_PATH, headers=headers)
        if response.status_code != 200 or "Idempotent-Replayed" in response.headers:
            raise BenchError(f"{role}: write answered {response.status_code}")

    def read_op() -> None:
        response = client.get(READ_PATH, headers={HEADER: sid})
        if response.status_code != 200:
            raise BenchError(f"{role}: read answered {response.status_code}")

    def value() -> int:
        with engine.connect() as conn:
            rows = int(conn.exec_driver_sql("SELECT count(*) FROM bench_orders").scalar() or 0)
        counted = int(client.get(READ_PATH, headers={HEADER: sid}).get_json()["n"])
        if rows != counted:
            raise BenchError(f"{role}: {rows} host rows but the counter says {counted}")
        return counted

    labels = {
        "host_two_commits": "Flask-SQLAlchemy host, two commits",
        "host_atomic": "Flask-SQLAlchemy host, atomic",
        "host_atomic_idempotent": "Flask-SQLAlchemy host, atomic, @silo.idempotent",
    }
    client.post(WRITE_PATH, headers={HEADER: sid, "Idempotency-Key": "first"})  # the rows
    bench = Bench(labels[role], role, db, write, read_op, value,
                  closers=[silo.stop, engine.dispose])
    bench.writes_done = 1
    bench.statements = {"write": count_statements(storage, write)}
    bench.writes_done = 2
    return bench


def host_benches(db: str, new_url: Callable[[], str], sid: str) -> list[Bench]:
    """The Flask-SQLAlchemy host configurations on *db*, each in its own database."""
    return [host_bench(db, new_url(), sid, role) for role in HOST_ROLES]


def host_verdicts(db: str, benches: list[Bench]) -> list[Verdict]:
    by_role = {b.role: b for b in benches if b.db == db}
    if not all(role in by_role for role in HOST_ROLES):
        return []
    two, atomic, idem = (by_role[role] for role in HOST_ROLES)
    return [
        Verdict(db, "host write, atomic / two commits", atomic.write_us / two.write_us,
                ATOMIC_TARGET, True),
        Verdict(db, "host write, atomic idempotent (new key) / atomic",
                idem.write_us / atomic.write_us, ATOMIC_IDEMPOTENT_TARGETS[db], True),
    ]


def host_report(benches: list[Bench], dbs: list[str]) -> list[Verdict]:
    """The host configurations' lines (printed) and verdicts."""
    print("Flask-SQLAlchemy host (write: one host row + one namespace; statements = silo's, "
          "at its statement hook):")
    verdicts: list[Verdict] = []
    for db in dbs:
        for bench in benches:
            if bench.db == db and bench.role in HOST_ROLES:
                print(f"  {DB_TITLES[db]:<10}  {bench.label:<50} write {bench.write_us:7.1f} µs "
                      f"({bench.statements.get('write', 0)} statements), read "
                      f"{bench.read_us:7.1f} µs")
        verdicts += host_verdicts(db, benches)
    return verdicts


def engine_spans(engine: Engine) -> Any:
    """``tests/otel.py``'s ``EngineSpans`` on *engine* (not attached yet)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("otel").EngineSpans(engine)


def floor_table(engine: Engine, sid: str) -> Table:
    """The floors' one-row table, shaped like ``silo_namespaces``, created and filled."""
    metadata = MetaData()
    table = Table(
        "bench_floor",
        metadata,
        Column("sid", String(SID_LENGTH), primary_key=True),
        Column("data", JSONDocument, nullable=False),
        Column("version", Integer, nullable=False),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table).values(sid=sid, data={"n": 0}, version=1))
    return table


def server_version(engine: Engine) -> str | None:
    info = engine.dialect.server_version_info
    return ".".join(map(str, info)) if info else None


def floor_bench(db: str, url: str, sid: str) -> Bench:
    """One Core SELECT (read); SELECT + UPDATE + commit (write); no Flask."""
    engine: Engine = make_engine(url)
    table = floor_table(engine, sid)
    key = bindparam("k_sid", type_=String(SID_LENGTH))
    load = select(table.c.data, table.c.version).where(table.c.sid == key)
    store = (
        update(table)
        .where(table.c.sid == key, table.c.version == bindparam("k_version", type_=Integer()))
        .values(data=bindparam("k_data", type_=JSONDocument), version=table.c.version + 1)
    )
    params = {"k_sid": sid}

    def write() -> None:
        with engine.begin() as conn:
            row = conn.execute(load, params).one()
            data = dict(row.data)
            data["n"] += 1
            conn.execute(store, {"k_sid": sid, "k_data": data, "k_version": row.version})

    def read() -> None:
        with engine.connect() as conn:
            conn.execute(load, params).one()

    def value() -> int:
        with engine.connect() as conn:
            return int(conn.execute(load, params).one().data["n"])

    return Bench("Core floor (no Flask)", "floor", db, write, read, value,
                 closers=[engine.dispose], server_version=server_version(engine))


def dbapi_floor_bench(db: str, url: str, sid: str) -> Bench:
    """One DBAPI SELECT (read); one UPDATE + COMMIT (write); no SQLAlchemy, no Flask.

    Two pooled connections of a :func:`make_engine` engine, taken once: the
    reader's in autocommit on PostgreSQL (as silo's reads run), the writer's
    not, so each write is the UPDATE and then COMMIT.
    """
    engine: Engine = make_engine(url)
    floor_table(engine, sid)
    pg = engine.dialect.name == "postgresql"
    mark = "%s" if pg else "?"
    load = f"SELECT data, version FROM bench_floor WHERE sid = {mark}"
    store = (f"UPDATE bench_floor SET data = {mark}{'::jsonb' if pg else ''}, "
             f"version = version + 1 WHERE sid = {mark} AND version = {mark}")
    pooled = [engine.raw_connection(), engine.raw_connection()]
    reader: Any = pooled[0].dbapi_connection
    writer: Any = pooled[1].dbapi_connection
    if pg:
        reader.autocommit = True
    read_cursor = reader.cursor()
    write_cursor = writer.cursor()
    key = (sid,)
    read_cursor.execute(load, key)
    data, version = read_cursor.fetchone()
    n = int((json.loads(data) if isinstance(data, str) else data)["n"])

    def write() -> None:
        nonlocal n, version
        write_cursor.execute(store, (json.dumps({"n": n + 1}), sid, version))
        writer.commit()
        if write_cursor.rowcount != 1:
            raise BenchError("DBAPI floor: the UPDATE changed no row")
        n += 1
        version += 1

    def read() -> None:
        read_cursor.execute(load, key)
        read_cursor.fetchone()

    def value() -> int:
        read_cursor.execute(load, key)
        row = read_cursor.fetchone()
        return int((json.loads(row[0]) if isinstance(row[0], str) else row[0])["n"])

    def close() -> None:
        read_cursor.close()
        write_cursor.close()
        if pg:
            reader.autocommit = False  # the pool's default
        for connection in pooled:
            connection.close()
        engine.dispose()

    return Bench("DBAPI floor (no SQLAlchemy, no Flask)", "dbapi_floor", db, write, read,
                 value, closers=[close], server_version=server_version(engine))


def dbapi_request_bench(db: str, url: str, sid: str) -> Bench:
    """Bare Flask whose views run the DBAPI floor's statements: the sum the targets name.

    The write view does the floor's SELECT, then its UPDATE + COMMIT; the read
    view its SELECT; on two pooled connections taken once (no checkout per
    request, which silo pays). Timing the floor inside a Flask request, as
    silo's statements are timed, charges both with the same cache and
    scheduling costs a tight loop of bare statements does not have.
    """
    floor = dbapi_floor_bench(db, url, sid)
    app = Flask("bench_dbapi_request")

    @app.post(WRITE_PATH)
    def count() -> Response:
        floor.read()
        floor.write()
        return jsonify(n=1)

    @app.get(READ_PATH)
    def read() -> Response:
        floor.read()
        return jsonify(n=1)

    write, read_op, _ = client_ops(app, sid)
    return Bench(
        "bare Flask + DBAPI statements in the view", "dbapi_request", db, write, read_op,
        floor.value, closers=floor.closers, server_version=floor.server_version,
    )


# -- databases -----------------------------------------------------------------


def start_postgresql() -> PgServerLike:
    """A private server with fsync on, or the one named by ``SILO_TEST_PG_URL``."""
    sys.path.insert(0, str(REPO / "tests"))
    pgserver = importlib.import_module("pgserver")
    external = os.environ.get("SILO_TEST_PG_URL")
    server: PgServerLike = (
        pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
    )
    return server


def database_benches(db: str, new_url: Callable[[], str], sid: str) -> list[Bench]:
    """The floors, Flask-Session and flask_silo_sql (untraced, traced) on *db*.

    Each in its own database.
    """
    return [
        dbapi_floor_bench(db, new_url(), sid),
        dbapi_request_bench(db, new_url(), sid),
        floor_bench(db, new_url(), sid),
        flask_session_bench(db, new_url(), sid),
        silo_sql_bench(db, new_url(), sid),
        silo_sql_bench(db, new_url(), sid, traced=True),
        silo_sql_idempotent_bench(db, new_url(), sid),
        *host_benches(db, new_url, sid),
        *encryption_benches(db, new_url, sid),
    ]


# -- measuring -----------------------------------------------------------------


def timed(op: Op, iterations: int) -> float:
    """Microseconds per call of *op*, over *iterations* back-to-back calls."""
    gc.collect()
    start = time.perf_counter_ns()
    for _ in range(iterations):
        op()
    return (time.perf_counter_ns() - start) / iterations / 1000


def warm_up(bench: Bench, iterations: int) -> None:
    """Create the client's state, fill caches and pools, and check the answers."""
    for _ in range(iterations):
        bench.write()
        bench.read()
    bench.writes_done += iterations
    check(bench)
    if bench.after_round is not None:
        bench.after_round()


def check(bench: Bench) -> None:
    seen = bench.value()
    if seen != bench.writes_done:
        raise BenchError(f"{bench.label} ({bench.db}): counter is {seen}, "
                         f"expected {bench.writes_done}")


def run(benches: list[Bench], iterations: int, rounds: int) -> None:
    warmup = max(30, iterations // 5)
    for bench in benches:
        warm_up(bench, warmup)
    for done in range(rounds):  # interleaved, so drift hits every configuration alike
        for bench in benches if done % 2 == 0 else benches[::-1]:  # (and no one goes first)
            bench.write_rounds.append(timed(bench.write, iterations))
            bench.writes_done += iterations
            bench.read_rounds.append(timed(bench.read, iterations))
            if bench.after_round is not None:
                bench.after_round()
    for bench in benches:
        check(bench)


# -- report --------------------------------------------------------------------


@dataclass
class Verdict:
    db: str
    what: str
    ratio: float
    target: float
    at_most: bool

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    def cell(self) -> str:
        return f"{self.ratio:.2f} {'PASS' if self.ok else 'FAIL'}"

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        mark = "PASS" if self.ok else "FAIL"
        return f"  {mark}  {DB_TITLES[self.db]:<10}  {self.what:<64} {self.ratio:5.2f}  " \
               f"(target {sign} {self.target:g})"


FLOOR_RATIOS = (
    ("write / (bare Flask write + DBAPI SELECT + DBAPI UPDATE/COMMIT)", DBAPI_FLOOR_TARGET),
    ("read / (bare Flask read + DBAPI SELECT)", DBAPI_FLOOR_TARGET),
    ("write / (bare Flask write + Core write floor)", CORE_FLOOR_TARGET),
    ("read / (bare Flask read + Core read floor)", CORE_FLOOR_TARGET),
)
"""The ratios of a flask_silo_sql configuration to the floors, in :func:`floor_ratios`' order."""


def floor_ratios(silo: Bench, db: str, benches: list[Bench], bare: Bench) -> list[float]:
    """*silo*'s costs over bare Flask's plus each floor's on *db* (see FLOOR_RATIOS)."""
    by_role = {b.role: b for b in benches if b.db == db}
    in_view, core = by_role["dbapi_request"], by_role["floor"]
    return [
        silo.write_us / in_view.write_us,
        silo.read_us / in_view.read_us,
        silo.write_us / (bare.write_us + core.write_us),
        silo.read_us / (bare.read_us + core.read_us),
    ]


def idempotent_verdicts(db: str, benches: list[Bench]) -> list[Verdict]:
    """@silo.idempotent against the same app without it, in the same run."""
    by_role = {b.role: b for b in benches if b.db == db}
    silo, idem = by_role["silo_sql"], by_role["silo_sql_idempotent"]
    extra = idem.statements["write"] - silo.statements["write"]
    return [
        Verdict(db, "idempotent POST (new key) / the same POST without the decorator",
                idem.write_us / silo.write_us, IDEMPOTENT_FIRST_TARGET, True),
        Verdict(db, "statements of an idempotent POST - those of the same POST",
                float(extra), IDEMPOTENT_EXTRA_STATEMENTS, True),
        Verdict(db, "replay / read request",
                idem.read_us / silo.read_us, IDEMPOTENT_REPLAY_TARGET, True),
    ]


def verdicts_for(db: str, benches: list[Bench], bare: Bench) -> list[Verdict]:
    by_role = {b.role: b for b in benches if b.db == db}
    silo, peer = by_role["silo_sql"], by_role["flask_session"]
    ratios = floor_ratios(silo, db, benches, bare)
    return [
        *(Verdict(db, what, ratio, target, True)
          for (what, target), ratio in zip(FLOOR_RATIOS, ratios, strict=True)),
        Verdict(db, "Flask-Session write / flask_silo_sql write",
                peer.write_us / silo.write_us, PEER_TARGET, False),
        Verdict(db, "Flask-Session read / flask_silo_sql read",
                peer.read_us / silo.read_us, PEER_TARGET, False),
        *idempotent_verdicts(db, benches),
        *host_verdicts(db, benches),
        *encryption_verdicts(db, benches),
    ]


def report(benches: list[Bench], dbs: list[str], skipped: dict[str, str],
           iterations: int, rounds: int, pg_version: str | None, load_before: float,
           verbose: bool) -> None:
    bare = next(b for b in benches if b.role == "bare")
    verdicts = {db: verdicts_for(db, benches, bare) for db in dbs}
    sid = secrets.token_urlsafe(32)
    per_hash_us = hash_us(sid)
    for db in dbs:
        verdicts[db] += hashing_verdicts(db, benches, per_hash_us)
    columns = ["configuration", "write µs/req", "read µs/req", "write/(bare+DBAPI)",
               "read/(bare+DBAPI)", "write/(bare+Core)", "read/(bare+Core)",
               "FS/silo write", "FS/silo read"]
    rows: list[list[str] | str] = []
    for bench in benches:
        if bench.db is None:
            rows.append(_row(bench, []))
    for db in DATABASES:
        if db in skipped:
            rows.append(f"{DB_TITLES[db]}: skipped ({skipped[db]})")
            continue
        if db not in dbs:
            continue
        rows.append(DB_TITLES[db])
        for bench in benches:
            if bench.db != db:
                continue
            if bench.role == "silo_sql":
                cells = [v.cell() for v in verdicts[db][:len(FLOOR_RATIOS) + 2]]
            elif bench.role in ("silo_sql_traced", "silo_sql_idempotent"):
                cells = [f"{r:.2f}" for r in floor_ratios(bench, db, benches, bare)] + ["", ""]
            else:
                cells = []
            rows.append(_row(bench, cells))
    cells_rows = [columns, *[r for r in rows if isinstance(r, list)]]
    widths = [max(len(row[i]) for row in cells_rows) for i in range(len(columns))]
    rule = "-+-".join("-" * w for w in widths)

    def fmt(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return " | ".join([first, *rest]).rstrip()

    print()
    print(f"Per-request cost, median of {rounds} rounds x {iterations} requests "
          f"(Flask test client, in-process)")
    setup = [f"Python {platform.python_version()}", f"Flask {version('flask')}",
             f"SQLAlchemy {version('sqlalchemy')}"]
    if "sqlite" in dbs:
        setup.append(f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)")
    if "postgresql" in dbs:
        setup.append(f"PostgreSQL {pg_version or '?'} via psycopg {version('psycopg')} "
                     "(fsync=on, synchronous_commit=on)")
    setup.append(f"{os.cpu_count()} CPUs, load average {load_before:.2f} before / "
                 f"{os.getloadavg()[0]:.2f} after")
    print(", ".join(setup))
    print()
    print(fmt(columns))
    print(rule)
    for row in rows:
        if isinstance(row, str):
            print(f"-- {row} " + "-" * max(0, len(rule) - len(row) - 4))
        else:
            print(fmt(row))
    print()
    print("FS = Flask-Session 0.8 (SQLAlchemy backend; by default it saves the session on "
          "every request, reads included). DBAPI floor: its write column is UPDATE + COMMIT "
          "alone, its read column one SELECT; bare+DBAPI = bare Flask + DBAPI SELECT (+ DBAPI "
          "UPDATE/COMMIT for writes). Core floor: a write is SELECT + UPDATE + commit.")
    for db in dbs:
        by_role = {b.role: b for b in benches if b.db == db}
        dbapi, core = by_role["dbapi_floor"], by_role["floor"]
        dbapi_write = bare.write_us + dbapi.read_us + dbapi.write_us
        print(f"  {DB_TITLES[db]}: bare+DBAPI write {dbapi_write:.1f} µs, "
              f"read {bare.read_us + dbapi.read_us:.1f} µs; bare+Core write "
              f"{bare.write_us + core.write_us:.1f} µs, read {bare.read_us + core.read_us:.1f} µs")
    if verbose:
        print("Rounds (µs/req):")
        for bench in benches:
            where = f", {DB_TITLES[bench.db]}" if bench.db else ""
            print(f"  {bench.label}{where}")
            print("    write " + " ".join(f"{v:.0f}" for v in bench.write_rounds))
            print("    read  " + " ".join(f"{v:.0f}" for v in bench.read_rounds))
    all_verdicts = [v for db in dbs for v in verdicts[db]]
    if not all_verdicts:
        print("No database measured: no verdicts.")
        return
    print("Traced (OpenTelemetry on the engine, Core executor), no target:")
    for db in dbs:
        by_role = {b.role: b for b in benches if b.db == db}
        traced, silo = by_role["silo_sql_traced"], by_role["silo_sql"]
        ratios = floor_ratios(traced, db, benches, bare)
        for (what, _target), ratio in zip(FLOOR_RATIOS[:2], ratios, strict=False):
            print(f"  {DB_TITLES[db]:<10}  traced {what:<57} {ratio:5.2f}")
        print(f"  {DB_TITLES[db]:<10}  traced / untraced flask_silo_sql: write "
              f"{traced.write_us / silo.write_us:.2f}, read {traced.read_us / silo.read_us:.2f}")
    print("Idempotent requests (@silo.idempotent, its own database, same rounds): write = a "
          "first request (new key), read = a replay; statements per request:")
    for db in dbs:
        by_role = {b.role: b for b in benches if b.db == db}
        silo, idem = by_role["silo_sql"], by_role["silo_sql_idempotent"]
        print(f"  {DB_TITLES[db]:<10}  POST {silo.statements['write']}, idempotent POST "
              f"{idem.statements['write']}; read {silo.statements['read']}, replay "
              f"{idem.statements['read']}; idempotent POST {idem.write_us:.1f} µs vs "
              f"{silo.write_us:.1f} µs, replay {idem.read_us:.1f} µs vs read {silo.read_us:.1f} µs")
    print(f"SIDs hashed at rest: one SHA-256 of a {len(sid)}-character SID (session_key) "
          f"costs {per_hash_us:.2f} µs; hashing is always on, so its share is computed:")
    for db in dbs:
        silo = next(b for b in benches if b.db == db and b.role == "silo_sql")
        for kind, request_us in (("write", silo.write_us), ("read", silo.read_us)):
            cost = silo.hashes[kind] * per_hash_us
            print(f"  {DB_TITLES[db]:<10}  {kind:<5} {silo.hashes[kind]} hash(es) = {cost:.2f} µs "
                  f"of {request_us:.1f} µs ({100 * cost / request_us:.2f} %)")
    host_report(benches, dbs)
    encryption_report(benches, dbs)
    print("Verdicts:")
    for verdict in all_verdicts:
        print(verdict.line())
    failed = sum(not v.ok for v in all_verdicts)
    if failed:
        print(f"RESULT: {failed} of {len(all_verdicts)} targets MISSED")
    else:
        print(f"RESULT: all {len(all_verdicts)} targets met")
    for db, reason in skipped.items():
        print(f"NOTE: {DB_TITLES[db]} was not measured ({reason}): its targets are unchecked.")


def _row(bench: Bench, ratio_cells: list[str]) -> list[str]:
    return [bench.label, f"{bench.write_us:.1f}", f"{bench.read_us:.1f}",
            *(ratio_cells or [""] * 6)]


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=300,
                        help="requests per round, configuration and endpoint (default 300)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds, interleaved; the median is reported (default 9)")
    parser.add_argument("--verbose", action="store_true", help="also print every round")
    parser.add_argument("--host-only", action="store_true",
                        help="only the Flask-SQLAlchemy host configurations (atomic mode)")
    parser.add_argument("--encryption-only", action="store_true",
                        help="only the 1 kB plain and encrypted namespace configurations")
    parser.add_argument("--only", choices=DATABASES,
                        help="measure one database only (bare Flask and flask-silo always run)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.rounds < 1:
        parser.error("--iterations and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    wanted = [args.only] if args.only else list(DATABASES)
    sid = secrets.token_urlsafe(32)
    tmp = Path(tempfile.mkdtemp(prefix="silo-bench-"))
    alone = args.host_only or args.encryption_only
    benches: list[Bench] = [] if alone else [bare_bench(sid), flask_silo_bench(sid)]
    per_db = (
        host_benches if args.host_only
        else encryption_benches if args.encryption_only
        else database_benches
    )
    skipped: dict[str, str] = {}
    dbs: list[str] = []
    pg: PgServerLike | None = None
    pg_version: str | None = None
    try:
        if "sqlite" in wanted:
            count = iter(range(1_000))
            benches += per_db(
                "sqlite", lambda: f"sqlite:///{tmp / f'bench{next(count)}.db'}", sid
            )
            dbs.append("sqlite")
        if "postgresql" in wanted:
            try:
                pg = start_postgresql()
            except Exception as exc:
                skipped["postgresql"] = f"no PostgreSQL server: {exc}"
            if pg is not None:
                benches += per_db("postgresql", pg.create_database, sid)
                dbs.append("postgresql")
                floor = next((b for b in benches if b.role == "dbapi_floor"
                              and b.db == "postgresql"), None)
                pg_version = floor.server_version if floor is not None else None
        print(f"measuring {len(benches)} configurations, {args.rounds} rounds x "
              f"{args.iterations} requests each ...", flush=True)
        run(benches, args.iterations, args.rounds)
        if alone:
            print(f"\nPer-request cost, median of {args.rounds} rounds x {args.iterations} "
                  f"requests (Flask test client, in-process); load average {load_before:.2f} "
                  f"before / {os.getloadavg()[0]:.2f} after")
            only = (host_report if args.host_only else encryption_report)(benches, dbs)
            print("Verdicts:")
            for verdict in only:
                print(verdict.line())
        else:
            report(benches, dbs, skipped, args.iterations, args.rounds, pg_version,
                   load_before, args.verbose)
    finally:
        for bench in benches:
            bench.close()
        if pg is not None:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
