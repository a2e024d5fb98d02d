"""Every session ends ``SILO_SESSION_MAX_AGE`` after its creation, however active it is.

The idle TTL alone lets a session that is used now and then live for ever, and
with it a SID that leaked once. The absolute lifetime ends it: the request that
finds it past its end ends it (a data endpoint answers ``410``, as to an
expired client; elsewhere the client starts afresh), and the sweep finds it by
then too, since its ``sweep_after`` is never past its end. SIDs the client chose
end as silo's do. A rotation keeps the lifetime unless it renews it (a login).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, select
from support import T0, Clock, sql_storage, unix

from flask_silo_sql import InMemoryStorage, Silo, session_key
from flask_silo_sql.sql.models import expired_sids, sessions

MAX_AGE = 1000
TTL = 600
HEADER = "X-Session-ID"
CHOSEN = "a-sid-the-client-chose-0123456789"


def make_app(url: str | None, **config: Any) -> tuple[Flask, Silo, Clock, list[str]]:
    app = Flask(__name__)
    app.config.update({"SILO_SESSION_MAX_AGE": MAX_AGE, "SILO_TOUCH_INTERVAL": 0, **config})
    if url is not None:
        app.config["SILO_DATABASE_URI"] = url
    storage = InMemoryStorage() if url is None else None
    silo = Silo(app, auto_cleanup=False, ttl=TTL, storage=storage)
    clock = Clock()
    silo.store.clock = clock
    silo.register("counter", lambda: {"n": 0})
    silo.add_data_endpoints("/api/data")
    ended: list[str] = []
    silo.store.on_expire(ended.append)

    @app.post("/api/count")
    def count() -> dict[str, Any]:
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.post("/api/login")
    def login() -> dict[str, Any]:
        return {"sid": silo.rotate(renew=True)}

    @app.post("/api/rotate")
    def rotate() -> dict[str, Any]:
        return {"sid": silo.rotate()}

    @app.get("/api/ping")
    def ping() -> dict[str, Any]:
        return {}

    if url is not None:

        @app.post("/api/once")
        @silo.idempotent
        def once() -> dict[str, Any]:
            app.config["ONCE_RAN"] = app.config.get("ONCE_RAN", 0) + 1
            state = silo.state("counter")
            state["n"] += 1
            return {"n": state["n"]}

    return app, silo, clock, ended


@pytest.fixture
def lifetime_app(silo_url: str) -> Iterator[tuple[Flask, Silo, Clock, list[str]]]:
    made = make_app(silo_url)
    yield made
    sql_storage(made[1].store).dispose()


def keep_busy(app: Flask, clock: Clock, sid: str, until: float) -> int:
    """Use the session every TTL/2 seconds up to *until* seconds from now; the last count."""
    client = app.test_client()
    n = 0
    end = clock.now + until
    while clock.now + TTL / 2 < end:
        clock.advance(TTL / 2)
        n = client.post("/api/count", headers={HEADER: sid}).get_json()["n"]
    return n


@pytest.mark.parametrize("chosen", [True, False], ids=["client-chosen", "issued"])
def test_an_active_session_ends_at_its_absolute_lifetime(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]], chosen: bool
) -> None:
    app, silo, clock, ended = lifetime_app
    client = app.test_client()
    headers = {HEADER: CHOSEN} if chosen else {}
    sid = client.post("/api/count", headers=headers).headers[HEADER]
    assert (sid == CHOSEN) is chosen
    assert keep_busy(app, clock, sid, MAX_AGE) == 4  # used every 300 s: never idle
    clock.now = T0 + MAX_AGE  # its end: active, yet over
    answer = client.get("/api/data", headers={HEADER: sid})
    assert answer.status_code == 410
    assert answer.get_json()["error"] == "session_expired"
    assert ended == [session_key(sid)]  # recorded like an expired one, on_expire once
    assert not silo.store.exists(sid)
    assert silo.store.is_expired(sid)
    fresh = client.post("/api/count", headers={HEADER: sid})  # elsewhere: starts over
    assert fresh.get_json() == {"n": 1}
    assert ended == [session_key(sid)]


def test_a_request_that_writes_ends_it_and_starts_afresh(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]],
) -> None:
    app, silo, clock, ended = lifetime_app
    client = app.test_client()
    assert client.post("/api/count", headers={HEADER: CHOSEN}).get_json() == {"n": 1}
    keep_busy(app, clock, CHOSEN, MAX_AGE)
    clock.now = T0 + MAX_AGE
    assert client.post("/api/count", headers={HEADER: CHOSEN}).get_json() == {"n": 1}
    assert ended == [session_key(CHOSEN)]
    assert silo.store.exists(CHOSEN)  # the new session, with a lifetime of its own
    clock.advance(MAX_AGE - 1)
    assert client.post("/api/count", headers={HEADER: CHOSEN}).get_json() == {"n": 2}


def test_locking_mode_ends_it_too(silo_url: str) -> None:
    app, silo, clock, ended = make_app(silo_url, SILO_LOCKING=True)
    try:
        client = app.test_client()
        client.post("/api/count", headers={HEADER: CHOSEN})
        keep_busy(app, clock, CHOSEN, MAX_AGE)
        clock.now = T0 + MAX_AGE + 1
        assert client.post("/api/count", headers={HEADER: CHOSEN}).get_json() == {"n": 1}
        assert ended == [session_key(CHOSEN)]
    finally:
        sql_storage(silo.store).dispose()


def test_a_request_that_reads_no_state_ends_it(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]],
) -> None:
    app, silo, clock, ended = lifetime_app
    client = app.test_client()
    client.post("/api/count", headers={HEADER: CHOSEN})
    clock.advance(MAX_AGE)
    assert client.get("/api/ping", headers={HEADER: CHOSEN}).status_code == 200
    assert ended == [session_key(CHOSEN)]
    assert not silo.store.exists(CHOSEN)


def test_the_sweep_ends_sessions_past_their_lifetime(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]], silo_url: str
) -> None:
    app, silo, clock, ended = lifetime_app
    client = app.test_client()
    client.post("/api/count", headers={HEADER: CHOSEN})
    keep_busy(app, clock, CHOSEN, MAX_AGE)  # last used at +900: idle expiry at +1500
    engine = create_engine(silo_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(sessions.c.created_at, sessions.c.expires_at, sessions.c.sweep_after)
            ).one()
        created, expires, bound = (unix(value) for value in row)
        assert expires == created + MAX_AGE  # its end, not last_active + ttl
        assert bound <= created + MAX_AGE  # the sweep looks at it by then
        clock.now = T0 + MAX_AGE - 1
        assert silo.store.sweep().expired == []
        clock.now = T0 + MAX_AGE + 1
        assert silo.store.sweep().expired == [session_key(CHOSEN)]
        assert ended == [session_key(CHOSEN)]
        with engine.connect() as conn:
            assert conn.execute(select(sessions.c.sid)).all() == []
            assert conn.execute(select(expired_sids.c.sid)).scalars().all() == [session_key(CHOSEN)]
    finally:
        engine.dispose()
    assert client.get("/api/data", headers={HEADER: CHOSEN}).status_code == 410


def test_rotation_keeps_the_lifetime_and_a_login_renews_it(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]],
) -> None:
    app, _silo, clock, ended = lifetime_app
    client = app.test_client()
    client.post("/api/count", headers={HEADER: CHOSEN})
    clock.advance(MAX_AGE / 2)
    rotated = client.post("/api/rotate", headers={HEADER: CHOSEN}).get_json()["sid"]
    clock.advance(MAX_AGE / 2)
    assert client.get("/api/data", headers={HEADER: rotated}).status_code == 410
    assert ended == [session_key(rotated)]

    sid = client.post("/api/count").headers[HEADER]
    clock.advance(MAX_AGE / 2)
    renewed = client.post("/api/login", headers={HEADER: sid}).get_json()["sid"]
    clock.advance(MAX_AGE / 2 + 1)
    assert client.get("/api/data", headers={HEADER: renewed}).get_json() == {"n": 1}
    clock.advance(MAX_AGE / 2)
    assert client.get("/api/data", headers={HEADER: renewed}).status_code == 410


def test_an_idempotent_request_ends_it_too(
    lifetime_app: tuple[Flask, Silo, Clock, list[str]], silo_url: str
) -> None:
    app, silo, clock, ended = lifetime_app
    client = app.test_client()
    headers = {HEADER: CHOSEN, "Idempotency-Key": "k1"}
    assert client.post("/api/once", headers=headers).get_json() == {"n": 1}
    engine = create_engine(silo_url)
    try:
        with engine.connect() as conn:
            expires = unix(conn.execute(select(sessions.c.expires_at)).scalar_one())
    finally:
        engine.dispose()
    assert expires == clock.now + TTL  # the idle expiry: its end is further off
    keep_busy(app, clock, CHOSEN, MAX_AGE)
    clock.now = T0 + MAX_AGE
    ran = app.config["ONCE_RAN"]
    again = client.post("/api/once", headers={HEADER: CHOSEN, "Idempotency-Key": "k2"})
    assert again.status_code == 410
    assert app.config["ONCE_RAN"] == ran  # the view never ran for the ended session
    assert ended == [session_key(CHOSEN)]
    assert not silo.store.exists(CHOSEN)


def test_memory_storage_ends_it_too() -> None:
    app, silo, clock, ended = make_app(None)
    client = app.test_client()
    client.post("/api/count", headers={HEADER: CHOSEN})
    keep_busy(app, clock, CHOSEN, MAX_AGE)
    clock.now = T0 + MAX_AGE
    assert client.get("/api/data", headers={HEADER: CHOSEN}).status_code == 410
    assert ended == [session_key(CHOSEN)]
    client.post("/api/count", headers={HEADER: "another-client-chosen-sid-0123"})
    clock.advance(MAX_AGE)
    assert silo.store.sweep().expired == [session_key("another-client-chosen-sid-0123")]


def test_without_the_setting_sessions_live_while_used(
    silo_url: str,
) -> None:
    app, silo, clock, ended = make_app(silo_url, SILO_SESSION_MAX_AGE=None)
    try:
        client = app.test_client()
        client.post("/api/count", headers={HEADER: CHOSEN})
        assert keep_busy(app, clock, CHOSEN, 3 * MAX_AGE) == 10
        assert silo.store.sweep().expired == []
        assert ended == []
    finally:
        sql_storage(silo.store).dispose()
