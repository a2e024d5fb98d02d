"""The app harness (``harness.py``, the ``silo_app`` fixture): what it builds and cleans up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import AppFactory, Harness
from support import T0, Clock

from flask_silo_sql import SchemaError, SQLStorage

ALICE = "alice-harness-000000000001"
BOB = "bob-harness-00000000000001"


def counting(h: Harness) -> Harness:
    h.silo.register("counter", lambda: {"n": 0})

    @h.app.post("/api/count")
    def count() -> dict[str, int]:
        state = h.silo.state("counter")
        state["n"] += 1
        return {"n": state["n"]}

    return h


def test_the_example_in_the_docstring(silo_app: AppFactory) -> None:
    h = silo_app(ttl=600, config={"SILO_MAX_STATE_BYTES": 4096})
    assert h.store.ttl == 600
    assert h.store.max_state_bytes == 4096
    counting(h)
    assert h.json("POST", "/api/count", ALICE) == {"n": 1}
    assert h.post("/api/count", ALICE).get_json() == {"n": 2}
    h.expire(ALICE)
    assert h.store.is_expired(ALICE)


@pytest.mark.parametrize("via", ["storage", "config"])
def test_apps_share_the_test_database(silo_app: AppFactory, silo_url: str, via: str) -> None:
    first, second = counting(silo_app(via=via)), counting(silo_app(via=via))
    assert first.app.config["SILO_DATABASE_URI"] == (silo_url if via == "config" else None)
    assert first.storage is not second.storage  # two workers, each with its own engine
    assert first.json("POST", "/api/count", ALICE) == {"n": 1}
    assert second.json("POST", "/api/count", ALICE) == {"n": 2}
    check = SQLStorage(silo_url)
    try:
        session = check.get_session(ALICE)
        assert session is not None
        assert session["counter"] == {"n": 2}
    finally:
        check.dispose()


def test_the_clock_is_injected_unless_real_time(silo_app: AppFactory) -> None:
    frozen = silo_app()
    assert frozen.store.now() == T0
    frozen.clock.advance(5)
    assert frozen.store.now() == T0 + 5
    given = Clock(T0 + 100)
    assert silo_app(clock=given).clock is given
    real = silo_app(clock=False)
    assert abs(real.store.now() - time.time()) < 60
    with pytest.raises(AssertionError, match="real time"):
        real.clock  # noqa: B018


def test_requests_carry_the_sid_in_the_apps_header(silo_app: AppFactory) -> None:
    h = counting(silo_app(header="X-Client", default_sid=ALICE))
    assert h.post("/api/count").headers["X-Client"] == ALICE
    assert h.post("/api/count", BOB).headers["X-Client"] == BOB
    assert h.json("POST", "/api/count") == {"n": 2}
    anonymous = counting(silo_app())
    issued = anonymous.post("/api/count").headers["X-Session-ID"]
    assert issued not in (ALICE, BOB)


def test_close_stops_the_daemon_once(silo_url: str, tmp_path: Path) -> None:
    factory = AppFactory(silo_url, instance_path=tmp_path / "instance")
    h = counting(factory(auto_cleanup=True))
    assert h.post("/api/count", ALICE).status_code == 200  # the daemon runs by now
    state = h.app.extensions["silo"]
    assert state.daemon.running
    factory.close()
    assert h.closed
    assert not state.daemon.running
    h.close()  # again: harmless


def test_a_failed_start_disposes_the_storage_it_made(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    disposed: list[SQLStorage] = []
    dispose = SQLStorage.dispose

    def recording(storage: SQLStorage) -> None:
        disposed.append(storage)
        dispose(storage)

    monkeypatch.setattr(SQLStorage, "dispose", recording)
    with pytest.raises(SchemaError):
        Harness(db_url)  # no schema
    assert len(disposed) == 1
