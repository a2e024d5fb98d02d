"""BackgroundTask: run a callable in a daemon thread and report its progress.

A task created outside any session behaves exactly as in flask-silo 0.1.6:
its state lives in the object. A task that sits in a session's namespace (put
there by a namespace factory or by a handler) is *linked* to a
:class:`TaskHome`, its row in ``silo_tasks``: the namespace stores a reference
to the row, where the state lives, so every worker that loads the namespace
sees the live progress. A linked run heartbeats while it runs; a run whose
heartbeat is older than the home's ``heartbeat_timeout`` is reported (and
recorded) as failed, worker lost. Progress writes are coalesced to one per
``flush_interval`` seconds, and a coalesced write is made at the latest that
long after the update it holds. Inside a request, a linked task's thread
starts once the request has committed its row (a failed request starts nothing).

A linked run of a *registered* function (:func:`task`, ``@silo.task``) with
JSON arguments is **durable**: its row records the function's name and
arguments, and each attempt runs under a lease (renewed by the heartbeat) with
an attempt number. A run whose lease lapses, or that raises, is claimed by a
live process and runs again as the next attempt, until its retries are used
up. Every write of an attempt is fenced by its number, so an attempt whose
lease was taken writes nothing more and finds out (:class:`TaskLeaseLost`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol, TypeVar

from .errors import StorageUnavailable, TaskAlreadyRunning, TaskCancelled, TaskLeaseLost
from .instruments.hooks import observed_attempt
from .logs import log_failure, silo_logger
from .sids import tag

logger = silo_logger("flask_silo_sql.tasks")

TASK_MARKER = "__silo_task__"
"""Key of the JSON object that stands for a linked task inside a namespace."""

NAMESPACE_ARG = "__silo_namespace__"
"""Key of the JSON object that stands, in a durable run's arguments, for the namespace
holding the task (the worker that runs it passes that namespace, freshly loaded)."""

CANCEL_OUTCOMES = ("cancelled", "cancelling", "finished", "idle")
"""What :meth:`BackgroundTask.cancel` answers: the run was waiting and never starts; it
runs and stops at its next ``update()``, ``log()`` or ``checkpoint()``; it was over
already (nothing done); it never started."""

LOST_WORKER = "worker lost: no heartbeat for {timeout:g} s (its process died or hung)"

SPEC_ATTRIBUTE = "__silo_task_spec__"
MAX_RETRY_DELAY_S = 300.0
"""The longest wait between two attempts (the delay doubles from ``retry_delay``)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskSpec:
    """A registered task function: its name (in task rows) and its retry policy."""

    name: str
    fn: Callable[..., Any]
    retries: int | None = None
    """None: the store's default (``SILO_TASK_RETRIES``)."""
    retry_delay: float | None = None
    """Seconds before the first retry; None: the store's default (``SILO_TASK_RETRY_DELAY``)."""


def spec_of(fn: Any) -> TaskSpec | None:
    """The registration of *fn* (None for a closure, a lambda, any unregistered callable)."""
    spec = getattr(fn, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, TaskSpec) else None


def mark_registered(fn: F, spec: TaskSpec) -> F:
    """Record *spec* on *fn* (what ``@silo.task`` does); *fn* itself is returned."""
    setattr(fn, SPEC_ATTRIBUTE, spec)
    return fn


