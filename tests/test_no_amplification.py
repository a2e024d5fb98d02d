"""A request stores what it needs, and costs what it touches.

Anonymous traffic (a crawler, a flood of SID-less requests, 404 probes,
CORS preflights) must not turn into session rows; and a large namespace must
not make every other request of its session slow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select
from support import StatementLog, sql_storage

from flask_silo_sql import Silo
from flask_silo_sql.sql.models import expired_sids, namespaces, sessions

HEADER = "X-Session-ID"
SID = "amplification-session-0001"


@pytest.fixture
def app(silo_url: str) -> Iterator[tuple[Flask, Silo]]:
    app = Flask(__name__)
    app.config.update(SILO_DATABASE_URI=silo_url, SILO_MAX_STATE_BYTES=None)
    silo = Silo(app, auto_cleanup=False)
    silo.register("small", lambda: {"n": 0})
    silo.register("big", lambda: {"blob": ""})

    @app.route("/api/ping", methods=["GET", "POST"])
    def ping() -> dict[str, Any]:
        return {"pong": True}

    @app.post("/api/small")
    def small() -> dict[str, Any]:
        state = silo.state("small")
        state["n"] += 1
        return {"n": state["n"]}

    @app.post("/api/big")
    def big() -> dict[str, Any]:
        silo.state("big")["blob"] = "x" * (20 * 1024 * 1024)
        return {"ok": True}

    yield app, silo
    sql_storage(silo.store).dispose()


def rows(silo: Silo) -> tuple[int, int, int]:
    with sql_storage(silo.store).engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in (sessions, namespaces, expired_sids)
        )


@pytest.mark.slow
def test_a_flood_of_sid_less_requests_leaves_the_tables_as_they_were(
    app: tuple[Flask, Silo],
) -> None:
    flask_app, silo = app
    client = flask_app.test_client()
    before = rows(silo)
    for _ in range(100_000):
        assert client.get("/api/ping").status_code == 200
    assert rows(silo) == before


def test_404_405_and_options_store_and_touch_nothing(app: tuple[Flask, Silo]) -> None:
    flask_app, silo = app
    client = flask_app.test_client()
    storage = sql_storage(silo.store)
    with StatementLog(storage) as log:
        assert client.get("/api/nowhere", headers={HEADER: SID}).status_code == 404
        assert client.delete("/api/ping", headers={HEADER: SID}).status_code == 405
        assert client.options("/api/ping", headers={HEADER: SID}).status_code == 200
        for _ in range(50):
            client.get("/api/nowhere")
            client.options("/api/small")
    assert log.statements == []
    assert rows(silo) == (0, 0, 0)


def test_a_large_namespace_costs_nothing_to_requests_that_do_not_use_it(
    app: tuple[Flask, Silo],
) -> None:
    flask_app, silo = app
    client = flask_app.test_client()
    headers = {HEADER: SID}
    client.post("/api/small", headers=headers)
    client.post("/api/big", headers=headers)  # 20 MB of state in the same session
    with StatementLog(sql_storage(silo.store)) as log:
        assert client.post("/api/small", headers=headers).get_json() == {"n": 2}
    assert log.names == ["load_one", "update_namespace"]
    assert all(v.get("name") in (None, "small") for v in log.values)
    sent = sum(len(str(v.get("data", ""))) for v in log.values)
    assert sent < 100  # the big namespace was neither read nor written back
