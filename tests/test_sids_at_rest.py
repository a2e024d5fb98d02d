"""SIDs at rest: nothing stored names a SID, a stored key is no SID, and migration 0009.

Every test runs on SQLite and on PostgreSQL. A client uses every kind of
thing silo stores (namespace state, a file, a task, an idempotency key, an
expired mark); then the raw database (the SQLite file, a ``pg_dump``) and the
uploads folder's names are searched for its SID.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask, Response, jsonify, request
from flask.cli import ScriptInfo
from harness import Harness
from pgserver import find_bindir
from sqlalchemy import Engine, make_url, text
from support import as_before_hashing, row_counts

from flask_silo_sql import BackgroundTask, FileStore, Silo, SQLStorage, schema, session_key
from flask_silo_sql.cli import silo_db
from flask_silo_sql.keys import SessionKey
from flask_silo_sql.sids import tag
from flask_silo_sql.sql.engine import make_engine

PAGE = Path(__file__).resolve().parent.parent / "docs" / "sids-at-rest.md"


class Client(Harness):
    """An app whose clients keep items, a file, a task and an idempotent counter."""

    def __init__(self, url: str, *, uploads: Path, **options: Any) -> None:
        super().__init__(url, **options)
        silo: Silo = self.silo
        silo.register("work", lambda: {"items": [], "job": BackgroundTask("job"), "paid": 0})
        silo.add_data_endpoints("/api/items")
        self.files: FileStore = silo.add_file_store("uploads", str(uploads))
        self.done = threading.Event()
        app = self.app

        @app.post("/api/items")
        def add() -> Response:
            state = silo.state("work")
            state["items"].append(request.get_json()["item"])
            return jsonify(state["items"])

        @app.get("/api/items")
        def items() -> Response:
            state = silo.state("work")
            return jsonify(items=state["items"], job=state["job"].state.to_dict())

        @app.post("/api/upload")
        def upload() -> Response:
            self.files.save(silo.sid, "note.txt", request.get_data())
            return jsonify(self.files.list_files(silo.sid))

        @app.get("/api/upload")
        def download() -> Response:
            path = self.files.get_path(silo.sid, "note.txt")
            return jsonify(None if path is None else Path(path).read_text())

        def work(task: BackgroundTask) -> None:
            task.update(50, "half way")
            task.complete("finished")
            self.done.set()

        @app.post("/api/job")
        def job() -> Response:
            silo.state("work")["job"].start(work)
            return jsonify(started=True)

        @app.post("/api/pay")
        @silo.idempotent()
        def pay() -> Response:
            state = silo.state("work")
            state["paid"] += 1
            return jsonify(paid=state["paid"])


def use_everything(h: Client, sid: str, item: str = "apple") -> None:
    """The client *sid* stores state, a file, a task's state and an idempotency key."""
    assert h.post("/api/items", sid, json={"item": item}).status_code == 200
    assert h.json("POST", "/api/upload", sid, data=b"hello " + item.encode()) == ["note.txt"]
    h.done.clear()
    assert h.json("POST", "/api/job", sid) == {"started": True}
    assert h.done.wait(30)
    headers = {"Idempotency-Key": "pay-" + item}
    assert h.json("POST", "/api/pay", sid, headers=headers) == {"paid": 1}
    assert h.json("POST", "/api/pay", sid, headers=headers) == {"paid": 1}  # replayed


def served(h: Client, sid: str, item: str = "apple") -> None:
    """The client *sid* finds everything it stored."""
    response = h.get("/api/items", sid)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers[h.header] == sid
    body = response.get_json()
    assert body["items"] == [item]
    assert body["job"]["complete"]
    assert body["job"]["message"] == "finished"
    assert h.json("GET", "/api/upload", sid) == "hello " + item
    headers = {"Idempotency-Key": "pay-" + item}
    assert h.json("POST", "/api/pay", sid, headers=headers) == {"paid": 1}  # still replayed


@pytest.fixture
def client_app(silo_url: str, tmp_path: Path) -> Iterator[Client]:
    with Client(silo_url, uploads=tmp_path / "uploads", instance_path=tmp_path / "i") as h:
        yield h


