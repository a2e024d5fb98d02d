"""Expiry at scale: the batched sweep, busy sessions, no resurrection, many sweepers, CLI.

Every test runs on SQLite and on PostgreSQL (row locks with ``SKIP LOCKED`` are
PostgreSQL's; SQLite's equivalent, a sweep that waits briefly for a writer, is
tested on SQLite). Time is an injected clock; threads and processes are waited
for with timeouts.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from harness import Harness
from sqlalchemy import Engine, func, insert, select, text, update
from support import T0, Clock, Recorder, at, sql_storage

from flask_silo_sql import (
    BackgroundTask,
    FileStore,
    SessionExpired,
    SessionStore,
    SQLStorage,
    schema,
    session_key,
)
from flask_silo_sql.cli import silo_db
from flask_silo_sql.keys import SessionKey
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import expired_sids, files, namespaces, sessions, tasks

TTL = 100
HEADER = "X-Session-ID"
DEADLINE = 20.0
"""Seconds any thread of a test may take before it counts as stuck."""

T = TypeVar("T")


def sid_of(prefix: str, index: int) -> str:
    """A session as the tables name it (its key): seeded rows and the store's answers
    hold the same value, which every method takes back as it is."""
    return SessionKey(session_key(f"{prefix}-{index:06d}-{'x' * 20}"))


class InThread(Generic[T]):
    """Run *fn* in a daemon thread; :meth:`result` waits for it with a timeout."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started_at = time.monotonic()
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def result(self, timeout: float = DEADLINE) -> T:
        assert self.done.wait(timeout), f"still running after {timeout} s (blocked?)"
        if self.error is not None:
            raise self.error
        value = self._value
        assert value is not None
        return value

    @property
    def elapsed(self) -> float:
        return self.finished_at - self.started_at


# -- databases and stores --------------------------------------------------------------


@pytest.fixture
def url(silo_url: str) -> str:
    """The test database (SQLite or PostgreSQL), at the current schema, no silo rows."""
    return silo_url


@pytest.fixture
def observer(url: str) -> Iterator[Engine]:
    """An engine of its own: what another worker sees, i.e. only committed rows."""
    engine = make_engine(url)
    yield engine
    engine.dispose()


def make_store(storage: SQLStorage, clock: Clock, **options: Any) -> SessionStore:
    store = SessionStore(ttl=TTL, storage=storage, clock=clock, **options)
    store.register_namespace("cart", lambda: {"items": [], "total": 0})
    return store


@pytest.fixture
def store(storage: SQLStorage, clock: Clock) -> SessionStore:
    return make_store(storage, clock)


def expire_after(store: SessionStore) -> float:
    """Idle seconds after which a session may be expired (TTL plus the touch interval)."""
    return store.ttl + store.touch_interval


def seed(
    engine: Engine,
    sids: list[str],
    last_active: float,
    *,
    names: tuple[str, ...] = ("cart",),
) -> None:
    """Insert sessions idle since *last_active*, each with namespaces *names*."""
    when = at(last_active)
    due = at(last_active + TTL + min(60.0, TTL / 20))  # as a store with this TTL writes it
    with engine.begin() as conn:
        conn.execute(
            insert(sessions),
            [
                {
                    "sid": s,
                    "created_at": when,
                    "last_active": when,
                    "expires_at": due,
                    "sweep_after": due,
                }
                for s in sids
            ],
        )
        rows = [
            {"sid": s, "name": n, "data": {"owner": s}, "version": 1, "updated_at": when}
            for s in sids
            for n in names
        ]
        if rows:
            conn.execute(insert(namespaces), rows)


def add_task(
    engine: Engine,
    sid: str,
    status: str,
    heartbeat: float,
    *,
    name: str = "job",
) -> str:
    """A ``silo_tasks`` row for *sid*; returns its id."""
    task_id = hashlib.sha256(f"{sid}/{name}".encode()).hexdigest()[:32]
    when = at(heartbeat)
    with engine.begin() as conn:
        conn.execute(
            insert(tasks).values(
                id=task_id,
                sid=sid,
                name=name,
                status=status,
                progress=50.0,
                message="working",
                logs=[],
                started_at=when,
                finished_at=None if status == "running" else when,
                heartbeat_at=when,
            )
        )
    return task_id


