"""BackgroundTask: run a callable in a daemon thread and report its progress.

Same API and behaviour as flask-silo 0.1.6.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("flask_silo_sql.tasks")


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
            "logs": self.logs[-max_logs:] if max_logs > 0 else [],
            "complete": self.complete,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class BackgroundTask:
    """Runs ``target(task, *args, **kwargs)`` in a daemon thread with progress reporting.

    A target that returns without calling :meth:`complete` or :meth:`fail`
    is marked complete; one that raises is marked failed.
    """

    __slots__ = ("_lock", "_state", "_thread", "name")

    def __init__(self, name: str = "task") -> None:
        self.name = name
        self._state = TaskState()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start the task (RuntimeError if it is already running)."""
        with self._lock:
            if self._state.running:
                raise RuntimeError(f"Task '{self.name}' is already running")
            self._state = TaskState(running=True, message="Starting…", started_at=time.time())

        def run() -> None:
            try:
                target(self, *args, **kwargs)
                with self._lock:
                    if self._state.running:
                        self._state.running = False
                        self._state.complete = True
                        self._state.progress = 100.0
                        self._state.finished_at = time.time()
            except Exception as exc:
                self.fail(str(exc))
                logger.exception("Task '%s' failed", self.name)

        self._thread = threading.Thread(
            target=run, name=f"flask-silo-task-{self.name}", daemon=True
        )
        self._thread.start()

    def reset(self) -> None:
        """Clear the state so the task can run again (RuntimeError while running)."""
        with self._lock:
            if self._state.running:
                raise RuntimeError(f"Cannot reset running task '{self.name}'")
            self._state = TaskState()

    def update(self, progress: float | None = None, message: str | None = None) -> None:
        """Report progress (clamped to 0..100) and/or a status message."""
        with self._lock:
            if progress is not None:
                self._state.progress = min(max(float(progress), 0.0), 100.0)
            if message is not None:
                self._state.message = message

    def log(self, msg: str) -> None:
        """Append a log line."""
        with self._lock:
            self._state.logs.append(msg)

    def complete(self, msg: str = "Done") -> None:
        """Mark the task finished successfully."""
        with self._lock:
            self._state.running = False
            self._state.complete = True
            self._state.progress = 100.0
            self._state.message = msg
            self._state.finished_at = time.time()

    def fail(self, error: str) -> None:
        """Mark the task failed with *error*."""
        with self._lock:
            self._state.running = False
            self._state.error = error
            self._state.message = f"Failed: {error}"
            self._state.finished_at = time.time()

    @property
    def state(self) -> TaskState:
        """A copy of the current state."""
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

    @property
    def is_running(self) -> bool:
        """Whether the task is running."""
        with self._lock:
            return self._state.running

    @property
    def is_complete(self) -> bool:
        """Whether the task finished successfully."""
        with self._lock:
            return self._state.complete

    @property
    def is_failed(self) -> bool:
        """Whether the task failed."""
        with self._lock:
            return self._state.error is not None
