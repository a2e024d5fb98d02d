"""``SILO_PREPARED_STATEMENTS``: on PostgreSQL, silo's statements are prepared on the
server, once per connection; off, none is, as PgBouncer before 1.21 needs; ``auto`` (the
default) prepares them on a connection that reaches the server directly, and on none
through PgBouncer."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, jsonify
from sqlalchemy import text

from flask_silo_sql import Silo, SQLStorage
from flask_silo_sql.sql.engine import PREPARE_AFTER

SID = "prepared-statements-session-0001"


def _app(url: str, prepared: bool | str | None) -> tuple[Flask, Silo]:
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        SILO_DATABASE_URI=url,
        SILO_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
    )
    if prepared is not None:
        app.config["SILO_PREPARED_STATEMENTS"] = prepared
    silo = Silo(app, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})

    @app.post("/api/count")
    def count() -> Any:
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(n=state["n"])

    return app, silo


def _prepared_on_the_connection(silo: Silo, app: Flask) -> list[str]:
    storage = silo.store.storage
    assert isinstance(storage, SQLStorage)
    with storage.engine.connect() as conn:  # the pool's one connection: the requests' own
        rows = conn.execute(text("SELECT statement FROM pg_prepared_statements")).all()
    return [row[0] for row in rows]


def _count_eight_times(app: Flask, sid: str = SID) -> None:
    client = app.test_client()
    for n in range(1, 9):
        answer = client.post("/api/count", headers={"X-Session-ID": sid})
        assert answer.get_json() == {"n": n}


@pytest.mark.parametrize(
    "prepared", [None, "auto", False, True], ids=["default", "auto", "off", "on"]
)
def test_statements_are_prepared_only_when_asked(
    pg_silo_url: str, prepared: bool | str | None
) -> None:
    app, silo = _app(pg_silo_url, prepared)
    _count_eight_times(app)
    statements = _prepared_on_the_connection(silo, app)
    if prepared is False:
        assert statements == []
    else:  # the tests' server is reached directly, over TCP
        assert any("silo_namespaces" in statement for statement in statements), statements


def _threshold(silo: Silo) -> int | None:
    storage = silo.store.storage
    assert isinstance(storage, SQLStorage)
    with storage.engine.connect() as conn:  # the pool's one connection: the requests' own
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        threshold: int | None = dbapi.prepare_threshold
        return threshold


def test_auto_prepares_nothing_through_pgbouncer(pg_bouncer: Any, pg_silo_url: str) -> None:
    """Through a pooler in transaction mode a prepared statement would reach other clients:
    ``auto`` sees the pooler (the server was dialled by it, not by us) and prepares none."""
    database = pg_silo_url.rsplit("/", 1)[1]
    app, silo = _app(pg_bouncer.url(database), "auto")
    _count_eight_times(app)
    assert _threshold(silo) is None
    app, silo = _app(pg_silo_url, "auto")
    _count_eight_times(app, "prepared-statements-direct-0002")
    assert _threshold(silo) == PREPARE_AFTER


def test_a_wrong_value_is_refused_at_start_up(pg_silo_url: str) -> None:
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        _app(pg_silo_url, "yes")
