"""TaskState: a snapshot of a task's state, as a status endpoint reports it, and the rows
(as plain values) it is built from."""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

WAITING = ("queued", "retrying")
"""Statuses of a durable run that waits for a process to claim it."""


@dataclass(frozen=True)
class StoredTask:
    """A task's row as the storage read it: plain values (Unix times, decoded logs)."""

    status: str
    """``running``, ``queued``, ``retrying``, ``complete``, ``failed`` or ``cancelled``."""
    progress: float
    message: str
    logs: list[str]
    error: str | None
    started_at: float | None
    finished_at: float | None
    attempt: int
    durable: bool
    cancel_requested: bool

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


CANCEL_OUTCOMES = ("cancelled", "cancelling", "finished", "idle")
"""What :meth:`BackgroundTask.cancel` answers: the run was waiting and never starts; it
runs and stops at its next ``update()``, ``log()`` or ``checkpoint()``; it was over
already (nothing done); it never started."""


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
    def from_stored(cls, row: StoredTask) -> TaskState:
        """The state a task's row records (any process's run, read back)."""
        status = row.status
        failed = status == "failed"
        return cls(
            running=status == "running" or status in WAITING,
            progress=row.progress,
            message=row.message,
            logs=list(row.logs),
            complete=status == "complete",
            error=row.error if failed or not row.durable else None,
            started_at=row.started_at,
            finished_at=row.finished_at,
            attempt=row.attempt,
            last_error=None if failed or not row.durable else row.error,
            durable=row.durable,
            waiting=status if status in WAITING else None,
            cancelled=status == "cancelled",
            cancel_requested=row.cancel_requested and status != "cancelled",
        )

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
