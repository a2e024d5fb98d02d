"""SessionStore: namespaces, TTL, expired-SID memory and lifecycle callbacks.

The API is flask-silo 0.1.6's. Over :class:`~flask_silo_sql.storage.InMemoryStorage`
(the default) it behaves as the original, minus its deadlock when a busy check
reads the store. Over :class:`~flask_silo_sql.sql_storage.SQLStorage` it loads a
session in one SELECT, remembers the JSON it read, and :meth:`SessionStore.save`
writes only the namespaces whose JSON changed, each guarded by its version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .engine import dumps
from .errors import NamespaceError, SessionBusy, StateNotSerializable, StateTooLarge
from .sids import new_sid
from .sql_storage import LoadedSession, NamespaceWrite, SQLStorage, to_datetime
from .storage import InMemoryStorage, SiloStorage

logger = logging.getLogger("flask_silo_sql")

META = "_meta"
UNSERIALISABLE = "\x00"  # a baseline no JSON text equals: forces a (failing) write


class Session(dict[str, Any]):
    """A session's namespaces as loaded from SQL, plus what they were when read.

    ``baseline`` maps each namespace to ``(json_text, version)``; version is
    None for a namespace that has no row yet (made by its factory).
    """

    __slots__ = ("baseline", "last_active")

    def __init__(self) -> None:
        super().__init__()
        self.baseline: dict[str, tuple[str, int | None]] = {}
        self.last_active = 0.0


def serialise(namespace: str, value: Any, max_bytes: int | None = None) -> str:
    """JSON text of a namespace, or an error naming the namespace and key."""
    try:
        text = dumps(value)
    except (TypeError, ValueError) as exc:
        raise StateNotSerializable(namespace, _offending_key(value), str(exc)) from None
    if max_bytes is not None and len(text) > max_bytes // 4:  # cheap pre-check
        size = len(text.encode())
        if size > max_bytes:
            raise StateTooLarge(namespace, size, max_bytes)
    return text


def _offending_key(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return repr(key)
            try:
                dumps(item)
            except (TypeError, ValueError):
                return str(key)
    return None


class SessionStore:
    """Per-client state with TTL expiry, over any :class:`SiloStorage`.

    ``clock`` (seconds, like :func:`time.time`) can be injected for tests.
    ``touch_interval`` bounds how often ``last_active`` is written on SQL
    storage (default ``min(60, ttl / 20)`` seconds, 0 in memory); expiry waits
    that much longer, so a session is never expired before ``ttl`` idle seconds.
    """

    def __init__(
        self,
        *,
        ttl: int = 3600,
        cleanup_interval: int = 60,
        expired_retain: int = 7200,
        sid_generator: Callable[[], str] | None = None,
        storage: SiloStorage | None = None,
        clock: Callable[[], float] | None = None,
        touch_interval: float | None = None,
        max_state_bytes: int | None = None,
        heartbeat_timeout: float = 60.0,
        sweep_batch_size: int = 500,
    ) -> None:
        self.storage: SiloStorage = storage if storage is not None else InMemoryStorage()
        self.ttl = ttl
        self.cleanup_interval = cleanup_interval
        self.expired_retain = expired_retain
        self.clock: Callable[[], float] = clock or time.time
        self.max_state_bytes = max_state_bytes
        self.heartbeat_timeout = heartbeat_timeout
        self.sweep_batch_size = sweep_batch_size
        self._touch_interval = touch_interval
        self._sid_gen = sid_generator or new_sid
        self._lock = threading.RLock()
        self._factories: dict[str, Callable[[], dict[str, Any]]] = {}
        self._busy_check: Callable[[str, dict[str, Any]], bool] | None = None
        self._on_expire_cbs: list[Callable[[str], None]] = []
        self._on_create_cbs: list[Callable[[str], None]] = []

    # -- configuration -------------------------------------------------------

    @property
    def sql(self) -> SQLStorage | None:
        """The storage when it is SQL (the fast path), else None."""
        storage = self.storage
        return storage if isinstance(storage, SQLStorage) else None

    @property
    def touch_interval(self) -> float:
        """Seconds between ``last_active`` writes for one session."""
        if self._touch_interval is not None:
            return self._touch_interval
        return min(60.0, self.ttl / 20) if self.sql is not None else 0.0

    @touch_interval.setter
    def touch_interval(self, value: float | None) -> None:
        self._touch_interval = value

    @property
    def namespaces(self) -> list[str]:
        """Registered namespace names."""
        return list(self._factories)

    def register_namespace(self, name: str, factory: Callable[[], dict[str, Any]]) -> None:
        """Register namespace *name*, whose default state *factory* returns."""
        if not name or name == META:
            raise ValueError(f"invalid namespace name {name!r}")
        self._factories[name] = factory

    def set_busy_check(self, predicate: Callable[[str, dict[str, Any]], bool]) -> None:
        """``predicate(sid, session) -> True`` keeps a session from expiry and reset.

        It is called outside any lock or transaction, so it may read the store.
        """
        self._busy_check = predicate

    def on_expire(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(sid)`` once per expired session, after the commit."""
        self._on_expire_cbs.append(callback)

    def on_create(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(sid)`` once per created session, after the commit."""
        self._on_create_cbs.append(callback)

    def generate_sid(self) -> str:
        """A new SID from the configured generator (by default :func:`new_sid`)."""
        return self._sid_gen()

    # -- reading -------------------------------------------------------------

    def get(self, sid: str) -> dict[str, Any]:
        """The session *sid*, created (and ``on_create`` fired) when missing."""
        if self.sql is None:
            return self._get_memory(sid)
        session = self.open(sid)
        assert session is not None
        now = self.clock()
        if now - session.last_active >= self.touch_interval:
            self.sql.touch(sid, now)
            session.last_active = now
        return session

    def open(self, sid: str, *, create: bool = True) -> Session | None:
        """Load an SQL session in one SELECT (creating it if *create*), untouched.

        Used by the request path, which writes ``last_active`` with the changes.
        """
        sql = self.sql
        assert sql is not None, "open() needs SQL storage"
        loaded = sql.load(sid)
        created = False
        if loaded is None:
            if not create:
                return None
            now = self.clock()
            created = sql.create(sid, now)
            loaded = sql.load(sid) if not created else None
            if loaded is None:
                when = to_datetime(now)
                loaded = LoadedSession(when, when, {})
        session = self._build(sid, loaded)
        if created:
            self._fire(self._on_create_cbs, sid)
        return session

    def _build(self, sid: str, loaded: LoadedSession) -> Session:
        session = Session()
        baseline = session.baseline
        for name, (data, version) in loaded.namespaces.items():
            session[name] = data
            baseline[name] = (dumps(data), version)
        for name, factory in self._factories.items():
            if name not in session:
                value = factory()
                session[name] = value
                try:
                    baseline[name] = (dumps(value), None)
                except (TypeError, ValueError):
                    baseline[name] = (UNSERIALISABLE, None)
        session.last_active = loaded.last_active.timestamp()
        session[META] = {
            "created_at": loaded.created_at.timestamp(),
            "last_active": session.last_active,
            "sid": sid,
        }
        return session

    def get_namespace(self, sid: str, namespace: str) -> dict[str, Any]:
        """The state of one registered namespace of session *sid*."""
        if namespace not in self._factories:
            raise NamespaceError(namespace)
        value: dict[str, Any] = self.get(sid)[namespace]
        return value

    def touch(self, sid: str) -> None:
        """Mark *sid* active now, without creating it."""
        now = self.clock()
        if self.sql is not None:
            self.sql.touch(sid, now)
            return
        with self._lock:
            session = self.storage.get_session(sid)
            if session is not None:
                session[META]["last_active"] = now
                self.storage.set_session(sid, session)

    def touch_or_create(self, sid: str) -> None:
        """For a request that never read state: one statement at most (SQL)."""
        sql = self.sql
        if sql is None:
            self.get(sid)
            return
        now = self.clock()
        if sql.touch_or_create(sid, now, now - self.touch_interval):
            self._fire(self._on_create_cbs, sid)

    def exists(self, sid: str) -> bool:
        """Whether *sid* is a live session."""
        with self._lock:
            return self.storage.has_session(sid)

    def is_expired(self, sid: str) -> bool:
        """Whether *sid* expired and is still remembered (for ``410 Gone``)."""
        with self._lock:
            return self.storage.is_expired(sid)

    # -- writing -------------------------------------------------------------

    def save(self, sid: str, session: dict[str, Any]) -> None:
        """Persist *session*: on SQL, only the namespaces whose JSON changed.

        Raises :class:`StateNotSerializable` (nothing written) for non-JSON
        state, :class:`StateConflict` when another writer changed a namespace
        since it was read, and :class:`SessionExpired` when the session was
        expired meanwhile (it is not recreated).
        """
        sql = self.sql
        if sql is None:
            with self._lock:
                self.storage.set_session(sid, session)
            return
        if not isinstance(session, Session):
            self._save_plain(sql, sid, session)
            return
        writes: list[NamespaceWrite] = []
        texts: list[str] = []
        for name, value in session.items():
            if name == META:
                continue
            text = serialise(name, value, self.max_state_bytes)
            base = session.baseline.get(name)
            if base is None or base[0] != text:
                writes.append(NamespaceWrite(name, text, base[1] if base else None))
                texts.append(text)
        now = self.clock()
        touch = now - session.last_active >= self.touch_interval
        if not writes and not touch:
            return
        versions = sql.write(sid, writes, now, touch=touch)
        for write, text, version in zip(writes, texts, versions, strict=True):
            session.baseline[write.name] = (text, version)
        if touch:
            session.last_active = now
            session[META]["last_active"] = now

    def _save_plain(self, sql: SQLStorage, sid: str, session: dict[str, Any]) -> None:
        for name, value in session.items():
            if name != META:
                serialise(name, value, self.max_state_bytes)
        sql.set_session(sid, session)

    def reset(self, sid: str) -> None:
        """Give every namespace of *sid* fresh factory state (SessionBusy if busy)."""
        sql = self.sql
        if sql is None:
            with self._lock:
                current = self.storage.get_session(sid)
            if current is None:
                return
            if self._busy_check and self._busy_check(sid, current):
                raise SessionBusy(sid)
            with self._lock:
                self.storage.set_session(sid, self._fresh_memory(sid))
            return
        current = sql.get_session(sid)
        if current is None:
            return
        if self._busy_check and self._busy_check(sid, current):
            raise SessionBusy(sid)
        fresh = {
            name: serialise(name, factory(), self.max_state_bytes)
            for name, factory in self._factories.items()
        }
        sql.replace_namespaces(sid, fresh, self.clock())

    def destroy(self, sid: str) -> None:
        """Remove session *sid* without remembering it as expired."""
        with self._lock:
            self.storage.delete_session(sid)

    # -- expiry --------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Expire idle sessions, prune old expired-SID records; return expired SIDs."""
        sql = self.sql
        if sql is None:
            return self._cleanup_memory()
        now = self.clock()
        result = sql.sweep(
            now=now,
            cutoff=now - self.ttl - self.touch_interval,
            heartbeat_cutoff=now - self.heartbeat_timeout,
            batch_size=self.sweep_batch_size,
            is_busy=self._busy_sids if self._busy_check else None,
            on_batch=self._fire_expired,
        )
        sql.prune_expired(self.expired_retain, now=now)
        return result.expired

    def _fire_expired(self, sids: list[str]) -> None:
        for sid in sids:
            self._fire(self._on_expire_cbs, sid)

    def _busy_sids(self, sids: list[str]) -> set[str]:
        check = self._busy_check
        assert check is not None
        assert self.sql is not None
        busy: set[str] = set()
        for sid in sids:
            session = self.sql.get_session(sid)
            if session is not None and self._vetoes(check, sid, session):
                busy.add(sid)
        return busy

    @staticmethod
    def _vetoes(check: Callable[[str, dict[str, Any]], bool], sid: str, session: Any) -> bool:
        try:
            return bool(check(sid, session))
        except Exception:
            logger.exception("busy check failed for session %s; treating it as busy", sid)
            return True

    def _cleanup_memory(self) -> list[str]:
        now = self.clock()
        with self._lock:
            stale = [
                (sid, session)
                for sid, session in self.storage.all_sessions()
                if now - session[META]["last_active"] > self.ttl
            ]
        check = self._busy_check
        expired: list[str] = []
        for sid, session in stale:
            if check is not None and self._vetoes(check, sid, session):
                continue
            with self._lock:
                current = self.storage.get_session(sid)
                if current is None or now - current[META]["last_active"] <= self.ttl:
                    continue  # touched (or removed) while the predicate ran
                self.storage.delete_session(sid)
                self.storage.mark_expired(sid, now)
            expired.append(sid)
        for sid in expired:
            self._fire(self._on_expire_cbs, sid)
        with self._lock:
            storage = self.storage
            if isinstance(storage, InMemoryStorage):
                storage.prune_expired(self.expired_retain, now=now)
            else:
                storage.prune_expired(self.expired_retain)
        return expired

    # -- in-memory path (flask-silo semantics) ---------------------------------

    def _fresh_memory(self, sid: str) -> dict[str, Any]:
        now = self.clock()
        session: dict[str, Any] = {ns: factory() for ns, factory in self._factories.items()}
        session[META] = {"created_at": now, "last_active": now, "sid": sid}
        return session

    def _get_memory(self, sid: str) -> dict[str, Any]:
        with self._lock:
            session = self.storage.get_session(sid)
            is_new = session is None
            if session is None:
                session = self._fresh_memory(sid)
                self.storage.clear_expired(sid)
            for ns, factory in self._factories.items():
                if ns not in session:
                    session[ns] = factory()
            session[META]["last_active"] = self.clock()
            self.storage.set_session(sid, session)
        if is_new:
            self._fire(self._on_create_cbs, sid)
        return session

    # -- introspection -------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Number of live sessions."""
        with self._lock:
            return self.storage.session_count()

    @property
    def expired_count(self) -> int:
        """Number of remembered expired SIDs."""
        with self._lock:
            return self.storage.expired_count()

    @property
    def all_sids(self) -> list[str]:
        """Every live SID (a snapshot)."""
        with self._lock:
            return self.storage.all_sids()

    @staticmethod
    def _fire(callbacks: list[Callable[[str], None]], sid: str) -> None:
        for callback in callbacks:
            try:
                callback(sid)
            except Exception:
                logger.exception("silo callback %r failed for session %s", callback, sid)
