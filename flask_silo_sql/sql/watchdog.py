"""Every wait on a PostgreSQL server is bounded, even when the server is frozen.

A server that stops answering (stopped, swapping, a dead network path whose
packets still get acknowledged) cannot enforce its own ``statement_timeout``,
and a blocked read on its socket never returns: a request would hang until
the WSGI server kills its worker. So each process runs one watchdog thread
that looks at the connections silo is using every :data:`TICK_S` seconds; a
statement (or commit) waiting longer than its executor's timeout gets the
connection's socket shut down. The blocked read then fails at once, the
connection is discarded, and the request answers ``503``. Connection
checkouts are bounded by the engine's ``connect_timeout`` and ``pool_timeout``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from typing import Protocol

from ..logs import silo_logger

logger = silo_logger("flask_silo_sql.sql")

TICK_S = 0.1
"""How often the watchdog looks (the bound is the timeout plus at most this)."""


class Watched(Protocol):
    """A connection in use, which the watchdog may cut off."""

    def cut_off_if_overdue(self, now: float) -> None:
        """Shut the connection's socket down if its current wait began too long before *now*."""


class Watchdog:
    """The process's watchdog thread (started on first use, again after a fork)."""

    def __init__(self) -> None:
        self._watched: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, item: Watched) -> None:
        with self._lock:
            self._watched.add(item)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="flask-silo-watchdog", daemon=True
                )
                self._thread.start()

    def forget(self, item: Watched) -> None:
        with self._lock:
            self._watched.discard(item)

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            with self._lock:
                watched = list(self._watched)
            for item in watched:
                item.cut_off_if_overdue(now)


def shut_down(fd: int) -> None:
    """Shut down the socket behind *fd* (both ways): a read blocked on it fails at once."""
    try:
        duplicate = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


WATCHDOG = Watchdog()
