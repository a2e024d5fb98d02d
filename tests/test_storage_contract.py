"""Contract tests: every storage, and the SessionStore over every storage.

``StorageContract`` exercises the 12 :class:`SiloStorage` methods and
``StoreContract`` the :class:`SessionStore` API. Each runs against
:class:`InMemoryStorage`, :class:`SQLStorage` on SQLite and :class:`SQLStorage`
on PostgreSQL, the SQL ones with each executor: the subclasses only supply a
``storage`` fixture.
"""

from __future__ import annotations

import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import T0, Clock, Recorder

from flask_silo_sql import (
    InMemoryStorage,
    NamespaceError,
    SessionBusy,
    SessionStore,
    SiloStorage,
    SQLStorage,
    session_key,
)

pytestmark = pytest.mark.each_executor  # the contract proves both executors send the same

TTL = 100
RETAIN = 50


def key(sid: str) -> str:
    """What the store names session *sid* by (its key at rest, on every storage)."""
    return session_key(sid)


def stored(storage: SiloStorage, sid: str) -> str:
    """What *storage* itself lists for *sid*: SQL storage keeps its key, memory the SID."""
    return session_key(sid) if isinstance(storage, SQLStorage) else sid


# -- the storages every contract runs on ----------------------------------------------


def sql_storage(url: str, executor: Any) -> Iterator[SQLStorage]:
    storage = SQLStorage(url, executor=executor)
    assert storage.connector.mode == executor
    yield storage
    storage.dispose()


class InMemoryStorageFixture:
    """A fresh :class:`InMemoryStorage` for each test."""

    @pytest.fixture
    def storage(self) -> SiloStorage:
        return InMemoryStorage()


class SQLiteStorageFixture:
    """:class:`SQLStorage` on a migrated, empty SQLite file."""

    @pytest.fixture
    def storage(self, sqlite_silo_url: str, executor: str) -> Iterator[SiloStorage]:
        yield from sql_storage(sqlite_silo_url, executor)


class PostgreSQLStorageFixture:
    """:class:`SQLStorage` on the migrated, emptied PostgreSQL database."""

    @pytest.fixture
    def storage(self, pg_silo_url: str, executor: str) -> Iterator[SiloStorage]:
        yield from sql_storage(pg_silo_url, executor)


# -- the storage contract -------------------------------------------------------


def session_data(created: float, **namespaces: Any) -> dict[str, Any]:
    data: dict[str, Any] = dict(namespaces)
    data["_meta"] = {"created_at": created, "last_active": created}
    return data


def namespaces_of(session: dict[str, Any] | None) -> dict[str, Any]:
    assert session is not None
    return {name: value for name, value in session.items() if name != "_meta"}


