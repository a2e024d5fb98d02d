"""What makes a run durable, and the attempt a process claimed: built from its row."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .spec import NAMESPACE_ARG, TaskSpec, unregistered
from .state import RunRow, TaskState


class Attempting(Protocol):
    """What runs a claimed attempt: its task (a :class:`~.task.BackgroundTask`)."""

    def execute(self, claimed: Claimed, on_done: Callable[[], None] | None = None) -> None: ...


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

    task: Attempting
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
        task: Attempting,
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
