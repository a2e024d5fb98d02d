"""Task rows in ``silo_tasks``: where a linked BackgroundTask's state lives.

A run claims the row (``INSERT ... ON CONFLICT DO UPDATE`` unless a live run
holds it), writes its progress and heartbeat while it owns it (the update is
guarded by the run's start time, its attempt number and ``status =
'running'``, so a run declared lost stays failed and an attempt whose lease was
taken writes nothing), and a plain run is reported lost once its heartbeat is
older than the heartbeat timeout. A durable run's row also records its
registered function and arguments, its attempts and its lease (see
:mod:`.task_queue` for the claims of processes that run them). The namespace
holding the task is saved in the same transaction as the run's state. Every
statement is scoped to the task's session as well as its ID, and every time
is the database's clock. A run follows its session: when a rotation moved its
row to a new SID, a refused write finds the row by the run's own fence (ID,
start, attempt) and is made again under the new SID.

A start (:func:`claim`) locks the session's row first, as a reset, a rotation
and a request's commit do (:func:`~.sessions.hold`): a start and a reset of
one session run one after the other, never interleaved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..backends.base import Policy
from ..codec import dumps
from ..errors import SessionExpired, SiloError, StateConflict, TaskAlreadyRunning
from ..logs import log_failure
from ..sids import tag
from ..tasks import (
    HAND_BACK,
    LOST_WORKER,
    NAMESPACE_ARG,
    PROCESS,
    BackgroundTask,
    Durable,
    StoredTask,
    TaskSpec,
    TaskState,
    logger,
    running_homes,
)
from . import event_rows
from . import sessions as ops
from .context import Context
from .executor import Executor
from .queue_watch import watch_queue
from .slots import MERGE_ATTEMPTS, Slot, catch_up, merge_write, pending_text
from .statements import Statements


def _fields(
    st: Statements,
    sid: str,
    task_id: str,
    state: TaskState,
    now: float,
    timeout: float,
    checkpoint: str | None,
) -> dict[str, Any]:
    v = st.values
    status = state.status
    run_after = None
    if status == "queued":
        run_after = now
    elif status == "retrying":
        run_after = state.retry_at if state.retry_at is not None else now
    error = state.error if state.error is not None else state.last_error
    return {
        "id": task_id,
        "sid": sid,
        "status": status,
        "progress": state.progress,
        "message": state.message,
        "logs": dumps(state.logs),
        "error": error,
        "started_at": None if state.started_at is None else v.time(state.started_at),
        "finished_at": None if state.finished_at is None else v.time(state.finished_at),
        "now": v.time(now),
        "lease": v.time(now + timeout) if status == "running" and state.durable else None,
        "run_after": None if run_after is None else v.time(run_after),
        "checkpoint": checkpoint,
        "attempt": state.attempt,
    }


def claim(
    ex: Executor,
    st: Statements,
    home: SQLTaskHome,
    state: TaskState,
    name: str,
    now: float,
    durable: Durable | None,
) -> None:
    """Write a new run's row unless a live run holds it (:class:`TaskAlreadyRunning`).

    The caller holds the session's row in this transaction (a request's commit locks it
    first, a start outside a request holds it with :func:`~.sessions.hold`; either raises
    :class:`SessionExpired` when it is gone), so a refused claim is a live run's doing."""
    values = _fields(st, home.sid, home.task_id, state, now, home.heartbeat_timeout, None)
    values["name"] = name
    values["stale_before"] = st.values.time(now - home.heartbeat_timeout)
    values["namespace"] = home.slot.name if home.slot is not None else None
    values["target"] = durable.target if durable else None
    values["args"] = durable.args if durable else None
    values["max_attempts"] = durable.max_attempts if durable else 1
    values["retry_delay"] = durable.retry_delay if durable else 0.0
    values["worker"] = None if durable is not None and durable.queued else PROCESS.id
    if ex.run(st.claim_task, values).first() is None:
        raise TaskAlreadyRunning(name)
    if durable is not None and durable.queued and st.notify_tasks is not None:
        ex.run(st.notify_tasks, {})  # delivered with the commit: a worker wakes up
    if durable is not None and durable.queued:
        watch_queue(home.ctx, ex, now, 0.0)
    home.written(ex, name, state, now)


def running_in_session(ex: Executor, st: Statements, sid: str, now: float, policy: Policy) -> bool:
    """Whether a task of *sid* is running (or, durable, waiting to run)."""
    v = st.values
    stale_before = v.time(now - policy.heartbeat_timeout)
    values = {"sid": sid, "now": v.time(now), "stale_before": stale_before}
    return ex.run(st.running_task, values).first() is not None


