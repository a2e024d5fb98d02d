"""The guards against lost updates and resurrection, each held to what it protects.

Every guard (a ``raise StateConflict``, ``SessionExpired`` or
``TaskAlreadyRunning`` in the SQL backend) answers one race: another writer
between a read and its write, or a session that went away while a request or
task worked on it. Each test makes that race happen deterministically (the
other writer acts at the storage's statement hook, the seam every statement
passes, or between two calls) and checks the outcome a user relies on: the
error, and that nothing was overwritten or brought back.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from flask import jsonify, request
from harness import AppFactory
from sqlalchemy import Engine, delete, insert, select, update
from support import Clock, at

from flask_silo_sql import (
    BackgroundTask,
    SessionExpired,
    SessionStore,
    SQLStorage,
    StateConflict,
    TaskAlreadyRunning,
    session_key,
)
from flask_silo_sql.codec import task_id_for
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import files, namespaces, sessions, tasks
from flask_silo_sql.sql.task_rows import SQLTaskHome
from flask_silo_sql.tasks import TaskState

TTL = 100
SID = "guarded-session-000000001"
KEY = session_key(SID)


@pytest.fixture
def other(silo_url: str) -> Iterator[Engine]:
    """Another client of the database: what a second worker does, committed at once."""
    engine = make_engine(silo_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(storage: SQLStorage, clock: Clock) -> SessionStore:
    store = SessionStore(ttl=TTL, storage=storage, clock=clock)
    store.register_namespace("cart", lambda: {"items": []})
    store.register_namespace("job", lambda: {"task": BackgroundTask("work")})
    return store


def exists(engine: Engine, sid: str = SID) -> bool:
    with engine.connect() as conn:
        found = select(sessions.c.sid).where(sessions.c.sid == session_key(sid))
        return conn.execute(found).first() is not None


def saved_cart(engine: Engine, sid: str = SID) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == "cart"
            )
        ).scalar()


def at_statement(storage: SQLStorage, name: str, action: Any) -> None:
    """Run *action* once, just before the storage sends statement *name*."""
    done: list[bool] = []

    def hook(statement: str, sql: str, values: Mapping[str, Any]) -> None:
        if statement == name and not done:
            done.append(True)
            action()

    storage.statement_hook = hook


# -- namespaces and sessions ---------------------------------------------------------


@pytest.mark.parametrize("touch_due", [False, True], ids=["fresh", "touch-due"])
def test_a_session_destroyed_meanwhile_is_not_recreated(
    store: SessionStore, clock: Clock, other: Engine, touch_due: bool
) -> None:
    """Its row is gone (no expiry mark either): the write raises, nothing comes back."""
    session = store.get(SID)
    session["cart"]["items"].append("first")
    store.save(SID, session)
    session["cart"]["items"].append("late")
    store.destroy(SID)
    clock.advance(TTL if touch_due else 1)  # past the touch interval, or well within it
    with pytest.raises(SessionExpired):
        store.save(SID, session)
    assert not exists(other)
    assert saved_cart(other) is None


def test_a_namespace_written_meanwhile_is_a_conflict(
    store: SessionStore, storage: SQLStorage, other: Engine
) -> None:
    session = store.get(SID)
    session["cart"]["items"].append("mine")
    store.save(SID, session)
    with other.begin() as conn:  # another worker's write, version 1 -> 2
        conn.execute(
            update(namespaces)
            .where(namespaces.c.sid == KEY)
            .values(data={"items": ["theirs"]}, version=namespaces.c.version + 1)
        )
    session["cart"]["items"].append("lost?")
    with pytest.raises(StateConflict):
        store.save(SID, session)
    assert saved_cart(other) == {"items": ["theirs"]}


def test_a_task_threads_merge_gives_up_instead_of_overwriting(
    store: SessionStore, storage: SQLStorage, other: Engine
) -> None:
    """Every retry of the merge finds the namespace changed again: it stops, it never
    writes over the other writer."""
    unit = store.unit(SID)
    cart = unit.namespace("cart")
    unit.commit()
    cart["items"].append("from the thread")
    slot = unit._slots["cart"]  # type: ignore[attr-defined]

    def bump(statement: str, sql: str, values: Mapping[str, Any]) -> None:
        if statement in ("update_namespace", "insert_namespace"):
            with other.begin() as conn:
                row = conn.execute(select(namespaces.c.version).where(namespaces.c.sid == KEY))
                if row.first() is None:
                    conn.execute(
                        insert(namespaces).values(
                            sid=KEY, name="cart", data={"items": ["other"]}, version=1,
                            updated_at=at(store.now()),
                        )
                    )
                else:
                    conn.execute(
                        update(namespaces)
                        .where(namespaces.c.sid == KEY)
                        .values(data={"items": ["other"]}, version=namespaces.c.version + 1)
                    )

    home = SQLTaskHome(store.backend.ctx, KEY, "0" * 32, slot)  # type: ignore[attr-defined]
    storage.statement_hook = bump
    with pytest.raises(StateConflict):
        home.save(TaskState(running=True, attempt=1), "work")
    storage.statement_hook = None
    assert saved_cart(other) == {"items": ["other"]}


# -- tasks ------------------------------------------------------------------------


def test_a_task_started_in_a_session_destroyed_meanwhile_does_not_run(
    store: SessionStore, other: Engine
) -> None:
    session = store.get(SID)
    task = session["job"]["task"]
    ran: list[bool] = []
    store.destroy(SID)
    with pytest.raises(SessionExpired):
        task.start(lambda t: ran.append(True))
    assert not exists(other)
    with other.connect() as conn:
        assert conn.execute(select(tasks.c.id)).first() is None
    assert not task.is_running
    assert ran == []


def test_a_task_claimed_elsewhere_meanwhile_is_refused(
    store: SessionStore, storage: SQLStorage, other: Engine
) -> None:
    """Another worker claims the run between this one's check and its claim (it gets in
    before the claim's transaction locks the session: once locked, it would wait)."""
    session = store.get(SID)
    task = session["job"]["task"]
    now = store.now()

    def claim_elsewhere() -> None:
        with other.begin() as conn:
            conn.execute(
                insert(tasks).values(
                    id=task.task_id, sid=KEY, name="work", status="running", progress=0.0,
                    message="elsewhere", logs=[], started_at=at(now), heartbeat_at=at(now),
                )
            )

    at_statement(storage, "touch", claim_elsewhere)  # the claim's first statement
    ran: list[bool] = []
    with pytest.raises(TaskAlreadyRunning):
        task.start(lambda t: ran.append(True))
    storage.statement_hook = None
    assert ran == []
    with other.connect() as conn:
        assert conn.execute(select(tasks.c.message)).scalar() == "elsewhere"


