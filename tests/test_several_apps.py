"""One Silo, several apps; an app's own error handlers come first.

The factory pattern (``silo = Silo()`` at import, ``silo.init_app(app)`` per
app) is how test suites and multi-tenant deployments use an extension: each
app is served from its own database and settings, never silently from
another's. Errors are answered from the error table unless the app handles
them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify
from support import sql_storage

from flask_silo_sql import (
    SessionExpired,
    Silo,
    SiloError,
    SQLStorage,
    StateConflict,
    StorageUnavailable,
    schema,
)
from flask_silo_sql.app_state import SiloApp
from flask_silo_sql.sql.engine import make_engine

SID = "several-apps-session-0001"


def migrated_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    return url


def counting_app(silo: Silo, url: str, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SILO_DATABASE_URI=url, **config)
    silo.init_app(app)

    @app.post("/api/count")
    def count() -> dict[str, Any]:
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"], "db": str(sql_storage(silo.store).engine.url.database)}

    return app


def test_each_app_is_served_from_its_own_database_and_settings(tmp_path: Path) -> None:
    silo = Silo(auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    first = counting_app(silo, migrated_sqlite(tmp_path / "a.db"), SILO_TOUCH_INTERVAL=5)
    second = counting_app(silo, migrated_sqlite(tmp_path / "b.db"), SILO_TOUCH_INTERVAL=7)
    try:
        headers = {"X-Session-ID": SID}
        for _ in range(3):
            first.test_client().post("/api/count", headers=headers)
        answer = second.test_client().post("/api/count", headers=headers).get_json()
        assert answer == {"n": 1, "db": str(tmp_path / "b.db")}
        assert first.test_client().post("/api/count", headers=headers).get_json() == {
            "n": 4,
            "db": str(tmp_path / "a.db"),
        }
        states = [app.extensions["silo"] for app in (first, second)]
        assert all(isinstance(s, SiloApp) and s.silo is silo for s in states)
        assert [s.store.touch_interval for s in states] == [5.0, 7.0]
        with second.app_context():
            assert silo.store is states[1].store
        with pytest.raises(RuntimeError, match="several apps"):
            _ = silo.store  # outside an app context: which one would it be?
    finally:
        silo.stop()
        for app in (first, second):
            state = app.extensions["silo"]
            sql_storage(state.store).dispose()


def test_a_second_init_app_of_the_same_app_is_refused(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = migrated_sqlite(tmp_path / "a.db")
    silo = Silo(app, auto_cleanup=False)
    try:
        with pytest.raises(RuntimeError, match="already registered"):
            silo.init_app(app)
    finally:
        sql_storage(silo.store).dispose()


def test_a_shared_storage_given_explicitly_is_shared(tmp_path: Path) -> None:
    storage = SQLStorage(migrated_sqlite(tmp_path / "shared.db"))
    silo = Silo(auto_cleanup=False, storage=storage)
    silo.register("counter", lambda: {"n": 0})
    first = counting_app(silo, "sqlite:///ignored.db")
    second = counting_app(silo, "sqlite:///ignored-too.db")
    try:
        headers = {"X-Session-ID": SID}
        first.test_client().post("/api/count", headers=headers)
        assert second.test_client().post("/api/count", headers=headers).get_json()["n"] == 2
    finally:
        storage.dispose()


# -- error handlers ---------------------------------------------------------------------


def error_app(url: str, *, handlers: str = "") -> tuple[Flask, Silo]:
    """An app on *url*; *handlers* ``"own"`` or ``"all"`` registers the app's own first."""
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = url
    if handlers == "own":
        app.register_error_handler(
            SessionExpired, lambda exc: (jsonify(custom="come back soon"), 410)
        )
        app.register_error_handler(StateConflict, lambda exc: (jsonify(custom="try again"), 409))
    elif handlers == "all":
        app.register_error_handler(
            SiloError, lambda exc: (jsonify(mine=exc.slug), exc.http_status)
        )
    silo = Silo(app, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    silo.add_data_endpoints("/api/data")

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.get("/api/boom/<kind>")
    def boom(kind: str) -> dict[str, Any]:
        raise {"conflict": StateConflict(SID, "counter"), "down": StorageUnavailable("x")}[kind]

    return app, silo


def test_every_silo_error_body_has_error_and_message(silo_url: str) -> None:
    app, silo = error_app(silo_url)
    try:
        client = app.test_client()
        conflict = client.get("/api/boom/conflict", headers={"X-Session-ID": SID})
        assert conflict.status_code == 409
        assert conflict.get_json() == {
            "error": "state_conflict",
            "message": StateConflict(SID, "counter").public_message,
            "namespace": "counter",
        }
        down = client.get("/api/boom/down", headers={"X-Session-ID": SID})
        assert down.status_code == 503
        assert down.get_json() == {
            "error": "storage_unavailable",
            "message": "Session storage is unavailable.",
        }
        assert conflict.headers["X-Session-ID"] == SID  # the SID header on errors too
    finally:
        sql_storage(silo.store).dispose()


def test_an_apps_own_handler_takes_precedence_also_on_data_endpoints(silo_url: str) -> None:
    app, silo = error_app(silo_url, handlers="own")
    try:
        client = app.test_client()
        headers = {"X-Session-ID": SID}
        client.get("/api/data", headers=headers)  # the session exists
        silo.store.clock = lambda: 10.0**10  # far later: the session is due
        silo.store.sweep()
        assert silo.store.is_expired(SID)
        answer = client.get("/api/data", headers=headers)
        assert answer.status_code == 410
        assert answer.get_json() == {"custom": "come back soon"}
        assert answer.headers["X-Session-ID"] == SID
        conflict = client.get("/api/boom/conflict", headers=headers)
        assert conflict.get_json() == {"custom": "try again"}
    finally:
        sql_storage(silo.store).dispose()


def test_an_apps_expiry_handler_cannot_bring_the_session_back(silo_url: str) -> None:
    """A handler of the 410 that writes state and commits (or rotates) is refused: the SID
    stays ended."""
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    silo = Silo(app, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    silo.add_data_endpoints("/api/data")
    refused: list[str] = []

    @app.errorhandler(SessionExpired)
    def expired(exc: SessionExpired) -> tuple[Response, int]:
        silo.state("counter")["n"] = 99
        for attempt in (silo.commit, silo.rotate):
            try:
                attempt()
            except SessionExpired as again:
                refused.append(again.slug)
        return jsonify(custom="gone"), 410

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    try:
        client = app.test_client()
        headers = {"X-Session-ID": SID}
        client.get("/api/data", headers=headers)
        silo.store.clock = lambda: 10.0**10
        silo.store.sweep()
        answer = client.get("/api/data", headers=headers)
        assert (answer.status_code, answer.get_json()) == (410, {"custom": "gone"})
        assert refused == ["session_expired", "session_expired"]
        assert silo.store.is_expired(SID)
        assert not silo.store.exists(SID)
    finally:
        sql_storage(silo.store).dispose()


def test_an_apps_handler_for_every_silo_error_replaces_ours(silo_url: str) -> None:
    app, silo = error_app(silo_url, handlers="all")
    try:
        answer = app.test_client().get("/api/boom/down", headers={"X-Session-ID": SID})
        assert (answer.status_code, answer.get_json()) == (503, {"mine": "storage_unavailable"})
    finally:
        sql_storage(silo.store).dispose()
