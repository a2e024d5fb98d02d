"""SessionStore: namespaces, TTL, expired-SID memory and lifecycle callbacks.

The API is flask-silo 0.1.6's. The store keeps the registry (namespaces and
their factories, the busy check, the ``on_create``/``on_expire`` callbacks)
and the settings, and delegates the sessions to a backend
(:mod:`flask_silo_sql.backends`): over :class:`~flask_silo_sql.storage.InMemoryStorage`
(the default) or any flask-silo storage it behaves as the original, minus its
deadlock when a busy check reads the store; over
:class:`~flask_silo_sql.sql.SQLStorage` a request loads what it reads and
writes only the namespaces whose JSON changed, each guarded by its version.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .backends import Backend, SweepResult, Unit, backend_for
from .config import SiloConfig
from .errors import NamespaceError, SiloError
from .instruments.seams import observed_sweep
from .keys import SessionKey, session_key
from .logs import log_failure, silo_logger
from .sealing import Sealer
from .sids import new_sid, tag
from .storage import InMemoryStorage, SiloStorage
from .tasks.spec import TaskSpec

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

logger = silo_logger("flask_silo_sql")

META = "_meta"
T = TypeVar("T")


class Registry:
    """What a store knows of the application: namespaces, busy check, callbacks.

    Shared by the stores a :class:`~flask_silo_sql.Silo` makes for its apps.
    """

    def __init__(self) -> None:
        self.factories: dict[str, Callable[[], dict[str, Any]]] = {}
        self.busy_check: Callable[[str, dict[str, Any]], bool] | None = None
        self.on_create: list[Callable[[str], None]] = []
        self.on_expire: list[Callable[[str], None]] = []
        self.on_rotate: list[Callable[[str, str], Callable[[], None]]] = []
        """``mover(old, new) -> undo``: what else a rotation moves (file directories)."""
        self.after_sweep: list[Callable[[], None]] = []
        """Called after each sweep that changes things (the file stores' upkeep)."""
        self.encrypted: set[str] = set()
        """The namespaces stored encrypted (``register(..., encrypted=True)``)."""
        self.tasks: dict[str, TaskSpec] = {}
        """The registered task functions (``@silo.task``), by name."""

    def add_task(self, spec: TaskSpec) -> None:
        """Register a task function; a second function under a name already taken is refused
        (the same function registered again, say by a module imported twice, replaces it)."""
        known = self.tasks.get(spec.name)
        if known is not None and _origin(known.fn) != _origin(spec.fn):
            raise ValueError(
                f"a task named {spec.name!r} is already registered ({_origin(known.fn)}): "
                "give this one another name, @silo.task(name=...)"
            )
        self.tasks[spec.name] = spec


def undoable(actions: Iterable[Callable[[], Callable[[], None]]]) -> Callable[[], None]:
    """Run each action, which returns its undo; when one fails, undo those done and raise.

    Returns the undo of them all (last done, first undone).
    """
    undos: list[Callable[[], None]] = []
    try:
        for action in actions:
            undos.append(action())
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def _origin(fn: Callable[..., Any]) -> str:
    module = str(getattr(fn, "__module__", "")).rsplit(".", 1)[-1]
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


class HostHold(Protocol):
    """A hold on the host session's transaction (the SQL storage's ``join(host)`` gives one)."""

    done: bool

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class Setting(Generic[T]):
    """A store attribute that reads, and writes, one field of the store's settings: the
    settings stay one object, not copies kept in step."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, store: SessionStore, owner: type | None = None) -> T:
        value: T = getattr(store.settings, self.field)
        return value

    def __set__(self, store: SessionStore, value: T) -> None:
        changed: dict[str, Any] = {self.field: value}
        store.settings = dataclasses.replace(store.settings, **changed)


class SessionStore:
    """Per-client state with TTL expiry, over any :class:`SiloStorage`.

    ``clock`` (seconds, like :func:`time.time`) replaces the storage's clock
    (the database's, on SQL), for tests. ``touch_interval`` bounds how often
    ``last_active`` is written on SQL storage (default ``min(60, ttl / 20)``
    seconds, 0 in memory); expiry waits that much longer, so a session is
    never expired before ``ttl`` idle seconds.
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
        registry: Registry | None = None,
    ) -> None:
        self.ttl = ttl
        self.cleanup_interval = cleanup_interval
        self.expired_retain = expired_retain
        self.settings = dataclasses.replace(
            SiloConfig.from_mapping({}, environ={}),
            touch_interval=touch_interval,
            max_state_bytes=max_state_bytes,
            task_heartbeat_timeout=heartbeat_timeout,
            sweep_batch_size=sweep_batch_size,
        )
        """The app's ``SILO_*`` settings, read once by ``init_app`` (the defaults, and the
        constructor's arguments, for a store made on its own): the one place the store's
        behaviour is read from."""
        self.sealer: Sealer | None = None
        """Seals the encrypted namespaces (made from ``SILO_ENCRYPTION_KEYS``)."""
        self._clock = clock
        self._sid_gen = sid_generator or new_sid
        self._registry = registry or Registry()
        self._checking = threading.local()  # .active while a busy check runs in this thread
        self._storage: SiloStorage = storage if storage is not None else InMemoryStorage()
        self._backend: Backend = backend_for(self._storage, self)

    # -- configuration -------------------------------------------------------

    @property
    def storage(self) -> SiloStorage:
        """The storage the sessions live in."""
        return self._storage

    @storage.setter
    def storage(self, storage: SiloStorage) -> None:
        self._storage = storage
        self._backend = backend_for(storage, self)

    @property
    def backend(self) -> Backend:
        """What the store delegates the sessions to."""
        return self._backend

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def clock(self) -> Callable[[], float] | None:
        """The injected clock, or None (the storage's: the database's on SQL)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float] | None) -> None:
        self._clock = clock

    def now(self) -> float:
        """Unix seconds by the store's clock."""
        return self._backend.now()

    @property
    def touch_interval(self) -> float:
        """Seconds between ``last_active`` writes for one session."""
        return self._backend.touch_interval

    @touch_interval.setter
    def touch_interval(self, value: float | None) -> None:
        self.settings = dataclasses.replace(self.settings, touch_interval=value)

    def touch_interval_for(self, default: float) -> float:
        chosen = self.settings.touch_interval
        return default if chosen is None else chosen

    # -- settings, read from :attr:`settings` ---------------------------------------------

    max_state_bytes = Setting[int | None]("max_state_bytes")
    """Largest JSON of one namespace (``SILO_MAX_STATE_BYTES``)."""
    heartbeat_timeout = Setting[float]("task_heartbeat_timeout")
    """Seconds without a heartbeat before a run counts as lost."""
    sweep_batch_size = Setting[int]("sweep_batch_size")
    session_max_age = Setting[float | None]("session_max_age")
    """Absolute lifetime of every session, from its creation (``SILO_SESSION_MAX_AGE``)."""
    task_flush_interval = Setting[float]("task_flush_interval")
    """Seconds between writes of a running task's progress (coalescing)."""
    task_max_logs = Setting[int]("task_max_logs")
    """Log lines a linked task keeps (the newest)."""
    task_runner = Setting[str]("task_runner")
    """Where durable runs run: ``thread`` (the starting process) or ``worker``."""
    task_retries = Setting[int]("task_retries")
    """Retries of a registered task that names none."""
    task_retry_delay = Setting[float]("task_retry_delay")
    """Seconds before a registered task's first retry (doubling), unless it names one."""
    event_retention = Setting[float]("event_retention")
    """Seconds a session's events are kept for replay (the sweep prunes older ones)."""

    @property
    def db_min_free_bytes(self) -> int | None:
        """SQLite: state writes that grow a session are refused (``507``) while the
        database's disk has less free space than this (``SILO_DB_MIN_FREE_BYTES``; unset:
        half the uploads' floor, so state goes on once uploads stop)."""
        floor = self.settings.db_min_free_bytes
        if floor is None:
            floor = (self.settings.min_free_bytes or 0) // 2
        return floor or None

    @property
    def factories(self) -> Mapping[str, Callable[[], dict[str, Any]]]:
        return self._registry.factories

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        return self._registry.tasks

    @property
    def namespaces(self) -> list[str]:
        """Registered namespace names."""
        return list(self._registry.factories)

    def register_namespace(
        self, name: str, factory: Callable[[], dict[str, Any]], *, encrypted: bool = False
    ) -> None:
        """Register namespace *name*, whose default state *factory* returns.

        *encrypted*: stored sealed under the keys of :attr:`sealer` (SQL storage).
        """
        if not isinstance(name, str) or not name or name == META:
            raise ValueError(f"invalid namespace name {name!r}")
        if not callable(factory):
            raise TypeError(f"the factory of namespace {name!r} must be callable")
        self._registry.factories[name] = factory
        if encrypted:
            self._registry.encrypted.add(name)
        else:
            self._registry.encrypted.discard(name)

    @property
    def encrypted(self) -> frozenset[str]:
        """The namespaces registered as encrypted."""
        return frozenset(self._registry.encrypted)

    def sealer_for(self, namespace: str) -> Sealer | None:
        """The sealer of *namespace* if it is encrypted (None for a plain one)."""
        if namespace not in self._registry.encrypted:
            return None
        if self.sealer is None:
            raise SiloError(
                f"namespace {namespace!r} is registered as encrypted, but no keys are set: "
                "set SILO_ENCRYPTION_KEYS (or the store's sealer)"
            )
        return self.sealer

    def set_busy_check(self, predicate: Callable[[str, dict[str, Any]], bool]) -> None:
        """``predicate(sid, session) -> True`` keeps a session from expiry and reset.

        It is called outside any lock or transaction, so it may read the store.
        """
        self._registry.busy_check = predicate

    def on_expire(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(key)`` once per expired session, after the commit (*key*: the
        session's key at rest, :func:`~flask_silo_sql.session_key`; every method takes it)."""
        self._registry.on_expire.append(callback)

    def on_create(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(key)`` once per created session, after the commit (its key at
        rest, as ``on_expire`` gets it)."""
        self._registry.on_create.append(callback)

    def generate_sid(self) -> str:
        """A new SID from the configured generator (by default :func:`new_sid`)."""
        return self._sid_gen()

    # -- the backend's policy ------------------------------------------------------

    @property
    def has_busy_check(self) -> bool:
        return self._registry.busy_check is not None

    def vetoes(self, sid: str, session: dict[str, Any]) -> bool:
        """The busy check's verdict; one that raises counts as busy (and is logged)."""
        check = self._registry.busy_check
        if check is None:
            return False
        self._checking.active = True
        try:
            return bool(check(SessionKey(sid), session))
        except Exception as exc:
            log_failure(
                logger,
                "busy check failed for session %s; treating it as busy",
                tag(sid),
                exc=exc,
                sid=sid,
            )
            return True
        finally:
            self._checking.active = False

    def created(self, sid: str) -> None:
        self._fire(self._registry.on_create, SessionKey(sid))

    def expired(self, sid: str) -> None:
        self._fire(self._registry.on_expire, SessionKey(sid))

    @staticmethod
    def _fire(callbacks: list[Callable[[str], None]], sid: str) -> None:
        for callback in callbacks:
            try:
                callback(sid)
            except Exception as exc:
                log_failure(
                    logger,
                    "silo callback %r failed for session %s",
                    callback,
                    tag(sid),
                    exc=exc,
                    sid=sid,
                )

    # -- reading -------------------------------------------------------------

    def get(self, sid: str) -> dict[str, Any]:
        """The session *sid*, created (and ``on_create`` fired) when missing.

        Inside a busy check it is read as it is: nothing created, nothing touched.
        """
        if getattr(self._checking, "active", False):
            return self._backend.peek(session_key(sid))
        return self._backend.get(session_key(sid))

    def get_namespace(self, sid: str, namespace: str) -> dict[str, Any]:
        """The state of one registered namespace of session *sid*."""
        if namespace not in self._registry.factories:
            raise NamespaceError(namespace)
        value: dict[str, Any] = self.get(sid)[namespace]
        return value

    def touch(self, sid: str) -> None:
        """Mark *sid* active now, without creating it."""
        self._backend.touch(session_key(sid))

    def exists(self, sid: str) -> bool:
        """Whether *sid* is a live session."""
        return self._backend.exists(session_key(sid))

    def is_expired(self, sid: str) -> bool:
        """Whether *sid* expired and is still remembered (for ``410 Gone``)."""
        return self._backend.is_expired(session_key(sid))

    # -- units of work -------------------------------------------------------------

    def unit(self, sid: str, *, locking: bool = False) -> Unit:
        """A unit of work on *sid*: lazy reads, then one commit."""
        return self._backend.unit(session_key(sid), locking=locking)

    def request(self, sid: str, *, locking: bool = False, issued: bool = False) -> Unit:
        """The unit of the current request (its context shares one connection)."""
        return self._backend.request(session_key(sid), locking=locking, issued=issued)

    @contextmanager
    def transaction(self, sid: str, *, host: Session | None = None) -> Iterator[dict[str, Any]]:
        """Load, change and save session *sid* in one transaction, with it locked.

        For code outside a request (threads, scripts, the CLI)::

            with store.transaction(sid) as session:
                session["cart"]["items"].append(item)

        The session is created if missing. Other writers of the same session
        wait for the block; an exception inside it discards every change.

        With *host* (a SQLAlchemy ``Session`` of the host's, on silo's database),
        the block is one transaction with that session: what it adds and what the
        block changes in *sid* are committed together by one COMMIT at the end
        (``host.commit()`` inside the block only flushes), or both rolled back.
        """
        if host is None:
            unit = self.unit(sid, locking=True)
            try:
                yield unit.session()
                unit.commit()
            finally:
                unit.close()
            return
        with self._joined(host) as hold:
            unit = self.unit(sid, locking=True)
            try:
                yield unit.session()
                unit.commit()
            except BaseException:
                hold.rollback()
                raise
            finally:
                unit.close()
            hold.commit()

    @contextmanager
    def _joined(self, host: Session) -> Iterator[HostHold]:
        """This context's silo statements in *host*'s transaction, for the block."""
        storage = self.storage
        join = getattr(storage, "join", None)
        connector = getattr(storage, "connector", None)
        if join is None or connector is None:
            raise SiloError("transaction(sid, host=...) needs SQL storage (SQLStorage)")
        if connector.holding:
            raise RuntimeError(
                "transaction(sid, host=...) inside a request: the request has its own "
                "connection (in atomic mode its work is in the host's transaction already); "
                "use it outside requests (threads, scripts, the CLI)"
            )
        token = connector.hold()
        try:
            hold: HostHold = join(host)
            try:
                yield hold
            finally:
                if not hold.done:  # the block was left early (a generator closed)
                    hold.rollback()
        finally:
            connector.release(token)

    # -- writing -------------------------------------------------------------

    def save(self, sid: str, session: dict[str, Any]) -> None:
        """Persist *session*: on SQL, only the namespaces whose JSON changed.

        Raises :class:`StateNotSerializable` (nothing written) for non-JSON
        state, :class:`StateConflict` when another writer changed a namespace
        since it was read, and :class:`SessionExpired` when the session was
        expired meanwhile (it is not recreated).
        """
        self._backend.save(session_key(sid), session)

    def reset(self, sid: str) -> None:
        """Give every namespace of *sid* fresh factory state (SessionBusy if busy)."""
        self._backend.reset(session_key(sid))

    def destroy(self, sid: str) -> None:
        """Remove session *sid* without remembering it as expired."""
        self._backend.destroy(session_key(sid))

    def rotate(self, old: str, new: str | None = None, *, renew: bool = False) -> str:
        """Give the client of session *old* a new SID (returned), against session fixation.

        Its namespaces, tasks and files move to the new SID in one transaction
        (the file stores' directories with it); the old SID reaches nothing any
        more and is remembered as expired. A session that does not exist has
        nothing to move: the new SID is returned all the same. The session keeps
        its absolute lifetime (``SILO_SESSION_MAX_AGE``) unless *renew*: then it
        starts again now (a rotation after a login).
        """
        new = new or self.generate_sid()
        movers = list(self._registry.on_rotate)

        old_key, new_key = session_key(old), session_key(new)

        def before_commit() -> Callable[[], None]:
            return undoable(functools.partial(mover, old_key, new_key) for mover in movers)

        self._backend.rotate(old_key, new_key, before_commit, renew=renew)
        return new

    # -- expiry --------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Expire idle sessions, prune old expired-SID records; return the expired keys."""
        return self.sweep().expired

    @observed_sweep
    def sweep(
        self,
        *,
        batch_size: int | None = None,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> SweepResult:
        """One expiry sweep, in batches of *batch_size* sessions (SQL).

        Each batch is one short transaction; ``on_expire`` fires once per SID
        after its batch commits. *progress* gets the running count of expired
        (or, with *dry_run*, expirable) sessions after each batch.
        """
        result = self._backend.sweep(
            batch_size=batch_size or self.sweep_batch_size, dry_run=dry_run, progress=progress
        )
        result.expired = [SessionKey(key) for key in result.expired]  # keys, as stored
        if not dry_run:
            for upkeep in list(self._registry.after_sweep):
                try:
                    upkeep()
                except Exception:
                    logger.exception("error after a sweep")
        return result

    # -- introspection -------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Number of live sessions."""
        return self._backend.active_count()

    @property
    def expired_count(self) -> int:
        """Number of remembered expired SIDs."""
        return self._backend.expired_count()

    @property
    def all_sids(self) -> list[str]:
        """The key of every live session (a snapshot; every method takes a key as a SID)."""
        return [SessionKey(key) for key in self._backend.all_sids()]