def column(engine: Engine, col: Any, **where: str) -> list[Any]:
    query = select(col)
    for key, value in where.items():
        query = query.where(col.table.c[key] == value)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def sids_in(engine: Engine, table: Any) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(table.c.sid)).scalars())


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def make_silo(url: str, tmp_path: Path, clock: Clock) -> Harness:
    h = Harness(url, ttl=TTL, clock=clock, instance_path=tmp_path / "instance")
    h.silo.register("cart", lambda: {"items": [], "total": 0})
    return h


def write_state(store: SessionStore, sid: str, item: str) -> None:
    """Create *sid* (at the store's current time) with a non-default cart."""
    with store.transaction(sid) as session:
        session["cart"]["items"].append(item)
        session["cart"]["total"] = 1


# -- the batched sweep -------------------------------------------------------------------


def test_sweep_expires_exactly_the_idle_sessions_in_batches(
    url: str, tmp_path: Path, clock: Clock, observer: Engine
) -> None:
    h = make_silo(url, tmp_path, clock)
    silo = h.silo
    try:
        store = silo.store
        engine = sql_storage(store).engine
        uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))
        idle = [sid_of("idle", i) for i in range(50)]
        live = [sid_of("live", i) for i in range(10)]
        for sid in idle:
            write_state(store, sid, f"item of {sid}")
            uploads.save(sid, "data.csv", f"a,b\n{sid}\n".encode())
            add_task(engine, sid, "complete", T0)
        clock.advance(50)  # the live sessions are younger
        for sid in live:
            write_state(store, sid, f"item of {sid}")
            uploads.save(sid, "data.csv", b"live")
            add_task(engine, sid, "failed", clock())
        live_state = {sid: sql_storage(store).get_session(sid) for sid in live}

        # The callback checks, on a connection of its own, that the batch was committed.
        checks: list[tuple[str, bool, bool]] = []

        def check_committed(sid: str) -> None:
            with observer.connect() as conn:
                row = conn.execute(select(sessions.c.sid).where(sessions.c.sid == sid)).first()
                mark = conn.execute(
                    select(expired_sids.c.sid).where(expired_sids.c.sid == sid)
                ).first()
            checks.append((sid, row is None, mark is not None))

        fired = Recorder()
        store.on_expire(fired)
        store.on_expire(check_committed)

        # Exactly TTL + touch interval idle: not yet.
        clock.now = T0 + expire_after(store)
        assert store.sweep(batch_size=7).expired == []
        assert fired.calls == []

        clock.advance(1)
        progress: list[int] = []
        result = store.sweep(batch_size=7, progress=progress.append)

        assert sorted(result.expired) == sorted(idle)
        assert len(result.expired) == len(set(result.expired))
        expected_batches = math.ceil(len(idle) / 7)
        assert expected_batches <= result.batches <= expected_batches + 1
        assert progress[-1] == len(idle)
        steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
        assert all(0 < step <= 7 for step in steps), steps
        assert len(steps) == expected_batches

        assert sids_in(engine, sessions) == set(live)
        assert sids_in(engine, namespaces) == set(live)
        assert sids_in(engine, tasks) == set(live)
        assert sids_in(engine, files) == set(live)
        assert sids_in(engine, expired_sids) == set(idle)
        for sid in idle:
            assert store.is_expired(sid)
            assert not (tmp_path / "uploads" / sid).exists()
        for sid in live:
            assert not store.is_expired(sid)
            assert sql_storage(store).get_session(sid) == live_state[sid]
            assert uploads.list_files(sid) == ["data.csv"]
            assert (tmp_path / "uploads" / sid / "data.csv").read_bytes() == b"live"

        assert Counter(fired.calls) == Counter(dict.fromkeys(idle, 1))
        assert sorted(checks) == [(sid, True, True) for sid in sorted(idle)]

        again = store.sweep(batch_size=7)
        assert again.expired == []
        assert len(fired.calls) == len(idle)
    finally:
        h.close()


