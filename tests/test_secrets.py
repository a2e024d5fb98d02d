"""Secrets stay out of logs and shared caches.

A SID is a bearer credential and state is the client's data: neither may
appear in a log line silo writes (a session is named by a short keyed tag),
whatever goes wrong — a database outage, a failing task, a file operation
that fails on a path (a session's directory is its SID). Responses carrying a
SID are never cached by a shared cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify
from sqlalchemy import create_engine
from support import sql_storage

from flask_silo_sql import BackgroundTask, Silo, SQLStorage, StorageUnavailable
from flask_silo_sql.sids import tag

SID = "secret-session-id-0123456789abcdef"
SECRET = "SECRET-STATE-VALUE-XYZ"


@pytest.fixture
def app(silo_url: str, tmp_path: Path, executor: Any) -> Iterator[tuple[Flask, Silo]]:
    """The app, on a host-style engine that does not hide SQL parameters itself."""
    app = Flask(__name__)
    engine = create_engine(silo_url)
    silo = Silo(app, auto_cleanup=False, storage=SQLStorage(engine, executor=executor))
    silo.register("vault", lambda: {"secret": None, "task": BackgroundTask("job")})
    uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))

    @app.post("/api/keep")
    def keep() -> Any:
        silo.state("vault")["secret"] = SECRET
        return jsonify(ok=True)

    @app.post("/api/fail")
    def fail() -> Any:
        vault = silo.state("vault")

        def work(task: BackgroundTask) -> None:
            raise ValueError(f"cannot process {silo_sid} with {SECRET}")

        silo_sid = silo.sid
        vault["task"].start(work)
        return jsonify(ok=True)

    @app.post("/api/upload")
    def upload() -> Any:
        uploads.save(silo.sid, "a.txt", b"hello")
        return jsonify(ok=True)

    @app.get("/api/cached")
    def cached() -> Any:
        response = jsonify(value=silo.state("vault")["secret"])
        response.headers["Cache-Control"] = "private, max-age=5"
        return response

    yield app, silo
    engine.dispose()


def leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Captured log text (messages and tracebacks) that carries the SID or the secret."""
    found = []
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if SID in text or SECRET in text:
            found.append(text)
    return found


def test_an_outage_logs_neither_state_nor_sid(
    app: tuple[Flask, Silo], caplog: pytest.LogCaptureFixture
) -> None:
    """The database fails while a request writes a secret: 503, and no log line has it."""
    flask_app, silo = app
    client = flask_app.test_client()
    headers = {"X-Session-ID": SID}
    client.post("/api/keep", headers=headers)
    storage = sql_storage(silo.store)
    dbapi = storage.engine.dialect.loaded_dbapi

    def down(name: str, sql: str, values: Any) -> None:
        raise dbapi.OperationalError("server closed the connection unexpectedly")

    storage.statement_hook = down
    with caplog.at_level(logging.DEBUG):
        written = client.post("/api/keep", headers=headers)
        read = client.get("/api/cached", headers=headers)
    storage.statement_hook = None
    assert (written.status_code, read.status_code) == (503, 503)
    assert any("silo database" in r.getMessage().lower() for r in caplog.records)
    assert leaks(caplog) == []


def test_a_failing_task_logs_a_tag_not_its_sid(
    app: tuple[Flask, Silo], caplog: pytest.LogCaptureFixture
) -> None:
    flask_app, _ = app
    client = flask_app.test_client()
    with caplog.at_level(logging.DEBUG):
        assert client.post("/api/fail", headers={"X-Session-ID": SID}).status_code == 200
        deadline = time.monotonic() + 20
        while not any("failed" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the task never failed"
            time.sleep(0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert any(tag(SID) in m for m in messages), messages
    # The SID never; the task's own words (its exception) are the app's to log or not.
    assert [t for t in leaks(caplog) if SECRET not in t] == []


def test_responses_with_a_sid_are_private_and_vary_on_it(app: tuple[Flask, Silo]) -> None:
    flask_app, _ = app
    client = flask_app.test_client()
    answer = client.post("/api/keep", headers={"X-Session-ID": SID})
    assert answer.headers["Cache-Control"] == "private, no-store"
    assert "X-Session-ID" in answer.headers["Vary"]
    own = client.get("/api/cached", headers={"X-Session-ID": SID})
    assert own.headers["Cache-Control"] == "private, max-age=5"  # the view's own wins
    assert "X-Session-ID" in own.headers["Vary"]


def test_storage_errors_carry_no_parameters(app: tuple[Flask, Silo]) -> None:
    _, silo = app
    storage = sql_storage(silo.store)

    def down(name: str, sql: str, values: Any) -> None:
        raise storage.engine.dialect.loaded_dbapi.OperationalError("gone")

    storage.statement_hook = down
    with pytest.raises(StorageUnavailable) as info:
        silo.store.exists(SID)
    storage.statement_hook = None
    assert info.value.__cause__ is None  # nothing chained that could print parameters
    assert info.value.original is not None
    assert SID not in str(info.value)
