"""Plain helpers shared by the test modules (the database fixtures are in conftest.py)."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from sqlalchemy import Engine, event

T0 = 1_700_000_000.0
"""The fixed time every :class:`Clock` starts at unless told otherwise."""

SILO_TABLES_CHILD_FIRST = (
    "silo_tasks",
    "silo_files",
    "silo_namespaces",
    "silo_expired_sids",
    "silo_sessions",
)
"""Every table the migrations create, in an order that deletes children first."""


class Clock:
    """An injectable clock (``clock=...``) that moves only when told to; thread-safe."""

    def __init__(self, now: float = T0) -> None:
        self._now = now
        self._lock = threading.Lock()

    @property
    def now(self) -> float:
        with self._lock:
            return self._now

    @now.setter
    def now(self, value: float) -> None:
        with self._lock:
            self._now = value

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock on by *seconds*; return the new time."""
        with self._lock:
            self._now += seconds
            return self._now


class Recorder:
    """An ``on_create``/``on_expire`` callback that remembers the SIDs it was called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, sid: str) -> None:
        self.calls.append(sid)


_Log = TypeVar("_Log", bound="StatementLog")


class StatementLog:
    """SQL statements an engine executes while attached, whitespace folded (thread-safe)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        self._lock = threading.Lock()

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with self._lock:
            self.statements.append(" ".join(statement.split()))

    def __enter__(self: _Log) -> _Log:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def starting(self, prefix: str) -> list[str]:
        """The statements that begin with *prefix*, ignoring case."""
        with self._lock:
            return [s for s in self.statements if s.upper().startswith(prefix.upper())]
