"""BackgroundTask: run a callable in a daemon thread and report its progress.

A task created outside any session behaves exactly as in flask-silo 0.1.6:
its state lives in the object. A task that sits in a session's namespace (put
there by a namespace factory or by a handler) is *linked* to a
:class:`TaskHome`, its row in ``silo_tasks``: the namespace stores a reference
to the row, where the state lives, so every worker that loads the namespace
sees the live progress. A linked run heartbeats while it runs; a run whose
heartbeat is older than the home's ``heartbeat_timeout`` is reported (and
recorded) as failed, worker lost. Progress writes are coalesced to one per
``flush_interval`` seconds. Inside a request, a linked task's thread starts
once the request has committed its row (a failed request starts nothing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import TaskAlreadyRunning
from .logs import log_failure
from .sids import tag

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

    def copy(self) -> TaskState:
        return TaskState(
            self.running,
            self.progress,
            self.message,
            list(self.logs),
            self.complete,
            self.error,
            self.started_at,
            self.finished_at,
        )


class TaskHome(Protocol):
    """Where a linked task's state lives (its row)."""

    @property
    def task_id(self) -> str: ...

    @property
    def sid(self) -> str:
        """The owning session (kept out of log lines, which name it by a tag)."""

    @property
    def heartbeat_timeout(self) -> float: ...

    @property
    def flush_interval(self) -> float: ...

    @property
    def max_logs(self) -> int: ...

    def now(self) -> float:
        """Unix seconds by the storage's clock."""

    def running_elsewhere(self) -> bool:
        """Whether a live run holds the row (checked before a start)."""

    def claim(self, state: TaskState, name: str, *, on_commit: Callable[[], None]) -> None:
        """Start a run: write its row unless a live run holds it (TaskAlreadyRunning).

        *on_commit* runs once the row is committed: at once outside a request,
        after the request's commit inside one.
        """

    def save(self, state: TaskState, name: str) -> bool:
        """Write the run's state and heartbeat; False if that run no longer owns the row."""

    def load(self) -> TaskState | None:
        """The row's state; a run whose heartbeat is stale is recorded as lost first."""

    def delete(self) -> None:
        """Forget the row (the task's reset)."""

    def save_namespace(self) -> None:
        """Save the namespace holding the task (merging the keys the thread changed)."""


