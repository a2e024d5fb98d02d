"""The OpenTelemetry helper: spans for one engine's statements, and a clean detach."""

from __future__ import annotations

from pathlib import Path

import pytest
from otel import EngineSpans
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from flask_silo_sql import SessionStore, SQLStorage
from flask_silo_sql.sql.engine import make_engine


def test_spans_name_each_statement(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'otel.db'}")
    other = create_engine("sqlite://")
    with EngineSpans(engine) as spans:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": 1}, {"x": 2}])
            assert conn.execute(text("SELECT x FROM t WHERE x = :x"), {"x": 2}).scalar() == 2
        with other.connect() as conn:
            conn.execute(text("SELECT 42"))  # another engine: not traced
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT missing FROM t"))
    assert spans.statements() == [
        "CREATE TABLE t (x INTEGER)",
        "INSERT INTO t VALUES (?)",
        "SELECT x FROM t WHERE x = ?",
        "SELECT missing FROM t",
    ]
    assert spans.names()[0].split()[0] == "CREATE"
    assert [span.status.is_ok for span in spans.spans()] == [True, True, True, False]
    engine.dispose()
    other.dispose()


def test_detach_removes_exactly_its_listeners() -> None:
    engine = create_engine("sqlite://")
    second = create_engine("sqlite://")
    spans, second_spans = EngineSpans(engine), EngineSpans(second)
    spans.attach()
    second_spans.attach()
    listeners = list(spans._listeners)
    events = {identifier for _target, identifier, _fn in listeners}
    assert {"before_cursor_execute", "after_cursor_execute", "handle_error"} <= events
    assert all(event.contains(engine, identifier, fn) for _t, identifier, fn in listeners)
    spans.detach()
    assert not any(event.contains(engine, identifier, fn) for _t, identifier, fn in listeners)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    with second.connect() as conn:
        conn.execute(text("SELECT 2"))
    assert spans.statements() == []
    assert second_spans.statements() == ["SELECT 2"]
    second_spans.detach()
    spans.attach()  # attaching again works
    with engine.connect() as conn:
        conn.execute(text("SELECT 3"))
    spans.detach()
    assert spans.statements() == ["SELECT 3"]


def test_traces_silo_storage_on_postgresql(pg_silo_url: str) -> None:
    """While traced, silo sends its statements through Core, where spans see them."""
    engine = make_engine(pg_silo_url)
    storage = SQLStorage(engine)
    store = SessionStore(ttl=3600, storage=storage)
    store.register_namespace("cart", lambda: {"items": []})
    sid = "sid-otel-000000000000001"
    assert not storage.connector.observed()
    with EngineSpans(engine) as spans:
        assert storage.connector.observed()
        with store.transaction(sid) as session:
            session["cart"]["items"].append(1)
        assert store.get(sid)["cart"] == {"items": [1]}
    assert not storage.connector.observed()
    statements = spans.statements()
    assert any(s.lstrip().upper().startswith("INSERT INTO SILO_") for s in statements)
    assert any(s.lstrip().upper().startswith("SELECT") for s in statements)
    database = engine.url.database
    assert all(name.endswith(f" {database}") for name in spans.names())
    storage.dispose()
