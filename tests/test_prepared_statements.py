"""``SILO_PREPARED_STATEMENTS``: on PostgreSQL, silo's statements are prepared on the
server, once per connection; off (the default), none is, as PgBouncer before 1.21 needs."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, jsonify
from sqlalchemy import text

from flask_silo_sql import Silo, SQLStorage

SID = "prepared-statements-session-0001"


def _app(url: str, prepared: bool | None) -> tuple[Flask, Silo]:
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


@pytest.mark.parametrize("prepared", [None, False, True], ids=["default", "off", "on"])
def test_statements_are_prepared_only_when_asked(pg_silo_url: str, prepared: bool | None) -> None:
    app, silo = _app(pg_silo_url, prepared)
    client = app.test_client()
    for n in range(1, 9):
        answer = client.post("/api/count", headers={"X-Session-ID": SID})
        assert answer.get_json() == {"n": n}
    statements = _prepared_on_the_connection(silo, app)
    if prepared:
        assert any("silo_namespaces" in statement for statement in statements), statements
    else:
        assert statements == []
