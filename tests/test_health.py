"""``flask silo-db health`` and ``silo.health_view()``: what a probe learns, healthy and not.

On SQLite and PostgreSQL: a current database, one migrated back to an older
revision (the app started at head; the database was then downgraded), and
``SILO_TASK_RUNNER = "worker"`` with and without a live worker.
"""

from __future__ import annotations

import pytest
from click.testing import Result
from harness import Harness
from sqlalchemy import Engine, make_url

from flask_silo_sql.cli import silo_db
from flask_silo_sql.sql import schema


@pytest.fixture
def fresh(db_url: str, migrated_engine: Engine) -> tuple[str, Engine]:
    """A database of this test alone, at head (it may be downgraded)."""
    return db_url, migrated_engine


def probed(url: str, **config: object) -> Harness:
    h = Harness(url, config=config)
    h.app.add_url_rule("/healthz", view_func=h.silo.health_view())
    return h


def health(h: Harness) -> Result:
    return h.app.test_cli_runner().invoke(silo_db, ["health"], catch_exceptions=False)


def test_a_current_database_is_healthy(fresh: tuple[str, Engine]) -> None:
    with probed(fresh[0]) as h:
        result = health(h)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("healthy: database reachable, schema current")
        assert result.output.count("\n") == 1
        response = h.client.get("/healthz")
        assert response.status_code == 200
        assert response.json is not None
        assert response.json["status"] == "ok"
        assert response.json["checks"]["database"] == "reachable"
        assert "X-Session-ID" not in response.headers  # a probe creates no session
        assert h.store.active_count == 0


def test_a_schema_behind_is_unhealthy(fresh: tuple[str, Engine]) -> None:
    url, engine = fresh
    with probed(url) as h:
        schema.downgrade(engine, "0006")
        result = health(h)
        assert result.exit_code == 1
        assert "schema behind: at 0006" in result.output
        assert "flask silo-db upgrade" in result.output
        response = h.client.get("/healthz")
        assert response.status_code == 503
        assert response.json is not None
        assert response.json["status"] == "unavailable"
        assert response.json["checks"]["schema"]["current"] == "0006"


def test_the_worker_runner_needs_a_live_worker(fresh: tuple[str, Engine]) -> None:
    with probed(fresh[0], SILO_TASK_RUNNER="worker") as h:
        result = health(h)
        assert result.exit_code == 1
        assert "no live task worker" in result.output
        assert "flask silo-db worker" in result.output
        assert h.client.get("/healthz").status_code == 503

        queue = h.store.backend.task_queue()
        assert queue is not None
        queue.register("worker-host:4242:cafe", "worker", 4)  # as a worker's heartbeat does
        result = health(h)
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith("1 live worker")
        assert h.client.get("/healthz").status_code == 200

        h.clock.now += h.store.heartbeat_timeout + 1  # its heartbeat is now stale
        assert health(h).exit_code == 1


def test_an_unreachable_database_is_unhealthy(pg_url: str) -> None:
    missing = make_url(pg_url).set(database="silo_no_such_database")
    with probed(missing.render_as_string(hide_password=False)) as h:
        result = health(h)
        assert result.exit_code == 1
        assert result.output.startswith("database unreachable:")
        assert result.output.count("\n") == 1
        assert h.client.get("/healthz").status_code == 503
