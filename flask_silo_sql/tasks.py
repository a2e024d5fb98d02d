"""BackgroundTask: run a callable in a daemon thread and report its progress.

A task created outside any session behaves exactly as in flask-silo 0.1.6:
its state lives in the object. A task that sits in a session's namespace (put
there by a namespace factory or by a handler) is *linked*: the namespace
stores a reference to its row in ``silo_tasks``, where the state lives, so
every worker that loads the namespace sees the live progress. A linked run
heartbeats while it runs; a run whose heartbeat is older than the store's
``heartbeat_timeout`` is reported (and recorded) as failed, worker lost.
Progress writes are coalesced to one per ``task_flush_interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .sql_storage import TaskRow

if TYPE_CHECKING:
    from .store import Session, SessionStore

logger = logging.getLogger("flask_silo_sql.tasks")

TASK_MARKER = "__silo_task__"
"""Key of the JSON object that stands for a linked task inside a namespace."""

LOST_WORKER = "worker lost: no heartbeat for {timeout:g} s (its process died or hung)"


@dataclass
class TaskState:
    """A snapshot of a task's state."""

    running: bool = False
    progress: float = 0.0
    message: str = ""
    logs: list[str] = field(default_factory=list)
    complete: bool = False
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self, *, max_logs: int = 50) -> dict[str, Any]:
        """JSON-ready dict with the newest *max_logs* log lines."""
        return {
            "running": self.running,
            "progress": round(self.progress, 1),
            "message": self.message,
            "logs": self.logs[-max_logs:],  # as flask-silo: max_logs=0 means all
            "complete": self.complete,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    @property
    def status(self) -> str:
        """``idle``, ``running``, ``complete`` or ``failed``."""
        if self.running:
            return "running"
        if self.error is not None:
            return "failed"
        return "complete" if self.complete else "idle"


@dataclass(slots=True)
class TaskLink:
    """Where a linked task lives: its row, its session and namespace."""

    store: SessionStore
    sid: str
    task_id: str
    namespace: str
    session: Session | None = None
    """The loaded session holding the task: saved when the task's state changes."""


class BackgroundTask:
    """Runs ``target(task, *args, **kwargs)`` in a daemon thread with progress reporting.

    A target that returns without calling :meth:`complete` or :meth:`fail`
    is marked complete; one that raises is marked failed.
    """

    __slots__ = (
        "_dirty",
        "_flush_lock",
        "_flushed_at",
        "_link",
        "_lock",
        "_owner",
        "_state",
        "_thread",
        "name",
    )

    def __init__(self, name: str = "task") -> None:
        self.name = name
        self._state = TaskState()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._link: TaskLink | None = None
        self._owner = False  # this object runs (or ran) the current run
        self._dirty = False
        self._flushed_at = 0.0
        # One flush at a time (task thread or heartbeat): a snapshot taken
        # earlier must never be written after a newer one.
        self._flush_lock = threading.Lock()

    # -- linking -----------------------------------------------------------------

    @classmethod
    def linked(cls, name: str, link: TaskLink) -> BackgroundTask:
        """A task object for an existing row (as a namespace is loaded)."""
        task = cls(name)
        task._link = link
        return task

    def link(self, link: TaskLink) -> None:
        """Attach to a row; a run already under way in this object is written there."""
        with self._lock:
            if self._link is not None:
                return
            self._link = link
            running = self._state.running
            if running:
                self._owner = True
        if running:
            self._claim_or_raise(self._clock())
            _HEARTBEATS.add(self)

    @property
    def task_id(self) -> str | None:
        """The row ID of a linked task, else None."""
        return self._link.task_id if self._link is not None else None

    def reference(self) -> dict[str, str] | None:
        """The JSON that stands for this task in a namespace (None if not linked)."""
        if self._link is None:
            return None
        return {TASK_MARKER: self._link.task_id, "name": self.name}

    def _clock(self) -> float:
        return self._link.store.clock() if self._link is not None else time.time()

    # -- lifecycle ---------------------------------------------------------------

    def start(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start the task (RuntimeError if it is already running, in any worker)."""
        with self._lock:
            if self._state.running:
                raise RuntimeError(f"Task '{self.name}' is already running")
            now = self._clock()
            previous = self._state
            self._state = TaskState(running=True, message="Starting…", started_at=now)
        if self._link is not None:
            try:
                self._claim_or_raise(now)
            except BaseException:
                with self._lock:
                    self._state = previous
                raise
            self._owner = True
            _HEARTBEATS.add(self)

        def run() -> None:
            try:
                target(self, *args, **kwargs)
                with self._lock:
                    finished = not self._state.running
                if not finished:
                    self._finish(complete=True, message=None)
            except Exception as exc:
                logger.exception("Task '%s' failed", self.name)
                self.fail(str(exc))
            finally:
                _HEARTBEATS.discard(self)

        self._thread = threading.Thread(
            target=run, name=f"flask-silo-task-{self.name}", daemon=True
        )
        self._thread.start()

    def _claim_or_raise(self, now: float) -> None:
        link = self._link
        assert link is not None
        sql = link.store.sql
        assert sql is not None
        with self._lock:
            row = self._row(now)
        if not sql.claim_task(row, now - link.store.heartbeat_timeout):
            raise RuntimeError(f"Task '{self.name}' is already running")
        self._flushed_at = now

    def reset(self) -> None:
        """Clear the state so the task can run again (RuntimeError while running)."""
        if self.is_running:
            raise RuntimeError(f"Cannot reset running task '{self.name}'")
        with self._lock:
            self._state = TaskState()
            self._owner = False
        link = self._link
        if link is not None and link.store.sql is not None:
            link.store.sql.delete_task(link.sid, link.task_id)

    # -- progress (called by the target) ---------------------------------------------

    def update(self, progress: float | None = None, message: str | None = None) -> None:
        """Report progress (clamped to 0..100) and/or a status message."""
        with self._lock:
            if progress is not None:
                self._state.progress = min(max(float(progress), 0.0), 100.0)
            if message is not None:
                self._state.message = message
            self._dirty = True
        self._maybe_flush()

    def log(self, msg: str) -> None:
        """Append a log line (a linked task keeps the newest ``task_max_logs``)."""
        with self._lock:
            self._state.logs.append(msg)
            if self._link is not None:
                excess = len(self._state.logs) - self._link.store.task_max_logs
                if excess > 0:
                    del self._state.logs[:excess]
            self._dirty = True
        self._maybe_flush()

    def complete(self, msg: str = "Done") -> None:
        """Mark the task finished successfully."""
        self._finish(complete=True, message=msg)

    def fail(self, error: str) -> None:
        """Mark the task failed with *error*."""
        with self._lock:
            self._state.running = False
            self._state.error = error
            self._state.message = f"Failed: {error}"
            self._state.finished_at = self._clock()
            self._dirty = True
        self._flush()

    def _finish(self, *, complete: bool, message: str | None) -> None:
        with self._lock:
            self._state.running = False
            self._state.complete = complete
            self._state.progress = 100.0
            if message is not None:
                self._state.message = message
            self._state.finished_at = self._clock()
            self._dirty = True
        self._flush()

    # -- persistence ---------------------------------------------------------------

    def _row(self, now: float) -> TaskRow:
        link = self._link
        assert link is not None
        s = self._state
        return TaskRow(
            id=link.task_id,
            sid=link.sid,
            name=self.name,
            status=s.status,
            progress=s.progress,
            message=s.message,
            logs=list(s.logs),
            error=s.error,
            started_at=s.started_at,
            finished_at=s.finished_at,
            now=now,
        )

    def _maybe_flush(self) -> None:
        link = self._link
        if link is None or not self._owner:
            return
        if self._clock() - self._flushed_at >= link.store.task_flush_interval:
            self._flush()

    def _flush(self) -> None:
        """Save the namespace holding this task, then write the run's state (and heartbeat).

        In that order: whoever reads the new state (``complete``) also reads
        what the thread wrote before changing it (``state["results"]``).
        """
        link = self._link
        if link is None or not self._owner:
            return
        sql = link.store.sql
        if sql is None:
            return
        with self._flush_lock:
            now = self._clock()
            with self._lock:
                row = self._row(now)
                self._dirty = False
                self._flushed_at = now
            if link.session is not None:
                try:
                    link.store.save_namespace_merged(link.sid, link.session, link.namespace)
                except Exception:
                    logger.exception(
                        "could not save namespace %r of session %s", link.namespace, link.sid
                    )
            try:
                sql.save_task(row)
            except Exception:
                with self._lock:
                    self._dirty = True
                logger.exception("could not save task '%s' of session %s", self.name, link.sid)

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> TaskState:
        """A copy of the current state (from ``silo_tasks`` for a run in another worker)."""
        link = self._link
        if link is None or self._owner:
            with self._lock:
                s = self._state
                return TaskState(
                    s.running,
                    s.progress,
                    s.message,
                    list(s.logs),
                    s.complete,
                    s.error,
                    s.started_at,
                    s.finished_at,
                )
        return self._state_from_row(link)

    def _state_from_row(self, link: TaskLink) -> TaskState:
        sql = link.store.sql
        if sql is None:
            return TaskState()
        row = sql.load_task(link.sid, link.task_id)
        if row is None:
            return TaskState()
        now = link.store.clock()
        state = TaskState(
            running=row.status == "running",
            progress=float(row.progress),
            message=row.message,
            logs=list(row.logs),
            complete=row.status == "complete",
            error=row.error,
            started_at=row.started_at.timestamp() if row.started_at else None,
            finished_at=row.finished_at.timestamp() if row.finished_at else None,
        )
        timeout = link.store.heartbeat_timeout
        heartbeat = row.heartbeat_at.timestamp() if row.heartbeat_at else 0.0
        if state.running and heartbeat < now - timeout:
            error = LOST_WORKER.format(timeout=timeout)
            sql.mark_task_lost(link.sid, link.task_id, now - timeout, now, error)
            state.running = False
            state.error = error
            state.message = f"Failed: {error}"
            state.finished_at = now
        return state

    @property
    def is_running(self) -> bool:
        """Whether the task is running."""
        return self.state.running

    @property
    def is_complete(self) -> bool:
        """Whether the task finished successfully."""
        return self.state.complete

    @property
    def is_failed(self) -> bool:
        """Whether the task failed."""
        return self.state.error is not None

    def __repr__(self) -> str:
        where = f" id={self._link.task_id}" if self._link is not None else ""
        return f"<BackgroundTask {self.name!r}{where}>"


class _Heartbeats:
    """One thread per process that heartbeats (and flushes) every linked running task."""

    def __init__(self) -> None:
        self._tasks: set[BackgroundTask] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, task: BackgroundTask) -> None:
        with self._lock:
            self._tasks.add(task)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="flask-silo-heartbeat", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def discard(self, task: BackgroundTask) -> None:
        with self._lock:
            self._tasks.discard(task)

    def _interval(self) -> float:
        with self._lock:
            intervals = [
                t._link.store.heartbeat_timeout / 4 for t in self._tasks if t._link is not None
            ]
        return max(0.05, min(intervals, default=5.0))

    def _loop(self) -> None:
        while True:
            self._wake.wait(timeout=self._interval())
            self._wake.clear()
            with self._lock:
                tasks = list(self._tasks)
            for task in tasks:
                try:
                    task._flush()
                except Exception:
                    logger.exception("heartbeat failed for task %r", task)


_HEARTBEATS = _Heartbeats()
