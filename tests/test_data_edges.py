"""What the databases themselves do to state: numbers keep their type on both databases.

Through Flask's test client on SQLite and PostgreSQL. A
namespace holds what the client sent; it is read back in a later request (a
new unit: from the database, not from memory) and compared value by value,
type by type. The size a namespace is checked at is the size its row holds,
so state near its limit can still be changed a little.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request
from sqlalchemy import inspect, text
from support import Clock, small_tmpfs

from flask_silo_sql import Silo, SQLStorage, schema, session_key
from flask_silo_sql.cli import silo_db
from flask_silo_sql.sql.engine import make_engine

HEADER = "X-Session-ID"
SID = "numbers-0000000000000000"


class ValueApp:
    """An app that keeps the JSON a client posts in the ``data`` namespace."""

    def __init__(self, url: str, executor: str, **config: Any) -> None:
        self.storage = SQLStorage(url, executor=executor)  # type: ignore[arg-type]
        self.app = app = Flask(__name__)
        app.config.update(config)
        self.silo = silo = Silo(app, storage=self.storage, auto_cleanup=False)
        silo.register("data", lambda: {"value": None})

        @app.post("/api/value")
        def write() -> Response:
            silo.state("data")["value"] = request.get_json()
            return jsonify(ok=True)

        @app.get("/api/value")
        def read() -> Response:
            value = silo.state("data")["value"]
            return jsonify(value=value, types=types_of(value))

        self.client = app.test_client()

    def write(self, value: Any, sid: str = SID) -> Any:
        return self.client.post(
            "/api/value",
            data=json.dumps(value),
            content_type="application/json",
            headers={HEADER: sid},
        )

    def read(self) -> Any:
        response = self.client.get("/api/value", headers={HEADER: SID})
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        return response.get_json()

    def close(self) -> None:
        self.silo.stop()
        self.storage.dispose()


def types_of(value: Any) -> Any:
    """The Python type of every number in *value* (what the app saw after its read)."""
    if isinstance(value, list):
        return [types_of(item) for item in value]
    if isinstance(value, dict):
        return {key: types_of(item) for key, item in value.items()}
    return type(value).__name__


@pytest.fixture
def value_app(silo_url: str, executor: str) -> Iterator[ValueApp]:
    app = ValueApp(silo_url, executor, SILO_MAX_STATE_BYTES=64 * 1024)
    yield app
    app.close()


NUMBERS = {
    "big_float": 1e20,
    "whole_float": 2.0,
    "tiny": 1.5e-7,
    "huge": 1e300,
    "negative_zero": -0.0,
    "tenth": 0.1,
    "big_int": 12345678901234567890123,
    "int": 7,
    "nested": [1e16, {"x": 3.0}],
}


def test_numbers_come_back_as_the_client_sent_them(value_app: ValueApp) -> None:
    """A float stays a float of the same value, an integer an integer, on both databases
    (``jsonb`` gave 1e20 and 1e16 back as the integers 100000000000000000000 and
    10000000000000000)."""
    assert value_app.write(NUMBERS).status_code == 200
    got = value_app.read()
    assert got["types"] == types_of(NUMBERS)
    assert got["types"]["big_float"] == "float"  # the app's own read, in Python
    same = json.dumps(got["value"], sort_keys=True) == json.dumps(NUMBERS, sort_keys=True)
    assert same  # the same values, written the same way
    assert math.copysign(1.0, got["value"]["negative_zero"]) == -1.0


def test_state_is_checked_at_the_size_its_row_holds(value_app: ValueApp) -> None:
    """State near its limit is stored at the size it was checked at, and a small change
    to it is still accepted (``jsonb`` stored [1e300, ...] 38 times larger, and the next
    change to that namespace was refused 413 against its own limit)."""
    near = [1e300] * 9000  # 6 bytes each: about 55 kB of the 64 KiB limit
    assert value_app.write(near).status_code == 200
    with value_app.storage.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT length(CAST(data AS TEXT)) FROM silo_namespaces WHERE sid = :sid"),
            {"sid": session_key(SID)},
        ).scalar_one()
    assert stored < 64 * 1024
    assert stored == len(json.dumps({"value": near}, separators=(",", ":")))
    changed = [*near, 1.0]
    assert value_app.write(changed).status_code == 200
    assert value_app.read()["value"][-2:] == [1e300, 1.0]


def test_operators_still_query_keys_of_state_on_postgresql(pg_silo_url: str) -> None:
    """``data->'key'`` and ``data->>'key'`` (the operators' queries) answer on ``json``."""
    app = ValueApp(pg_silo_url, "dbapi")
    try:
        assert app.write({"plan": "pro", "n": 1e20}).status_code == 200
        with app.storage.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT data->'value'->>'plan', data->'value'->'n' "
                    "FROM silo_namespaces WHERE sid = :sid"
                ),
                {"sid": session_key(SID)},
            ).one()
        assert row[0] == "pro"
        assert row[1] == 1e20
        assert isinstance(row[1], float)
    finally:
        app.close()


