"""Rotating a SID, against session fixation: the state moves, the old SID reaches nothing.

An app calls ``silo.rotate()`` after a login (Django's ``cycle_key``,
Flask-Session's ``regenerate``): whatever SID the client came with, maybe one
an attacker planted, the session continues under a new one. Namespaces, task
rows and files (rows and directories) move in one transaction; a request that
still holds the old SID is answered as an expired session.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from sqlalchemy import select
from support import sql_storage

from flask_silo_sql import BackgroundTask, SessionExpired, Silo, session_key
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.files.locks import make_directory
from flask_silo_sql.sql.models import files, namespaces, tasks

PLANTED = "planted-by-an-attacker-000001"
HEADER = "X-Session-ID"


@pytest.fixture
def app(silo_url: str, tmp_path: Path) -> Iterator[tuple[Flask, Silo]]:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    silo = Silo(app, auto_cleanup=False)
    silo.register("cart", lambda: {"items": []})
    silo.register("job", lambda: {"task": BackgroundTask("work")})
    silo.register("report", lambda: {"task": BackgroundTask("report"), "pages": None})
    silo.add_data_endpoints("/api/cart")
    uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))
    release = threading.Event()
    go = threading.Event()

    @app.post("/api/add")
    def add() -> Any:
        silo.state("cart")["items"].append(request.args.get("item", "x"))
        return jsonify(items=silo.state("cart")["items"])

    @app.post("/api/upload")
    def upload() -> Any:
        name = request.args.get("name", "a.txt")
        uploads.save(silo.sid, name, io.BytesIO(b"file of the session"))
        return jsonify(ok=True)

    @app.post("/api/start")
    def start() -> Any:
        silo.state("job")["task"].start(lambda task: release.wait(30))
        return jsonify(ok=True)

    @app.post("/api/report")
    def report() -> Any:
        holder = silo.state("report")

        def write_report(task: BackgroundTask) -> None:
            task.update(10, "drafting")
            go.wait(30)
            task.update(60, "written")
            holder["pages"] = 12  # the run's result, saved with its state
            task.complete("report ready")

        if request.args.get("durable"):
            holder["task"].start(durable_report, holder)
        else:
            holder["task"].start(write_report)
        return jsonify(ok=True)

    @silo.task(name="durable_report", retries=0)
    def durable_report(task: BackgroundTask, holder: dict[str, Any]) -> None:
        task.update(10, "drafting")
        go.wait(30)
        task.update(60, "written")
        holder["pages"] = 12
        task.complete("report ready")

    @app.get("/api/report")
    def report_state() -> Any:
        holder = silo.state("report")
        return jsonify(
            status=holder["task"].state.status,
            pages=holder["pages"],
            task=holder["task"].state.to_dict(),
        )

    @app.get("/api/job")
    def job() -> Any:
        return jsonify(running=silo.state("job")["task"].is_running)

    @app.post("/api/login")
    def login() -> Any:
        silo.state("cart")["items"].append("after login")
        new = silo.rotate()
        silo.state("cart")["items"].append("as the new sid")
        return jsonify(sid=new, listed=uploads.list_files(silo.sid))

    @app.get("/api/cart")
    def cart() -> Any:
        return jsonify(items=silo.state("cart")["items"])

    app.config["release"] = release
    app.config["go"] = go
    yield app, silo
    release.set()
    go.set()
    sql_storage(silo.store).dispose()


def test_login_rotates_the_sid_and_keeps_everything(
    app: tuple[Flask, Silo], tmp_path: Path
) -> None:
    flask_app, silo = app
    client = flask_app.test_client()
    old = {HEADER: PLANTED}
    client.post("/api/add?item=book", headers=old)
    client.post("/api/upload", headers=old)
    client.post("/api/start", headers=old)
    assert client.get("/api/job", headers=old).get_json() == {"running": True}

    answer = client.post("/api/login", headers=old)
    new = answer.headers[HEADER]
    assert new != PLANTED
    assert answer.get_json() == {"sid": new, "listed": ["a.txt"]}

    fresh = {HEADER: new}
    assert client.get("/api/cart", headers=fresh).get_json() == {
        "items": ["book", "after login", "as the new sid"]
    }
    assert client.get("/api/job", headers=fresh).get_json() == {"running": True}
    moved = tmp_path / "uploads" / session_key(new) / "a.txt"
    assert moved.read_bytes() == b"file of the session"
    assert not (tmp_path / "uploads" / session_key(PLANTED)).exists()

    # The planted SID reaches nothing: a data endpoint says it expired.
    gone = client.get("/api/cart", headers=old)
    assert gone.status_code == 410
    assert not silo.store.exists(PLANTED)
    engine = sql_storage(silo.store).engine
    with engine.connect() as conn:
        for table in (namespaces, tasks, files):
            sids = set(conn.execute(select(table.c.sid)).scalars())
            assert sids == {session_key(new)}, table.name
    flask_app.config["release"].set()


def test_a_request_holding_the_old_sid_during_a_rotation_loses_nothing(
    app: tuple[Flask, Silo],
) -> None:
    """It read the old session, the SID rotated, its write is refused (410), not merged in."""
    flask_app, silo = app
    client = flask_app.test_client()
    old = {HEADER: PLANTED}
    client.post("/api/add?item=book", headers=old)
    unit = silo.store.unit(PLANTED)
    stale = unit.namespace("cart")  # a request of the old SID, in flight
    new = silo.store.rotate(PLANTED)
    stale["items"].append("late write")
    from flask_silo_sql import SessionExpired

    with pytest.raises(SessionExpired):
        unit.commit()
    unit.close()
    assert client.get("/api/cart", headers={HEADER: new}).get_json() == {"items": ["book"]}
    assert not silo.store.exists(PLANTED)


def test_rotating_a_sid_without_a_session_moves_nothing(app: tuple[Flask, Silo]) -> None:
    _, silo = app
    new = silo.store.rotate("never-used-sid-000000000")
    assert new != "never-used-sid-000000000"
    assert not silo.store.exists(new)
    assert not silo.store.exists("never-used-sid-000000000")


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_a_running_task_follows_its_session_through_a_rotation(
    app: tuple[Flask, Silo], durable: bool
) -> None:
    """Its progress, its end and its result land under the new SID (nothing is refused;
    a durable run keeps its attempt)."""
    flask_app, silo = app
    client = flask_app.test_client()
    old = {HEADER: PLANTED}
    query = {"durable": "1"} if durable else {}
    assert client.post("/api/report", headers=old, query_string=query).status_code == 200
    new = client.post("/api/login", headers=old).headers[HEADER]
    fresh = {HEADER: new}
    flask_app.config["go"].set()  # the run goes on writing, after the rotation
    deadline = time.monotonic() + 20
    while client.get("/api/report", headers=fresh).get_json()["status"] == "running":
        assert time.monotonic() < deadline, "the run never ended"
        time.sleep(0.05)
    body = client.get("/api/report", headers=fresh).get_json()
    assert body["status"] == "complete"
    assert body["pages"] == 12
    assert body["task"]["progress"] == 100
    assert body["task"]["message"] == "report ready"
    if durable:
        assert body["task"]["attempt"] == 1
    engine = sql_storage(silo.store).engine
    with engine.connect() as conn:
        rows = conn.execute(select(tasks.c.sid, tasks.c.name, tasks.c.status)).all()
    assert (session_key(new), "report", "complete") in rows
    assert not any(sid == session_key(PLANTED) for sid, _, _ in rows)


def test_a_session_directory_renamed_away_while_it_is_made_is_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that makes its session's directory as a rotation renames it: the
    directory was there when ``mkdir`` looked and gone when ``makedirs`` checked it
    (a 500 "could not create a session directory" before)."""
    directory = tmp_path / "uploads" / "session"
    directory.mkdir(parents=True)
    real_mkdir = os.mkdir

    def mkdir_as_a_rotation_renames(path: Any, mode: int = 0o777, **kw: Any) -> None:
        if os.fspath(path) == str(directory) and directory.exists():
            directory.rename(tmp_path / "uploads" / "rotated")  # after mkdir saw it
            raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
        real_mkdir(path, mode, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir_as_a_rotation_renames)
    make_directory(str(directory))
    assert directory.is_dir()
    (tmp_path / "uploads" / "in-the-way").write_bytes(b"")
    with pytest.raises(FileExistsError):  # a file where the directory goes is still refused
        make_directory(str(tmp_path / "uploads" / "in-the-way"))


