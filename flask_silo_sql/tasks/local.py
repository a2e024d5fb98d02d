"""The task queue of a storage without tables: runs live in the process that started them.

flask-silo's way: a run is its thread, so nothing is ever queued, claimed or handed
back. A :class:`~flask_silo_sql.tasks.TaskRunner` over such a storage finds nothing
to run, as it would over a database whose queue is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

    from .runs import Claimed


class LocalQueue:
    """A :class:`~.queue.TaskQueue` with nothing in it, ever."""

    __slots__ = ()

    def register(self, worker: str, kind: str, concurrency: int) -> None:
        return None  # no table lists the processes

    def unregister(self, worker: str) -> None:
        return None

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        return []

    def hand_back(self, worker: str) -> int:
        return 0

    def listen(self, stop: threading.Event, wake: Callable[[], None]) -> bool:
        return False  # no notifications: a runner polls (and finds nothing)
