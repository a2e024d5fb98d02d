"""The SQL backend of :class:`~flask_silo_sql.store.SessionStore`.

It implements :class:`~flask_silo_sql.backends.base.Backend` with the
operations of :mod:`.sessions`, :mod:`.sweep`, :mod:`.task_rows` and
:mod:`.file_rows`, every one through the storage's
:class:`~flask_silo_sql.sql.executor.Connector`. A request's unit is bound to
its context, so uploads and task starts of that request join its commit.
"""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING, Any

from ..backends.base import Policy, SweepResult
from ..codec import serialise
from ..errors import SessionBusy
from . import sessions as ops
from . import sweep as sweeping
from .file_rows import SQLFileRecords
from .statements import Statements
from .task_rows import SQLTaskHome, running_in_session
from .unit import META, Session, Slot, SQLUnit, busy_session, save_merged

if TYPE_CHECKING:
    from .executor import Connector
    from .storage import SQLStorage

logger = logging.getLogger("flask_silo_sql")


class _Bound:
    """A request's unit and the token of the connection it holds."""

    __slots__ = ("token", "unit")

    def __init__(self, unit: SQLUnit, token: contextvars.Token[Any]) -> None:
        self.unit = unit
        self.token = token


class SQLBackend:
    """Sessions in SQL tables for one store (see the module docstring)."""

    def __init__(self, storage: SQLStorage, policy: Policy) -> None:
        self.storage = storage
        self.policy = policy
        self._bound: contextvars.ContextVar[_Bound | None] = contextvars.ContextVar(
            f"silo_unit_{id(self):x}", default=None
        )
        self._file_records: dict[str, SQLFileRecords] = {}

    @property
    def connector(self) -> Connector:
        return self.storage.connector

    @property
    def st(self) -> Statements:
        return self.storage.statements

    # -- time ------------------------------------------------------------------

    def now(self) -> float:
        clock = self.policy.clock
        return clock() if clock is not None else self.storage.clock()

    @property
    def touch_interval(self) -> float:
        return self.policy.touch_interval_for(min(60.0, self.policy.ttl / 20))

    def times(self, now: float, *, since: float | None = None) -> ops.Times:
        """The times a write at *now* records (the session expires ttl + touch interval on)."""
        lifetime = self.policy.ttl + self.touch_interval
        return ops.Times(now, now + lifetime, now if since is None else since)

    # -- units -----------------------------------------------------------------

    def unit(self, sid: str, *, locking: bool = False) -> SQLUnit:
        return SQLUnit(self, sid, locking=locking)

    def request(self, sid: str, *, locking: bool = False) -> SQLUnit:
        token = self.connector.hold()
        try:
            unit = SQLUnit(self, sid, locking=locking)
        except BaseException:
            self.connector.release(token)
            raise
        self._bound.set(_Bound(unit, token))
        return unit

    def unbind(self, unit: SQLUnit) -> None:
        """End a request's unit: give its connection back."""
        bound = self._bound.get()
        if bound is not None and bound.unit is unit:
            self._bound.set(None)
            self.connector.release(bound.token)

    def current_unit(self, sid: str) -> SQLUnit | None:
        """The unit of this context's request, if it works on *sid*."""
        bound = self._bound.get()
        return bound.unit if bound is not None and bound.unit.sid == sid else None

    def task_home(self, sid: str, task_id: str, slot: Slot | None) -> SQLTaskHome:
        return SQLTaskHome(self, sid, task_id, slot)

    def save_merged(self, sid: str, slot: Slot) -> None:
        save_merged(self, sid, slot)

    def file_rows(self, store: str) -> SQLFileRecords:
        records = self._file_records.get(store)
        if records is None:
            records = self._file_records[store] = SQLFileRecords(self, store)
        return records

    def file_records(self, store: str) -> SQLFileRecords:
        return self.file_rows(store)

    # -- flask-silo's store operations --------------------------------------------

    def get(self, sid: str) -> dict[str, Any]:
        unit = self.unit(sid)
        session = unit.session()
        unit.touch()
        return session

    def peek(self, sid: str) -> dict[str, Any]:
        return self.unit(sid).session()

    def save(self, sid: str, session: dict[str, Any]) -> None:
        if isinstance(session, Session) and session.unit.sid == sid:
            session.unit.commit()
            return
        self.replace(sid, session)

    def replace(self, sid: str, session: dict[str, Any]) -> None:
        """Store *session* (a plain dict of namespaces) as the whole of *sid*."""
        max_bytes = self.policy.max_state_bytes
        fresh = {
            name: serialise(name, value, max_bytes)
            for name, value in session.items()
            if name != META
        }
        now = self.now()
        with self.connector.transaction() as ex:
            created, _ = ops.lock(ex, self.st, sid, self.times(now), existed=None)
            ops.replace_namespaces(ex, self.st, sid, fresh, now)
        if created:
            self.policy.created(sid)

    def touch(self, sid: str) -> None:
        now = self.now()
        with self.connector.executor() as ex:
            ops.touch_stale(ex, self.st, sid, self.times(now), now + 1.0)

    def exists(self, sid: str) -> bool:
        with self.connector.executor() as ex:
            return ex.run(self.st.has_session, {"sid": sid}).first() is not None

    def is_expired(self, sid: str) -> bool:
        with self.connector.executor() as ex:
            return ex.run(self.st.is_expired, {"sid": sid}).first() is not None

    def destroy(self, sid: str) -> None:
        with self.connector.executor() as ex:
            ops.delete_sessions(ex, self.st, [sid])

    def reset(self, sid: str) -> None:
        """Every namespace of *sid* back to its factory's state, its tasks forgotten.

        Refused (:class:`SessionBusy`) while a task runs or the busy check vetoes.
        """
        policy = self.policy
        with self.connector.executor() as ex:
            if running_in_session(ex, self.st, sid, self.now(), policy):
                raise SessionBusy(sid)
        if policy.has_busy_check:
            current = busy_session(self, sid)
            if current is None:
                return
            if policy.vetoes(sid, current):
                raise SessionBusy(sid)
        scratch = self.unit(sid)
        fresh = {
            name: serialise(name, scratch.fresh(name).value, policy.max_state_bytes)
            for name in policy.factories
        }
        now = self.now()
        times = self.times(now)
        v = self.st.values
        with self.connector.transaction() as ex:
            stamp = {"sid": sid, "now": v.time(times.now), "expires": v.time(times.expires)}
            if ex.run(self.st.touch, stamp).first() is None:
                return  # no such session: nothing to reset
            ex.run(self.st.delete_session_tasks, {"sid": sid})
            ops.replace_namespaces(ex, self.st, sid, fresh, now)

    # -- expiry ------------------------------------------------------------------

    def sweep(self, *, batch_size: int, dry_run: bool, progress: Any) -> SweepResult:
        policy = self.policy
        now = self.now()
        done = 0

        def after_batch(sids: list[str]) -> None:
            nonlocal done
            done += len(sids)
            if not dry_run:
                for sid in sids:
                    policy.expired(sid)
            if progress is not None:
                progress(done)

        result = sweeping.sweep(
            self.connector,
            self.st,
            now=now,
            heartbeat_cutoff=now - policy.heartbeat_timeout,
            batch_size=batch_size,
            is_busy=self._busy_sids if policy.has_busy_check else None,
            on_batch=after_batch,
            dry_run=dry_run,
        )
        if not dry_run:
            result.pruned = sweeping.prune(
                self.connector, self.st, cutoff=now - policy.expired_retain
            )
        return result

    def _busy_sids(self, sids: list[str]) -> set[str]:
        busy: set[str] = set()
        for sid in sids:
            session = busy_session(self, sid)
            if session is not None and self.policy.vetoes(sid, session):
                busy.add(sid)
        return busy

    # -- counts ------------------------------------------------------------------

    def active_count(self) -> int:
        return self.storage.session_count()

    def expired_count(self) -> int:
        return self.storage.expired_count()

    def all_sids(self) -> list[str]:
        return self.storage.all_sids()