def hand_back(ctx: Context, worker: str) -> int:
    """Queue again the durable runs process *worker* holds (it stops): others run them now."""
    st = ctx.st
    with ctx.connector.transaction() as ex:
        count = ex.run(st.hand_back_all, {"worker": worker, "now": st.values.time(ctx.now())})
        if count.rowcount and st.notify_tasks is not None:
            ex.run(st.notify_tasks, {})
    return int(count.rowcount or 0)


def hand_back_at_exit(ctx: Context) -> None:
    """Whatever this process still holds when it exits goes back to the queue."""

    def at_exit() -> None:
        homes = running_homes()
        if any(isinstance(home, SQLTaskHome) and home.ctx is ctx for home in homes):
            hand_back(ctx, PROCESS.id)

    HAND_BACK.add(id(ctx), at_exit)


class StagedClaim:
    """A run's claim, written with the request's commit; its thread starts after it."""

    directory: str | None = None
    locks_session = True

    def __init__(
        self,
        home: SQLTaskHome,
        state: TaskState,
        name: str,
        on_commit: Callable[[], None],
        durable: Durable | None,
    ) -> None:
        self.home = home
        self.state = state
        self.name = name
        self.on_commit = on_commit
        self.durable = durable

    def write(self, ex: Executor, now: float) -> None:
        claim(ex, self.home.ctx.st, self.home, self.state, self.name, now, self.durable)

    def committed(self) -> None:
        self.on_commit()

    def discard(self) -> None:
        """Nothing was done ahead of the commit: the thread simply never starts."""


FOLLOW_HOPS = 4
"""How many rotations one write of a run follows (each hop is a rotation meanwhile)."""


class _Refused(Exception):
    """The run no longer owns its row: the transaction is rolled back."""


class _Again(Exception):
    """The namespace changed meanwhile: roll back and merge again."""


class _Times(NamedTuple):
    """What :meth:`SQLTaskHome._settle` reads of a task's row: its times, as stored."""

    status: str
    durable: bool
    run_after: Any
    heartbeat: Any
    lease: Any
    max_attempts: int


