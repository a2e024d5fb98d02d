"""A registered task function (``@silo.task``): its spec, its retries, its stand-in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

NAMESPACE_ARG = "__silo_namespace__"
"""Key of the JSON object that stands, in a durable run's arguments, for the namespace
holding the task (the worker that runs it passes that namespace, freshly loaded)."""


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


def unregistered(target: str) -> Callable[..., Any]:
    """A stand-in for a function this process does not know: the attempt fails saying so."""

    def missing(task: Any, *args: Any, **kwargs: Any) -> None:
        raise LookupError(
            f"task function {target!r} is not registered in this process: import the "
            "module that defines it (@silo.task) in the app"
        )

    return missing
