"""SessionStore over SQLStorage: JSON-only state, minimal writes, conflicts, durability.

Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, create_engine, func, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support import T0, Clock, StatementLog

from flask_silo_sql import (
    SessionExpired,
    SessionStore,
    Silo,
    SiloError,
    SQLStorage,
    StateConflict,
    StateNotSerializable,
    schema,
    session_key,
)
from flask_silo_sql.sql.models import namespaces

TTL = 100
SID = "sid-sql-store-0000001"


def make_store(storage: SQLStorage, clock: Callable[[], float] | None = None) -> SessionStore:
    store = SessionStore(ttl=TTL, storage=storage, clock=clock)
    store.register_namespace("cart", lambda: {"items": [], "total": 0})
    store.register_namespace("prefs", lambda: {"theme": "dark"})
    return store


@pytest.fixture
def store(storage: SQLStorage, clock: Clock) -> SessionStore:
    return make_store(storage, clock)


def stored(storage: SQLStorage, sid: str = SID) -> dict[str, Any]:
    """The namespaces of *sid* as the database holds them."""
    session = storage.get_session(sid)
    assert session is not None
    return {name: value for name, value in session.items() if name != "_meta"}


def versions(storage: SQLStorage, sid: str = SID) -> dict[str, tuple[int, dt.datetime]]:
    with storage.engine.connect() as conn:
        rows = conn.execute(
            select(namespaces.c.name, namespaces.c.version, namespaces.c.updated_at).where(
                namespaces.c.sid == session_key(sid)
            )
        ).all()
    return {row.name: (row.version, row.updated_at) for row in rows}


def saved_session(store: SessionStore, **changes: dict[str, Any]) -> dict[str, Any]:
    """Create the session, apply *changes* to namespaces and save it."""
    session = store.get(SID)
    for name, value in changes.items():
        session[name].update(value)
    store.save(SID, session)
    return session


# -- JSON-only state ----------------------------------------------------------------


class Unserialisable:
    pass


NOT_STORABLE: list[Any] = [
    pytest.param(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), id="datetime"),
    pytest.param({1, 2}, id="set"),
    pytest.param(Unserialisable(), id="object"),
    pytest.param(b"bytes", id="bytes"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="infinity"),
    pytest.param({(1, 2): "tuple key"}, id="tuple-key"),
    pytest.param("nul \x00 inside", id="nul-character"),
    pytest.param(["lone \ud800 surrogate"], id="lone-surrogate"),
]


@pytest.mark.parametrize("bad", NOT_STORABLE)
def test_non_json_value_is_refused_naming_namespace_and_key(
    store: SessionStore, storage: SQLStorage, bad: Any
) -> None:
    saved_session(store, cart={"total": 5})
    before = stored(storage)
    session = store.get(SID)
    session["prefs"]["theme"] = "light"  # a valid change in the same save
    session["cart"]["when"] = bad
    with pytest.raises(StateNotSerializable) as info:
        store.save(SID, session)
    assert info.value.namespace == "cart"
    assert info.value.key == "when"
    assert "'cart'" in str(info.value)
    assert "'when'" in str(info.value)
    assert isinstance(info.value, SiloError)
    assert stored(storage) == before  # nothing of the session was written
    # The same session saves once the value is gone.
    del session["cart"]["when"]
    store.save(SID, session)
    assert stored(storage)["prefs"] == {"theme": "light"}


def test_non_json_factory_state_is_refused(store: SessionStore, storage: SQLStorage) -> None:
    store.register_namespace("clock", lambda: {"at": dt.datetime.now(dt.timezone.utc)})
    session = store.get(SID)
    with pytest.raises(StateNotSerializable) as info:
        store.save(SID, session)
    assert (info.value.namespace, info.value.key) == ("clock", "at")
    assert "clock" not in stored(storage)


def test_json_state_round_trips_exactly(store: SessionStore, storage: SQLStorage) -> None:
    value = {
        "items": [{"sku": "a-1", "qty": 2, "price": 9.99}],
        "unicode": "ünïcödé ☃ 😀 \\u0000 is text here",
        "nested": {"deep": [[], {}, None, True, False, -0.5, 10**15]},
    }
    saved_session(store, cart=value)
    other = make_store(SQLStorage(storage.engine))
    assert other.get_namespace(SID, "cart") == {**value, "total": 0}


# -- minimal, versioned writes ----------------------------------------------------


def test_only_changed_namespaces_are_written(
    store: SessionStore, storage: SQLStorage, clock: Clock
) -> None:
    saved_session(store, cart={"total": 1}, prefs={"theme": "light"})
    assert {n: v for n, (v, _) in versions(storage).items()} == {"cart": 1, "prefs": 1}
    _, prefs_updated = versions(storage)["prefs"]
    clock.now += 1
    session = store.get(SID)
    session["cart"]["total"] = 2
    session["prefs"]["theme"] = "light"  # assigned, but the same JSON
    with StatementLog(storage) as log:
        store.save(SID, session)
    after = versions(storage)
    assert after["cart"][0] == 2
    assert after["prefs"] == (1, prefs_updated)
    assert len(log.starting("UPDATE silo_namespaces")) == 1
    assert log.starting("INSERT") == []
    assert len(log.statements) == 1  # within the touch interval: no last_active write


def test_unchanged_session_writes_nothing(
    store: SessionStore, storage: SQLStorage, clock: Clock
) -> None:
    saved_session(store, cart={"total": 1})
    clock.now += 1
    session = store.get(SID)
    with StatementLog(storage) as log:
        store.save(SID, session)
    assert log.statements == []


def test_factory_state_is_not_written_until_changed(
    store: SessionStore, storage: SQLStorage
) -> None:
    session = store.get(SID)
    store.save(SID, session)
    assert versions(storage) == {}
    assert stored(storage) == {}
    # It is still what the session reads.
    assert store.get_namespace(SID, "cart") == {"items": [], "total": 0}


def test_version_is_bumped_on_every_write(store: SessionStore, storage: SQLStorage) -> None:
    session = store.get(SID)
    seen = []
    for total in range(1, 5):
        session["cart"]["total"] = total
        store.save(SID, session)
        seen.append(versions(storage)["cart"][0])
    assert seen == [1, 2, 3, 4]
    store.reset(SID)
    assert versions(storage)["cart"][0] == 5  # a reset is a write too
    assert stored(storage)["cart"] == {"items": [], "total": 0}


def test_one_session_object_saves_repeatedly(store: SessionStore, storage: SQLStorage) -> None:
    session = store.get(SID)
    for n in range(3):
        session["cart"]["items"].append(n)
        store.save(SID, session)
    assert stored(storage)["cart"]["items"] == [0, 1, 2]


# -- optimistic concurrency ------------------------------------------------------------


@pytest.mark.parametrize("already_stored", [True, False], ids=["update", "insert"])
def test_second_of_two_concurrent_writes_conflicts(
    store: SessionStore, storage: SQLStorage, already_stored: bool
) -> None:
    if already_stored:
        saved_session(store, cart={"total": 1})
    else:
        store.get(SID)
    first = store.get(SID)
    second = store.get(SID)
    first["cart"]["total"] = 100
    second["cart"]["total"] = 200
    store.save(SID, first)
    with pytest.raises(StateConflict) as info:
        store.save(SID, second)
    assert (info.value.sid, info.value.namespace) == (session_key(SID), "cart")
    assert stored(storage)["cart"]["total"] == 100


@pytest.mark.parametrize("contested", ["cart", "prefs"])
def test_a_conflict_writes_nothing_of_the_session(
    store: SessionStore, storage: SQLStorage, contested: str
) -> None:
    saved_session(store, cart={"total": 1}, prefs={"theme": "light"})
    first = store.get(SID)
    second = store.get(SID)
    first[contested]["winner"] = "first"
    store.save(SID, first)
    second["cart"]["winner"] = "second"
    second["prefs"]["winner"] = "second"
    with pytest.raises(StateConflict):
        store.save(SID, second)
    state = stored(storage)
    assert state[contested]["winner"] == "first"
    other = "prefs" if contested == "cart" else "cart"
    assert "winner" not in state[other]


def test_other_namespaces_do_not_conflict(store: SessionStore, storage: SQLStorage) -> None:
    saved_session(store, cart={"total": 1}, prefs={"theme": "light"})
    first = store.get(SID)
    second = store.get(SID)
    first["cart"]["total"] = 2
    second["prefs"]["theme"] = "solarized"
    store.save(SID, first)
    store.save(SID, second)
    assert stored(storage) == {
        "cart": {"items": [], "total": 2},
        "prefs": {"theme": "solarized"},
    }


# -- expiry during a request -------------------------------------------------------------


def test_save_after_expiry_raises_and_does_not_recreate(
    store: SessionStore, storage: SQLStorage, clock: Clock
) -> None:
    saved_session(store, cart={"total": 1})
    session = store.get(SID)
    clock.now += TTL + store.touch_interval + 1
    assert store.cleanup() == [session_key(SID)]
    session["cart"]["total"] = 2
    with pytest.raises(SessionExpired) as info:
        store.save(SID, session)
    assert info.value.sid == session_key(SID)
    assert not store.exists(SID)
    assert store.is_expired(SID)
    assert storage.session_count() == 0
    assert versions(storage) == {}


def test_touch_only_save_after_expiry_does_not_recreate(
    store: SessionStore, clock: Clock
) -> None:
    session = store.get(SID)
    clock.now += TTL + store.touch_interval + 1
    store.cleanup()
    with contextlib.suppress(SessionExpired):
        store.save(SID, session)  # nothing changed, only last_active is due
    assert not store.exists(SID)
    assert store.is_expired(SID)


def test_throttled_activity_still_counts_for_ttl(store: SessionStore, clock: Clock) -> None:
    store.get(SID)
    clock.now += store.touch_interval / 2
    store.get(SID)  # within the touch interval: last_active is not written
    last_request = clock.now
    clock.now = last_request + TTL  # idle for exactly the TTL since the last request
    assert store.cleanup() == []
    assert store.exists(SID)


def test_concurrent_sweeps_expire_each_session_once(
    silo_url: str, storage: SQLStorage, clock: Clock
) -> None:
    sids = [f"sid-sweep-{i:010d}" for i in range(60)]
    for sid in sids:
        storage.set_session(sid, {"_meta": {"created_at": T0, "last_active": T0}})
    clock.now += TTL + 3600
    stores = [make_store(SQLStorage(silo_url), clock) for _ in range(4)]
    fired: list[str] = []
    for other in stores:
        other.sweep_batch_size = 7
        other.on_expire(fired.append)
    results: list[list[str]] = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))

    def sweep(index: int) -> None:
        barrier.wait()
        results[index] = stores[index].cleanup()

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    expired = [sid for result in results for sid in result]
    keys = sorted(map(session_key, sids))
    assert sorted(expired) == keys
    assert sorted(fired) == keys
    assert storage.session_count() == 0
    assert storage.expired_count() == len(sids)
    for other in stores:
        assert isinstance(other.storage, SQLStorage)
        other.storage.dispose()


# -- durability ------------------------------------------------------------------


def test_restart_sees_the_state(silo_url: str, clock: Clock) -> None:
    first = SQLStorage(silo_url)
    store = make_store(first, clock)
    saved_session(store, cart={"items": ["kept"]})
    store.get("sid-to-expire-000001")
    clock.now += TTL + store.touch_interval + 1
    store.get(SID)
    assert store.cleanup() == [session_key("sid-to-expire-000001")]
    first.dispose()

    second = SQLStorage(silo_url)
    try:
        restarted = make_store(second, clock)
        assert restarted.get_namespace(SID, "cart")["items"] == ["kept"]
        assert restarted.is_expired("sid-to-expire-000001")
        assert restarted.all_sids == [session_key(SID)]
    finally:
        second.dispose()


# -- what SQLStorage accepts -----------------------------------------------------------


def test_accepts_a_url_string_and_url_object(silo_url: str) -> None:
    for bind in (silo_url, make_url(silo_url)):
        storage = SQLStorage(bind)
        try:
            storage.set_session(SID, {"cart": {"n": 1}})
            assert stored(storage) == {"cart": {"n": 1}}
            assert storage.dialect == make_url(silo_url).get_backend_name()
        finally:
            storage.delete_session(SID)
            storage.dispose()


def test_accepts_an_engine_and_leaves_it_to_its_owner(silo_url: str) -> None:
    engine = create_engine(silo_url)
    try:
        storage = SQLStorage(engine)
        assert storage.engine is engine
        store = make_store(storage)
        saved_session(store, cart={"total": 3})
        pool = engine.pool
        storage.dispose()
        assert engine.pool is pool  # not disposed: the engine is the caller's
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM silo_namespaces")).scalar_one()
        assert count == 1
    finally:
        engine.dispose()


def test_bare_postgresql_url_uses_psycopg(pg_migrated: Engine) -> None:
    url = pg_migrated.url.set(drivername="postgresql")
    storage = SQLStorage(url.render_as_string(hide_password=False))
    try:
        assert storage.engine.dialect.driver == "psycopg"
        storage.has_session(SID)
    finally:
        storage.dispose()


def test_refuses_other_binds_and_databases() -> None:
    with pytest.raises(TypeError):
        SQLStorage(42)  # type: ignore[arg-type]
    with pytest.raises(SiloError, match="SQLite and PostgreSQL"):
        SQLStorage("mysql://user@localhost/db")


def flask_sqlalchemy_app(url: str) -> tuple[Flask, SQLAlchemy, type[Any]]:
    """A host application with its own model, on *url*."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Item(Base):
        __tablename__ = "host_items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db.init_app(app)
    with app.app_context():
        db.create_all()
        schema.upgrade(db.engine)
    return app, db, Item


