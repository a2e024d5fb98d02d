"""Task rows in ``silo_tasks``: where a linked BackgroundTask's state lives.

A run claims the row (``INSERT ... ON CONFLICT DO UPDATE`` unless a live run
holds it), writes its progress and heartbeat while it owns it (the update is
guarded by the run's start time and ``status = 'running'``, so a run declared
lost stays failed), and is reported lost once its heartbeat is older than the
heartbeat timeout. Every statement is scoped to the task's session as well as
its ID, and every time is the database's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends.base import Policy
from ..codec import dumps
from ..errors import SessionExpired, TaskAlreadyRunning
from ..tasks import LOST_WORKER, TaskState
from .context import Context
from .executor import Executor
from .slots import Slot, save_merged
from .statements import Statements


def _fields(st: Statements, sid: str, task_id: str, state: TaskState, now: float) -> dict[str, Any]:
    v = st.values
    return {
        "id": task_id,
        "sid": sid,
        "status": state.status,
        "progress": state.progress,
        "message": state.message,
        "logs": dumps(state.logs),
        "error": state.error,
        "started_at": None if state.started_at is None else v.time(state.started_at),
        "finished_at": None if state.finished_at is None else v.time(state.finished_at),
        "now": v.time(now),
    }


def claim(
    ex: Executor, st: Statements, home: SQLTaskHome, state: TaskState, name: str, now: float
) -> None:
    """Write a new run's row unless a live run holds it (:class:`TaskAlreadyRunning`)."""
    values = _fields(st, home.sid, home.task_id, state, now)
    values["name"] = name
    values["stale_before"] = st.values.time(now - home.heartbeat_timeout)
    if ex.run(st.claim_task, values).first() is None:
        if ex.run(st.has_session, {"sid": home.sid}).first() is None:
            raise SessionExpired(home.sid)
        raise TaskAlreadyRunning(name)


def running_in_session(ex: Executor, st: Statements, sid: str, now: float, policy: Policy) -> bool:
    """Whether a task of *sid* is running with a fresh heartbeat."""
    values = {"sid": sid, "stale_before": st.values.time(now - policy.heartbeat_timeout)}
    return ex.run(st.running_task, values).first() is not None


class StagedClaim:
    """A run's claim, written with the request's commit; its thread starts after it."""

    directory: str | None = None
    locks_session = True

    def __init__(
        self, home: SQLTaskHome, state: TaskState, name: str, on_commit: Callable[[], None]
    ) -> None:
        self.home = home
        self.state = state
        self.name = name
        self.on_commit = on_commit

    def write(self, ex: Executor, now: float) -> None:
        claim(ex, self.home.ctx.st, self.home, self.state, self.name, now)

    def committed(self) -> None:
        self.on_commit()

    def discard(self) -> None:
        """Nothing was done ahead of the commit: the thread simply never starts."""


class SQLTaskHome:
    """A linked task's row (the :class:`~flask_silo_sql.tasks.TaskHome` of the SQL backend)."""

    __slots__ = ("ctx", "sid", "slot", "task_id")

    def __init__(self, ctx: Context, sid: str, task_id: str, slot: Slot | None) -> None:
        self.ctx = ctx
        self.sid = sid
        self.task_id = task_id
        self.slot = slot
        """The namespace holding the task, saved when the task's state changes."""

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

    def claim(self, state: TaskState, name: str, *, on_commit: Callable[[], None]) -> None:
        ctx = self.ctx
        unit = ctx.current_unit(self.sid)
        if unit is not None:  # with the request's commit; the thread starts after it
            unit.stage(StagedClaim(self, state, name, on_commit))
            return
        with ctx.connector.transaction() as ex:
            claim(ex, ctx.st, self, state, name, ctx.now())
        on_commit()

    def save(self, state: TaskState, name: str) -> bool:
        b = self.ctx
        values = _fields(b.st, self.sid, self.task_id, state, b.now())
        with b.connector.executor() as ex:
            return ex.run(b.st.save_task, values).rowcount == 1

    def load(self) -> TaskState | None:
        b = self.ctx
        st = b.st
        v = st.values
        with b.connector.executor() as ex:
            row = ex.run(st.load_task, {"id": self.task_id, "sid": self.sid}).first()
            if row is None:
                return None
            status, progress, message, logs, error, started, finished, heartbeat = row
            if isinstance(logs, str):
                logs = v.json(logs)[0]
            state = TaskState(
                running=status == "running",
                progress=float(progress),
                message=message,
                logs=list(logs),
                complete=status == "complete",
                error=error,
                started_at=v.maybe_unix(started),
                finished_at=v.maybe_unix(finished),
            )
            now = b.now()
            timeout = self.heartbeat_timeout
            beat = v.maybe_unix(heartbeat) or 0.0
            if state.running and beat < now - timeout:
                error = LOST_WORKER.format(timeout=timeout)
                ex.run(
                    st.mark_task_lost,
                    {
                        "id": self.task_id,
                        "sid": self.sid,
                        "stale_before": v.time(now - timeout),
                        "now": v.time(now),
                        "error": error,
                        "message": f"Failed: {error}",
                    },
                )
                state.running = False
                state.error = error
                state.message = f"Failed: {error}"
                state.finished_at = now
        return state

    def delete(self) -> None:
        b = self.ctx
        with b.connector.executor() as ex:
            ex.run(b.st.delete_task, {"id": self.task_id, "sid": self.sid})

    def save_namespace(self) -> None:
        if self.slot is not None:
            save_merged(self.ctx, self.sid, self.slot)
