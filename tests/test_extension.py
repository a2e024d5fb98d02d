"""The Flask extension: the request lifecycle through Flask's test client.

Apps run on SQLite and PostgreSQL (``Silo(app, storage=SQLStorage(url))``) and
on the embedded default (``Silo(app)`` with an SQLite file in the instance
folder). Statement counts are measured with SQLAlchemy events.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from harness import AppFactory, Harness
from sqlalchemy import text
from support import Recorder, StatementLog

from flask_silo_sql import (
    SchemaError,
    Silo,
    SQLStorage,
    schema,
    session_key,
)

TTL = 600
HEADER = "X-Session-ID"
ALICE = "alice-0000000000000000"
BOB = "bob-00000000000000000000"
SID_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")  # at least 128 bits in the URL-safe alphabet


# -- the application under test ----------------------------------------------------


def define_app(app: Flask, silo: Silo) -> None:
    """Namespaces and routes of the test application."""
    silo.register("counter", lambda: {"n": 0})
    silo.register("notes", lambda: {"items": []})
    silo.add_data_endpoints("/api/data")

    @app.post("/api/count")
    def count() -> dict[str, Any]:
        state = silo.state("counter")
        state["n"] += 1
        return {"n": state["n"], "sid": silo.sid}

    @app.get("/api/read")
    def read() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.get("/api/data")
    def data() -> dict[str, Any]:
        return {"n": silo.state("counter")["n"]}

    @app.get("/api/ping")
    def ping() -> dict[str, Any]:
        return {"pong": True}

    @app.post("/api/note")
    def note() -> dict[str, Any]:
        notes = silo.state("notes")
        notes["items"].append(len(notes["items"]))
        return {"items": notes["items"]}

    @app.post("/api/g-count")
    def g_count() -> dict[str, Any]:
        g.silo["counter"]["n"] += 1
        return {
            "n": g.silo["counter"]["n"],
            "same": g.silo["counter"] is silo.state("counter"),
            "sid": g.silo_sid,
            "namespaces": sorted(k for k in g.silo if not k.startswith("_")),
        }

    @app.post("/api/bad")
    def bad() -> dict[str, Any]:
        silo.state("counter")["when"] = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
        silo.state("notes")["items"].append("not saved either")
        return {"ok": True}

    @app.get("/api/unknown-namespace")
    def unknown_namespace() -> dict[str, Any]:
        return silo.state("nope")

    @app.get("/plain")
    def plain() -> str:
        return "plain"


class SiloApp(Harness):
    """The test application on a harness: a Flask app with a Silo, its client and its clock."""

    def __init__(self, url: str | None, **options: Any) -> None:
        super().__init__(url, **options)
        define_app(self.app, self.silo)

    def count(self, sid: str) -> int:
        response = self.post("/api/count", sid)
        assert response.status_code == 200, response.get_data(as_text=True)
        n: int = response.get_json()["n"]
        return n

    def read(self, sid: str) -> int:
        response = self.get("/api/read", sid)
        assert response.status_code == 200, response.get_data(as_text=True)
        n: int = response.get_json()["n"]
        return n


@pytest.fixture
def make_app(silo_app: AppFactory) -> Callable[..., SiloApp]:
    """Build apps on the test database (every one shares it)."""

    def build(**silo_options: Any) -> SiloApp:
        return silo_app(SiloApp, ttl=TTL, **silo_options)

    return build


@pytest.fixture
def api(make_app: Callable[..., SiloApp]) -> SiloApp:
    return make_app()


# -- SIDs -----------------------------------------------------------------------


def test_new_client_gets_a_fresh_sid(api: SiloApp) -> None:
    first = api.client.get("/api/ping")
    second = api.client.get("/api/ping")
    assert first.status_code == 200
    sid1, sid2 = first.headers[HEADER], second.headers[HEADER]
    assert SID_RE.fullmatch(sid1)
    assert SID_RE.fullmatch(sid2)
    assert sid1 != sid2
    # A request that touches no state stores nothing: the SID becomes a session on use.
    assert not api.silo.store.exists(sid1)
    assert api.read(sid1) == 0
    assert api.silo.store.exists(sid1)


def test_sid_from_header(api: SiloApp) -> None:
    response = api.client.post("/api/count", headers={HEADER: ALICE})
    assert response.headers[HEADER] == ALICE
    assert response.get_json() == {"n": 1, "sid": ALICE}
    assert api.count(ALICE) == 2


def test_sid_from_query_parameter(api: SiloApp) -> None:
    response = api.client.post("/api/count", query_string={"_sid": ALICE})
    assert response.headers[HEADER] == ALICE
    assert response.get_json()["n"] == 1
    assert api.count(ALICE) == 2  # the same session, by header


def test_header_wins_over_query_parameter(api: SiloApp) -> None:
    response = api.client.post("/api/count", headers={HEADER: ALICE}, query_string={"_sid": BOB})
    assert response.headers[HEADER] == ALICE
    assert not api.silo.store.exists(BOB)


def test_invalid_header_falls_back_to_query_parameter(api: SiloApp) -> None:
    response = api.client.post("/api/count", headers={HEADER: "short"}, query_string={"_sid": BOB})
    assert response.headers[HEADER] == BOB


BAD_SIDS = [
    pytest.param("a" * 15, id="shorter-than-min_sid_length"),
    pytest.param("a" * 129, id="longer-than-128"),
    pytest.param("../../etc/passwd-000000", id="path"),
    pytest.param("abc.def.ghi.jkl.mno.pqr", id="dots"),
    pytest.param("abcdefghijklmnop qrst", id="space"),
    pytest.param("abcdefgh\x00ijklmnopqrst", id="nul"),
    pytest.param("abcdefgh\r\nX-Evil: 1-000000", id="crlf"),
    pytest.param("ünïcödé-sid-000000000000", id="unicode"),
    pytest.param("☃" * 20, id="snowmen"),
    pytest.param("abcdefgh'; DROP TABLE x;--", id="quote"),
]


@pytest.mark.parametrize("bad", BAD_SIDS)
def test_bad_sid_in_query_is_ignored(api: SiloApp, bad: str) -> None:
    response = api.client.post("/api/count", query_string={"_sid": bad})
    assert response.status_code == 200
    issued = response.headers[HEADER]
    assert issued != bad
    assert SID_RE.fullmatch(issued)
    assert response.get_json() == {"n": 1, "sid": issued}
    assert api.silo.store.all_sids == [session_key(issued)]  # no session under the bad SID


@pytest.mark.parametrize(
    "bad", [p for p in BAD_SIDS if "\n" not in str(p.values[0])]  # the client refuses CR-LF
)
def test_bad_sid_in_header_is_ignored(api: SiloApp, bad: str) -> None:
    response = api.client.post("/api/count", headers={HEADER: bad})
    assert response.status_code == 200
    issued = response.headers[HEADER]
    assert issued != bad
    assert SID_RE.fullmatch(issued)
    assert api.silo.store.all_sids == [session_key(issued)]


@pytest.mark.parametrize("length", [16, 128])
def test_sid_length_bounds_are_accepted(api: SiloApp, length: int) -> None:
    sid = "s" * length
    response = api.client.post("/api/count", headers={HEADER: sid})
    assert response.headers[HEADER] == sid
    assert api.count(sid) == 2


def test_custom_header_parameter_and_minimum(make_app: Callable[..., SiloApp]) -> None:
    api = make_app(header="X-Client", query_param="client", min_sid_length=24)
    response = api.client.post("/api/count", headers={"X-Client": "c" * 24})
    assert response.headers["X-Client"] == "c" * 24
    assert HEADER not in response.headers
    response = api.client.post("/api/count", query_string={"client": "c" * 24})
    assert response.get_json()["n"] == 2
    response = api.client.post("/api/count", headers={"X-Client": "d" * 23})
    assert response.headers["X-Client"] != "d" * 23


def test_only_api_paths_take_part(api: SiloApp) -> None:
    response = api.client.get("/plain", headers={HEADER: ALICE})
    assert response.status_code == 200
    assert HEADER not in response.headers
    assert api.silo.store.active_count == 0
    missing = api.client.get("/api/missing", headers={HEADER: ALICE})
    assert missing.status_code == 404
    assert missing.headers[HEADER] == ALICE  # every response under the prefix


def test_isolated_counters_per_client(api: SiloApp) -> None:
    assert [api.count(ALICE) for _ in range(3)] == [1, 2, 3]
    assert api.count(BOB) == 1
    assert api.read(ALICE) == 3
    assert api.read(BOB) == 1
    api.client.post("/api/note", headers={HEADER: BOB})
    assert api.client.post("/api/note", headers={HEADER: ALICE}).get_json() == {"items": [0]}


# -- expiry -------------------------------------------------------------------------


def test_expired_sid_on_data_endpoint_is_gone(api: SiloApp) -> None:
    api.count(ALICE)
    api.expire(ALICE)
    response = api.client.get("/api/data", headers={HEADER: ALICE})
    assert response.status_code == 410
    body = response.get_json()
    assert body["error"] == "session_expired"
    assert isinstance(body["message"], str)
    assert body["message"]
    assert response.headers[HEADER] == ALICE
    assert not api.silo.store.exists(ALICE)  # no session created
    assert api.silo.store.is_expired(ALICE)
    assert api.client.get("/api/data", headers={HEADER: ALICE}).status_code == 410


def test_expired_sid_in_query_on_data_endpoint_is_gone(api: SiloApp) -> None:
    api.count(ALICE)
    api.expire(ALICE)
    assert api.client.get("/api/data", query_string={"_sid": ALICE}).status_code == 410


def test_data_endpoint_serves_live_and_unknown_sids(api: SiloApp) -> None:
    api.count(ALICE)
    assert api.client.get("/api/data", headers={HEADER: ALICE}).get_json() == {"n": 1}
    fresh = api.client.get("/api/data", headers={HEADER: BOB})
    assert fresh.status_code == 200
    assert fresh.get_json() == {"n": 0}


@pytest.mark.parametrize("path", ["/api/count", "/api/ping"])
def test_other_request_with_expired_sid_starts_fresh(api: SiloApp, path: str) -> None:
    api.count(ALICE)
    api.count(ALICE)
    api.expire(ALICE)
    response = api.client.post(path, headers={HEADER: ALICE}) if path == "/api/count" else (
        api.client.get(path, headers={HEADER: ALICE})
    )
    assert response.status_code == 200
    assert response.headers[HEADER] == ALICE
    # The mark is cleared; the fresh session is stored once state is used.
    assert api.silo.store.exists(ALICE) is (path == "/api/count")
    assert not api.silo.store.is_expired(ALICE)
    data = api.client.get("/api/data", headers={HEADER: ALICE})
    assert data.status_code == 200
    assert data.get_json() == {"n": 1 if path == "/api/count" else 0}


def test_on_create_and_on_expire_fire_once(api: SiloApp) -> None:
    created, expired = Recorder(), Recorder()
    api.silo.store.on_create(created)
    api.silo.store.on_expire(expired)
    api.count(ALICE)
    api.read(ALICE)
    api.client.get("/api/ping", headers={HEADER: ALICE})
    api.client.get("/api/data", headers={HEADER: ALICE})
    assert created.calls == [session_key(ALICE)]
    api.expire(ALICE)
    api.silo.store.cleanup()
    assert expired.calls == [session_key(ALICE)]
    api.client.get("/api/data", headers={HEADER: ALICE})  # 410: nothing created
    assert created.calls == [session_key(ALICE)]
    api.client.get("/api/ping", headers={HEADER: ALICE})  # starts over: no state, no row
    assert created.calls == [session_key(ALICE)]
    api.read(ALICE)  # its first use of state creates it
    api.read(ALICE)
    assert created.calls == [session_key(ALICE)] * 2
    assert expired.calls == [session_key(ALICE)]


def test_session_expired_during_a_request_is_not_recreated(
    make_app: Callable[..., SiloApp],
) -> None:
    api = make_app()

    @api.app.post("/api/slow")
    def slow() -> dict[str, Any]:
        state = api.silo.state("counter")
        api.expire(api.silo.sid)  # a sweep runs while this request works
        state["n"] += 100
        return {"n": state["n"]}

    api.count(ALICE)
    api.client.post("/api/slow", headers={HEADER: ALICE})
    assert not api.silo.store.exists(ALICE)
    assert api.silo.store.is_expired(ALICE)
    assert api.client.get("/api/data", headers={HEADER: ALICE}).status_code == 410


# -- several apps, restarts ----------------------------------------------------------


def test_two_apps_on_one_database_share_sessions(make_app: Callable[..., SiloApp]) -> None:
    first, second = make_app(), make_app()
    assert first.count(ALICE) == 1
    assert second.count(ALICE) == 2
    assert first.count(ALICE) == 3
    assert second.read(ALICE) == 3
    assert second.count(BOB) == 1
    assert first.silo.store.active_count == 2


def test_restart_keeps_state(make_app: Callable[..., SiloApp]) -> None:
    before = make_app()
    for _ in range(3):
        before.count(ALICE)
    before.count(BOB)
    before.expire(ALICE)  # BOB too
    before.close()

    after = make_app()
    after.clock.now = before.clock.now  # one clock, the database's, across restarts
    assert after.silo.store.is_expired(ALICE)
    assert after.client.get("/api/data", headers={HEADER: ALICE}).status_code == 410
    assert after.count(ALICE) == 1
    after.close()

    third = make_app()
    third.clock.now = after.clock.now
    assert third.read(ALICE) == 1
    assert third.count(ALICE) == 2


# -- accessors ------------------------------------------------------------------------


def test_g_silo_is_the_session(api: SiloApp) -> None:
    body = api.client.post("/api/g-count", headers={HEADER: ALICE}).get_json()
    assert body == {"n": 1, "same": True, "sid": ALICE, "namespaces": ["counter", "notes"]}
    assert api.read(ALICE) == 1  # saved like silo.state()
    assert api.client.post("/api/g-count", headers={HEADER: ALICE}).get_json()["n"] == 2


def test_state_outside_a_request_raises(api: SiloApp) -> None:
    with pytest.raises(RuntimeError):
        api.silo.state("counter")
    with pytest.raises(RuntimeError):
        api.silo.sid  # noqa: B018
    with api.app.app_context(), pytest.raises(RuntimeError):
        api.silo.state()
    with api.app.test_request_context("/plain"), pytest.raises(RuntimeError):
        api.silo.state("counter")


def test_unregistered_namespace_is_a_json_error(api: SiloApp) -> None:
    response = api.client.get("/api/unknown-namespace", headers={HEADER: ALICE})
    assert response.status_code == 500
    assert response.is_json
    assert response.get_json()["namespace"] == "nope"


# -- errors as JSON -----------------------------------------------------------------


def test_non_json_state_is_a_json_500_naming_namespace_and_key(api: SiloApp) -> None:
    assert api.count(ALICE) == 1
    response = api.client.post("/api/bad", headers={HEADER: ALICE})
    assert response.status_code == 500
    assert response.is_json
    body = response.get_json()
    assert body["error"] == "state_not_serializable"
    assert body["namespace"] == "counter"
    assert body["key"] == "when"
    assert "counter" in body["message"]
    assert "when" in body["message"]
    assert response.headers[HEADER] == ALICE
    # Nothing of that request was stored.
    assert api.read(ALICE) == 1
    assert api.client.post("/api/note", headers={HEADER: ALICE}).get_json() == {"items": [0]}


def test_concurrent_change_of_a_namespace_is_a_409(make_app: Callable[..., SiloApp]) -> None:
    api, rival = make_app(), make_app()

    @api.app.post("/api/race")
    def race() -> dict[str, Any]:
        state = api.silo.state("counter")
        assert rival.count(api.silo.sid) == state["n"] + 1  # another worker writes first
        state["n"] += 10
        return {"n": state["n"]}

    assert api.count(ALICE) == 1
    response = api.client.post("/api/race", headers={HEADER: ALICE})
    assert response.status_code == 409
    assert response.is_json
    body = response.get_json()
    assert body["error"] == "state_conflict"
    assert body["namespace"] == "counter"
    assert response.headers[HEADER] == ALICE
    assert api.read(ALICE) == 2  # the rival's write survived


# -- schema at start-up -------------------------------------------------------------


def assert_names_upgrade_command(error: SchemaError) -> None:
    assert "flask silo-db upgrade" in str(error)


def test_missing_schema_fails_at_start_up(db_url: str) -> None:
    storage = SQLStorage(db_url)
    try:
        with pytest.raises(SchemaError) as info:
            Silo(Flask(__name__), storage=storage, auto_cleanup=False)
        assert info.value.current is None
        assert_names_upgrade_command(info.value)
    finally:
        storage.dispose()


def test_outdated_schema_fails_at_start_up(db_url: str) -> None:
    storage = SQLStorage(db_url)
    try:
        schema.upgrade(storage.engine)
        with storage.engine.begin() as conn:
            conn.execute(text("UPDATE silo_alembic_version SET version_num = '0000_older'"))
        with pytest.raises(SchemaError) as info:
            Silo(Flask(__name__), storage=storage, auto_cleanup=False)
        assert info.value.current == "0000_older"
        assert info.value.head == schema.head()
        assert_names_upgrade_command(info.value)
    finally:
        storage.dispose()


def configured(url: str, source: str, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The harness URL for *url* given in the app's config, or (None) in the environment."""
    if source == "config":
        return url
    monkeypatch.setenv("SILO_DATABASE_URI", url)
    return None  # Silo finds it in the environment