def test_a_task_started_outside_a_request_for_a_session_gone_meanwhile_is_refused(
    store: SessionStore, other: Engine
) -> None:
    """A script holds a session's task, and the session is destroyed before it starts it:
    the start raises SessionExpired, writes no run and starts nothing."""
    task = store.get(SID)["job"]["task"]
    with other.begin() as conn:
        conn.execute(delete(sessions).where(sessions.c.sid == KEY))
    ran: list[bool] = []
    with pytest.raises(SessionExpired):
        task.start(lambda t: ran.append(True))
    assert ran == []
    with other.connect() as conn:
        assert conn.execute(select(tasks.c.id)).first() is None


# -- files -------------------------------------------------------------------------


def test_an_upload_into_a_session_destroyed_meanwhile_keeps_nothing(
    store: SessionStore, storage: SQLStorage, other: Engine, tmp_path: Path
) -> None:
    """Outside a request: the session goes between the move and the row."""
    from flask_silo_sql import FileStore

    store.get(SID)
    uploads = FileStore(
        str(tmp_path / "up"), name="up", records=lambda: store.backend.file_records("up")
    )

    def destroy() -> None:
        with other.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.sid == KEY))

    # The row's transaction starts (on PostgreSQL it first locks the session's row, which
    # a destruction after that would wait for).
    locks = storage.statements.files.lock_session_row
    first = "lock_session_row" if locks else "delete_replaced_chunks"
    at_statement(storage, first, destroy)
    with pytest.raises(SessionExpired):
        uploads.save(SID, "a.txt", b"hello")
    storage.statement_hook = None
    assert not exists(other)
    assert not (tmp_path / "up" / SID / "a.txt").exists()
    with other.connect() as conn:
        assert conn.execute(select(files.c.id)).first() is None


