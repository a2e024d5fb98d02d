"""The durable runs' queue, as the processes that claim and run them see it: the
protocol a backend with tables implements (:class:`~flask_silo_sql.sql.task_queue.SQLTaskQueue`),
and :class:`~.local.LocalQueue` for one without."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .runs import Claimed


class TaskQueue(Protocol):
    """Durable task runs, as the processes that claim and run them see them."""

    def register(self, worker: str, kind: str, concurrency: int) -> None:
        """Record (or refresh) process *worker* as live."""

    def unregister(self, worker: str) -> None: ...

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        """Claim up to *limit* due runs for *worker*, each as its next attempt."""

    def hand_back(self, worker: str) -> int:
        """Queue again, at once, the runs *worker* holds (it is stopping); how many."""

    def listen(self, stop: threading.Event, wake: Callable[[], None]) -> bool:
        """Call *wake* whenever a run is queued, until *stop*; False at once when this
        database has no notifications (then claimers poll)."""