def test_sweep_cost_follows_the_idle_sessions_not_the_live_ones(
    storage: SQLStorage, store: SessionStore, clock: Clock
) -> None:
    """Live sessions are never candidates: batches count only idle ones."""
    seed(storage.engine, [sid_of("idle", i) for i in range(12)], T0)
    seed(storage.engine, [sid_of("live", i) for i in range(300)], T0 + 60)
    clock.now = T0 + expire_after(store) + 1
    result = store.sweep(batch_size=5)
    assert len(result.expired) == 12
    assert result.batches == math.ceil(12 / 5)
    assert storage.session_count() == 300


def test_a_touch_leaves_the_sweeps_index_alone_until_its_bound_has_passed(
    storage: SQLStorage, store: SessionStore, clock: Clock, observer: Engine
) -> None:
    """Touches write no indexed column (HOT on PostgreSQL); the sweep still expires on time.

    The sweep's bound (``sweep_after``) moves only once it has passed: a touch
    then, or the sweep finding the session still alive. ``expires_at`` always
    says when the session expires, and only it decides.
    """
    sid = SessionKey(session_key(store.generate_sid()))
    clock.now = T0
    write_state(store, sid, "a")
    first = column(observer, sessions.c.sweep_after, sid=sid)
    assert first == column(observer, sessions.c.expires_at, sid=sid)

    clock.now = T0 + 3 * store.touch_interval
    store.touch(sid)
    assert column(observer, sessions.c.sweep_after, sid=sid) == first  # not rewritten
    expires = column(observer, sessions.c.expires_at, sid=sid)
    assert expires > first

    clock.now = T0 + expire_after(store) + 1  # past the bound, not the expiry
    assert store.sweep().expired == []
    assert column(observer, sessions.c.sweep_after, sid=sid) == expires  # moved up by the sweep
    assert storage.has_session(sid)

    clock.now = T0 + 3 * store.touch_interval + expire_after(store) + 1
    assert store.sweep().expired == [sid]
    assert store.is_expired(sid)


# -- busy sessions --------------------------------------------------------------------------


def test_running_task_with_fresh_heartbeat_is_skipped_until_it_goes_stale(
    storage: SQLStorage, store: SessionStore, clock: Clock
) -> None:
    engine = storage.engine
    fresh, stale, done, plain = (sid_of(name, 0) for name in ("fresh", "stale", "done", "plain"))
    seed(engine, [fresh, stale, done, plain], T0)
    add_task(engine, stale, "running", T0)  # its worker died long ago
    add_task(engine, done, "complete", T0)
    fired = Recorder()
    store.on_expire(fired)

    clock.now = T0 + expire_after(store) + 1
    heartbeat = clock.now
    task_id = add_task(engine, fresh, "running", heartbeat)
    first = store.sweep()
    assert sorted(first.expired) == sorted([stale, done, plain])
    assert storage.has_session(fresh)
    assert not storage.is_expired(fresh)
    assert column(engine, tasks.c.id, sid=fresh) == [task_id]

    # Still fresh one second before the heartbeat timeout.
    clock.now = heartbeat + store.heartbeat_timeout - 1
    assert store.sweep().expired == []
    assert storage.has_session(fresh)

    # The worker stopped heartbeating: a later sweep expires the session.
    clock.now = heartbeat + store.heartbeat_timeout + 1
    assert store.sweep().expired == [fresh]
    assert not storage.has_session(fresh)
    assert column(engine, tasks.c.id, sid=fresh) == []
    assert sorted(fired.calls) == sorted([stale, done, plain, fresh])


def test_real_running_task_keeps_its_session_until_it_finishes(
    storage: SQLStorage, clock: Clock
) -> None:
    store = make_store(storage, clock, heartbeat_timeout=10_000.0)
    store.register_namespace("job", lambda: {"task": BackgroundTask("work")})
    sid, other = sid_of("worker", 0), sid_of("other", 0)
    started, release = threading.Event(), threading.Event()

    def work(task: BackgroundTask) -> None:
        started.set()
        release.wait(DEADLINE)
        task.update(100, "finished")

    session = store.get(sid)
    task = session["job"]["task"]
    assert isinstance(task, BackgroundTask)
    task.start(work)
    try:
        assert started.wait(DEADLINE)
        store.save(sid, session)
        store.get(other)

        clock.now = T0 + expire_after(store) + 1
        assert store.sweep().expired == [other]
        assert storage.has_session(sid)
        assert task.is_running
    finally:
        release.set()
    deadline = time.monotonic() + DEADLINE
    while column(storage.engine, tasks.c.status, sid=sid) != ["complete"]:  # as others see it
        assert time.monotonic() < deadline, "the task did not finish"
        time.sleep(0.01)
    assert task.is_complete

    assert store.sweep().expired == [sid]
    assert not storage.has_session(sid)
    assert count(storage.engine, tasks) == 0