def retry_delay(spec_delay: float, attempt: int) -> float:
    """Seconds before the attempt after *attempt* (1, 2, ...): doubling, capped."""
    return float(min(MAX_RETRY_DELAY_S, spec_delay * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class RunRow:
    """A durable run a process claimed, as the storage returns its row.

    Plain values: times in Unix seconds, JSON as text (``args``, ``checkpoint``) or
    decoded (``logs``). The storage fills it; :meth:`Claimed.from_row` makes the attempt.
    """

    task_id: str
    sid: str
    name: str
    namespace: str | None
    target: str
    args: str
    """``{"args": [...], "kwargs": {...}}`` as JSON text."""
    attempt: int
    max_attempts: int
    retry_delay: float
    checkpoint: str | None
    logs: list[str]
    error: str | None
    """The previous attempt's error (the run is being retried), or None."""
    started_at: float | None


def unregistered(target: str) -> Callable[..., Any]:
    """A stand-in for a function this process does not know: the attempt fails saying so."""

    def missing(task: BackgroundTask, *args: Any, **kwargs: Any) -> None:
        raise LookupError(
            f"task function {target!r} is not registered in this process: import the "
            "module that defines it (@silo.task) in the app"
        )

    return missing


@dataclass
class Durable:
    """What makes a run durable, as its row records it."""

    target: str
    """The registered function's name."""
    args: str
    """``{"args": [...], "kwargs": {...}}`` as JSON text."""
    max_attempts: int
    retry_delay: float
    queued: bool = False
    """Enqueue only (``SILO_TASK_RUNNER = "worker"``): a worker process runs it."""

    @classmethod
    def from_row(cls, row: RunRow) -> Durable:
        return cls(row.target, row.args, row.max_attempts, row.retry_delay)


@dataclass
class Claimed:
    """An attempt of a durable run that this process claimed, ready to run."""

    task: BackgroundTask
    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: TaskState
    durable: Durable
    checkpoint: str | None

    @classmethod
    def from_row(
        cls,
        row: RunRow,
        *,
        task: BackgroundTask,
        holder: dict[str, Any] | None,
        specs: Mapping[str, TaskSpec],
    ) -> Claimed:
        """The attempt *row* starts: *task* (in its namespace *holder*, when it has one)
        runs the registered function of *specs* with the row's arguments."""
        payload = json.loads(row.args) or {}

        def decoded(value: Any) -> Any:
            if isinstance(value, dict) and set(value) == {NAMESPACE_ARG}:
                return holder if holder is not None else {}
            return value

        spec = specs.get(row.target)
        return cls(
            task=task,
            target=spec.fn if spec is not None else unregistered(row.target),
            args=tuple(decoded(a) for a in payload.get("args", [])),
            kwargs={k: decoded(x) for k, x in payload.get("kwargs", {}).items()},
            state=TaskState.from_row(row),
            durable=Durable.from_row(row),
            checkpoint=row.checkpoint,
        )


class _Process:
    """This process's identity in ``silo_tasks.worker`` and ``silo_workers`` (new after a fork)."""

    def __init__(self) -> None:
        self._pid = 0
        self._id = ""
        self._lock = threading.Lock()

    def forget(self) -> None:
        """In a forked child: a new identity (the parent's lock may have been held)."""
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                host = socket.gethostname()[:40]
                self._id = f"{host}:{self._pid}:{secrets.token_hex(4)}"
            return self._id


PROCESS = _Process()
os.register_at_fork(after_in_child=PROCESS.forget)


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
    _: KW_ONLY  # what durable runs add: by keyword only, flask-silo's positions kept
    attempt: int = 0
    """A durable run's attempt number (1, 2, ...; 0 while it waits for its first)."""
    last_error: str | None = None
    """A durable run being retried: the error of its previous attempt."""
    durable: bool = False
    waiting: str | None = None
    """A durable run waiting to be claimed: ``"queued"`` or ``"retrying"``."""
    retry_at: float | None = None
    """When a retrying run may start again (Unix seconds, the storage's clock)."""
    queued_for: float | None = None
    """A queued durable run, as read from its row: seconds since it was queued."""
    workers: int | None = None
    """With ``queued_for``: the processes alive to run it (0: none, it waits)."""
    cancelled: bool = False
    """The run ended cancelled (``task.cancel()``)."""
    cancel_requested: bool = False
    """A cancel was asked for while the run runs: it stops at its next write."""

    @classmethod
    def from_row(cls, row: RunRow) -> TaskState:
        """The state of the attempt a process just claimed."""
        return cls(
            running=True,
            progress=0.0,
            message="Starting…",
            logs=list(row.logs),
            started_at=row.started_at,
            attempt=row.attempt,
            last_error=row.error,
            durable=True,
        )

    def to_dict(self, *, max_logs: int = 50) -> dict[str, Any]:
        """JSON-ready dict with the newest *max_logs* log lines.

        A durable run adds ``attempt`` and ``last_error`` to flask-silo's keys;
        a queued one read from its row, ``queued_for`` and ``workers`` too.
        """
        body: dict[str, Any] = {
            "running": self.running,
            "progress": round(self.progress, 1),
            "message": self.message,
            "logs": self.logs[-max_logs:],  # as flask-silo: max_logs=0 means all
            "complete": self.complete,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.durable:
            body["attempt"] = self.attempt
            body["last_error"] = self.last_error
            if self.waiting == "queued" and self.queued_for is not None:
                body["queued_for"] = round(self.queued_for, 1)
                body["workers"] = self.workers
        if self.cancelled or self.cancel_requested:
            body["cancelled"] = self.cancelled
            body["cancel_requested"] = True
        return body

    @property
    def status(self) -> str:
        """``idle``, ``queued``, ``running``, ``retrying``, ``complete``, ``failed`` or
        ``cancelled``."""
        if self.running:
            return self.waiting or "running"
        if self.cancelled:
            return "cancelled"
        if self.error is not None:
            return "failed"
        return "complete" if self.complete else "idle"

    def copy(self) -> TaskState:
        return dataclasses.replace(self, logs=list(self.logs))


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

    def durable(self, spec: TaskSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Durable:
        """The durable form of a run of *spec* (TypeError for arguments that are not JSON)."""

    def knows(self, spec: TaskSpec) -> bool:
        """Whether *spec* is registered on this home's store (then its runs are durable)."""

    def claim(
        self,
        state: TaskState,
        name: str,
        *,
        on_commit: Callable[[], None],
        durable: Durable | None = None,
    ) -> None:
        """Start a run: write its row unless a live run holds it (TaskAlreadyRunning).

        *on_commit* runs once the row is committed: at once outside a request,
        after the request's commit inside one.
        """

    def save(self, state: TaskState, name: str, *, checkpoint: str | None = None) -> bool:
        """Write the namespace holding the task (merged) and the run's state, heartbeat and
        lease, in one transaction; False (nothing written) if that run, or that attempt, no
        longer owns the row."""

    def load(self) -> TaskState | None:
        """The row's state; a run whose heartbeat is stale is recorded as lost first."""

    def delete(self) -> None:
        """Forget the row (the task's reset)."""

    def cancel(self, name: str) -> str:
        """Cancel the run the row holds, from any process (what it did, as ``cancel()``).

        A waiting run (queued, retrying) is cancelled now; a running one is marked,
        and its process learns it at its next write (:meth:`cancel_seen`).
        """

    def cancel_seen(self) -> bool:
        """Whether the run's last write found a cancel asked for on its row."""

    def namespace(self) -> dict[str, Any] | None:
        """The namespace holding the task (the one its run saves)."""


class BackgroundTask:
    """Runs ``target(task, *args, **kwargs)`` in a daemon thread with progress reporting.

    A target that returns without calling :meth:`complete` or :meth:`fail`
    is marked complete; one that raises is marked failed (a durable run is
    retried first, while it has retries left).
    """

    __slots__ = (
        "_cancel",
        "_cancel_raised",
        "_checkpoint",
        "_dirty",
        "_due",
        "_durable",
        "_flush_lock",
        "_flushed_at",
        "_home",
        "_lock",
        "_lost",
        "_owner",
        "_saved_mono",
        "_state",
        "_thread",
        "_written_mono",
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
        self._written_mono = 0.0  # monotonic time of the last write attempt (heartbeats)
        self._saved_mono = 0.0  # monotonic time of the last write that succeeded
        self._due: float | None = None  # monotonic time a coalesced write is due
        self._durable: Durable | None = None
        self._checkpoint: str | None = None  # JSON text
        self._lost = False
        self._cancel = False  # a cancel was asked for this run (learned here)
        self._cancel_raised = False  # TaskCancelled was raised in the run's thread
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

        A linked task started inside a request runs once the request commits. A
        registered *target* (``@silo.task``) with JSON arguments makes the run
        durable; with ``SILO_TASK_RUNNER = "worker"`` it is only queued here.
        """
        home = self._home
        spec = spec_of(target)
        durable = None
        if home is not None and spec is not None and home.knows(spec):
            durable = home.durable(spec, args, kwargs)
        if home is not None and not self._owner and home.running_elsewhere():
            raise TaskAlreadyRunning(self.name)
        queued = durable is not None and durable.queued
        with self._lock:
            if self._state.running:
                raise TaskAlreadyRunning(self.name)
            previous = self._state, self._durable, self._checkpoint, self._lost
            self._state = TaskState(
                running=True,
                message="Queued" if queued else "Starting…",
                started_at=None if queued else self._now(),
                attempt=0 if queued else 1,
                durable=durable is not None,
                waiting="queued" if queued else None,
            )
            self._durable = durable
            self._checkpoint = None
            self._lost = False
            self._cancel = self._cancel_raised = False
        thread = threading.Thread(
            target=self._run,
            args=(target, args, kwargs, None),
            name=f"flask-silo-task-{self.name}",
            daemon=True,
        )
        if not queued:
            self._thread = thread
        if home is None:
            thread.start()
            return
        owner = self._owner
        try:
            self._claim(home, on_commit=self._handed_over if queued else thread.start)
        except BaseException:
            with self._lock:
                self._state, self._durable, self._checkpoint, self._lost = previous
                self._owner = owner
            raise

    def _handed_over(self) -> None:
        """A queued run is committed: its state is the row's from now on (a worker runs it)."""
        with self._lock:
            self._owner = False

    def _claim(self, home: TaskHome, *, on_commit: Callable[[], None]) -> None:
        """Write the run's row; *on_commit* (and heartbeats) once it is committed.

        From here this object's state is the run's (it owns the run), so a view
        that starts a task sees it running before its request commits.
        """
        with self._lock:
            state = self._state.copy()
            self._owner = True
            durable = self._durable

        def started() -> None:
            self._flushed_at = home.now()
            self._saved_mono = self._written_mono = time.monotonic()
            if durable is None or not durable.queued:
                _HEARTBEATS.add(self)
            on_commit()

        home.claim(state, self.name, on_commit=started, durable=durable)

    def execute(self, claimed: Claimed, on_done: Callable[[], None] | None = None) -> None:
        """Run an attempt this process claimed (its row already says so), in a new thread."""
        home = self._home
        if home is None:
            raise RuntimeError("only a linked task runs a claimed attempt")
        with self._lock:
            self._state = claimed.state
            self._durable = claimed.durable
            self._checkpoint = claimed.checkpoint
            self._owner = True
            self._lost = False
            self._cancel = self._cancel_raised = False
            self._dirty = False  # the claim wrote the attempt's start
        self._flushed_at = home.now()
        self._saved_mono = self._written_mono = time.monotonic()
        thread = threading.Thread(
            target=self._run,
            args=(claimed.target, claimed.args, claimed.kwargs, on_done),
            name=f"flask-silo-task-{self.name}",
            daemon=True,
        )
        self._thread = thread
        _HEARTBEATS.add(self)
        thread.start()

    @observed_attempt
    def _run(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        on_done: Callable[[], None] | None,
    ) -> None:
        try:
            target(self, *args, **kwargs)
            with self._lock:
                finished = not self._state.running
            if not finished and not self._lost:
                if self._cancel_raised:  # it caught TaskCancelled, cleaned up and returned
                    self._end_cancelled()
                else:
                    self._finish(complete=True, message=None)
        except TaskLeaseLost:
            pass  # logged when it was found out; nothing of this attempt is written
        except Exception as exc:
            if self._lost:
                pass
            elif self._cancel_raised or isinstance(exc, TaskCancelled):
                self._end_cancelled()  # never retried
            else:
                self._log("task '%s'%s failed", exc)
                durable = self._durable
                if durable is not None and self._state.attempt < durable.max_attempts:
                    self._retry(str(exc), durable)
                else:
                    self.fail(str(exc))
        finally:
            if self._durable is not None and self._home is not None:
                with self._lock:  # the row is the truth once the attempt is over
                    self._owner = self._owner and not self._lost and self._state.waiting is None
            _HEARTBEATS.discard(self)
            if on_done is not None:
                on_done()

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

    def _check_lease(self) -> None:
        if self._lost:
            raise TaskLeaseLost(self.name, self._state.attempt)
        if self._cancel and not self._cancel_raised and self._owner_of_run():
            self._cancel_raised = True  # once: the task's clean-up may report as it goes
            raise TaskCancelled(self.name)

    def _owner_of_run(self) -> bool:
        """Whether the calling thread is this run's (a cancel is raised there only)."""
        thread = self._thread
        return thread is None or thread is threading.current_thread() or not thread.is_alive()

    # -- cancel ----------------------------------------------------------------------

    def cancel(self) -> str:
        """Cancel the run, from any worker or process; says what it did (a ``str``).

        ``"cancelled"``: the run was queued or waiting for a retry, and never starts.
        ``"cancelling"``: it runs; its next ``update()``, ``log()`` or ``checkpoint()``
        raises :class:`TaskCancelled` (which the task may catch to clean up), and it
        ends ``cancelled``, never retried. ``"finished"``: it was over already, nothing
        is done; ``"idle"``: it never started. Asking again is harmless.
        """
        home = self._home
        if home is None:
            with self._lock:
                if not self._state.running:
                    return "finished" if self._state.started_at is not None else "idle"
                self._cancel = True
                self._state.cancel_requested = True
            return "cancelling"
        outcome = home.cancel(self.name)
        if outcome == "cancelling":
            _HEARTBEATS.cancel(home.task_id)  # a run in this process learns it now
            with self._lock:
                if self._owner:
                    self._cancel = True
                    self._state.cancel_requested = True
        return outcome

    def _end_cancelled(self) -> None:
        with self._lock:
            self._state.running = False
            self._state.waiting = None
            self._state.cancelled = True
            self._state.message = "Cancelled"
            self._state.finished_at = self._now()
            self._dirty = True
        self._flush(final=True)

    def update(self, progress: float | None = None, message: str | None = None) -> None:
        """Report progress (clamped to 0..100) and/or a status message."""
        self._check_lease()
        with self._lock:
            if progress is not None:
                self._state.progress = min(max(float(progress), 0.0), 100.0)
            if message is not None:
                self._state.message = message
            self._dirty = True
        self._maybe_flush()
        self._check_lease()  # the write may have found a cancel

    def log(self, message: str) -> None:
        """Append a log line (a linked task keeps the newest ``max_logs``)."""
        self._check_lease()
        with self._lock:
            self._state.logs.append(message)
            if self._home is not None:
                excess = len(self._state.logs) - self._home.max_logs
                if excess > 0:
                    del self._state.logs[:excess]
            self._dirty = True
        self._maybe_flush()
        self._check_lease()  # the write may have found a cancel

    def complete(self, message: str = "Done") -> None:
        """Mark the task finished successfully."""
        self._finish(complete=True, message=message)

    def fail(self, error: str) -> None:
        """Mark the task failed with *error* (a durable run is not retried after this)."""
        with self._lock:
            self._state.running = False
            self._state.error = error
            self._state.message = f"Failed: {error}"
            self._state.finished_at = self._now()
            self._dirty = True
        self._flush(final=True)

    def _retry(self, error: str, durable: Durable) -> None:
        """The attempt raised and retries are left: the run waits, then runs again."""
        now = self._now()
        attempt = self._state.attempt
        with self._lock:
            self._state.waiting = "retrying"
            self._state.retry_at = now + retry_delay(durable.retry_delay, attempt)
            self._state.last_error = error  # the row's error while the run waits
            self._state.message = f"Attempt {attempt} failed: {error}; retrying"
            self._dirty = True
        self._flush(final=True)

    def _finish(self, *, complete: bool, message: str | None) -> None:
        with self._lock:
            self._state.running = False
            self._state.complete = complete
            self._state.progress = 100.0
            if message is not None:
                self._state.message = message
            self._state.finished_at = self._now()
            self._dirty = True
        self._flush(final=True)

    # -- durable runs --------------------------------------------------------------

    @property
    def attempt(self) -> int:
        """The attempt number of a durable run (1, 2, ...); 1 for any other run once started."""
        state = self.state
        if state.durable:
            return state.attempt
        return 1 if state.started_at is not None else 0

    def checkpoint(self, data: Any) -> None:
        """Record *data* (JSON) on the row now, for a later attempt to resume from."""
        self._check_lease()
        try:
            text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a task checkpoint must be JSON: {exc}") from None
        with self._lock:
            self._checkpoint = text
            self._dirty = True
        if self._home is not None and self._owner:
            self._flush()
            self._check_lease()

    @property
    def last_checkpoint(self) -> Any:
        """The newest checkpoint of this run (from an earlier attempt too), or None."""
        text = self._checkpoint
        return None if text is None else json.loads(text)

    @property
    def lease_lost(self) -> bool:
        """Whether this attempt found out that another process runs the task now."""
        return self._lost

    @property
    def namespace(self) -> dict[str, Any] | None:
        """The namespace holding this task (what its run's changes are saved into)."""
        return self._home.namespace() if self._home is not None else None

    # -- persistence ---------------------------------------------------------------

    def _maybe_flush(self) -> None:
        home = self._home
        if home is None or not self._owner:
            return
        wait = home.flush_interval - (self._now() - self._flushed_at)
        if wait <= 0:
            self._flush()
        elif self._due is None:  # written by the heartbeat thread at the latest then
            self._due = time.monotonic() + wait
            _HEARTBEATS.poke()

    def _flush(self, *, final: bool = False) -> None:
        """Write the namespace holding this task and the run's state (and heartbeat).

        In one transaction: whoever reads the new state (``complete``) also
        reads what the thread wrote before changing it (``state["results"]``).
        A final write (the run ends) is retried while the database is
        unavailable, until the run's heartbeat would be stale.
        """
        home = self._home
        if home is None or not self._owner:
            return
        pause = 0.05
        while True:
            try:
                self._write(home)
                return
            except StorageUnavailable as exc:
                deadline = self._saved_mono + home.heartbeat_timeout
                if not final:
                    self._log("could not save task '%s'%s (the next write tries again)", exc)
                    return
                if time.monotonic() + pause > deadline:
                    self._log("could not save the end of task '%s'%s: the database is away", exc)
                    return
            except Exception as exc:
                self._log("could not save task '%s'%s", exc)
                return
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _write(self, home: TaskHome) -> None:
        with self._flush_lock:
            if self._lost:
                return
            with self._lock:
                state = self._state.copy()
                checkpoint = self._checkpoint
                self._dirty = False
                self._due = None
                self._flushed_at = home.now()
            self._written_mono = time.monotonic()
            try:
                owned = home.save(state, self.name, checkpoint=checkpoint)
            except BaseException:
                with self._lock:
                    self._dirty = True
                raise
            self._saved_mono = time.monotonic()
            if owned and not self._cancel and home.cancel_seen():
                with self._lock:
                    self._cancel = True
                    self._state.cancel_requested = True
            if not owned and state.durable and not self._lost:
                self._lost = True
                logger.warning(
                    "task '%s' of session %s: attempt %d lost its lease (another process "
                    "runs it now); its writes are refused",
                    self.name,
                    tag(home.sid),
                    state.attempt,
                )

    def _beat_due(self, now: float) -> float:
        """Monotonic time this task's next write is due (heartbeat, or a coalesced update)."""
        home = self._home
        interval = home.heartbeat_timeout / 4 if home is not None else 5.0
        due = self._written_mono + max(0.05, interval)
        pending = self._due
        return min(due, pending) if pending is not None else due

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
        """Whether the task is running (a durable run: also while queued or retrying)."""
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
    """One thread per process that heartbeats (and flushes) every linked running task.

    Each task is written when its heartbeat is due (a quarter of the heartbeat
    timeout after its last write) or when a coalesced update is due, whichever
    comes first.
    """

    def __init__(self) -> None:
        self._tasks: set[BackgroundTask] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def forget(self) -> None:
        """In a forked child: the parent's runs and thread are not this process's."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._tasks = set()
        self._thread = None

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

    def homes(self) -> list[TaskHome]:
        """The homes of the durable runs this process is running now."""
        with self._lock:
            return [t._home for t in self._tasks if t._home is not None and t._durable is not None]

    def poke(self) -> None:
        """A task has a write due sooner than the thread planned for."""
        self._wake.set()

    def cancel(self, task_id: str) -> None:
        """A cancel of *task_id* was recorded: its run here (if it runs here) learns it now."""
        with self._lock:
            tasks = [t for t in self._tasks if t._home is not None and t._home.task_id == task_id]
        for task in tasks:
            with task._lock:
                task._cancel = True
                task._state.cancel_requested = True

    def _loop(self) -> None:
        while True:
            with self._lock:
                tasks = list(self._tasks)
            now = time.monotonic()
            wait = 5.0
            for task in tasks:
                due = task._beat_due(now)
                if due <= now:
                    try:
                        task._flush()
                    except Exception as exc:
                        task._log("heartbeat of task '%s'%s failed", exc)
                    due = task._beat_due(time.monotonic())
                wait = min(wait, max(0.01, due - time.monotonic()))
            self._wake.wait(timeout=wait)
            self._wake.clear()


_HEARTBEATS = _Heartbeats()
# A forked child runs none of its parent's runs (their threads stayed in the parent).
os.register_at_fork(after_in_child=_HEARTBEATS.forget)


def running_homes() -> list[TaskHome]:
    """The rows of the durable runs this process is running now."""
    return _HEARTBEATS.homes()


class _HandBack:
    """At exit, a process hands back the durable runs it holds, so they run elsewhere now."""

    def __init__(self) -> None:
        self._hooks: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        atexit.register(self.run)

    def add(self, key: int, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks[key] = hook

    def run(self) -> None:
        with self._lock:
            hooks = list(self._hooks.values())
        for hook in hooks:
            try:
                hook()
            except Exception as exc:  # the database may be gone too: the leases lapse then
                logger.warning("could not hand back durable task runs at exit: %s", exc)


HAND_BACK = _HandBack()