class StorageContract:
    """What every :class:`SiloStorage` does; subclasses supply ``storage``."""

    def test_unknown_sid(self, storage: SiloStorage) -> None:
        assert storage.get_session("a" * 20) is None
        assert storage.has_session("a" * 20) is False
        storage.delete_session("a" * 20)  # no-op
        assert storage.session_count() == 0
        assert storage.all_sids() == []
        assert storage.all_sessions() == []

    def test_set_then_get_round_trips_json_state(self, storage: SiloStorage) -> None:
        cart = {
            "items": [1, 2.5, "x", None, True, {"deep": [False, {"k": "v"}]}],
            "text": "ünïcödé ☃ 😀",
            "big": 2**62,
            "empty": {},
        }
        storage.set_session("sid-one-0000000000", session_data(T0, cart=cart, prefs={"a": 1}))
        got = storage.get_session("sid-one-0000000000")
        assert namespaces_of(got) == {"cart": cart, "prefs": {"a": 1}}
        assert got is not None
        assert got["_meta"]["created_at"] == pytest.approx(T0, abs=1e-3)
        assert got["_meta"]["last_active"] == pytest.approx(T0, abs=1e-3)

    def test_set_session_replaces_the_whole_session(self, storage: SiloStorage) -> None:
        sid = "sid-replace-000000"
        storage.set_session(sid, session_data(T0, a={"n": 1}, b={"n": 2}))
        replacement = session_data(T0, a={"n": 10})
        replacement["_meta"]["last_active"] = T0 + 5
        storage.set_session(sid, replacement)
        got = storage.get_session(sid)
        assert namespaces_of(got) == {"a": {"n": 10}}
        assert got is not None
        assert got["_meta"]["last_active"] == pytest.approx(T0 + 5, abs=1e-3)
        assert storage.session_count() == 1

    def test_sessions_are_isolated(self, storage: SiloStorage) -> None:
        storage.set_session("sid-alice-00000000", session_data(T0, cart={"items": ["a"]}))
        storage.set_session("sid-bob-0000000000", session_data(T0, cart={"items": ["b"]}))
        assert namespaces_of(storage.get_session("sid-alice-00000000")) == {
            "cart": {"items": ["a"]}
        }
        assert namespaces_of(storage.get_session("sid-bob-0000000000")) == {
            "cart": {"items": ["b"]}
        }

    def test_delete_session_removes_only_that_session(self, storage: SiloStorage) -> None:
        storage.set_session("sid-keep-000000000", session_data(T0, ns={"v": 1}))
        storage.set_session("sid-gone-000000000", session_data(T0, ns={"v": 2}))
        storage.delete_session("sid-gone-000000000")
        storage.delete_session("sid-gone-000000000")  # idempotent
        assert storage.get_session("sid-gone-000000000") is None
        assert storage.has_session("sid-gone-000000000") is False
        assert storage.has_session("sid-keep-000000000") is True
        assert storage.all_sids() == [stored(storage, "sid-keep-000000000")]
        assert storage.is_expired("sid-gone-000000000") is False  # deleting is not expiring

    def test_has_session(self, storage: SiloStorage) -> None:
        assert not storage.has_session("sid-has-0000000000")
        storage.set_session("sid-has-0000000000", session_data(T0))
        assert storage.has_session("sid-has-0000000000")
        assert not storage.has_session("sid-has-0000000001")

    def test_all_sessions_is_a_snapshot_of_every_session(self, storage: SiloStorage) -> None:
        storage.set_session("sid-s1-00000000000", session_data(T0, ns={"v": 1}))
        storage.set_session("sid-s2-00000000000", session_data(T0, ns={"v": 2}))
        snapshot = storage.all_sessions()
        storage.set_session("sid-s3-00000000000", session_data(T0, ns={"v": 3}))
        as_dict = dict(snapshot)
        s1, s2 = stored(storage, "sid-s1-00000000000"), stored(storage, "sid-s2-00000000000")
        assert set(as_dict) == {s1, s2}
        assert as_dict[s1]["ns"] == {"v": 1}
        assert as_dict[s2]["ns"] == {"v": 2}
        assert as_dict[s1]["_meta"]["created_at"] == pytest.approx(T0, abs=1e-3)
        assert len(storage.all_sessions()) == 3

    def test_session_count_and_all_sids(self, storage: SiloStorage) -> None:
        sids = [f"sid-count-{i:08d}" for i in range(5)]
        for sid in sids:
            storage.set_session(sid, session_data(T0))
        storage.set_session(sids[0], session_data(T0, ns={"again": True}))  # no duplicate
        assert storage.session_count() == 5
        assert sorted(storage.all_sids()) == sorted(stored(storage, s) for s in sids)
        storage.delete_session(sids[1])
        assert storage.session_count() == 4
        assert sorted(storage.all_sids()) == sorted(
            stored(storage, s) for s in [sids[0], *sids[2:]]
        )

    def test_mark_and_is_expired(self, storage: SiloStorage) -> None:
        storage.set_session("sid-live-000000000", session_data(T0))
        assert storage.is_expired("sid-old-0000000000") is False
        storage.mark_expired("sid-old-0000000000", time.time())
        assert storage.is_expired("sid-old-0000000000") is True
        assert storage.is_expired("sid-live-000000000") is False
        assert storage.has_session("sid-live-000000000")  # marks are separate from sessions
        storage.mark_expired("sid-old-0000000000", time.time())  # marking again: one record
        assert storage.expired_count() == 1

    def test_clear_expired(self, storage: SiloStorage) -> None:
        storage.mark_expired("sid-a-000000000000", time.time())
        storage.mark_expired("sid-b-000000000000", time.time())
        storage.clear_expired("sid-a-000000000000")
        storage.clear_expired("sid-never-00000000")  # no-op
        assert storage.is_expired("sid-a-000000000000") is False
        assert storage.is_expired("sid-b-000000000000") is True
        assert storage.expired_count() == 1

    def test_prune_expired_forgets_only_old_records(self, storage: SiloStorage) -> None:
        now = time.time()
        storage.mark_expired("sid-ancient-000000", now - 10_000)
        storage.mark_expired("sid-old-0000000000", now - 1_000)
        storage.mark_expired("sid-recent-0000000", now - 10)
        storage.prune_expired(500)
        assert storage.is_expired("sid-ancient-000000") is False
        assert storage.is_expired("sid-old-0000000000") is False
        assert storage.is_expired("sid-recent-0000000") is True
        assert storage.expired_count() == 1

    def test_expired_count(self, storage: SiloStorage) -> None:
        assert storage.expired_count() == 0
        for i in range(3):
            storage.mark_expired(f"sid-exp-{i:010d}", time.time())
        assert storage.expired_count() == 3
        storage.clear_expired("sid-exp-0000000001")
        assert storage.expired_count() == 2


