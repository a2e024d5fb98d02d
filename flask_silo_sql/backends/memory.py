"""The memory backend: flask-silo's semantics over any :class:`~flask_silo_sql.storage.SiloStorage`.

Sessions are dicts of namespaces plus ``_meta`` (``created_at``,
``last_active``), as flask-silo keeps them; with :class:`InMemoryStorage`
``get`` returns the stored dict itself. What is not copied from flask-silo is
its deadlock: the busy check is called outside the store's lock, so it may
read the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import IdempotencyUnsupported, NamespaceError, SessionBusy
from ..files.unrecorded import UNRECORDED, Unrecorded
from ..storage import InMemoryStorage, SiloStorage
from ..tasks.local import LocalQueue
from .base import Policy, SweepResult

META = "_meta"


class MemoryBackend:
    """Sessions in a flask-silo ``SiloStorage`` (see the module docstring)."""

    def __init__(self, storage: SiloStorage, policy: Policy) -> None:
        self.storage = storage
        self.policy = policy
        self.lock = threading.RLock()

    def now(self) -> float:
        clock = self.policy.clock
        return clock() if clock is not None else time.time()

    @property
    def touch_interval(self) -> float:
        return self.policy.touch_interval_for(0.0)

    def _over(self, session: dict[str, Any], now: float) -> bool:
        """Whether *session* is past its absolute lifetime (``SILO_SESSION_MAX_AGE``)."""
        max_age = self.policy.session_max_age
        return max_age is not None and now - session[META]["created_at"] >= max_age

    def end_if_over(self, sid: str) -> bool:
        """End *sid* if past its absolute lifetime (remembered as expired); whether it was."""
        now = self.now()
        with self.lock:
            session = self.storage.get_session(sid)
            if session is None or not self._over(session, now):
                return False
            self.storage.delete_session(sid)
            self.storage.mark_expired(sid, now)
        self.policy.expired(sid)
        return True

    def _fresh(self, sid: str) -> dict[str, Any]:
        now = self.now()
        session: dict[str, Any] = {ns: f() for ns, f in self.policy.factories.items()}
        session[META] = {"created_at": now, "last_active": now, "sid": sid}
        return session

    # -- units -----------------------------------------------------------------

    def unit(self, sid: str, *, locking: bool = False) -> MemoryUnit:
        return MemoryUnit(self, sid, locking=locking)

    def request(self, sid: str, *, locking: bool = False, issued: bool = False) -> MemoryUnit:
        return MemoryUnit(self, sid, locking=locking)

    # -- flask-silo's store operations --------------------------------------------

    def get(self, sid: str) -> dict[str, Any]:
        self.end_if_over(sid)
        with self.lock:
            session = self.storage.get_session(sid)
            created = session is None
            if session is None:
                session = self._fresh(sid)
                self.storage.clear_expired(sid)
            for ns, factory in self.policy.factories.items():
                if ns not in session:
                    session[ns] = factory()
            session[META]["last_active"] = self.now()
            self.storage.set_session(sid, session)
        if created:
            self.policy.created(sid)
        return session

    def peek(self, sid: str) -> dict[str, Any]:
        with self.lock:
            session = self.storage.get_session(sid)
        return session if session is not None else self._fresh(sid)

    def save(self, sid: str, session: dict[str, Any]) -> None:
        with self.lock:
            self.storage.set_session(sid, session)

    def touch(self, sid: str) -> None:
        with self.lock:
            session = self.storage.get_session(sid)
            if session is not None:
                session[META]["last_active"] = self.now()
                self.storage.set_session(sid, session)

    def exists(self, sid: str) -> bool:
        with self.lock:
            return self.storage.has_session(sid)

    def is_expired(self, sid: str) -> bool:
        with self.lock:
            return self.storage.is_expired(sid)

    def destroy(self, sid: str) -> None:
        with self.lock:
            self.storage.delete_session(sid)

    def reset(self, sid: str) -> None:
        with self.lock:
            current = self.storage.get_session(sid)
        if current is None:
            return
        if self.policy.has_busy_check and self.policy.vetoes(sid, current):
            raise SessionBusy(sid)
        with self.lock:
            self.storage.set_session(sid, self._fresh(sid))

    def rotate(
        self,
        old: str,
        new: str,
        before_commit: Callable[[], Callable[[], None]],
        *,
        renew: bool = False,
    ) -> bool:
        with self.lock:
            session = self.storage.get_session(old)
            if session is None:
                return False
            undo = before_commit()
            try:
                session.setdefault(META, {})["sid"] = new
                if renew:
                    session[META]["created_at"] = self.now()
                self.storage.set_session(new, session)
                self.storage.delete_session(old)
                self.storage.mark_expired(old, self.now())
            except BaseException:
                undo()
                raise
        return True

    def sweep(
        self, *, batch_size: int, dry_run: bool, progress: Callable[[int], None] | None
    ) -> SweepResult:
        now = self.now()
        ttl = self.policy.ttl
        with self.lock:
            stale = [
                (sid, session)
                for sid, session in self.storage.all_sessions()
                if now - session[META]["last_active"] > ttl or self._over(session, now)
            ]
        result = SweepResult(batches=1 if stale else 0)
        for sid, session in stale:
            if self.policy.has_busy_check and self.policy.vetoes(sid, session):
                result.skipped_busy += 1
                continue
            if dry_run:
                result.expired.append(sid)
                continue
            with self.lock:
                current = self.storage.get_session(sid)
                if current is None or (
                    now - current[META]["last_active"] <= ttl and not self._over(current, now)
                ):
                    continue  # touched (or removed) while the busy check ran
                self.storage.delete_session(sid)
                self.storage.mark_expired(sid, now)
            result.expired.append(sid)
        if progress is not None and result.expired:
            progress(len(result.expired))
        if not dry_run:
            for sid in result.expired:
                self.policy.expired(sid)
            with self.lock:
                before = self.storage.expired_count()
                storage = self.storage
                if isinstance(storage, InMemoryStorage):
                    storage.prune_expired(self.policy.expired_retain, now=now)
                else:
                    storage.prune_expired(self.policy.expired_retain)
                result.pruned = max(0, before - self.storage.expired_count())
        return result

    def active_count(self) -> int:
        with self.lock:
            return self.storage.session_count()

    def expired_count(self) -> int:
        with self.lock:
            return self.storage.expired_count()

    def all_sids(self) -> list[str]:
        with self.lock:
            return self.storage.all_sids()

    def file_records(self, store: str) -> Unrecorded:
        """No tables: each file store keeps its files on disk only (flask-silo's way)."""
        return UNRECORDED

    def task_queue(self) -> LocalQueue:
        """No tables: every run lives in the process that started it (flask-silo's way)."""
        return LocalQueue()

    def idempotency_records(self) -> NoReturn:
        """No tables: ``@silo.idempotent`` answers ``IdempotencyUnsupported`` here. Keys kept
        in one process's memory would protect nothing across workers or restarts."""
        raise IdempotencyUnsupported()


class MemoryUnit:
    """A request on a memory backend: flask-silo's ``get`` on first use, ``save`` at the end."""

    def __init__(self, backend: MemoryBackend, sid: str, *, locking: bool = False) -> None:
        self.sid = sid
        self._b = backend
        self._session: dict[str, Any] | None = None
        self._locking = locking
        self._locked = False

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def expired(self) -> bool:
        return self._b.end_if_over(self.sid) or self._b.is_expired(self.sid)

    def namespace(self, name: str) -> dict[str, Any]:
        session = self.session()
        if name not in session:
            raise NamespaceError(name)
        value: dict[str, Any] = session[name]
        return value

    def session(self) -> dict[str, Any]:
        if self._locking and not self._locked:
            self.lock()
        if self._session is None:
            self._session = self._b.get(self.sid)
        return self._session

    def lock(self) -> None:
        """Hold the store's lock until the unit ends: this process's requests run one by one."""
        if not self._locked:
            self._b.lock.acquire()
            self._locked = True

    def commit(self, *, state: bool = True, files: bool = True) -> None:
        if self._session is None:
            if state:
                self._b.get(self.sid)  # every API request is activity, as in flask-silo
        elif state:
            self._b.save(self.sid, self._session)
        self._unlock()

    def rollback(self) -> None:
        self._unlock()

    def reset(self) -> None:
        self._b.reset(self.sid)
        self._session = None

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            self._b.lock.release()

    def close(self) -> None:
        self._unlock()