def host_item_count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM host_items")).scalar_one())
    finally:
        engine.dispose()


def test_shares_a_flask_sqlalchemy_engine_without_touching_its_session(db_url: str) -> None:
    app, db, item_model = flask_sqlalchemy_app(db_url)
    storage = SQLStorage(db)
    with app.app_context():
        assert storage.engine is db.engine
        store = make_store(storage)
        db.session.execute(select(func.count()).select_from(item_model)).scalar_one()
        pending = item_model(name="uncommitted")
        db.session.add(pending)
        # Our reads and writes, while the host has an uncommitted change.
        session = store.get(SID)
        session["cart"]["total"] = 7
        store.save(SID, session)
        store.reset("sid-not-there-0000001")
        assert pending in db.session.new  # neither flushed nor rolled back
        assert db.session.is_active
        assert host_item_count(db_url) == 0  # not committed
        db.session.commit()
        assert host_item_count(db_url) == 1
    fresh = SQLStorage(db_url)
    try:
        assert make_store(fresh).get_namespace(SID, "cart")["total"] == 7
    finally:
        fresh.dispose()
    with app.app_context():
        db.engine.dispose()


def test_flask_sqlalchemy_object_through_the_extension(db_url: str) -> None:
    app, db, item_model = flask_sqlalchemy_app(db_url)
    silo = Silo(app, storage=SQLStorage(db), auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})

    @app.post("/api/add")
    def add() -> dict[str, Any]:
        db.session.add(item_model(name="left uncommitted by the host"))
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    @app.post("/api/add-and-commit")
    def add_and_commit() -> dict[str, Any]:
        db.session.add(item_model(name="committed by the host"))
        db.session.commit()
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    client = app.test_client()
    headers = {"X-Session-ID": SID}
    assert client.post("/api/add", headers=headers).get_json() == {"n": 1}
    assert host_item_count(db_url) == 0  # the extension did not commit the host's session
    assert client.post("/api/add-and-commit", headers=headers).get_json() == {"n": 2}
    assert host_item_count(db_url) == 1
    assert client.post("/api/add", headers=headers).get_json() == {"n": 3}
    with app.app_context():
        db.engine.dispose()