def raw_database(engine: Engine, tmp_path: Path) -> bytes:
    """Every byte the database keeps: the SQLite files, or a ``pg_dump`` of the database."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        with engine.connect() as conn:  # the WAL's pages into the file as well
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        base = str(url.database)
        return b"".join(
            Path(base + suffix).read_bytes()
            for suffix in ("", "-wal", "-journal")
            if os.path.exists(base + suffix)
        )
    bindir = find_bindir()
    assert bindir is not None, "PostgreSQL binaries not found"
    assert (bindir / "pg_dump").exists(), "pg_dump not found"
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    out = tmp_path / "dump.sql"
    subprocess.run(
        [str(bindir / "pg_dump"), "--no-owner", "-f", str(out), libpq], check=True, timeout=120
    )
    return out.read_bytes()


def names_under(*roots: Path) -> list[str]:
    found: list[str] = []
    for root in roots:
        for _, dirs, files in os.walk(root):
            found += dirs + files
    return found


def test_nothing_stored_holds_the_sid(client_app: Client, tmp_path: Path) -> None:
    h = client_app
    sid = secrets.token_urlsafe(32)
    use_everything(h, sid)
    served(h, sid)

    def search() -> None:
        raw = raw_database(h.engine, tmp_path)
        assert session_key(sid).encode() in raw  # the search finds what is there
        assert sid.encode() not in raw
        names = names_under(tmp_path / "uploads", tmp_path / "i")
        assert not [name for name in names if sid in name]

    search()
    assert session_key(sid) in os.listdir(tmp_path / "uploads")
    h.expire(sid)  # remembered as expired, by its key
    assert h.get("/api/items", sid).status_code == 410
    search()


def test_a_stored_key_presented_as_a_sid_starts_a_new_session(client_app: Client) -> None:
    h = client_app
    sid = secrets.token_urlsafe(32)
    use_everything(h, sid)
    (key,) = h.store.all_sids
    digits = key.removeprefix("sha256.")
    for stolen in (key, digits, digits.upper()):
        response = h.get("/api/items", stolen)
        assert response.status_code == 200
        assert response.get_json()["items"] == []  # a new session, not the victim's
        assert h.post("/api/items", stolen, json={"item": "x"}).get_json() == ["x"]
        issued = response.headers[h.header]
        assert issued != key
        assert session_key(issued) != key
    query = h.client.get("/api/items", query_string={"_sid": key})
    assert query.get_json()["items"] == []
    served(h, sid)  # the victim's session is untouched


def test_log_tags_name_the_key_and_operators_find_the_session(client_app: Client) -> None:
    h = client_app
    sid = secrets.token_urlsafe(32)
    use_everything(h, sid)
    key = session_key(sid)
    assert tag(sid) == tag(key) == key[len("sha256.") : len("sha256.") + 8]
    with h.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT sid FROM silo_sessions WHERE sid LIKE :tagged"),
            {"tagged": f"sha256.{tag(sid)}%"},
        ).all()
    assert [r[0] for r in rows] == [key]

    runner = h.app.test_cli_runner()
    shown = runner.invoke(silo_db, ["find"], input=sid + "\n", catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert f"key           {key}" in shown.output
    assert "state         live" in shown.output
    assert "files         1" in shown.output
    assert "tasks         1" in shown.output
    assert sid not in shown.output
    other = runner.invoke(silo_db, ["find", "--json", "never-seen-0123456789"])
    assert '"state": "unknown"' in other.output


def test_the_documented_postgresql_expression_computes_the_key(pg_silo_url: str) -> None:
    """The SQL of docs/sids-at-rest.md gives the key silo stores."""
    expression = "'sha256.' || encode(sha256(convert_to('the-sid-here', 'UTF8')), 'hex')"
    assert expression in PAGE.read_text()
    engine = make_engine(pg_silo_url)
    try:
        sid = secrets.token_urlsafe(32)
        with engine.connect() as conn:
            got = conn.execute(
                text(f"SELECT {expression.replace(chr(39) + 'the-sid-here' + chr(39), ':sid')}"),
                {"sid": sid},
            ).scalar()
    finally:
        engine.dispose()
    assert got == session_key(sid)


# -- migration 0009 ---------------------------------------------------------------------------


def test_migration_converts_rows_and_directories_and_downgrade_keeps_them(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    uploads = tmp_path / "uploads"
    clients = {secrets.token_urlsafe(32): f"item{i}" for i in range(5)}
    clients["client-chosen-sid-0001"] = "chosen"
    gone = "client-expired-0000001"
    options: dict[str, Any] = {"uploads": uploads, "instance_path": tmp_path / "i"}
    with Client(db_url, **options) as h:
        for sid, item in clients.items():
            use_everything(h, sid, item)
        h.post("/api/items", gone, json={"item": "x"})
        h.store.destroy(gone)
        h.storage.mark_expired(SessionKey(session_key(gone)), h.clock.now)
        clock = h.clock
    before = row_counts(engine)

    # The database as the previous version left it: at 0008, every SID in clear.
    schema.downgrade(engine, "0008")
    with engine.begin() as conn:
        as_before_hashing(conn, [*clients, gone], uploads)
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(text("SELECT sid FROM silo_sessions"))}
    assert stored == set(clients)
    assert sorted(os.listdir(uploads)) == sorted(clients)

    loaded: list[Client] = []

    def create_app() -> Flask:  # as `flask silo-db upgrade` loads the app
        loaded.append(Client(db_url, clock=clock, **options))
        return loaded[-1].app

    upgraded = CliRunner().invoke(
        silo_db, ["upgrade"], obj=ScriptInfo(create_app=create_app), catch_exceptions=False
    )
    for made in loaded:
        made.close()
    assert upgraded.exit_code == 0, upgraded.output
    assert "session directories renamed" in upgraded.output
    with Client(db_url, clock=clock, **options) as h:
        assert row_counts(engine) == before
        raw = raw_database(engine, tmp_path)
        for sid in [*clients, gone]:
            assert sid.encode() not in raw
        assert sorted(os.listdir(uploads)) == sorted(session_key(s) for s in clients)
        for sid, item in clients.items():
            served(h, sid, item)
        assert h.get("/api/items", gone).status_code == 410

        # Downgrade keeps every row (under its key); upgrading again serves them all.
        schema.downgrade(engine, "0008")
        assert schema.current(engine) == "0008"
        after_down = row_counts(engine)
        schema.upgrade(engine)
        assert row_counts(engine) == after_down
        for sid, item in clients.items():
            served(h, sid, item)
    engine.dispose()


def test_upkeep_renames_directories_the_upgrade_did_not_see(client_app: Client) -> None:
    """A machine whose directories no upgrade renamed: its file upkeep renames them."""
    h = client_app
    sid = secrets.token_urlsafe(32)
    use_everything(h, sid)
    base = Path(h.files.base_dir)
    (base / session_key(sid)).rename(base / sid)
    assert h.json("GET", "/api/upload", sid) is None
    h.files.maintain()
    assert os.listdir(base) == [session_key(sid)]
    served(h, sid)


def test_offline_sql_on_postgresql_converts_with_sha256() -> None:
    engine = make_engine(make_url("postgresql+psycopg://u@localhost/x"))
    try:
        import io

        out = io.StringIO()
        schema.upgrade(engine, "0008:0009", sql=True, stdout=out)
    finally:
        engine.dispose()
    sql = out.getvalue()
    assert "encode(sha256(convert_to(sid, 'UTF8')), 'hex')" in sql
    assert "UPDATE silo_namespaces SET sid =" in sql


def test_flask_silos_storage_interface_hashes_what_a_client_could_send(silo_url: str) -> None:
    """SQLStorage as flask-silo's own storage: flask-silo hands it the client's SID as is,
    so a key-shaped value is hashed like any other; only a key silo handed out passes."""
    storage = SQLStorage(silo_url)
    try:
        sid = secrets.token_urlsafe(32)
        storage.set_session(sid, {"cart": {"items": ["mine"]}})
        (key,) = storage.all_sids()
        assert isinstance(key, SessionKey)
        assert key == session_key(sid)
        assert storage.get_session(str(key)) is None  # as a client would present it
        assert not storage.has_session(str(key))
        stored = storage.get_session(key)  # as silo handed it out
        assert stored is not None
        assert stored["cart"] == {"items": ["mine"]}
        assert storage.get_session(sid) is not None
    finally:
        storage.dispose()