def test_migration_0006_converts_state_both_ways_on_postgresql(pg_url: str) -> None:
    """Upgrading to 0006 turns existing ``jsonb`` state into ``json`` with its values, and
    a downgrade turns it back."""
    engine = make_engine(pg_url)
    try:
        schema.upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO silo_sessions (sid, created_at, last_active, expires_at) "
                    "VALUES (:sid, now(), now(), now() + interval '1 hour')"
                ),
                {"sid": session_key(SID)},
            )
            conn.execute(
                text(
                    "INSERT INTO silo_namespaces (sid, name, data, version, updated_at) "
                    "VALUES (:sid, 'data', CAST(:data AS jsonb), 1, now())"
                ),
                {"sid": session_key(SID), "data": '{"value": {"n": 1.5, "s": "kept"}}'},
            )

        def column() -> tuple[str, Any]:
            with engine.connect() as conn:
                kind = conn.execute(
                    text(
                        "SELECT data_type FROM information_schema.columns "
                        "WHERE table_name = 'silo_namespaces' AND column_name = 'data'"
                    )
                ).scalar_one()
                data = conn.execute(text("SELECT data FROM silo_namespaces")).scalar_one()
            return kind, data

        schema.upgrade(engine)
        assert column() == ("json", {"value": {"n": 1.5, "s": "kept"}})
        schema.downgrade(engine, "0005")
        assert column() == ("jsonb", {"value": {"n": 1.5, "s": "kept"}})
    finally:
        engine.dispose()


# -- an interrupted upgrade ----------------------------------------------------------

KILLER = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "before_cursor_execute")
def die_at_the_data_step(conn, cursor, statement, parameters, context, executemany):
    # Migration 0002's data step, after its ADD COLUMN: the process is killed there.
    if statement.lstrip().startswith("UPDATE silo_sessions SET expires_at"):
        os.kill(os.getpid(), signal.SIGKILL)

from flask.cli import main
sys.argv[0] = "flask"
main()
"""

UPGRADE_APP = """
from flask import Flask
from flask_silo_sql import Silo

def create_app():
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = {url!r}
    Silo(app, auto_cleanup=False)
    return app
"""


def test_an_upgrade_killed_mid_migration_leaves_the_previous_revision(
    db_url: str, tmp_path: Path
) -> None:
    """A real ``flask silo-db upgrade`` SIGKILLed at a migration's data step changes
    nothing: the schema is still at the revision before, and upgrading again succeeds
    (on SQLite the ADD COLUMN before the step was committed on its own, and every later
    upgrade failed with "duplicate column name")."""
    (tmp_path / "app.py").write_text(UPGRADE_APP.format(url=db_url))
    engine = make_engine(db_url)
    try:
        schema.upgrade(engine, "0001")
        env = {k: v for k, v in os.environ.items() if k not in ("SILO_DATABASE_URI", "FLASK_APP")}

        def upgrade(*pre: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, *pre, "--app", "app", "silo-db", "upgrade"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        killed = upgrade("-c", KILLER)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert schema.current(engine) == "0001"
        columns = {c["name"] for c in inspect(engine).get_columns("silo_sessions")}
        assert "expires_at" not in columns  # the migration's DDL went with it
        again = upgrade("-m", "flask")
        assert again.returncode == 0, again.stderr
        assert schema.is_current(engine)
    finally:
        engine.dispose()


# -- a full disk on SQLite -----------------------------------------------------------

MIB = 1024 * 1024
DISK_MIB = 40
FLOOR = 6 * MIB
STATE = 900_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MIB MiB (mounting needs root, or CAP_SYS_ADMIN)."""
    with small_tmpfs(tmp_path / "disk", DISK_MIB) as where:
        yield where