@pytest.mark.parametrize("holder", ["request", "raw-row-lock"])
def test_postgresql_sweep_skips_a_row_locked_by_an_in_flight_request(
    pg_url: str, clock: Clock, holder: str
) -> None:
    engine = make_engine(pg_url)
    schema.upgrade(engine)
    storage = SQLStorage(pg_url)
    try:
        store = make_store(storage, clock)
        fired = Recorder()
        store.on_expire(fired)
        busy = sid_of("busy", 0)
        others = [sid_of("other", i) for i in range(6)]
        seed(storage.engine, [*others, busy], T0)
        clock.now = T0 + expire_after(store) + 1

        if holder == "request":
            # An in-flight request writing the session (SILO_LOCKING, store.transaction).
            lock_cm: Any = store.transaction(busy)
            lock_cm.__enter__()
        else:
            raw = engine.connect()
            raw_tx = raw.begin()
            raw.execute(
                text("SELECT sid FROM silo_sessions WHERE sid = :sid FOR NO KEY UPDATE"),
                {"sid": busy},
            )
        try:
            sweep = InThread(lambda: store.sweep(batch_size=3))
            finished = sweep.done.wait(DEADLINE / 2)
        finally:
            if holder == "request":
                lock_cm.__exit__(None, None, None)
            else:
                raw_tx.commit()
                raw.close()
        assert finished, "the sweep waited for a locked session instead of skipping it"
        result = sweep.result()
        assert sorted(result.expired) == sorted(others)
        assert storage.has_session(busy)
        assert not storage.is_expired(busy)
        assert busy not in fired.calls

        if holder == "request":
            # The request refreshed the session: it expires one TTL later.
            assert store.sweep().expired == []
            clock.advance(expire_after(store) + 1)
        assert store.sweep().expired == [busy]
        assert not storage.has_session(busy)
        assert Counter(fired.calls) == Counter(dict.fromkeys([*others, busy], 1))
    finally:
        storage.dispose()
        engine.dispose()


def test_sqlite_sweep_waits_briefly_for_a_writer_then_proceeds(
    sqlite_url: str, clock: Clock
) -> None:
    engine = make_engine(sqlite_url)
    schema.upgrade(engine)
    engine.dispose()
    storage = SQLStorage(sqlite_url)
    try:
        store = make_store(storage, clock)
        busy = sid_of("busy", 0)
        others = [sid_of("other", i) for i in range(6)]
        seed(storage.engine, [*others, busy], T0)
        clock.now = T0 + expire_after(store) + 1

        with store.transaction(busy):  # a request writing *busy*, now
            sweep = InThread(lambda: store.sweep(batch_size=3))
            time.sleep(0.3)  # the writer keeps its transaction open a little while
            assert not sweep.done.is_set(), "the sweep wrote while another writer held the db"
        result = sweep.result()
        assert sweep.elapsed >= 0.3
        # It waited, then expired the idle sessions, not the one the request refreshed.
        assert sorted(result.expired) == sorted(others)
        assert storage.has_session(busy)
        assert not storage.is_expired(busy)
    finally:
        storage.dispose()


