"""SessionStore: namespaces, TTL, expired-SID memory and lifecycle callbacks.

The API is flask-silo 0.1.6's. Over :class:`~flask_silo_sql.storage.InMemoryStorage`
(the default) it behaves as the original, minus its deadlock when a busy check
reads the store. Over :class:`~flask_silo_sql.sql_storage.SQLStorage` it loads a
session in one SELECT, remembers the JSON it read, and :meth:`SessionStore.save`
writes only the namespaces whose JSON changed, each guarded by its version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import (
    NamespaceError,
    SessionBusy,
    StateConflict,
    StateNotSerializable,
    StateTooLarge,
)
from .sids import new_sid
from .sql_storage import LoadedSession, NamespaceWrite, SQLStorage, SweepResult, to_datetime
from .storage import InMemoryStorage, SiloStorage
from .tasks import TASK_MARKER, BackgroundTask, TaskLink

logger = logging.getLogger("flask_silo_sql")

META = "_meta"
UNSERIALISABLE = "\x00"  # a baseline no JSON text equals: forces a (failing) write


class Session(dict[str, Any]):
    """A session's namespaces as loaded from SQL, plus what they were when read.

    ``baseline`` maps each namespace to ``(json_text, version)``; version is
    None for a namespace that has no row yet (made by its factory).
    """

    __slots__ = ("baseline", "last_active", "lock")

    def __init__(self) -> None:
        super().__init__()
        self.baseline: dict[str, tuple[str, int | None]] = {}
        self.last_active = 0.0
        self.lock = threading.Lock()  # a task thread may save this session too


class _UnlinkedTask(TypeError):
    """A BackgroundTask in a namespace that has no row yet."""


def _default(obj: Any) -> Any:
    if isinstance(obj, BackgroundTask):
        reference = obj.reference()
        if reference is None:
            raise _UnlinkedTask(obj.name)
        return reference
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def encode(value: Any) -> str:
    """Compact JSON; a linked BackgroundTask becomes a reference to its row."""
    return json.dumps(
        value, default=_default, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    )


def tasks_in(value: Any, path: str = "") -> Iterator[tuple[str, BackgroundTask]]:
    """Every BackgroundTask inside *value*, with its path (``key/0/key``)."""
    if isinstance(value, BackgroundTask):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tasks_in(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tasks_in(item, f"{path}/{index}")


def revive_tasks(value: Any, make: Callable[[str, str], BackgroundTask]) -> Any:
    """Replace task references in loaded JSON by task objects (``make(id, name)``)."""
    if isinstance(value, dict):
        if TASK_MARKER in value:
            return make(str(value[TASK_MARKER]), str(value.get("name", "task")))
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = revive_tasks(item, make)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                value[index] = revive_tasks(item, make)
    return value


def task_id_for(sid: str, namespace: str, path: str) -> str:
    """A stable row ID for the task at *path*: a factory makes the same task each load."""
    return hashlib.sha256(f"{sid}\0{namespace}\0{path}".encode()).hexdigest()[:32]


_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _storable(text: str) -> str:
    """*text*, if every database can store it (ValueError otherwise).

    PostgreSQL's JSONB refuses NUL characters in strings, and a lone surrogate
    is not UTF-8: both are refused on every database, so that state that works
    on SQLite keeps working on PostgreSQL.
    """
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise ValueError("a string holds a NUL character (\\u0000), which cannot be stored")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate, which is not valid UTF-8") from None
    return text


MAX_NESTING = 512
"""How deeply state may nest lists and objects.

Far enough below Python's recursion limit that state written in one call
stack can always be decoded again in a deeper one (the JSON decoder recurses).
"""


def _nesting_ok(text: str, value: Any) -> str:
    """*text* (the JSON of *value*), unless it nests deeper than MAX_NESTING (ValueError)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return text  # it cannot be that deep
    pending = [(value, 1)] if isinstance(value, (dict, list, tuple)) else []
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"state nests deeper than {MAX_NESTING} levels")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list, tuple)):
                pending.append((child, depth + 1))
    return text


def serialise(namespace: str, value: Any, max_bytes: int | None = None) -> str:
    """JSON text of a namespace, or an error naming the namespace and key."""
    try:
        text = _nesting_ok(_storable(encode(value)), value)
    except _UnlinkedTask:
        raise
    except TypeError as exc:
        raise StateNotSerializable(namespace, _offending_key(value), str(exc)) from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "state nests too deeply"
        key = _offending_key(value)
        raise StateNotSerializable(namespace, key, reason, invalid_value=True) from None
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
                _nesting_ok(_storable(encode(item)), item)
            except _UnlinkedTask:
                continue
            except (TypeError, ValueError, RecursionError):
                return str(key)
    return None


