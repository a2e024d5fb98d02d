"""An observer of the engine sees every statement and changes nothing.

Hosts trace their databases (OpenTelemetry's or Sentry's SQLAlchemy
instrumentation). While such a listener is attached silo sends its statements
through SQLAlchemy Core, where the listener sees them; the statements, their
order, the answers and the errors must be those of the untraced DBAPI path.
The same scripted conversation runs twice on fresh databases, once plain and
once traced, and is compared request by request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Harness
from otel import EngineSpans
from sqlalchemy import make_url
from support import Clock, StatementLog

from flask_silo_sql import Silo, schema
from flask_silo_sql.sql.engine import make_engine

ALICE = "alice-observed-000000000000"
TTL = 600


def make_app(url: str, clock: Clock) -> Harness:
    h = Harness(url, ttl=TTL, clock=clock)
    app, silo = h.app, h.silo
    silo.register("counter", lambda: {"n": 0})
    silo.register("notes", lambda: {"items": []})
    silo.add_data_endpoints("/api/data")

    @app.post("/api/count")
    def count() -> dict[str, Any]:
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    @app.get("/api/read")
    def read() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.get("/api/ping")
    def ping() -> dict[str, Any]:
        return {"pong": True}

    @app.post("/api/both")
    def both() -> dict[str, Any]:
        silo.state("counter")["n"] += 10
        silo.state("notes")["items"].append("x")
        return {"ok": True}

    @app.post("/api/bad")
    def bad() -> dict[str, Any]:
        silo.state("counter")["when"] = {1, 2}
        return {"ok": True}

    @app.post("/api/conflict")
    def conflict() -> dict[str, Any]:
        state = silo.state("counter")
        with silo.session(silo.sid) as other:  # another writer, in between
            other["counter"]["n"] += 100
        state["n"] += 1
        return {"ok": True}

    return h


Step = Callable[[Any, Clock, Silo], Any]

def call(method: str, path: str, *, sid: str | None = ALICE) -> Step:
    headers = {"X-Session-ID": sid} if sid else {}
    return lambda client, clock, silo: client.open(path, method=method, headers=headers)


def later(seconds: float, then: Step, *, sweep: bool = False) -> Step:
    def step(client: Any, clock: Clock, silo: Silo) -> Any:
        clock.advance(seconds)
        if sweep:
            silo.store.sweep()
        return then(client, clock, silo)

    return step


CONVERSATION: list[tuple[str, Step]] = [
    ("first write", call("POST", "/api/count")),
    ("read", call("GET", "/api/read")),
    ("no state", call("GET", "/api/ping")),
    ("two namespaces", call("POST", "/api/both")),
    ("touch due", later(TTL / 2, call("GET", "/api/read"))),
    ("not JSON", call("POST", "/api/bad")),
    ("conflict", call("POST", "/api/conflict")),
    ("data endpoint", call("GET", "/api/data")),
    ("expired", later(3 * TTL, call("GET", "/api/data"), sweep=True)),
    ("starts over", call("POST", "/api/count")),
    ("new client", call("GET", "/api/read", sid=None)),
]


def converse(url: str, *, traced: bool) -> tuple[list[Any], list[list[str]], list[str]]:
    """Each step's answer and the statements silo sent for it; and what tracing saw."""
    clock = Clock()
    h = make_app(url, clock)
    silo, storage, client = h.silo, h.storage, h.client
    answers: list[Any] = []
    statements: list[list[str]] = []
    spans = EngineSpans(storage.engine)
    if traced:
        spans.attach()
    try:
        for _, step in CONVERSATION:
            with StatementLog(storage) as log:
                response = step(client, clock, silo)
            body = response.get_json()
            answers.append((response.status_code, body.get("error"), body.get("n")))
            statements.append(list(log.statements))
            assert storage.connector.observed() is traced
    finally:
        spans.detach()
        h.close()
    return answers, statements, [" ".join(s.split()) for s in spans.statements()]


@pytest.fixture
def second_url(silo_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Another database of *silo_url*'s kind, at the current schema, with no rows."""
    if silo_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'traced.db'}"
        migrate(url)
        yield url
        return
    server = request.getfixturevalue("pg_server")
    url = server.create_database()
    migrate(url)
    yield url
    server.drop_database(str(make_url(url).database))


def migrate(url: str) -> None:
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()


def test_tracing_sees_every_statement_and_changes_nothing(silo_url: str, second_url: str) -> None:
    plain_answers, plain_statements, nothing = converse(silo_url, traced=False)
    assert nothing == []
    traced_answers, traced_statements, seen = converse(second_url, traced=True)

    assert traced_answers == plain_answers
    steps = zip(CONVERSATION, plain_statements, traced_statements, strict=True)
    for (title, _), plain, traced in steps:
        assert traced == plain, title
    assert seen == [s for step in traced_statements for s in step]  # every one, in order
    answers = dict(zip((t for t, _ in CONVERSATION), plain_answers, strict=True))
    assert answers["conflict"][:2] == (409, "state_conflict")
    assert answers["not JSON"][:2] == (500, "state_not_serializable")
    assert answers["expired"][:2] == (410, "session_expired")
    assert answers["starts over"] == (200, None, 1)