def test_busy_check_vetoes_only_candidates_and_may_read_the_store(
    storage: SQLStorage, store: SessionStore, clock: Clock
) -> None:
    engine = storage.engine
    store.register_namespace("job", lambda: {"busy": False})
    vetoed = [sid_of("vetoed", i) for i in range(2)]
    free = [sid_of("free", i) for i in range(3)]
    live = [sid_of("live", i) for i in range(3)]
    with_task = sid_of("task", 0)
    seed(engine, vetoed, T0, names=())
    seed(engine, [*free, with_task], T0)
    seed(engine, live, T0 + 60)
    with engine.begin() as conn:
        conn.execute(
            insert(namespaces),
            [
                {
                    "sid": s,
                    "name": "job",
                    "data": {"busy": True},
                    "version": 1,
                    "updated_at": at(T0),
                }
                for s in vetoed
            ],
        )
    clock.now = T0 + expire_after(store) + 1
    add_task(engine, with_task, "running", clock())

    calls: list[str] = []
    reads: list[tuple[str, bool, bool]] = []

    def predicate(sid: str, session: dict[str, Any]) -> bool:
        calls.append(sid)
        if sid == free[1]:  # meanwhile, another worker expires it
            storage.delete_session(sid)
            storage.mark_expired(sid, clock())
        # Reading the store from inside the predicate must neither deadlock nor fail.
        reads.append((sid, store.exists(sid), bool(store.get_namespace(sid, "job")["busy"])))
        return bool(session["job"]["busy"])

    store.set_busy_check(predicate)
    fired, created = Recorder(), Recorder()
    store.on_expire(fired)
    store.on_create(created)

    result = InThread(lambda: store.sweep(batch_size=2)).result()
    assert sorted(calls) == sorted([*vetoed, *free]), "called for a non-candidate"
    assert len(calls) == len(set(calls))
    assert sorted(reads) == sorted(
        [(s, True, True) for s in vetoed]
        + [(free[0], True, False), (free[1], False, False), (free[2], True, False)]
    )
    # Reading a session in the predicate is no client activity: it still expires.
    assert sorted(result.expired) == sorted([free[0], free[2]])
    assert result.skipped_busy == len(vetoed)
    assert sorted(fired.calls) == sorted([free[0], free[2]])
    # ... and the one expired meanwhile was not re-created by the predicate's read.
    assert not storage.has_session(free[1])
    assert storage.is_expired(free[1])
    assert created.calls == []
    for sid in vetoed:
        assert storage.has_session(sid)
        assert not storage.is_expired(sid)
        assert column(engine, sessions.c.last_active, sid=sid) == [at(T0)]
    for sid in live:
        assert column(engine, sessions.c.last_active, sid=sid) == [at(T0 + 60)]

    # The job of one vetoed session ends: a later sweep expires it, asking again.
    with engine.begin() as conn:
        conn.execute(
            update(namespaces)
            .where(namespaces.c.sid == vetoed[0], namespaces.c.name == "job")
            .values(data={"busy": False})
        )
    calls.clear()
    assert InThread(lambda: store.sweep(batch_size=2)).result().expired == [vetoed[0]]
    assert sorted(calls) == sorted(vetoed)
    assert storage.has_session(vetoed[1])
    assert storage.has_session(with_task)


# -- no resurrection ----------------------------------------------------------------------


def test_a_loaded_session_expired_meanwhile_is_not_written_back(
    storage: SQLStorage, store: SessionStore, clock: Clock, observer: Engine
) -> None:
    sid = sid_of("loaded", 0)
    write_state(store, sid, "first")
    session = store.get(sid)
    session["cart"]["items"].append("late")

    clock.advance(expire_after(store) + 1)
    assert store.sweep().expired == [sid]

    with pytest.raises(SessionExpired):
        store.save(sid, session)
    assert not storage.has_session(sid)
    assert sids_in(observer, sessions) == set()
    assert sids_in(observer, namespaces) == set()
    assert store.is_expired(sid)


