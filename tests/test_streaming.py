"""State changed inside a streamed response is saved, never silently dropped.

A view returning ``stream_with_context(generator)`` keeps the request while
the generator runs; what the generator changes is saved when the stream ends
(as flask-silo keeps it), ``silo.commit()`` saves it earlier for long streams,
and a save that fails after the headers went out is logged loudly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, jsonify, stream_with_context
from sqlalchemy import update
from support import StatementLog, sql_storage

from flask_silo_sql import Silo
from flask_silo_sql.sql.models import namespaces

SID = "streaming-session-0000001"
HEADERS = {"X-Session-ID": SID}


@pytest.fixture
def app(silo_url: str) -> Iterator[tuple[Flask, Silo]]:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    silo = Silo(app, auto_cleanup=False)
    silo.register("log", lambda: {"lines": []})

    @app.get("/api/stream")
    def stream() -> Response:
        def lines() -> Iterator[str]:
            log = silo.state("log")
            for n in range(3):
                log["lines"].append(n)
                yield f"{n}\n"

        return Response(stream_with_context(lines()), mimetype="text/plain")

    @app.get("/api/long")
    def long() -> Response:
        def lines() -> Iterator[str]:
            log = silo.state("log")
            log["lines"].append("first")
            silo.commit()  # saved now, while the stream goes on
            yield "saved\n"
            log["lines"].append("second")
            yield "more\n"

        return Response(stream_with_context(lines()), mimetype="text/plain")

    @app.get("/api/contested")
    def contested() -> Response:
        def lines() -> Iterator[str]:
            log = silo.state("log")
            engine = sql_storage(silo.store).engine
            with engine.begin() as conn:  # another writer, while the stream runs
                conn.execute(update(namespaces).values(version=namespaces.c.version + 5))
            log["lines"].append("lost?")
            yield "done\n"

        return Response(stream_with_context(lines()), mimetype="text/plain")

    @app.get("/api/bytes")
    def plain_bytes() -> Response:
        return Response(iter([b"a", b"b"]), mimetype="application/octet-stream")

    @app.get("/api/lines")
    def read() -> Any:
        return jsonify(silo.state("log")["lines"])

    @app.post("/api/seed")
    def seed() -> Any:
        silo.state("log")["lines"].append("seed")
        return jsonify(ok=True)

    yield app, silo
    sql_storage(silo.store).dispose()


def test_what_a_stream_changes_is_saved_when_it_ends(app: tuple[Flask, Silo]) -> None:
    flask_app, _ = app
    client = flask_app.test_client()
    assert client.get("/api/stream", headers=HEADERS).get_data(as_text=True) == "0\n1\n2\n"
    assert client.get("/api/lines", headers=HEADERS).get_json() == [0, 1, 2]


def test_commit_saves_part_of_a_long_stream_then_the_rest(app: tuple[Flask, Silo]) -> None:
    flask_app, _ = app
    client = flask_app.test_client()
    response = client.get("/api/long", headers=HEADERS)
    chunks = response.iter_encoded()
    assert next(chunks) == b"saved\n"
    assert lines_seen_by_another_client(flask_app) == ["first"]  # while the stream goes on
    assert b"".join(chunks) == b"more\n"
    response.close()
    assert lines_seen_by_another_client(flask_app) == ["first", "second"]


def lines_seen_by_another_client(app: Flask) -> Any:
    """A request of another client's thread (as a server would run it: not this one)."""
    seen: list[Any] = []
    reader = threading.Thread(
        target=lambda: seen.append(app.test_client().get("/api/lines", headers=HEADERS).get_json())
    )
    reader.start()
    reader.join(30)
    return seen[0]


def test_a_failed_save_after_the_headers_is_logged_loudly(
    app: tuple[Flask, Silo], caplog: pytest.LogCaptureFixture
) -> None:
    flask_app, _ = app
    client = flask_app.test_client()
    client.post("/api/seed", headers=HEADERS)
    with caplog.at_level(logging.ERROR, logger="flask_silo_sql"):
        assert client.get("/api/contested", headers=HEADERS).get_data(as_text=True) == "done\n"
    assert any("NOT saved" in r.getMessage() for r in caplog.records), caplog.text
    assert client.get("/api/lines", headers=HEADERS).get_json() == ["seed"]


def test_a_stream_that_reads_no_state_looks_at_its_session_once(
    app: tuple[Flask, Silo],
) -> None:
    """A streamed response (a file download) is committed when its view returns and
    again when its stream ends: a session found live and fresh by the first is not
    looked up again by the second."""
    flask_app, silo = app
    client = flask_app.test_client()
    client.post("/api/seed", headers=HEADERS)
    with StatementLog(sql_storage(silo.store)) as log:
        assert client.get("/api/bytes", headers=HEADERS).get_data() == b"ab"
    assert log.names == ["probe"]