def _holds_task_marker(value: Any) -> bool:
    """Whether a dict in *value* has the key reserved for task references."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if TASK_MARKER in item:
                return True
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


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
        self.task_flush_interval = 0.5
        """Seconds between writes of a running task's progress (coalescing)."""
        self.task_max_logs = 200
        """Log lines a linked task keeps (the newest)."""
        self._touch_interval = touch_interval
        self._sid_gen = sid_generator or new_sid
        self._lock = threading.RLock()
        self._factories: dict[str, Callable[[], dict[str, Any]]] = {}
        self._busy_check: Callable[[str, dict[str, Any]], bool] | None = None
        self._on_expire_cbs: list[Callable[[str], None]] = []
        self._on_create_cbs: list[Callable[[str], None]] = []
        self._checking = threading.local()  # .active while a busy check runs in this thread

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
        if getattr(self._checking, "active", False):
            # A busy check reading the store is not client activity: no touch (the
            # session would never expire), and no re-creating one expired meanwhile.
            session = self.open(sid, create=False)
            if session is None:
                when = to_datetime(self.clock())
                return self._build(sid, LoadedSession(when, when, {}))
            return session
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
        texts = loaded.texts
        for name, (data, version) in loaded.namespaces.items():
            # The stored text is what encode() wrote; a text written otherwise
            # merely makes the first save rewrite the row in canonical form.
            text = texts.get(name) or encode(data)
            if TASK_MARKER in text:
                data = revive_tasks(data, self._task_maker(sid, session, name))
                text = encode(data)
            session[name] = data
            baseline[name] = (text, version)
        for name, factory in self._factories.items():
            if name not in session:
                value = factory()
                self._link_tasks(sid, session, name, value)
                session[name] = value
                try:
                    baseline[name] = (encode(value), None)
                except (TypeError, ValueError):
                    baseline[name] = (UNSERIALISABLE, None)
        session.last_active = loaded.last_active.timestamp()
        session[META] = {
            "created_at": loaded.created_at.timestamp(),
            "last_active": session.last_active,
            "sid": sid,
        }
        return session

    def _task_maker(
        self, sid: str, session: Session | None, namespace: str
    ) -> Callable[[str, str], BackgroundTask]:
        def make(task_id: str, name: str) -> BackgroundTask:
            return BackgroundTask.linked(name, TaskLink(self, sid, task_id, namespace, session))

        return make

    def _link_tasks(self, sid: str, session: Session | None, namespace: str, value: Any) -> None:
        """Give every unlinked BackgroundTask in *value* its row in ``silo_tasks``."""
        for path, task in tasks_in(value):
            if task.task_id is None:
                task_id = task_id_for(sid, namespace, path)
                task.link(TaskLink(self, sid, task_id, namespace, session))

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

    def ensure(self, sid: str) -> None:
        """Create session *sid* if it does not exist (firing ``on_create``)."""
        sql = self.sql
        if sql is None:
            self.get(sid)
        elif sql.create(sid, self.clock()):
            self._fire(self._on_create_cbs, sid)

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
        with session.lock:
            writes = self._changes(sid, session)
            now = self.clock()
            touch = now - session.last_active >= self.touch_interval
            if not writes and not touch:
                return
            versions = sql.write(sid, writes, now, touch=touch)
            self._written(session, writes, versions)
            if touch:
                session.last_active = now
                session[META]["last_active"] = now

    def _serialise(self, sid: str, session: Session | None, name: str, value: Any) -> str:
        try:
            text = serialise(name, value, self.max_state_bytes)
        except _UnlinkedTask:  # a handler put a new BackgroundTask in the namespace
            self._link_tasks(sid, session, name, value)
            text = serialise(name, value, self.max_state_bytes)
        if TASK_MARKER in text and _holds_task_marker(value):
            # Only the library writes task references: such a dict from a client
            # would be loaded as a task (another session's, given its ID).
            key = next((str(k) for k, v in value.items() if _holds_task_marker(v)), None)
            reason = f"the key {TASK_MARKER!r} is reserved for task references"
            raise StateNotSerializable(name, key, reason, invalid_value=True)
        return text

    def _changes(self, sid: str, session: Session) -> list[NamespaceWrite]:
        """The namespaces whose JSON differs from what was read (all checked first)."""
        writes: list[NamespaceWrite] = []
        for name, value in session.items():
            if name == META:
                continue
            text = self._serialise(sid, session, name, value)
            base = session.baseline.get(name)
            if base is None or base[0] != text:
                writes.append(NamespaceWrite(name, text, base[1] if base else None))
        return writes

    @staticmethod
    def _written(session: Session, writes: list[NamespaceWrite], versions: list[int]) -> None:
        for write, version in zip(writes, versions, strict=True):
            session.baseline[write.name] = (write.data, version)

    def save_namespace_merged(self, sid: str, session: Session, name: str) -> None:
        """Save one namespace from outside its request (a task thread), merging by key.

        The top-level keys this copy changed since it was read are applied to
        the namespace as stored now, so changes made meanwhile by requests to
        other keys survive. Retries on a concurrent write.
        """
        sql = self.sql
        if sql is None:
            return
        with session.lock:
            if name not in session:
                return
            text = self._serialise(sid, session, name, session[name])
            base_text, _ = session.baseline.get(name, (UNSERIALISABLE, None))
            if text == base_text:
                return
            mine = json.loads(text)
            base = json.loads(base_text) if base_text != UNSERIALISABLE else None
            for _attempt in range(20):
                with sql.transaction() as conn:
                    current = sql.read_namespace(conn, sid, name)
                    if current is None:
                        write = NamespaceWrite(name, text, None)
                    else:
                        merged = _merge(current[0], base, mine)
                        write = NamespaceWrite(name, encode(merged), current[1])
                    try:
                        versions = sql.write(sid, [write], self.clock(), touch=False, conn=conn)
                    except StateConflict:
                        continue
                session.baseline[name] = (text, versions[0])
                return
            raise StateConflict(sid, name)

    @contextmanager
    def transaction(self, sid: str) -> Iterator[dict[str, Any]]:
        """Load, change and save session *sid* in one transaction, with it locked.

        For code outside a request (threads, scripts, the CLI)::

            with store.transaction(sid) as session:
                session["cart"]["items"].append(item)

        The session is created if missing. Other writers of the same session
        wait for the block; an exception inside it discards every change.
        """
        sql = self.sql
        if sql is None:
            with self._lock:
                session = self._get_memory(sid)
                yield session
                self.storage.set_session(sid, session)
            return
        now = self.clock()
        with sql.locked(sid, now) as (conn, created):
            loaded = sql.load(sid, conn)
            assert loaded is not None
            built = self._build(sid, loaded)
            yield built
            with built.lock:
                writes = self._changes(sid, built)
                if writes:
                    self._written(
                        built, writes, sql.write(sid, writes, now, touch=False, conn=conn)
                    )
        if created:
            self._fire(self._on_create_cbs, sid)

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
        now = self.clock()
        if sql.has_running_task(sid, now - self.heartbeat_timeout):
            raise SessionBusy(sid)
        current = self._session_for_check(sid)
        if current is None:
            return
        if self._busy_check and self._busy_check(sid, current):
            raise SessionBusy(sid)
        fresh = {
            name: self._serialise(sid, None, name, factory())
            for name, factory in self._factories.items()
        }
        sql.replace_namespaces(sid, fresh, now)

    def destroy(self, sid: str) -> None:
        """Remove session *sid* without remembering it as expired."""
        with self._lock:
            self.storage.delete_session(sid)

    # -- expiry --------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Expire idle sessions, prune old expired-SID records; return expired SIDs."""
        if self.sql is None:
            return self._cleanup_memory()
        return self.sweep().expired

    def sweep(
        self,
        *,
        batch_size: int | None = None,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> SweepResult:
        """One expiry sweep over SQL storage, in batches of *batch_size* sessions.

        Each batch is one short transaction; ``on_expire`` fires once per SID
        after its batch commits. *progress* gets the running count of expired
        (or, with *dry_run*, expirable) sessions after each batch.
        """
        sql = self.sql
        assert sql is not None, "sweep() needs SQL storage; use cleanup()"
        now = self.clock()
        done = 0

        def after_batch(sids: list[str]) -> None:
            nonlocal done
            done += len(sids)
            if not dry_run:
                for sid in sids:
                    self._fire(self._on_expire_cbs, sid)
            if progress is not None:
                progress(done)

        result = sql.sweep(
            now=now,
            cutoff=now - self.ttl - self.touch_interval,
            heartbeat_cutoff=now - self.heartbeat_timeout,
            batch_size=batch_size or self.sweep_batch_size,
            is_busy=self._busy_sids if self._busy_check else None,
            on_batch=after_batch,
            dry_run=dry_run,
        )
        if not dry_run:
            result.pruned = sql.prune_expired_count(self.expired_retain, now=now)
        return result

    def _busy_sids(self, sids: list[str]) -> set[str]:
        check = self._busy_check
        assert check is not None
        assert self.sql is not None
        busy: set[str] = set()
        for sid in sids:
            session = self._session_for_check(sid)
            if session is not None and self._vetoes(check, sid, session):
                busy.add(sid)
        return busy

    def _session_for_check(self, sid: str) -> Session | None:
        """An SQL session as a busy check sees it: with every registered namespace."""
        assert self.sql is not None
        loaded = self.sql.load(sid)
        return None if loaded is None else self._build(sid, loaded)

    def _vetoes(self, check: Callable[[str, dict[str, Any]], bool], sid: str, session: Any) -> bool:
        self._checking.active = True
        try:
            return bool(check(sid, session))
        except Exception:
            logger.exception("busy check failed for session %s; treating it as busy", sid)
            return True
        finally:
            self._checking.active = False

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
            if not getattr(self._checking, "active", False):  # a busy check is no activity
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


def _merge(current: Any, base: Any, mine: Any) -> Any:
    """Apply the top-level keys *mine* changed relative to *base* onto *current*."""
    if not (isinstance(current, dict) and isinstance(base, dict) and isinstance(mine, dict)):
        return mine
    merged = dict(current)
    for key, value in mine.items():
        if key not in base or base[key] != value:
            merged[key] = value
    for key in base:
        if key not in mine:
            merged.pop(key, None)
    return merged