class SQLTaskHome:
    """A linked task's row (the :class:`~flask_silo_sql.tasks.TaskHome` of the SQL backend)."""

    __slots__ = ("cancelling", "ctx", "last", "sid", "slot", "task_id")

    def __init__(self, ctx: Context, sid: str, task_id: str, slot: Slot | None) -> None:
        self.ctx = ctx
        self.sid = sid
        self.task_id = task_id
        self.slot = slot
        """The namespace holding the task, saved when the task's state changes."""
        self.last: TaskState | None = None
        """The state this home last wrote (what the next write's event is measured from)."""
        self.cancelling = False
        """The last write found a cancel asked for on the row."""

    def written(self, ex: Executor, name: str, state: TaskState, now: float) -> None:
        """In the write's transaction, last: the event telling of what changed (if any)."""
        made = event_rows.task_event(name, self.task_id, state, self.last)
        if made is not None:
            kind, data = made
            event_rows.write(ex, self.ctx, self.sid, kind, data, task_id=self.task_id, now=now)
        self.last = state.copy()

    def cancel_seen(self) -> bool:
        return self.cancelling

    def cancel(self, name: str) -> str:
        """Cancel the run (see :meth:`~flask_silo_sql.tasks.TaskHome.cancel`): one transaction
        that ends a waiting run or marks a running one, with the event that tells of it."""
        ctx = self.ctx
        st = ctx.st
        ids = {"id": self.task_id, "sid": self.sid}
        with ctx.connector.transaction() as ex:
            now = ctx.now()
            stamp = {**ids, "now": st.values.time(now)}
            data: dict[str, Any] = {"task_id": self.task_id, "task": name}
            row = ex.run(st.cancel_waiting, stamp).first()
            if row is not None:
                data.update(status="cancelled", progress=float(row[0]), message="Cancelled")
                event_rows.write(ex, ctx, self.sid, "cancelled", data, task_id=self.task_id)
                return "cancelled"
            row = ex.run(st.request_cancel, stamp).first()
            if row is not None:
                data.update(status="running", progress=float(row[0]), message=row[1])
                data["cancel_requested"] = True
                event_rows.write(ex, ctx, self.sid, "cancelling", data, task_id=self.task_id)
                return "cancelling"
            row = ex.run(st.task_status, ids).first()
        return "idle" if row is None or (row[1] is None and row[0] != "complete") else "finished"

    @property
    def heartbeat_timeout(self) -> float:
        return self.ctx.policy.heartbeat_timeout

    @property
    def flush_interval(self) -> float:
        return self.ctx.policy.task_flush_interval

    @property
    def max_logs(self) -> int:
        return self.ctx.policy.task_max_logs

    def now(self) -> float:
        return self.ctx.now()

    def running_elsewhere(self) -> bool:
        state = self.load()
        return state is not None and state.running

    def knows(self, spec: TaskSpec) -> bool:
        return spec.name in self.ctx.policy.tasks

    def durable(self, spec: TaskSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Durable:
        policy = self.ctx.policy
        holder = self.slot.value if self.slot is not None else None
        name = self.slot.name if self.slot is not None else None

        def stored(value: Any) -> Any:
            return {NAMESPACE_ARG: name} if holder is not None and value is holder else value

        payload = {
            "args": [stored(a) for a in args],
            "kwargs": {k: stored(v) for k, v in kwargs.items()},
        }
        try:
            text = dumps(payload)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"task {spec.name!r} is registered, so its runs are durable and its arguments "
                f"must be JSON (or the namespace holding the task): {exc}"
            ) from None
        retries = policy.task_retries if spec.retries is None else spec.retries
        delay = policy.task_retry_delay if spec.retry_delay is None else spec.retry_delay
        return Durable(
            spec.name,
            text,
            max(1, int(retries) + 1),
            float(delay),
            queued=policy.task_runner == "worker",
        )

    def claim(
        self,
        state: TaskState,
        name: str,
        *,
        on_commit: Callable[[], None],
        durable: Durable | None = None,
    ) -> None:
        ctx = self.ctx
        if durable is not None and not durable.queued:
            hand_back_at_exit(ctx)
        unit = ctx.current_unit(self.sid)
        if unit is not None:  # with the request's commit; the thread starts after it
            unit.stage(StagedClaim(self, state, name, on_commit, durable))
            return
        with ctx.connector.transaction() as ex:
            now = ctx.now()
            if ops.hold(ex, ctx.st, self.sid, ctx.times(now)) is None:
                raise SessionExpired(self.sid)
            claim(ex, ctx.st, self, state, name, now, durable)
        on_commit()

    def save(self, state: TaskState, name: str, *, checkpoint: str | None = None) -> bool:
        """Write the run's state where its row is now: a run follows its session's rotation.

        A write refused under this home's SID is tried again under the SID that holds
        the run's own row (same ID, start and attempt) when a rotation moved it there.
        """
        for _hop in range(FOLLOW_HOPS):
            if self._save(state, name, checkpoint):
                return True
            if not self._follow(state):
                return False
        return False

    def _follow(self, state: TaskState) -> bool:
        """Whether the run's row is held by another SID now (then this home names it)."""
        ctx = self.ctx
        v = ctx.st.values
        values = {
            "id": self.task_id,
            "started_at": None if state.started_at is None else v.time(state.started_at),
            "attempt": state.attempt,
        }
        with ctx.connector.executor() as ex:
            row = ex.run(ctx.st.find_run, values).first()
        if row is None or row[0] == self.sid:
            return False
        self.sid = row[0]
        return True

    def _save(self, state: TaskState, name: str, checkpoint: str | None) -> bool:
        """The namespace first (the order requests lock in), then the run's row, fenced."""
        ctx = self.ctx
        slot = self.slot
        if slot is None:
            return self._write(name, state, checkpoint, None, None)
        with slot.lock:
            try:
                text = pending_text(ctx, slot)
            except SiloError as exc:  # not JSON, too large: the run's state is saved all the same
                log_failure(
                    logger,
                    "could not save the namespace of task '%s' of session %s",
                    name,
                    tag(self.sid),
                    exc=exc,
                    sid=self.sid,
                )
                text = None
            for _attempt in range(MERGE_ATTEMPTS):
                try:
                    return self._write(name, state, checkpoint, slot, text)
                except _Again:
                    continue
            raise StateConflict(self.sid, slot.name)

    def _write(
        self,
        name: str,
        state: TaskState,
        checkpoint: str | None,
        slot: Slot | None,
        text: str | None,
    ) -> bool:
        ctx = self.ctx
        now = ctx.now()
        values = _fields(
            ctx.st, self.sid, self.task_id, state, now, self.heartbeat_timeout, checkpoint
        )
        version = None
        try:
            with ctx.connector.executor() as ex, ex.transaction():
                if slot is not None and text is not None:
                    try:
                        version = merge_write(ctx, ex, self.sid, slot, text, now)
                    except StateConflict:
                        raise _Again from None
                saved = ex.run(ctx.st.save_task, values).first()
                if saved is None:
                    raise _Refused
                self.cancelling = saved[0] is not None
                self.written(ex, name, state, now)
        except (_Refused, SessionExpired):
            return False
        if slot is not None and text is not None and version is not None:
            slot.text, slot.version = text, version
        return True

    def load(self) -> TaskState | None:
        b = self.ctx
        st = b.st
        v = st.values
        with b.connector.executor() as ex:
            row = ex.run(st.load_task, {"id": self.task_id, "sid": self.sid}).first()
            if row is None:
                return None
            (
                status,
                progress,
                message,
                logs,
                error,
                started,
                finished,
                heartbeat,
                target,
                attempt,
                max_attempts,
                lease,
                _checkpoint,
                run_after,
                cancel_requested,
                namespace_version,
            ) = row  # (a tuple on the DBAPI executor: by position)
            state = TaskState.from_stored(
                StoredTask(
                    status=status,
                    progress=float(progress),
                    message=message,
                    logs=list(v.json(logs)[0] if isinstance(logs, str) else logs),
                    error=error,
                    started_at=v.maybe_unix(started),
                    finished_at=v.maybe_unix(finished),
                    attempt=int(attempt or 0),
                    durable=target is not None,
                    cancel_requested=cancel_requested is not None,
                )
            )
            times = _Times(status, target is not None, run_after, heartbeat, lease, max_attempts)
            self._settle(ex, times, state)
            slot = self.slot
            if not state.running and slot is not None and namespace_version != slot.version:
                catch_up(b, ex, self.sid, slot, self._reviver(slot))
        return state

    def _settle(self, ex: Executor, row: _Times, state: TaskState) -> None:
        """What only time tells about a run read back: how long it has been queued, or that
        its process is gone (recorded, and told to its streams, by the first reader)."""
        b = self.ctx
        st = b.st
        v = st.values
        now = b.now()
        timeout = self.heartbeat_timeout
        durable = row.durable
        if durable and row.status == "queued" and row.run_after is not None:
            state.queued_for = max(0.0, now - v.unix(row.run_after))
            state.workers = watch_queue(b, ex, now, state.queued_for)
        values = {
            "id": self.task_id,
            "sid": self.sid,
            "stale_before": v.time(now - timeout),
            "now": v.time(now),
            "error": LOST_WORKER.format(timeout=timeout),
            "message": f"Failed: {LOST_WORKER.format(timeout=timeout)}",
        }
        if not durable:
            beat = v.maybe_unix(row.heartbeat) or 0.0
            if state.running and beat < now - timeout:
                with ex.transaction():
                    marked = ex.run(st.mark_task_lost, values).rowcount
                    self._lost(state, values["error"], now)
                    if marked:  # (else another reader recorded it, and told it)
                        self._tell_lost(ex, state, now)
        elif (
            row.status == "running"
            and row.lease is not None
            and state.attempt >= int(row.max_attempts)
            and v.unix(row.lease) < now
        ):
            with ex.transaction():
                if ex.run(st.fail_exhausted_one, values).rowcount:
                    self._lost(state, values["error"], now)
                    self._tell_lost(ex, state, now)

    def _reviver(self, slot: Slot) -> Callable[[str, str], BackgroundTask]:
        ctx, sid = self.ctx, self.sid

        def make(task_id: str, name: str) -> BackgroundTask:
            return BackgroundTask.linked(name, SQLTaskHome(ctx, sid, task_id, slot))

        return make

    def _tell_lost(self, ex: Executor, state: TaskState, now: float) -> None:
        """In the transaction that records a run lost: the event that tells its streams."""
        data = {
            "task_id": self.task_id,
            "status": "failed",
            "progress": round(state.progress, 1),
            "message": state.message,
            "logs": [],
            "error": state.error,
        }
        event_rows.write(ex, self.ctx, self.sid, "failed", data, task_id=self.task_id, now=now)

    @staticmethod
    def _lost(state: TaskState, error: str, now: float) -> None:
        state.running = False
        state.waiting = None
        state.error = error
        state.last_error = None
        state.message = f"Failed: {error}"
        state.finished_at = now

    def delete(self) -> None:
        b = self.ctx
        with b.connector.executor() as ex:
            ex.run(b.st.delete_task, {"id": self.task_id, "sid": self.sid})

    def namespace(self) -> dict[str, Any] | None:
        value = self.slot.value if self.slot is not None else None
        return value if isinstance(value, dict) else None