def fill(path: Path) -> None:
    """Write *path* until the disk is full (something else filling the disk)."""
    with open(path, "wb", buffering=0) as handle:
        for size in (256 * 1024, 4096, 512):
            with contextlib.suppress(OSError):
                while handle.write(b"\0" * size):
                    pass


def test_state_stops_at_the_disk_floor_and_the_sweep_frees_a_full_disk(
    small_disk: Path,
) -> None:
    """On a small disk, state writes stop at SILO_DB_MIN_FREE_BYTES with a 507 JSON
    answer; the disk then filled to the last byte by something else, a restarted app's
    ``flask silo-db cleanup`` still expires every session (it failed with "database or
    disk is full"), and state is written again once the disk has room."""
    url = f"sqlite:///{small_disk / 'silo.db'}"
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    clock = Clock()
    config = {"SILO_DB_MIN_FREE_BYTES": FLOOR, "SILO_MAX_STATE_BYTES": 2 * MIB}

    def start() -> ValueApp:
        app = ValueApp(url, "dbapi", **config)
        app.silo.store.clock = clock
        return app

    app = start()
    written = 0
    try:
        for i in range(DISK_MIB * MIB // STATE):
            response = app.write(["x" * STATE], sid=f"filler-{i:04d}-000000000000")
            if response.status_code != 200:
                break
            written += 1
        assert response.status_code == 507, response.get_data(as_text=True)[:300]
        error = response.get_json()
        assert error["error"] == "insufficient_storage"
        assert "SILO_DB_MIN_FREE_BYTES" not in error["message"]  # the client's wording
        assert written >= 20
        assert app.write([1], sid="filler-0000-000000000000").status_code == 200  # shrinks
    finally:
        app.close()

    fill(small_disk / "something-else")
    assert shutil.disk_usage(small_disk).free < 64 * 1024
    clock.advance(7 * 86400)
    app = start()  # a restart: the WAL the full disk left behind is still there
    try:
        result = app.app.test_cli_runner().invoke(silo_db, ["cleanup"])
        assert result.exit_code == 0, result.output
        assert f"expired {written} session(s)" in result.output
        with app.storage.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM silo_sessions")).scalar_one() == 0
        os.unlink(small_disk / "something-else")
        assert app.write(["x" * STATE], sid="after-0000-0000000000000").status_code == 200
    finally:
        app.close()


# -- locking mode ----------------------------------------------------------------------

ALICE = "alice-locking-0000000000"
BOB = "bob-locking-000000000000"


def test_locking_mode_holds_one_session_not_the_database(silo_url: str) -> None:
    """With SILO_LOCKING, a slow request holds its own session only: another client's
    reads and writes answer at once meanwhile (on SQLite they waited for the database's
    write lock, then answered 503), while a second request of the same session waits
    its turn and then sees the first one's change."""
    app = Flask(__name__)
    app.config.update(SILO_LOCKING=True)
    storage = SQLStorage(silo_url)
    silo = Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    gate = threading.Event()
    holding = threading.Event()

    @app.post("/api/slow")
    def slow() -> Response:
        state = silo.state("counter")  # the session is locked from here
        holding.set()
        assert gate.wait(30)  # a slow upload, say
        state["n"] += 1
        return jsonify(n=state["n"])

    @app.post("/api/inc")
    def inc() -> Response:
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(n=state["n"])

    @app.get("/api/read")
    def read() -> Response:
        return jsonify(n=silo.state("counter")["n"])

    def post(path: str, sid: str) -> Any:
        return app.test_client().post(path, headers={HEADER: sid})

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(post, "/api/slow", ALICE)
            assert holding.wait(30)
            second = pool.submit(post, "/api/inc", ALICE)  # waits for the first
            try:
                other = app.test_client().get("/api/read", headers={HEADER: BOB})
                assert other.status_code == 200, other.get_data(as_text=True)
                assert post("/api/inc", BOB).status_code == 200
                assert post("/api/inc", BOB).get_json() == {"n": 2}
                assert not second.done()  # Alice's second request is still waiting
            finally:
                gate.set()
            assert first.result().get_json() == {"n": 1}
            assert second.result().status_code == 200
            assert second.result().get_json() == {"n": 2}  # in turn, nothing lost
    finally:
        silo.stop()
        storage.dispose()
