"""A daemon thread that runs :meth:`SessionStore.cleanup` every *interval* seconds.

Every worker may run one: on SQL storage concurrent sweeps never expire a
session twice, so no coordination between workers is needed.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import SessionStore

from .logs import silo_logger

logger = silo_logger("flask_silo_sql.cleanup")


class CleanupDaemon:
    """Periodic expiry in a stoppable daemon thread (restarted after a fork)."""

    __slots__ = ("_interval", "_pid", "_stop_event", "_store", "_thread")

    def __init__(self, store: SessionStore, interval: int | float | None = None) -> None:
        self._store = store
        self._interval = interval if interval is not None else store.cleanup_interval
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._pid = 0

    def _loop(self) -> None:
        while not self._stop_event.wait(timeout=self._interval):
            try:
                expired = self._store.cleanup()
                if expired:
                    logger.info("Expired %d idle session(s)", len(expired))
            except Exception:
                logger.exception("Error during session cleanup")

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self.running:
            return
        self._stop_event.clear()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="flask-silo-cleanup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it to finish its current pass."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 1)
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the thread is alive in this process."""
        return self._thread is not None and self._pid == os.getpid() and self._thread.is_alive()