class BackgroundTask:
    """Runs ``target(task, *args, **kwargs)`` in a daemon thread with progress reporting.

    A target that returns without calling :meth:`complete` or :meth:`fail`
    is marked complete; one that raises is marked failed.
    """

    __slots__ = (
        "_dirty",
        "_flush_lock",
        "_flushed_at",
        "_home",
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
        self._home: TaskHome | None = None
        self._owner = False  # this object runs (or ran) the current run
        self._dirty = False
        self._flushed_at = 0.0
        # One flush at a time (task thread or heartbeat): a snapshot taken
        # earlier must never be written after a newer one.
        self._flush_lock = threading.Lock()

    # -- linking -----------------------------------------------------------------

    @classmethod
    def linked(cls, name: str, home: TaskHome) -> BackgroundTask:
        """A task object for an existing row (as a namespace is loaded)."""
        task = cls(name)
        task._home = home
        return task

    def link(self, home: TaskHome) -> None:
        """Attach to a row; a run already under way in this object is written there."""
        with self._lock:
            if self._home is not None:
                return
            self._home = home
            running = self._state.running
            if running:
                self._owner = True
        if running:
            self._claim(home, on_commit=lambda: None)
            _HEARTBEATS.add(self)

    @property
    def task_id(self) -> str | None:
        """The row ID of a linked task, else None."""
        return self._home.task_id if self._home is not None else None

    def reference(self) -> dict[str, str] | None:
        """The JSON that stands for this task in a namespace (None if not linked)."""
        if self._home is None:
            return None
        return {TASK_MARKER: self._home.task_id, "name": self.name}

    def _log(self, message: str, exc: BaseException) -> None:
        """Log a failure of this task, naming its session by a tag, never its SID."""
        home = self._home
        sid = home.sid if home is not None else None
        where = f" of session {tag(sid)}" if sid else ""
        log_failure(logger, message, self.name, where, exc=exc, sid=sid)

    def _now(self) -> float:
        return self._home.now() if self._home is not None else time.time()

    # -- lifecycle ---------------------------------------------------------------

    def start(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start the task (:class:`TaskAlreadyRunning`, a RuntimeError, if it runs anywhere).

        A linked task started inside a request runs once the request commits.
        """
        home = self._home
        if home is not None and not self._owner and home.running_elsewhere():
            raise TaskAlreadyRunning(self.name)
        with self._lock:
            if self._state.running:
                raise TaskAlreadyRunning(self.name)
            previous = self._state
            self._state = TaskState(running=True, message="Starting…", started_at=self._now())
        thread = threading.Thread(
            target=self._run,
            args=(target, args, kwargs),
            name=f"flask-silo-task-{self.name}",
            daemon=True,
        )
        self._thread = thread
        if home is None:
            thread.start()
            return
        owner = self._owner
        try:
            self._claim(home, on_commit=thread.start)
        except BaseException:
            with self._lock:
                self._state = previous
                self._owner = owner
            raise

    def _claim(self, home: TaskHome, *, on_commit: Callable[[], None]) -> None:
        """Write the run's row; *on_commit* (and heartbeats) once it is committed.

        From here this object's state is the run's (it owns the run), so a view
        that starts a task sees it running before its request commits.
        """
        with self._lock:
            state = self._state.copy()
            self._owner = True

        def started() -> None:
            self._flushed_at = home.now()
            _HEARTBEATS.add(self)
            on_commit()

        home.claim(state, self.name, on_commit=started)

    def _run(
        self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        try:
            target(self, *args, **kwargs)
            with self._lock:
                finished = not self._state.running
            if not finished:
                self._finish(complete=True, message=None)
        except Exception as exc:
            self._log("task '%s'%s failed", exc)
            self.fail(str(exc))
        finally:
            _HEARTBEATS.discard(self)

    def reset(self) -> None:
        """Clear the state so the task can run again (RuntimeError while running)."""
        if self.is_running:
            raise RuntimeError(f"Cannot reset running task '{self.name}'")
        with self._lock:
            self._state = TaskState()
            self._owner = False
        if self._home is not None:
            self._home.delete()

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

    def log(self, message: str) -> None:
        """Append a log line (a linked task keeps the newest ``max_logs``)."""
        with self._lock:
            self._state.logs.append(message)
            if self._home is not None:
                excess = len(self._state.logs) - self._home.max_logs
                if excess > 0:
                    del self._state.logs[:excess]
            self._dirty = True
        self._maybe_flush()

    def complete(self, message: str = "Done") -> None:
        """Mark the task finished successfully."""
        self._finish(complete=True, message=message)

    def fail(self, error: str) -> None:
        """Mark the task failed with *error*."""
        with self._lock:
            self._state.running = False
            self._state.error = error
            self._state.message = f"Failed: {error}"
            self._state.finished_at = self._now()
            self._dirty = True
        self._flush()

    def _finish(self, *, complete: bool, message: str | None) -> None:
        with self._lock:
            self._state.running = False
            self._state.complete = complete
            self._state.progress = 100.0
            if message is not None:
                self._state.message = message
            self._state.finished_at = self._now()
            self._dirty = True
        self._flush()

    # -- persistence ---------------------------------------------------------------

    def _maybe_flush(self) -> None:
        home = self._home
        if home is None or not self._owner:
            return
        if self._now() - self._flushed_at >= home.flush_interval:
            self._flush()

    def _flush(self) -> None:
        """Save the namespace holding this task, then write the run's state (and heartbeat).

        In that order: whoever reads the new state (``complete``) also reads
        what the thread wrote before changing it (``state["results"]``).
        """
        home = self._home
        if home is None or not self._owner:
            return
        with self._flush_lock:
            with self._lock:
                state = self._state.copy()
                self._dirty = False
                self._flushed_at = home.now()
            try:
                home.save_namespace()
            except Exception as exc:
                self._log("could not save the namespace of task '%s'%s", exc)
            try:
                home.save(state, self.name)
            except Exception as exc:
                with self._lock:
                    self._dirty = True
                self._log("could not save task '%s'%s", exc)

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> TaskState:
        """A copy of the current state (from its row for a run in another worker)."""
        home = self._home
        if home is None or self._owner:
            with self._lock:
                return self._state.copy()
        return home.load() or TaskState()

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
        where = f" id={self._home.task_id}" if self._home is not None else ""
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
            intervals = [t._home.heartbeat_timeout / 4 for t in self._tasks if t._home is not None]
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
                except Exception as exc:
                    task._log("heartbeat of task '%s'%s failed", exc)


_HEARTBEATS = _Heartbeats()