def test_a_request_running_across_a_sweep_does_not_resurrect_its_session(
    url: str, tmp_path: Path, clock: Clock, observer: Engine
) -> None:
    h = make_silo(url, tmp_path, clock)
    app, silo = h.app, h.silo
    silo.add_data_endpoints("/api/data")
    swept: list[str] = []

    @app.post("/api/add")
    def add() -> dict[str, Any]:
        cart = silo.state("cart")
        cart["items"].append("x")
        return {"items": len(cart["items"])}

    @app.post("/api/slow")
    def slow() -> dict[str, Any]:
        cart = silo.state("cart")
        clock.advance(expire_after(silo.store) + 1)  # the client idled; a sweep runs
        swept.extend(silo.store.sweep().expired)
        cart["items"].append("lost")
        return {"ok": True}

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"items": silo.state("cart")["items"]}

    try:
        client = app.test_client()
        first = client.post("/api/add")
        assert first.status_code == 200
        sid = first.headers[HEADER]

        slow_response = client.post("/api/slow", headers={HEADER: sid})
        assert swept == [session_key(sid)]
        assert slow_response.status_code < 500
        assert sids_in(observer, sessions) == set()
        assert sids_in(observer, namespaces) == set()
        assert sids_in(observer, expired_sids) == {session_key(sid)}

        gone = client.get("/api/data", headers={HEADER: sid})
        assert gone.status_code == 410
        body = gone.get_json()
        assert body is not None
        assert body["error"] == "session_expired"
        assert sids_in(observer, sessions) == set()
    finally:
        h.close()


# -- many sweepers -----------------------------------------------------------------------


def _sweeper(url: str, now: float, live: int, out: str, barrier: Any) -> None:
    """One worker process: sweep until only the live sessions are left."""
    try:
        storage = SQLStorage(url)
        store = SessionStore(ttl=TTL, storage=storage, clock=lambda: now, sweep_batch_size=20)
        with open(out, "w", encoding="utf-8") as fh:

            def record(sid: str) -> None:
                fh.write(sid + "\n")
                fh.flush()

            store.on_expire(record)
            storage.session_count()  # connected before the start line, so all start at once
            barrier.wait(60)
            deadline = time.monotonic() + 120
            while storage.session_count() > live:
                if time.monotonic() > deadline:
                    raise TimeoutError("idle sessions left after 120 s")
                store.cleanup()
        storage.dispose()
    except BaseException:
        traceback.print_exc()
        raise


@pytest.mark.slow
def test_four_processes_sweeping_at_once_expire_each_session_once(
    url: str, storage: SQLStorage, tmp_path: Path
) -> None:
    idle = [sid_of("idle", i) for i in range(2000)]
    live = [sid_of("live", i) for i in range(40)]
    seed(storage.engine, idle, T0, names=("cart", "prefs"))
    seed(storage.engine, live, T0 + 10 * TTL)
    now = T0 + 3 * TTL

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    outs = [tmp_path / f"sweeper-{i}.txt" for i in range(4)]
    workers = [
        context.Process(target=_sweeper, args=(url, now, len(live), str(out), barrier))
        for out in outs
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(180)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(10)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]

    seen = [out.read_text().split() for out in outs]
    everything = [sid for per_process in seen for sid in per_process]
    assert len(everything) == len(set(everything)), "an on_expire fired twice"
    assert set(everything) == set(idle)
    assert sum(1 for per_process in seen if per_process) >= 2, "the sweeps did not overlap"

    with storage.engine.connect() as conn:
        records = list(conn.execute(select(expired_sids.c.sid)).scalars())
    assert sorted(records) == sorted(idle)
    assert sids_in(storage.engine, sessions) == set(live)
    assert sids_in(storage.engine, namespaces) == set(live)


# -- pruning expired-SID records ----------------------------------------------------------


def test_sweep_prunes_expired_sid_records_older_than_expired_retain(
    storage: SQLStorage, clock: Clock
) -> None:
    store = make_store(storage, clock, expired_retain=1000)
    clock.now = T0 + 5000
    now = clock.now
    old = [sid_of("old", i) for i in range(5)]
    kept = [sid_of("kept", i) for i in range(3)]
    records = (
        [(s, now - 1000 - 1 - i * 500) for i, s in enumerate(old)]
        + [(s, now - 999 + i) for i, s in enumerate(kept)]
        + [(sid_of("edge", 0), now - 1000)]  # exactly expired_retain old: not older
    )
    with storage.engine.begin() as conn:
        conn.execute(insert(expired_sids), [{"sid": s, "expired_at": at(t)} for s, t in records])
    idle = sid_of("idle", 0)
    seed(storage.engine, [idle], now - expire_after(store) - 1)

    result = store.sweep()
    assert result.expired == [idle]
    assert result.pruned == len(old)
    assert sids_in(storage.engine, expired_sids) == {*kept, sid_of("edge", 0), idle}
    for sid in old:
        assert not store.is_expired(sid)

    # Later, everything recorded up to now is older than expired_retain.
    clock.advance(1001)
    assert store.sweep().pruned == len(kept) + 2
    assert storage.expired_count() == 0


