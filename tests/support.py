"""Plain helpers shared by the test modules (the database fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, Engine, inspect, text

from flask_silo_sql import SessionStore, SQLStorage, session_key
from flask_silo_sql.sql.models import SILO_TABLES

T0 = 1_700_000_000.0
"""The fixed time every :class:`Clock` starts at unless told otherwise."""

SILO_TABLES_CHILD_FIRST = (
    "silo_workers",
    "silo_idempotency_keys",
    "silo_tasks",
    "silo_file_chunks",
    "silo_files",
    "silo_namespaces",
    "silo_expired_sids",
    "silo_sessions",
)
"""Every table the migrations create, in an order that deletes children first."""

UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
"""Under CI a missing server or tool fails the test it is needed by (locally it skips)."""


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
    """An ``on_create``/``on_expire`` callback that remembers the SIDs it was called with.

    Thread-safe: sweeps may call it from several threads.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, sid: str) -> None:
        with self._lock:
            self.calls.append(sid)


_Log = TypeVar("_Log", bound="StatementLog")


def sql_storage(store: SessionStore) -> SQLStorage:
    """The SQL storage of *store* (a test's assertion that it has one)."""
    storage = store.storage
    assert isinstance(storage, SQLStorage), f"not SQL storage: {storage!r}"
    return storage


class StatementLog:
    """SQL statements a storage sends while attached, whitespace folded (thread-safe).

    It listens at the storage's statement hook, the seam every statement goes
    through whichever executor runs it, so the path under test is unchanged.
    """

    def __init__(self, storage: SQLStorage) -> None:
        self.storage = storage
        self.statements: list[str] = []
        self.names: list[str] = []
        self.values: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._previous: Any = None

    def _record(self, name: str, statement: str, values: Mapping[str, Any]) -> None:
        with self._lock:
            self.statements.append(" ".join(statement.split()))
            self.names.append(name)
            self.values.append(dict(values))
        self.seen(name, values)
        if self._previous is not None:
            self._previous(name, statement, values)

    def seen(self, name: str, values: Mapping[str, Any]) -> None:
        """Called for each statement (outside the log's lock): for subclasses."""

    def __enter__(self: _Log) -> _Log:
        self._previous = self.storage.statement_hook
        self.storage.statement_hook = self._record
        return self

    def __exit__(self, *exc: object) -> None:
        self.storage.statement_hook = self._previous

    def starting(self, prefix: str) -> list[str]:
        """The statements that begin with *prefix*, ignoring case."""
        with self._lock:
            return [s for s in self.statements if s.upper().startswith(prefix.upper())]


def at(timestamp: float) -> dt.datetime:
    """Unix time as an aware UTC datetime (what the tables' timestamp columns take)."""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def unix(value: Any) -> float:
    """A timestamp a statement was given (text on SQLite, a datetime on PostgreSQL)."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc).timestamp()


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of *size_mib* MiB mounted at *where* (needs root, or CAP_SYS_ADMIN).

    Mounting is a capability of the machine, not something the setup can install: the
    test is skipped, loudly, wherever it is missing (CI included).
    """
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"FULL-DISK TEST NOT RUN: cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def as_before_hashing(conn: Connection, sids: list[str], uploads: Path) -> None:
    """Put *sids* back in clear, as the version before migration 0009 stored them (the
    tests' own inverse of it): rows under the SID, upload directories named by it."""
    inspector = inspect(conn)
    children = [
        t
        for t in sorted(SILO_TABLES)
        if t not in ("silo_sessions", "silo_expired_sids")
        and any(c["name"] == "sid" for c in inspector.get_columns(t))
    ]
    columns = ", ".join(
        c["name"] for c in inspector.get_columns("silo_sessions") if c["name"] != "sid"
    )
    for sid in sids:
        pair = {"old": session_key(sid), "new": sid}
        conn.execute(
            text(
                f"INSERT INTO silo_sessions (sid, {columns}) SELECT :new, {columns} "
                "FROM silo_sessions WHERE sid = :old"
            ),
            pair,
        )
        for table in children:
            conn.execute(text(f"UPDATE {table} SET sid = :new WHERE sid = :old"), pair)
        conn.execute(text("DELETE FROM silo_sessions WHERE sid = :old"), pair)
        conn.execute(text("UPDATE silo_expired_sids SET sid = :new WHERE sid = :old"), pair)
        directory = uploads / session_key(sid)
        if directory.exists():
            directory.rename(uploads / sid)


def row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
            for t in sorted(SILO_TABLES)
            if t != "silo_workers"
        }
