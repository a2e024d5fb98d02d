"""The sweep's keyset paging misses no due session, whatever its ``expires_at`` looks like.

The first batch has no lower bound, and each next one starts after the last
row exactly as the database returned it: a row written without an expiry
(its default, the epoch) and rows whose timestamps were written in another
text form (SQLite keeps them as text) are all reached.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, insert, select, text
from support import T0, Clock, at

from flask_silo_sql import SessionStore, SQLStorage, session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import sessions

TTL = 100


@pytest.fixture
def engine(silo_url: str) -> Iterator[Engine]:
    engine = make_engine(silo_url)
    yield engine
    engine.dispose()


def test_every_due_row_is_swept_in_small_batches(silo_url: str, engine: Engine) -> None:
    with engine.begin() as conn:
        # Written without an expiry: the column's default, the epoch.
        conn.execute(
            text("INSERT INTO silo_sessions (sid, created_at, last_active) VALUES (:s, :t, :t)"),
            {"s": "no-expiry-given-000000", "t": at(T0 - 10 * TTL)},
        )
        conn.execute(
            insert(sessions),
            [
                {
                    "sid": f"due-session-{n:04d}-000000",
                    "created_at": at(T0 - 10 * TTL),
                    "last_active": at(T0 - 10 * TTL),
                    "expires_at": at(T0 - 5 * TTL + (n % 3)),  # ties on expires_at
                }
                for n in range(7)
            ],
        )
        conn.execute(
            insert(sessions).values(
                sid="live-session-0000000000",
                created_at=at(T0),
                last_active=at(T0),
                expires_at=at(T0 + TTL),
            )
        )
    storage = SQLStorage(silo_url)
    try:
        store = SessionStore(ttl=TTL, storage=storage, clock=Clock(T0))
        result = store.sweep(batch_size=2)
        assert len(result.expired) == 8
        assert "no-expiry-given-000000" in result.expired
        with engine.connect() as conn:
            left = list(conn.execute(select(sessions.c.sid)).scalars())
        assert left == ["live-session-0000000000"]
    finally:
        storage.dispose()


def test_each_session_keeps_its_own_apps_ttl(silo_url: str) -> None:
    """Two apps on one database, TTL 5 s and 3600 s: each one's sweep expires only what is due."""
    clock = Clock(T0)
    storage = SQLStorage(silo_url)
    try:
        short = SessionStore(ttl=5, storage=storage, clock=clock, touch_interval=0)
        long = SessionStore(ttl=3600, storage=storage, clock=clock, touch_interval=0)
        for store in (short, long):
            store.register_namespace("counter", lambda: {"n": 0})
        short.get("short-lived-session-000001")
        long.get("long-lived-session-0000001")
        clock.advance(10)
        assert short.sweep().expired == [session_key("short-lived-session-000001")]
        assert long.exists("long-lived-session-0000001")
        clock.advance(3591)
        assert short.sweep().expired == [session_key("long-lived-session-0000001")]  # its TTL
    finally:
        storage.dispose()