def test_an_upload_whose_session_and_bytes_went_meanwhile_is_410_not_interrupted(
    store: SessionStore, storage: SQLStorage, other: Engine, tmp_path: Path
) -> None:
    """Outside a request, ``local``: the session is destroyed, its directory with it, after
    the bytes moved in and before the row: the client's session is gone (410), which a
    409 "upload interrupted" would hide."""
    from flask_silo_sql import FileStore

    locks = storage.statements.files.lock_session_row
    if locks is None:
        pytest.skip("SQLite: no statement of the row's transaction comes before its check")
    store.get(SID)
    uploads = FileStore(
        str(tmp_path / "up"), name="up", records=lambda: store.backend.file_records("up")
    )

    def destroy() -> None:
        with other.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.sid == KEY))
        os.remove(tmp_path / "up" / KEY / "a.txt")  # a reset removes the session's files

    at_statement(storage, "lock_session_row", destroy)
    with pytest.raises(SessionExpired):
        uploads.save(SID, "a.txt", b"hello")
    storage.statement_hook = None
    with other.connect() as conn:
        assert conn.execute(select(files.c.id)).first() is None


def test_an_upload_whose_session_expires_during_the_request_answers_410(
    silo_app: AppFactory, tmp_path: Path, other: Engine
) -> None:
    """The sweep expires the session while the upload runs: 410, no file, no new session."""
    h = silo_app(via="config", ttl=TTL)
    app, silo, clock = h.app, h.silo, h.clock
    uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))
    silo.register("data", lambda: {"items": []})

    @app.put("/api/upload")
    def upload() -> Any:
        path = uploads.save(silo.sid, "data.bin", io.BytesIO(request.get_data()))
        clock.advance(10 * TTL)  # a slow client: the session idles out meanwhile
        silo.store.sweep()
        return jsonify(path=os.path.basename(path))

    @app.get("/api/hello")
    def hello() -> Any:
        return jsonify(items=silo.state("data")["items"])

    assert h.get("/api/hello", SID).status_code == 200
    answer = h.put("/api/upload", SID, data=b"x" * 1000)
    assert answer.status_code == 410, answer.get_data(as_text=True)
    assert answer.get_json()["error"] == "session_expired"
    assert not exists(other)
    assert silo.store.is_expired(SID)
    assert not (tmp_path / "uploads" / SID / "data.bin").exists()
    with other.connect() as conn:
        assert conn.execute(select(files.c.id)).first() is None


def test_a_view_learns_at_once_that_its_task_runs_elsewhere(
    silo_app: AppFactory, other: Engine
) -> None:
    """As in flask-silo, ``start()`` raises in the view (a RuntimeError it can handle)."""
    h = silo_app(via="config", ttl=TTL)
    app, silo, clock = h.app, h.silo, h.clock
    silo.register("job", lambda: {"task": BackgroundTask("work")})
    ran: list[bool] = []

    @app.get("/api/look")
    def look() -> Any:
        return jsonify(running=silo.state("job")["task"].is_running)

    @app.post("/api/start")
    def start() -> Any:
        task = silo.state("job")["task"]
        try:
            task.start(lambda t: ran.append(True))
        except RuntimeError as exc:
            return jsonify(refused=str(exc))
        return jsonify(started=True)

    assert h.get("/api/look", SID).get_json() == {"running": False}
    now = at(clock.now)
    with other.begin() as conn:  # another worker runs it, alive
        conn.execute(
            insert(tasks).values(
                id=task_id_for(KEY, "job", "/task"), sid=KEY, name="work", status="running",
                progress=0.0, message="theirs", logs=[], started_at=now, heartbeat_at=now,
            )
        )
    answer = h.post("/api/start", SID)
    assert answer.status_code == 200
    assert answer.get_json() == {"refused": "Task 'work' is already running"}
    assert ran == []
    with other.connect() as conn:
        assert conn.execute(select(tasks.c.message)).scalar() == "theirs"