@pytest.mark.parametrize("where", ["request", "script"])
def test_an_upload_whose_session_rotates_before_its_bytes_land_is_refused_whole(
    app: tuple[Flask, Silo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The rotation moves the upload's pending row and the session's directory after the
    upload began and before it made its temporary file, which then goes into the old
    SID's directory made anew. The upload is refused (410, as one whose SID rotated),
    in a request or outside one (a task, a script), not kept under a row that names
    bytes in the new SID's directory (a file without its bytes, and bytes without a
    row)."""
    flask_app, silo = app
    client = flask_app.test_client()
    old = {HEADER: PLANTED}
    assert client.post("/api/upload", headers=old).status_code == 200
    uploads = silo.file_store("uploads")
    real_open = os.open
    rotated: list[str] = []

    def open_after_a_rotation(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if not rotated and os.path.basename(os.fspath(path)).startswith(TEMP_PREFIX):
            rotated.append(silo.store.rotate(PLANTED))  # between the row and the file
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", open_after_a_rotation)
    if where == "request":
        late = client.post("/api/upload?name=late.txt", headers=old)
        assert late.status_code == 410, late.get_data(as_text=True)
    else:
        with pytest.raises(SessionExpired):
            uploads.save(PLANTED, "late.txt", io.BytesIO(b"written by a task"))
    monkeypatch.undo()
    assert rotated
    assert uploads.list_files(rotated[0]) == ["a.txt"]
    report = uploads.check(grace=0.0)
    assert report.unrecorded == []
    assert report.missing == []
    leftover = {p.name for p in (tmp_path / "uploads").rglob("*") if p.is_file()}
    assert leftover == {"a.txt"}


class RotatedWhileRead(io.BytesIO):
    """An upload's body whose first read rotates its session: the temporary file the
    upload writes to goes along with the session's directory."""

    def __init__(self, silo: Silo, sid: str, data: bytes) -> None:
        super().__init__(data)
        self.silo, self.sid = silo, sid
        self.rotated: list[str] = []

    def read(self, size: int | None = -1, /) -> bytes:
        if not self.rotated:
            self.rotated.append(self.silo.store.rotate(self.sid))
        return super().read(size)


def test_an_upload_whose_session_rotates_while_it_streams_leaves_nothing_behind(
    app: tuple[Flask, Silo], tmp_path: Path
) -> None:
    """Refused (its SID rotated), and its temporary file, which went into the new SID's
    directory with the rest, is gone too (fsck would find it as a leftover)."""
    flask_app, silo = app
    client = flask_app.test_client()
    assert client.post("/api/upload", headers={HEADER: PLANTED}).status_code == 200
    uploads = silo.file_store("uploads")
    body = RotatedWhileRead(silo, PLANTED, b"written by a task")
    with pytest.raises(SessionExpired):
        uploads.save(PLANTED, "late.txt", body)
    assert body.rotated
    assert uploads.list_files(body.rotated[0]) == ["a.txt"]
    report = uploads.check(grace=0.0)
    assert (report.unrecorded, report.missing, report.partial) == ([], [], [])
    leftover = {p.name for p in (tmp_path / "uploads").rglob("*") if p.is_file()}
    assert leftover == {"a.txt"}
