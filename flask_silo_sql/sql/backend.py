"""The SQL backend of :class:`~flask_silo_sql.store.SessionStore`.

It implements :class:`~flask_silo_sql.backends.base.Backend` with the units
of :mod:`.unit` and the operations of :mod:`.sessions`, :mod:`.sweep`,
:mod:`.task_rows`, :mod:`.file_rows` and :mod:`.idempotency_rows`, all sharing
one :class:`.Context`.
A request's unit is bound to its context, so uploads and task starts of that
request join its commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends.base import SweepResult
from ..codec import serialise
from ..errors import StateUnreadable, StorageUnavailable
from ..logs import silo_logger
from . import event_rows
from . import sessions as ops
from . import sweep as sweeping
from .context import Context
from .disk import RESERVE_BYTES, is_disk_full
from .file_rows import SQLFileRecords
from .idempotency_rows import SQLIdempotencyRecords
from .task_queue import SQLTaskQueue
from .unit import META, Session, SQLUnit, busy_session, reset, rotate

logger = silo_logger("flask_silo_sql")


class SQLBackend:
    """Sessions in SQL tables for one store (see the module docstring)."""

    def __init__(self, context: Callable[[], Context]) -> None:
        self._make_context = context
        self._ctx: Context | None = None
        self._file_records: dict[str, SQLFileRecords] = {}
        self._task_queue: SQLTaskQueue | None = None
        self._idempotency: SQLIdempotencyRecords | None = None

    @property
    def ctx(self) -> Context:
        """The shared parts, made on first use (a Flask-SQLAlchemy engine needs its app)."""
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = self._make_context()
        return ctx

    def now(self) -> float:
        return self.ctx.now()

    @property
    def touch_interval(self) -> float:
        return self.ctx.touch_interval

    # -- units -----------------------------------------------------------------

    def unit(self, sid: str, *, locking: bool = False) -> SQLUnit:
        return SQLUnit(self.ctx, sid, locking=locking)

    def request(self, sid: str, *, locking: bool = False, issued: bool = False) -> SQLUnit:
        unit = SQLUnit(self.ctx, sid, locking=locking, issued=issued, session_lock=True)
        self.ctx.bind(unit)
        return unit

    def file_records(self, store: str) -> SQLFileRecords:
        records = self._file_records.get(store)
        if records is None:
            records = self._file_records[store] = SQLFileRecords(self.ctx, store)
        return records

    def task_queue(self) -> SQLTaskQueue:
        queue = self._task_queue
        if queue is None:
            queue = self._task_queue = SQLTaskQueue(self.ctx)
        return queue

    def idempotency_records(self) -> SQLIdempotencyRecords:
        records = self._idempotency
        if records is None:
            records = self._idempotency = SQLIdempotencyRecords(self.ctx)
        return records

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
        ctx = self.ctx
        max_bytes = ctx.policy.max_state_bytes
        fresh = {
            name: ctx.stored_text(name, serialise(name, value, max_bytes))
            for name, value in session.items()
            if name != META
        }
        now = ctx.now()
        with ctx.connector.transaction() as ex:
            created, _ = ops.lock(ex, ctx.st, sid, ctx.times(now), existed=None)
            ops.replace_namespaces(ex, ctx.st, sid, fresh, now)
        if created:
            ctx.policy.created(sid)

    def touch(self, sid: str) -> None:
        ctx = self.ctx
        now = ctx.now()
        with ctx.connector.executor() as ex:
            ops.touch_stale(ex, ctx.st, sid, ctx.times(now), now + 1.0)

    def exists(self, sid: str) -> bool:
        with self.ctx.connector.executor() as ex:
            return ex.run(self.ctx.st.has_session, {"sid": sid}).first() is not None

    def is_expired(self, sid: str) -> bool:
        with self.ctx.connector.executor() as ex:
            return ex.run(self.ctx.st.is_expired, {"sid": sid}).first() is not None

    def destroy(self, sid: str) -> None:
        with self.ctx.connector.executor() as ex:
            ops.delete_sessions(ex, self.ctx.st, [sid])

    def reset(self, sid: str) -> None:
        reset(self.ctx, sid)

    def rotate(
        self,
        old: str,
        new: str,
        before_commit: Callable[[], Callable[[], None]],
        *,
        renew: bool = False,
    ) -> bool:
        return rotate(self.ctx, old, new, before_commit, renew=renew)

    # -- expiry ------------------------------------------------------------------

    def sweep(
        self, *, batch_size: int, dry_run: bool, progress: Callable[[int], None] | None
    ) -> SweepResult:
        """Expire due sessions; on a full SQLite disk, with the reserve's room (see
        :mod:`.disk`): the sweep is what frees the disk, so it must always run."""
        disk = self.ctx.disk
        if disk is None or dry_run:
            return self._sweep(batch_size=batch_size, dry_run=dry_run, progress=progress)
        released = disk.free() < RESERVE_BYTES and disk.release_reserve()
        try:
            result = self._sweep(batch_size=batch_size, dry_run=dry_run, progress=progress)
        except StorageUnavailable as exc:
            if released or not is_disk_full(exc) or not disk.release_reserve():
                raise
            released = True
            result = self._sweep(batch_size=batch_size, dry_run=dry_run, progress=progress)
        if released:
            disk.checkpoint("TRUNCATE")  # the WAL's space back, for the reserve
        disk.lay_reserve()  # (again) once the disk has room for it
        return result

    def _sweep(
        self, *, batch_size: int, dry_run: bool, progress: Callable[[int], None] | None
    ) -> SweepResult:
        ctx = self.ctx
        policy = ctx.policy
        now = ctx.now()
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
            ctx.connector,
            ctx.st,
            now=now,
            heartbeat_cutoff=now - policy.heartbeat_timeout,
            batch_size=batch_size,
            is_busy=self._busy_sids if policy.has_busy_check else None,
            on_batch=after_batch,
            dry_run=dry_run,
        )
        if not dry_run:
            result.pruned = sweeping.prune(
                ctx.connector, ctx.st, cutoff=now - policy.expired_retain
            )
            result.keys_expired = sweeping.expire_keys(
                ctx.connector, ctx.st, cutoff=now, batch_size=batch_size
            )
            event_rows.prune(ctx, cutoff=now - policy.event_retention, batch_size=batch_size)
        return result

    def _busy_sids(self, sids: list[str]) -> set[str]:
        busy: set[str] = set()
        for sid in sids:
            try:
                session = busy_session(self.ctx, sid)
            except StateUnreadable as exc:  # the busy check cannot judge it: left alone
                logger.error("%s; the sweep leaves the session to a later sweep", exc)
                busy.add(sid)
                continue
            if session is not None and self.ctx.policy.vetoes(sid, session):
                busy.add(sid)
        return busy

    # -- counts ------------------------------------------------------------------

    def _count(self, statement: Any) -> int:
        with self.ctx.connector.executor() as ex:
            return int(ex.run(statement, {}).scalar())

    def active_count(self) -> int:
        return self._count(self.ctx.st.count_sessions)

    def expired_count(self) -> int:
        return self._count(self.ctx.st.count_expired)

    def all_sids(self) -> list[str]:
        with self.ctx.connector.executor() as ex:
            return [row[0] for row in ex.run(self.ctx.st.all_sids, {}).rows]