@pytest.mark.parametrize("source", ["config", "environment"])
def test_configured_database_is_not_migrated_implicitly(
    db_url: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = configured(db_url, source, monkeypatch)
    with pytest.raises(SchemaError) as info:
        Harness(url, via="config", instance_path=tmp_path / "instance", clock=False)
    assert_names_upgrade_command(info.value)
    assert not (tmp_path / "instance" / "silo.db").exists()


@pytest.mark.parametrize("source", ["config", "environment"])
def test_configured_database_is_used(
    silo_url: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = configured(silo_url, source, monkeypatch)
    with SiloApp(url, via="config", instance_path=tmp_path / "instance", clock=False) as api:
        assert isinstance(api.silo.store.storage, SQLStorage)
        api.client.post("/api/count", headers={HEADER: ALICE})
        check = SQLStorage(silo_url)
        try:
            assert check.get_session(ALICE) is not None
        finally:
            check.dispose()


# -- the embedded default ------------------------------------------------------------


def embedded_app(instance: Path) -> SiloApp:
    """``Silo(app)`` as it comes: its defaults, the embedded database, real time."""
    return SiloApp(None, instance_path=instance, clock=False, auto_cleanup=True)


def test_embedded_default_migrates_itself_and_persists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SILO_DATABASE_URI", raising=False)
    instance = tmp_path / "instance"
    with embedded_app(instance) as api:
        storage = api.silo.store.storage
        assert isinstance(storage, SQLStorage)
        assert (instance / "silo.db").is_file()
        assert schema.is_current(storage.engine)
        with storage.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() > 0
        for expected in (1, 2):
            response = api.client.post("/api/count", headers={HEADER: ALICE})
            assert response.get_json()["n"] == expected

    with embedded_app(instance) as again:  # a restart: already migrated, state kept
        response = again.client.get("/api/read", headers={HEADER: ALICE})
        assert response.get_json() == {"n": 2}


# -- statement counts ------------------------------------------------------------------


@pytest.fixture
def warm(api: SiloApp) -> SiloApp:
    """An app whose ALICE session holds both namespaces, engine connected."""
    api.client.post("/api/count", headers={HEADER: ALICE})
    api.client.post("/api/note", headers={HEADER: ALICE})
    api.client.get("/api/ping", headers={HEADER: ALICE})
    api.clock.now += 1
    return api


def test_request_without_state_costs_at_most_one_statement(warm: SiloApp) -> None:
    with StatementLog(warm.storage) as log:
        response = warm.client.get("/api/ping", headers={HEADER: ALICE})
    assert response.status_code == 200
    assert len(log.statements) <= 1


def test_read_request_costs_one_select(warm: SiloApp) -> None:
    with StatementLog(warm.storage) as log:
        assert warm.read(ALICE) == 1
    assert len(log.starting("SELECT")) == 1
    assert len(log.statements) == 1


def test_data_endpoint_read_costs_two_selects(warm: SiloApp) -> None:
    """The expiry check (before the view runs) and the namespace the view reads."""
    with StatementLog(warm.storage) as log:
        response = warm.client.get("/api/data", headers={HEADER: ALICE})
    assert response.get_json() == {"n": 1}
    assert log.names == ["probe", "load_namespace"]


def test_write_request_updates_only_the_changed_namespace(warm: SiloApp) -> None:
    with StatementLog(warm.storage) as log:
        assert warm.count(ALICE) == 2
    assert len(log.starting("SELECT")) == 1
    updates = log.starting("UPDATE silo_namespaces")
    assert len(updates) == 1
    assert len(log.statements) == 2
    assert warm.client.get("/api/read", headers={HEADER: ALICE}).get_json() == {"n": 2}


def test_last_active_writes_are_throttled(warm: SiloApp) -> None:
    store = warm.silo.store
    interval = store.touch_interval
    assert 0 < interval <= TTL
    start = warm.storage.get_session(ALICE)
    assert start is not None
    last_active = start["_meta"]["last_active"]

    def session_writes(request: Callable[[], Any]) -> int:
        with StatementLog(warm.storage) as log:
            request()
        return len(log.starting("UPDATE silo_sessions")) + len(log.starting("INSERT"))

    def read() -> Any:
        return warm.read(ALICE)

    def ping() -> Any:
        return warm.client.get("/api/ping", headers={HEADER: ALICE})

    warm.clock.now = last_active + interval - 1
    assert session_writes(read) == 0
    ping()
    stored = warm.storage.get_session(ALICE)
    assert stored is not None
    assert stored["_meta"]["last_active"] == pytest.approx(last_active, abs=1e-3)

    warm.clock.now = last_active + interval
    assert session_writes(read) == 1
    stored = warm.storage.get_session(ALICE)
    assert stored is not None
    assert stored["_meta"]["last_active"] == pytest.approx(warm.clock.now, abs=1e-3)

    warm.clock.now += interval - 1
    assert session_writes(read) == 0
    ping()
    stored = warm.storage.get_session(ALICE)
    assert stored is not None
    assert stored["_meta"]["last_active"] == pytest.approx(
        last_active + interval, abs=1e-3
    )  # the ping inside the interval did not write
    warm.clock.now += 2  # past the interval
    ping()
    stored = warm.storage.get_session(ALICE)
    assert stored is not None
    assert stored["_meta"]["last_active"] == pytest.approx(warm.clock.now, abs=1e-3)
