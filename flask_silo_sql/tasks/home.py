"""TaskHome: where a linked task's state lives (a row of the SQL backend's ``silo_tasks``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .runs import Durable
from .spec import TaskSpec
from .state import TaskState


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
