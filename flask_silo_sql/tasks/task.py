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

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import StorageUnavailable, TaskAlreadyRunning, TaskCancelled, TaskLeaseLost
from ..instruments.seams import observed_attempt
from ..logs import log_failure
from ..sids import tag
from .home import TaskHome
from .log import logger
from .runs import Claimed, Durable
from .spec import retry_delay, spec_of
from .state import TaskState

TASK_MARKER = "__silo_task__"
"""Key of the JSON object that stands for a linked task inside a namespace."""


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