class TestInMemoryStorage(InMemoryStorageFixture, StorageContract):
    pass


class TestSQLStorageSQLite(SQLiteStorageFixture, StorageContract):
    pass


class TestSQLStoragePostgreSQL(PostgreSQLStorageFixture, StorageContract):
    pass


# -- the SessionStore contract ------------------------------------------------------


def cart_factory() -> dict[str, Any]:
    return {"items": [], "total": 0}


def run_with_deadline(work: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Run *work* in a thread; fail (instead of hanging) if it does not finish."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # reported in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlock: the call did not return"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class StoreContract:
    """What :class:`SessionStore` does over any storage; subclasses supply ``storage``."""

    @pytest.fixture
    def clock(self) -> Clock:
        return Clock()

    @pytest.fixture
    def store(self, storage: SiloStorage, clock: Clock) -> SessionStore:
        store = SessionStore(ttl=TTL, expired_retain=RETAIN, storage=storage, clock=clock)
        store.register_namespace("cart", cart_factory)
        return store

    def expiry_after(self, store: SessionStore) -> float:
        """Idle seconds after which cleanup expires a session."""
        return store.ttl + store.touch_interval

    # -- namespaces ------------------------------------------------------------

    def test_new_session_has_factory_state(self, store: SessionStore) -> None:
        session = store.get("sid-new-0000000000")
        assert session["cart"] == {"items": [], "total": 0}
        assert store.get_namespace("sid-new-0000000000", "cart") == {"items": [], "total": 0}
        assert store.exists("sid-new-0000000000")

    def test_each_session_gets_its_own_factory_state(self, store: SessionStore) -> None:
        first = store.get("sid-first-00000000")
        first["cart"]["items"].append("apple")
        store.save("sid-first-00000000", first)
        assert store.get_namespace("sid-second-0000000", "cart") == {"items": [], "total": 0}
        assert store.get_namespace("sid-first-00000000", "cart")["items"] == ["apple"]

    def test_unregistered_namespace(self, store: SessionStore) -> None:
        with pytest.raises(NamespaceError) as info:
            store.get_namespace("sid-ns-00000000000", "nope")
        assert info.value.namespace == "nope"
        with pytest.raises(ValueError, match="namespace"):
            store.register_namespace("_meta", dict)

    def test_namespace_registered_later_is_initialised_lazily(
        self, store: SessionStore
    ) -> None:
        session = store.get("sid-lazy-000000000")
        session["cart"]["total"] = 7
        store.save("sid-lazy-000000000", session)
        store.register_namespace("prefs", lambda: {"theme": "dark"})
        again = store.get("sid-lazy-000000000")
        assert again["prefs"] == {"theme": "dark"}
        assert again["cart"]["total"] == 7
        assert store.namespaces == ["cart", "prefs"]

    def test_get_save_round_trip(self, store: SessionStore, storage: SiloStorage) -> None:
        session = store.get("sid-trip-000000000")
        session["cart"]["items"].extend(["a", {"qty": 2}])
        session["cart"]["total"] = 12.5
        store.save("sid-trip-000000000", session)
        assert store.get_namespace("sid-trip-000000000", "cart") == {
            "items": ["a", {"qty": 2}],
            "total": 12.5,
        }
        # What a store reads is what the storage holds (another store, same storage).
        other = SessionStore(ttl=TTL, storage=storage)
        other.register_namespace("cart", cart_factory)
        assert other.get_namespace("sid-trip-000000000", "cart")["total"] == 12.5

    # -- reset, destroy, touch -------------------------------------------------------

    def test_reset_restores_factory_state(self, store: SessionStore) -> None:
        session = store.get("sid-reset-00000000")
        session["cart"]["items"].append("x")
        store.save("sid-reset-00000000", session)
        store.reset("sid-reset-00000000")
        assert store.get_namespace("sid-reset-00000000", "cart") == {"items": [], "total": 0}
        assert store.exists("sid-reset-00000000")

    def test_reset_of_unknown_sid_creates_nothing(self, store: SessionStore) -> None:
        store.reset("sid-nobody-0000000")
        assert not store.exists("sid-nobody-0000000")
        assert store.active_count == 0

    def test_reset_refused_when_busy(self, store: SessionStore) -> None:
        session = store.get("sid-busy-000000000")
        session["cart"]["total"] = 3
        store.save("sid-busy-000000000", session)
        store.set_busy_check(lambda sid, data: True)
        with pytest.raises(SessionBusy):
            store.reset("sid-busy-000000000")
        assert store.get_namespace("sid-busy-000000000", "cart")["total"] == 3

    def test_destroy(self, store: SessionStore) -> None:
        store.get("sid-destroy-000000")
        store.get("sid-stays-00000000")
        store.destroy("sid-destroy-000000")
        assert not store.exists("sid-destroy-000000")
        assert not store.is_expired("sid-destroy-000000")  # destroyed, not expired
        assert store.all_sids == [key("sid-stays-00000000")]
        store.destroy("sid-destroy-000000")  # idempotent

    def test_touch_postpones_expiry(self, store: SessionStore, clock: Clock) -> None:
        store.get("sid-touched-000000")
        store.get("sid-idle-000000000")
        clock.advance(TTL - 1)
        store.touch("sid-touched-000000")
        clock.advance(self.expiry_after(store) - TTL + 2)  # the idle one is now stale
        assert store.cleanup() == [key("sid-idle-000000000")]
        assert store.exists("sid-touched-000000")

    def test_touch_does_not_create(self, store: SessionStore) -> None:
        store.touch("sid-ghost-00000000")
        assert not store.exists("sid-ghost-00000000")
        assert store.active_count == 0

    def test_exists_and_is_expired(self, store: SessionStore, clock: Clock) -> None:
        assert not store.exists("sid-e-000000000000")
        assert not store.is_expired("sid-e-000000000000")
        store.get("sid-e-000000000000")
        assert store.exists("sid-e-000000000000")
        clock.advance(self.expiry_after(store) + 1)
        store.cleanup()
        assert not store.exists("sid-e-000000000000")
        assert store.is_expired("sid-e-000000000000")

    # -- expiry ------------------------------------------------------------

    def test_cleanup_expires_after_ttl_idle(self, store: SessionStore, clock: Clock) -> None:
        store.get("sid-exp-0000000000")
        clock.advance(self.expiry_after(store))
        assert store.cleanup() == []  # idle for exactly the bound: kept
        assert store.exists("sid-exp-0000000000")
        clock.advance(1)
        assert store.cleanup() == [key("sid-exp-0000000000")]
        assert not store.exists("sid-exp-0000000000")
        assert store.is_expired("sid-exp-0000000000")
        assert store.cleanup() == []  # expired once

    def test_expiry_bound_by_storage(self, store: SessionStore) -> None:
        if isinstance(store.storage, SQLStorage):
            assert 0 < store.touch_interval <= TTL / 10
        else:
            assert store.touch_interval == 0

    def test_activity_keeps_a_session(self, store: SessionStore, clock: Clock) -> None:
        store.get("sid-active-0000000")
        store.get("sid-idle-000000000")
        clock.advance(TTL / 2)
        store.get("sid-active-0000000")
        clock.advance(self.expiry_after(store) - TTL / 2 + 1)
        assert store.cleanup() == [key("sid-idle-000000000")]
        assert store.exists("sid-active-0000000")
        assert store.get_namespace("sid-active-0000000", "cart") == {"items": [], "total": 0}

    def test_expired_session_comes_back_fresh(self, store: SessionStore, clock: Clock) -> None:
        session = store.get("sid-back-000000000")
        session["cart"]["total"] = 99
        store.save("sid-back-000000000", session)
        clock.advance(self.expiry_after(store) + 1)
        store.cleanup()
        assert store.get_namespace("sid-back-000000000", "cart") == {"items": [], "total": 0}
        assert not store.is_expired("sid-back-000000000")  # the mark is cleared

    def test_expired_records_are_pruned_after_retain(
        self, store: SessionStore, clock: Clock
    ) -> None:
        store.get("sid-prune-00000000")
        clock.advance(self.expiry_after(store) + 1)
        store.cleanup()
        assert store.expired_count == 1
        clock.advance(RETAIN - 1)
        store.cleanup()
        assert store.is_expired("sid-prune-00000000")
        clock.advance(2)
        store.cleanup()
        assert not store.is_expired("sid-prune-00000000")
        assert store.expired_count == 0

    def test_on_create_fires_once_per_creation(self, store: SessionStore, clock: Clock) -> None:
        created = Recorder()
        store.on_create(created)
        store.get("sid-cb-00000000000")
        store.get("sid-cb-00000000000")
        store.get_namespace("sid-cb-00000000000", "cart")
        assert created.calls == [key("sid-cb-00000000000")]
        clock.advance(self.expiry_after(store) + 1)
        store.cleanup()
        store.get("sid-cb-00000000000")  # a new session under the same SID
        assert created.calls == [key("sid-cb-00000000000"), key("sid-cb-00000000000")]

    def test_on_expire_fires_once_per_expiry(self, store: SessionStore, clock: Clock) -> None:
        expired = Recorder()
        store.on_expire(expired)
        store.get("sid-x1-00000000000")
        store.get("sid-x2-00000000000")
        clock.advance(self.expiry_after(store) + 1)
        store.cleanup()
        store.cleanup()
        assert sorted(expired.calls) == sorted(
            map(key, ["sid-x1-00000000000", "sid-x2-00000000000"])
        )

    def test_failing_callback_does_not_break_the_store(
        self, store: SessionStore, clock: Clock
    ) -> None:
        def boom(sid: str) -> None:
            raise RuntimeError("callback bug")

        after = Recorder()
        store.on_create(boom)
        store.on_create(after)
        store.on_expire(boom)
        store.get("sid-boom-000000000")
        assert after.calls == [key("sid-boom-000000000")]
        clock.advance(self.expiry_after(store) + 1)
        assert store.cleanup() == [key("sid-boom-000000000")]

    def test_busy_check_that_reads_the_store_keeps_the_session(
        self, store: SessionStore, clock: Clock
    ) -> None:
        seen: list[tuple[str, bool, int]] = []

        def read_store() -> tuple[bool, int, list[str], bool]:
            return (
                store.exists("sid-busy-000000000"),
                store.active_count,
                store.all_sids,
                store.is_expired("sid-busy-000000000"),
            )

        def busy(sid: str, session: dict[str, Any]) -> bool:
            exists, count, _, _ = read_store()
            # The same reads from another thread, as a request would make them.
            run_with_deadline(read_store, 10.0)
            seen.append((sid, exists, count))
            return bool(session["cart"]["items"])

        busy_session = store.get("sid-busy-000000000")
        busy_session["cart"]["items"].append("job")
        store.save("sid-busy-000000000", busy_session)
        store.get("sid-free-000000000")
        store.set_busy_check(busy)
        clock.advance(self.expiry_after(store) + 1)
        expired = run_with_deadline(store.cleanup)
        assert expired == [key("sid-free-000000000")]
        assert store.exists("sid-busy-000000000")
        assert not store.is_expired("sid-busy-000000000")
        assert (key("sid-busy-000000000"), True, 2) in seen

    def test_busy_check_that_raises_keeps_the_session(
        self, store: SessionStore, clock: Clock
    ) -> None:
        def broken(sid: str, session: dict[str, Any]) -> bool:
            raise RuntimeError("predicate bug")

        store.get("sid-keep-000000000")
        store.set_busy_check(broken)
        clock.advance(self.expiry_after(store) + 1)
        assert store.cleanup() == []
        assert store.exists("sid-keep-000000000")

    # -- SIDs and counts -------------------------------------------------------------

    def test_generate_sid_is_long_random_and_distinct(self, store: SessionStore) -> None:
        sids = [store.generate_sid() for _ in range(2000)]
        assert len(set(sids)) == len(sids)
        for sid in sids[:50]:
            assert re.fullmatch(r"[A-Za-z0-9_-]+", sid)
            assert len(sid) * 6 >= 128  # at least 128 bits in the URL-safe alphabet
        # Not the `random` module: reseeding it does not repeat SIDs.
        random.seed(1234)
        first = store.generate_sid()
        random.seed(1234)
        assert store.generate_sid() != first

    def test_generate_sid_uses_secrets(
        self, store: SessionStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[int | None] = []
        real = secrets.token_bytes

        def spy(nbytes: int | None = None) -> bytes:
            calls.append(nbytes)
            return real(nbytes)

        monkeypatch.setattr(secrets, "token_bytes", spy)
        store.generate_sid()
        assert calls
        assert all(n is not None and n >= 16 for n in calls)

    def test_custom_sid_generator(self, storage: SiloStorage) -> None:
        store = SessionStore(storage=storage, sid_generator=lambda: "custom-sid-0000000")
        assert store.generate_sid() == "custom-sid-0000000"

    def test_counts_and_sids(self, store: SessionStore, clock: Clock) -> None:
        assert (store.active_count, store.expired_count, store.all_sids) == (0, 0, [])
        for sid in ("sid-c1-00000000000", "sid-c2-00000000000", "sid-c3-00000000000"):
            store.get(sid)
        assert store.active_count == 3
        assert sorted(store.all_sids) == sorted(
            key(s) for s in ("sid-c1-00000000000", "sid-c2-00000000000", "sid-c3-00000000000")
        )
        clock.advance(self.expiry_after(store) + 1)
        store.get("sid-c2-00000000000")
        assert sorted(store.cleanup()) == sorted(
            map(key, ["sid-c1-00000000000", "sid-c3-00000000000"])
        )
        assert store.active_count == 1
        assert store.expired_count == 2
        assert store.all_sids == [key("sid-c2-00000000000")]


class TestStoreInMemory(InMemoryStorageFixture, StoreContract):
    def test_bare_store_defaults_to_memory(self) -> None:
        store = SessionStore()
        assert isinstance(store.storage, InMemoryStorage)
        assert (store.ttl, store.cleanup_interval, store.expired_retain) == (3600, 60, 7200)


class TestStoreSQLite(SQLiteStorageFixture, StoreContract):
    pass


class TestStorePostgreSQL(PostgreSQLStorageFixture, StoreContract):
    pass
