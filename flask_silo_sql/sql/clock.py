"""The database's clock, read from any app server.

Every TTL, expiry, heartbeat and lease is measured on one clock per database,
so app servers whose own clocks disagree still agree on when a session
expires. On PostgreSQL that is the server's ``clock_timestamp()``: read now
and then (every :data:`RESYNC_S` seconds, on the connection in use) and carried
forward between readings by this process's monotonic clock, which a wrong or
stepped system clock does not move. The reading's error is at most half a round
trip. SQLite lives on one machine, whose clock every process shares.
"""

from __future__ import annotations

import threading
import time

from .executor import Connector
from .statements import Statements

RESYNC_S = 30.0
"""Seconds between two readings of the database server's clock."""


class DatabaseClock:
    """``clock()``: Unix seconds by the database's clock (see the module docstring)."""

    def __init__(self, connector: Connector, statements: Statements) -> None:
        self._connector = connector
        self._statements = statements
        self._lock = threading.Lock()
        self._base = 0.0
        self._at = -RESYNC_S - 1.0  # monotonic time of the reading: none yet

    def __call__(self) -> float:
        if self._statements.db_time is None:
            return time.time()
        elapsed = time.monotonic() - self._at
        if elapsed > RESYNC_S:
            self.sync()
            elapsed = time.monotonic() - self._at
        return self._base + elapsed

    def sync(self) -> None:
        """Read the server's clock now."""
        statement = self._statements.db_time
        if statement is None:
            return
        with self._lock, self._connector.executor() as ex:
            before = time.monotonic()
            value = ex.run(statement, {}).scalar()
            after = time.monotonic()
            self._base = self._statements.values.unix(value)
            self._at = (before + after) / 2
