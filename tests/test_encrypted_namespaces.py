"""A namespace registered with ``encrypted=True`` is stored sealed under the app's keys.

A dump, a replica or an operator's query then shows that the namespace exists
and its size, not the tokens and personal data an app keeps in it. Keys rotate
(a new key first, ``flask silo-db reencrypt``, the old key retired), and a row
changed outside silo is an error that changes nothing, never an empty state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from flask import Flask, request
from flask.testing import FlaskClient
from sqlalchemy import Engine, Text, cast, create_engine, select, update
from support import Clock, sql_storage

from flask_silo_sql import Silo, SiloError, session_key
from flask_silo_sql.cli import silo_db
from flask_silo_sql.sealing import SEALED, Sealer
from flask_silo_sql.sql.models import namespaces
from flask_silo_sql.sql.reseal import reseal

HEADER = "X-Session-ID"
SECRET = "a-refresh-token-nobody-may-read"
OLD_KEY = Fernet.generate_key().decode()
NEW_KEY = Fernet.generate_key().decode()


def make_app(url: str, keys: list[str] | None, **config: Any) -> tuple[Flask, Silo]:
    app = Flask(__name__)
    app.config.update(SILO_DATABASE_URI=url, SILO_ENCRYPTION_KEYS=keys, **config)
    silo = Silo(app, auto_cleanup=False)
    silo.register("vault", lambda: {"token": None}, encrypted=True)
    silo.register("prefs", lambda: {"theme": "light"})

    @app.post("/api/vault")
    def put() -> dict[str, Any]:
        silo.state("vault")["token"] = request.get_json()["token"]
        silo.state("prefs")["theme"] = "dark"
        return {}

    @app.get("/api/vault")
    def get() -> dict[str, Any]:
        return dict(silo.state("vault"))

    return app, silo


@pytest.fixture
def raw(silo_url: str) -> Iterator[Engine]:
    engine = create_engine(silo_url)
    yield engine
    engine.dispose()


def stored(engine: Engine, name: str) -> list[str]:
    """The ``data`` column of every row of namespace *name*, as its text."""
    with engine.connect() as conn:
        query = select(cast(namespaces.c.data, Text)).where(namespaces.c.name == name)
        return [str(text) for text in conn.execute(query.order_by(namespaces.c.sid)).scalars()]


def put(client: FlaskClient, sid: str, token: str) -> None:
    answer = client.post("/api/vault", headers={HEADER: sid}, json={"token": token})
    assert answer.status_code == 200


def read(client: FlaskClient, sid: str) -> Any:
    return client.get("/api/vault", headers={HEADER: sid})


def sid_of(i: int) -> str:
    return f"client-session-{i:04d}-0123456789"


def test_the_stored_value_is_not_its_json(silo_url: str, raw: Engine) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    try:
        client = app.test_client()
        assert read(client, sid_of(0)).get_json() == {"token": None}
        assert stored(raw, "vault") == []  # no row for a default state
        put(client, sid_of(0), SECRET)
        [sealed] = stored(raw, "vault")
        assert SECRET not in sealed
        token = json.loads(sealed)[SEALED]
        assert json.loads(Fernet(OLD_KEY).decrypt(token.encode())) == {"token": SECRET}
        assert json.loads(stored(raw, "prefs")[0]) == {"theme": "dark"}  # plain stays plain
        assert read(client, sid_of(0)).get_json() == {"token": SECRET}
    finally:
        sql_storage(silo.store).dispose()


def test_keys_rotate_and_reencrypt_works_in_batches(silo_url: str, raw: Engine) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    client = app.test_client()
    for i in range(5):
        put(client, sid_of(i), f"{SECRET}-{i}")
    sql_storage(silo.store).dispose()

    app, silo = make_app(silo_url, [NEW_KEY, OLD_KEY])  # a new key first: both open
    client = app.test_client()
    assert read(client, sid_of(3)).get_json() == {"token": f"{SECRET}-3"}
    put(client, sid_of(4), f"{SECRET}-4b")  # written under the new key
    result = app.test_cli_runner().invoke(silo_db, ["reencrypt", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "resealed 4 of 5 row(s) of vault" in result.output
    assert "(3 batch(es), 0 unreadable)" in result.output
    newest = Fernet(NEW_KEY)
    tokens = [json.loads(text)[SEALED] for text in stored(raw, "vault")]
    assert sorted(json.loads(newest.decrypt(t.encode()))["token"] for t in tokens) == [
        f"{SECRET}-0",
        f"{SECRET}-1",
        f"{SECRET}-2",
        f"{SECRET}-3",
        f"{SECRET}-4b",
    ]
    again = app.test_cli_runner().invoke(silo_db, ["reencrypt"])
    assert "resealed 0 of 5 row(s)" in again.output
    sql_storage(silo.store).dispose()

    app, silo = make_app(silo_url, [NEW_KEY])  # the old key retired
    try:
        client = app.test_client()
        for i in range(4):
            assert read(client, sid_of(i)).get_json() == {"token": f"{SECRET}-{i}"}
    finally:
        sql_storage(silo.store).dispose()


def test_a_retired_key_too_early_is_an_error_not_an_empty_state(silo_url: str) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    put(app.test_client(), sid_of(0), SECRET)
    sql_storage(silo.store).dispose()
    app, silo = make_app(silo_url, [NEW_KEY])
    try:
        answer = read(app.test_client(), sid_of(0))
        assert answer.status_code == 500
        assert answer.get_json()["error"] == "state_unreadable"
    finally:
        sql_storage(silo.store).dispose()


def test_a_tampered_row_is_a_500_and_loses_nothing(
    silo_url: str, raw: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    try:
        client = app.test_client()
        sid = sid_of(7)
        put(client, sid, SECRET)
        [sealed] = stored(raw, "vault")
        token = json.loads(sealed)[SEALED]
        flipped = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
        with raw.begin() as conn:
            vault = namespaces.c.name == "vault"
            conn.execute(update(namespaces).where(vault).values(data={SEALED: flipped}))
        tampered = stored(raw, "vault")
        with caplog.at_level(logging.INFO, logger="flask_silo_sql"):
            answer = read(client, sid)
            assert answer.status_code == 500
            assert answer.get_json()["error"] == "state_unreadable"
            written = client.post("/api/vault", headers={HEADER: sid}, json={"token": "new"})
            assert written.status_code == 500
        assert stored(raw, "vault") == tampered  # nothing reset, nothing overwritten
        assert json.loads(stored(raw, "prefs")[0]) == {"theme": "dark"}
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("fails authentication" in m and "'vault'" in m for m in messages)
        assert not any(sid in m or SECRET in m for m in messages)
        result = app.test_cli_runner().invoke(silo_db, ["reencrypt"])
        assert result.exit_code == 1
        assert "1 unreadable" in result.output
        assert stored(raw, "vault") == tampered
    finally:
        sql_storage(silo.store).dispose()


def test_the_size_limit_holds(silo_url: str, raw: Engine) -> None:
    app, silo = make_app(silo_url, [OLD_KEY], SILO_MAX_STATE_BYTES=1000)
    try:
        client = app.test_client()
        big = client.post("/api/vault", headers={HEADER: sid_of(1)}, json={"token": "x" * 2000})
        assert big.status_code == 413
        assert stored(raw, "vault") == []
        put(client, sid_of(1), "x" * 900)  # within the limit, whatever its sealed size
    finally:
        sql_storage(silo.store).dispose()


def test_an_encrypted_namespace_without_keys_is_refused_at_setup(silo_url: str) -> None:
    with pytest.raises(SiloError, match="SILO_ENCRYPTION_KEYS is not set"):
        make_app(silo_url, None)  # Silo(app), then register(encrypted=True)
    silo = Silo()
    silo.register("vault", dict, encrypted=True)
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    with pytest.raises(SiloError, match="SILO_ENCRYPTION_KEYS is not set"):
        silo.init_app(app)
    app = Flask(__name__)
    app.config.update(SILO_DATABASE_URI=silo_url, SILO_ENCRYPTION_KEYS=["not a key"])
    with pytest.raises(SiloError, match=r"SILO_ENCRYPTION_KEYS\[0\] is not a Fernet key"):
        Silo(app)


def test_keys_from_the_environment(
    silo_url: str, monkeypatch: pytest.MonkeyPatch, raw: Engine
) -> None:
    monkeypatch.setenv("SILO_ENCRYPTION_KEYS", f"{NEW_KEY}, {OLD_KEY}")
    app, silo = make_app(silo_url, None)
    try:
        put(app.test_client(), sid_of(2), SECRET)
        token = json.loads(stored(raw, "vault")[0])[SEALED]
        assert json.loads(Fernet(NEW_KEY).decrypt(token.encode())) == {"token": SECRET}
    finally:
        sql_storage(silo.store).dispose()


def test_reencrypt_leaves_a_row_written_meanwhile(silo_url: str) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    client = app.test_client()
    for i in range(3):
        put(client, sid_of(i), f"{SECRET}-{i}")
    sql_storage(silo.store).dispose()
    app, silo = make_app(silo_url, [NEW_KEY, OLD_KEY])
    try:
        client = app.test_client()
        storage = sql_storage(silo.store)
        store = silo.store
        written: list[str] = []

        def sealer_for(name: str) -> Sealer | None:
            if not written:  # a request writes between the page's read and its rewrite
                put(client, sid_of(0), "written meanwhile")
                written.append(name)
            return store.sealer_for(name)

        result = reseal(
            storage.connector, storage.statements, sealer_for, ["vault"], batch_size=10
        )
        assert (result.rows, result.resealed, result.batches) == (3, 2, 1)
        assert read(client, sid_of(0)).get_json() == {"token": "written meanwhile"}
        assert read(client, sid_of(1)).get_json() == {"token": f"{SECRET}-1"}
    finally:
        sql_storage(silo.store).dispose()


def test_a_tampered_row_does_not_stop_the_sweep(silo_url: str, raw: Engine) -> None:
    app, silo = make_app(silo_url, [OLD_KEY])
    try:
        clock = Clock()
        silo.store.clock = clock
        silo.store.set_busy_check(lambda sid, session: False)
        client = app.test_client()
        put(client, sid_of(0), SECRET)
        put(client, sid_of(1), SECRET)
        with raw.begin() as conn:
            tampered = namespaces.c.sid == session_key(sid_of(0))
            conn.execute(update(namespaces).where(tampered).values(data={SEALED: "gAAAA"}))
        clock.advance(2 * 3600)
        assert silo.store.sweep().expired == [session_key(sid_of(1))]
        assert silo.store.exists(sid_of(0))
    finally:
        sql_storage(silo.store).dispose()