def test_prune_works_through_batches(storage: SQLStorage) -> None:
    with storage.engine.begin() as conn:
        conn.execute(
            insert(expired_sids),
            [{"sid": sid_of("old", i), "expired_at": at(T0 - 1 - 10 * i)} for i in range(7)]
            + [{"sid": sid_of("new", 0), "expired_at": at(T0 + 50)}],
        )
    assert storage.prune_expired_count(100, now=T0 + 100, batch_size=2) == 7
    assert sids_in(storage.engine, expired_sids) == {sid_of("new", 0)}


# -- the CLI ------------------------------------------------------------------------------


def test_cli_cleanup_and_stats(url: str, tmp_path: Path, clock: Clock) -> None:
    h = Harness(url, via="config", ttl=TTL, clock=clock, instance_path=tmp_path / "instance")
    app, silo = h.app, h.silo
    try:
        store = silo.store
        silo.register("cart", lambda: {"items": [], "total": 0})
        uploads: FileStore = silo.add_file_store("uploads", str(tmp_path / "uploads"))
        engine = sql_storage(store).engine
        fired = Recorder()
        store.on_expire(fired)

        idle = [sid_of("idle", i) for i in range(12)]
        live = [sid_of("live", i) for i in range(4)]
        for sid in idle:
            write_state(store, sid, sid)
        for sid in idle[:3]:
            uploads.save(sid, "in.csv", b"x" * 100)
        add_task(engine, idle[0], "complete", T0)
        add_task(engine, idle[1], "complete", T0)
        clock.advance(TTL)
        for sid in live:
            write_state(store, sid, sid)
        uploads.save(live[0], "keep.bin", b"y" * 7)
        clock.now = T0 + expire_after(store) + 1
        add_task(engine, live[0], "running", clock())
        add_task(engine, live[1], "failed", T0)

        runner = app.test_cli_runner()

        def stats() -> dict[str, Any]:
            done = runner.invoke(silo_db, ["stats", "--json"], catch_exceptions=False)
            assert done.exit_code == 0, done.output
            numbers: dict[str, Any] = json.loads(done.stdout)
            numbers.pop("tables")  # sizes on disk: tests/test_cli.py
            return numbers

        before = stats()
        assert before == {
            "sessions": 16,
            "namespaces": 16,
            "expired_sids": 0,
            "files": 4,
            "file_bytes": 307,
            "tasks": {"complete": 2, "running": 1, "failed": 1},
            "workers": [],
        }

        dry = runner.invoke(silo_db, ["cleanup", "--dry-run"], catch_exceptions=False)
        assert dry.exit_code == 0, dry.output
        assert re.match(r"would expire 12 session\(s\)", dry.stdout.strip()), dry.stdout
        assert stats() == before
        assert fired.calls == []
        assert (tmp_path / "uploads" / idle[0] / "in.csv").exists()

        done = runner.invoke(silo_db, ["cleanup", "--batch-size", "5"], catch_exceptions=False)
        assert done.exit_code == 0, done.output
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout
        assert re.match(r"expired 12 session\(s\) .*\b3 batch", lines[0]), lines[0]
        assert sorted(fired.calls) == sorted(idle)
        assert not (tmp_path / "uploads" / idle[0]).exists()

        assert stats() == {
            "sessions": 4,
            "namespaces": 4,
            "expired_sids": 12,
            "files": 1,
            "file_bytes": 7,
            "tasks": {"running": 1, "failed": 1},
            "workers": [],
        }
        human = runner.invoke(silo_db, ["stats"], catch_exceptions=False)
        assert human.exit_code == 0, human.output
        assert re.search(r"^sessions\s+4$", human.stdout, re.MULTILINE), human.stdout
        assert re.search(r"^expired_sids\s+12$", human.stdout, re.MULTILINE), human.stdout

        again = runner.invoke(silo_db, ["cleanup"], catch_exceptions=False)
        assert re.match(r"expired 0 session\(s\)", again.stdout.strip()), again.stdout
    finally:
        h.close()
