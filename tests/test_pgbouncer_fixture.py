"""The PgBouncer helper: real transaction pooling, and what does and does not survive it.

With one server connection (``pool_size=1``) every client shares the same
PostgreSQL session, which makes the session-state effects deterministic.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgbouncer import PgBouncer
from pgserver import ExternalPg, PgServer
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from flask_silo_sql import SessionStore, SQLStorage, schema
from flask_silo_sql.sql.engine import make_engine

NO_PREPARE = {"prepare_threshold": None}


@pytest.fixture(scope="module")
def bouncer1(pg_bouncer: PgBouncer) -> Iterator[PgBouncer]:
    """A second PgBouncer with a single server connection."""
    with PgBouncer(pg_bouncer.server, pool_size=1) as bouncer:
        yield bouncer


@pytest.fixture
def db(pg_url: str) -> str:
    """The name of a fresh, empty database."""
    return str(make_url(pg_url).database)


def client(bouncer: PgBouncer, db: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A psycopg connection through *bouncer*: autocommit, no prepared statements."""
    dsn = make_url(bouncer.url(db)).set(drivername="postgresql").render_as_string(False)
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None)


def direct(server: PgServer | ExternalPg, db: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A psycopg connection straight to the server."""
    dsn = make_url(server.url(db)).set(drivername="postgresql").render_as_string(False)
    return psycopg.connect(dsn, autocommit=True)


def test_many_clients_share_a_few_server_connections(
    pg_bouncer: PgBouncer, pg_server: PgServer | ExternalPg, db: str
) -> None:
    clients = [client(pg_bouncer, db) for _ in range(20)]
    try:
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone() for conn in clients}
        with direct(pg_server, db) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid()",
                (db,),
            ).fetchone()
        assert row is not None
        assert 1 <= len(pids) <= 5
        assert row[0] <= 5
        (pool,) = [p for p in pg_bouncer.show("POOLS") if p["database"] == db]
        assert pool["pool_mode"] == "transaction"
        assert pool["cl_active"] + pool["cl_waiting"] == 20
    finally:
        for conn in clients:
            conn.close()


def test_default_psycopg_prepared_statements_break(bouncer1: PgBouncer, db: str) -> None:
    """psycopg prepares a statement on its 6th run, on whichever server connection is current."""
    engine = create_engine(bouncer1.url(db))
    query = text("SELECT CAST(:x AS int)")
    try:
        with engine.connect() as first, engine.connect() as second:
            for x in range(6):  # prepared as _pg3_0 on the only server connection
                first.execute(query, {"x": x})
                first.commit()
            for x in range(5):
                second.execute(query, {"x": x})
                second.commit()
            with pytest.raises(ProgrammingError, match='"_pg3_0" already exists'):
                second.execute(query, {"x": 5})
            second.rollback()
            second.exec_driver_sql("DEALLOCATE ALL")
            second.commit()
            with pytest.raises(ProgrammingError, match='"_pg3_0" does not exist'):
                first.execute(query, {"x": 6})
    finally:
        engine.dispose()


def test_prepare_threshold_none_fixes_it(bouncer1: PgBouncer, db: str) -> None:
    engine = create_engine(bouncer1.url(db), connect_args=NO_PREPARE)
    query = text("SELECT CAST(:x AS int)")
    try:
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second, first):
                for x in range(10):
                    assert conn.execute(query, {"x": x}).scalar() == x
                    conn.commit()
            second.exec_driver_sql("DEALLOCATE ALL")
            second.commit()
            assert first.execute(query, {"x": 11}).scalar() == 11
    finally:
        engine.dispose()


def test_concurrent_statements_with_prepare_threshold_none(pg_bouncer: PgBouncer, db: str) -> None:
    """Threads running the same two statements in turn: no errors, and each gets its own."""
    engine = create_engine(
        pg_bouncer.url(db), pool_size=10, max_overflow=0, connect_args=NO_PREPARE
    )
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(30):
            for tag in ("a", "b") if n % 2 else ("b", "a"):
                try:
                    with engine.begin() as conn:
                        row = conn.execute(
                            text(f"SELECT '{tag}' AS tag, CAST(:i AS int) AS i"), {"i": i}
                        ).one()
                    outcome = "right" if (row.tag, row.i) == (tag, i) else "wrong"
                except DBAPIError as exc:
                    outcome = type(exc.orig).__name__
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert outcomes == {"right": 600}


def test_session_settings_leak_to_other_clients(bouncer1: PgBouncer, db: str) -> None:
    with client(bouncer1, db) as a, client(bouncer1, db) as b:
        a.execute("SET application_name = 'client-a'")
        assert b.execute("SHOW application_name").fetchone() == ("client-a",)
        b.execute("RESET application_name")
        with a.transaction():
            a.execute("SET LOCAL statement_timeout = '1234ms'")
            assert a.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_session_advisory_locks_are_not_exclusive(
    bouncer1: PgBouncer, pg_server: PgServer | ExternalPg, db: str
) -> None:
    with client(bouncer1, db) as a, client(bouncer1, db) as b, direct(pg_server, db) as other:
        a.execute("SELECT pg_advisory_lock(42)")
        # b runs on the same server session, which already holds the lock.
        assert b.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
        assert other.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (False,)
        b.execute("SELECT pg_advisory_unlock_all()")


def test_transaction_advisory_locks_work(pg_bouncer: PgBouncer, db: str) -> None:
    waited: list[float] = []

    def wait_for_lock() -> None:
        with client(pg_bouncer, db) as conn, conn.transaction():
            start = time.monotonic()
            conn.execute("SELECT pg_advisory_xact_lock(7)")
            waited.append(time.monotonic() - start)

    with client(pg_bouncer, db) as a, client(pg_bouncer, db) as b:
        with a.transaction():
            a.execute("SELECT pg_advisory_xact_lock(7)")
            assert b.execute("SELECT pg_try_advisory_xact_lock(7)").fetchone() == (False,)
            waiter = threading.Thread(target=wait_for_lock)
            waiter.start()
            time.sleep(0.5)
            assert waiter.is_alive()
        waiter.join(10)
        assert len(waited) == 1
        assert waited[0] >= 0.4
        assert b.execute("SELECT pg_try_advisory_xact_lock(7)").fetchone() == (True,)


def test_listen_misses_notifications(
    pg_bouncer: PgBouncer, pg_server: PgServer | ExternalPg, db: str
) -> None:
    with client(pg_bouncer, db) as listener, direct(pg_server, db) as notifier:
        listener.execute("LISTEN silo_test")
        notifier.execute("NOTIFY silo_test, 'hello'")
        assert list(listener.notifies(timeout=1.0, stop_after=1)) == []
        listener.execute("SELECT 1")
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []


def test_alembic_migrations_run_through_the_bouncer(pg_bouncer: PgBouncer, db: str) -> None:
    engine = make_engine(pg_bouncer.url(db))  # psycopg's default settings
    try:
        schema.upgrade(engine)
        assert schema.is_current(engine)
        schema.downgrade(engine, "base")
        assert schema.current(engine) is None
    finally:
        engine.dispose()

    errors: list[BaseException] = []

    def upgrade() -> None:  # together, serialised by pg_advisory_xact_lock
        engine = make_engine(pg_bouncer.url(db), connect_args=NO_PREPARE)
        try:
            schema.upgrade(engine)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = make_engine(pg_bouncer.url(db))
    assert schema.is_current(engine)
    engine.dispose()


def test_silo_store_through_the_bouncer(pg_bouncer: PgBouncer, pg_silo_url: str) -> None:
    storage = SQLStorage(
        pg_bouncer.url(str(make_url(pg_silo_url).database)), connect_args=NO_PREPARE
    )
    store = SessionStore(ttl=3600, storage=storage)
    store.register_namespace("counter", lambda: {"n": 0})
    assert not storage.connector.observed()  # the DBAPI executor: the one users run
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        sid = f"sid-bouncer-{n:04d}-0000000"
        try:
            for _ in range(25):
                with store.transaction(sid) as session:
                    session["counter"]["n"] += 1
                store.get(sid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for n in range(8):
            assert store.get(f"sid-bouncer-{n:04d}-0000000")["counter"] == {"n": 25}
    finally:
        storage.dispose()


def test_stop_start_and_destroy(pg_bouncer: PgBouncer, db: str) -> None:
    bouncer = PgBouncer(pg_bouncer.server, pool_size=2)
    try:
        with client(bouncer, db) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        bouncer.stop()
        with pytest.raises(psycopg.OperationalError):
            client(bouncer, db)
        bouncer.start()
        with client(bouncer, db) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
        assert "PgBouncer 1." in bouncer.log()
    finally:
        bouncer.destroy()
    assert not bouncer.root.exists()
