"""Strict SIDs end: a signed SID older than ``SILO_SID_MAX_AGE`` is answered with a new one.

Without an end, a SID that leaked (a log, a shared link) would reach its
session for as long as the client keeps it alive. A strict SID carries its
issue time under its signature, so the server can tell its age without a
lookup, and a stale one starts a new session under a new SID instead of
reaching the old state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from support import Clock, sql_storage

from flask_silo_sql import Silo
from flask_silo_sql.sids import is_signed_sid, issued_at, new_signed_sid

MAX_AGE = 1000
HEADER = "X-Session-ID"


@pytest.fixture
def app(silo_url: str) -> Iterator[tuple[Flask, Silo, Clock]]:
    app = Flask(__name__)
    app.secret_key = "a secret for signing session ids"
    app.config.update(
        SILO_DATABASE_URI=silo_url, SILO_STRICT_SIDS=True, SILO_SID_MAX_AGE=MAX_AGE
    )
    silo = Silo(app, auto_cleanup=False, ttl=10 * MAX_AGE)
    clock = Clock()
    silo.store.clock = clock
    silo.register("counter", lambda: {"n": 0})

    @app.post("/api/count")
    def count() -> dict[str, Any]:
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    yield app, silo, clock
    sql_storage(silo.store).dispose()


def test_a_strict_sid_carries_its_issue_time() -> None:
    sid = new_signed_sid(b"key", 1_700_000_123.9)
    assert issued_at(sid) == 1_700_000_123
    assert is_signed_sid(sid, [b"key"], now=1_700_000_200, max_age=100)
    assert not is_signed_sid(sid, [b"key"], now=1_700_000_300, max_age=100)
    tampered = sid[:32] + new_signed_sid(b"key", 1_800_000_000)[32:39] + sid[39:]
    assert not is_signed_sid(tampered, [b"key"])  # the time is under the signature


def test_an_old_strict_sid_gets_a_new_sid_not_its_session(
    app: tuple[Flask, Silo, Clock],
) -> None:
    flask_app, silo, clock = app
    client = flask_app.test_client()
    first = client.post("/api/count")
    sid = first.headers[HEADER]
    assert client.post("/api/count", headers={HEADER: sid}).get_json() == {"n": 2}
    clock.advance(MAX_AGE - 1)
    assert client.post("/api/count", headers={HEADER: sid}).get_json() == {"n": 3}
    clock.advance(2)  # past its end: the session is alive, the SID is not
    answer = client.post("/api/count", headers={HEADER: sid})
    assert answer.get_json() == {"n": 1}
    fresh = answer.headers[HEADER]
    assert fresh != sid
    assert issued_at(fresh) == int(clock.now)
    assert client.post("/api/count", headers={HEADER: fresh}).get_json() == {"n": 2}
    assert silo.store.exists(sid)  # left to expire; no request reaches it any more


def test_the_query_parameter_can_be_turned_off(silo_url: str) -> None:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    silo = Silo(app, auto_cleanup=False, query_param="")
    sid = "a-client-chosen-sid-00000001"
    try:
        for url in (f"/api/x?_sid={sid}", f"/api/x?={sid}"):
            assert app.test_client().get(url).headers[HEADER] != sid
        assert app.test_client().get("/api/x", headers={HEADER: sid}).headers[HEADER] == sid
    finally:
        sql_storage(silo.store).dispose()
