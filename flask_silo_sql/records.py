"""Plain records passed between the store, the SQL storage and the request path."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from .engine import dumps

UTC = dt.timezone.utc


def to_datetime(timestamp: float) -> dt.datetime:
    """Unix time to an aware UTC datetime."""
    return dt.datetime.fromtimestamp(timestamp, UTC)


@dataclass(slots=True)
class LoadedSession:
    """A session row and its namespaces, as one SELECT returned them."""

    created_at: dt.datetime
    last_active: dt.datetime
    namespaces: dict[str, tuple[Any, int]]
    """Namespace name to ``(data, version)``."""
    texts: dict[str, str] = field(default_factory=dict)
    """The JSON text as stored, when the driver returned text (SQLite)."""


@dataclass(slots=True)
class NamespaceWrite:
    """One namespace to write; ``expected_version`` None means "insert"."""

    name: str
    data: str
    """The namespace as JSON text."""
    expected_version: int | None


@dataclass(slots=True)
class TaskRow:
    """A task run's state as written to ``silo_tasks``."""

    id: str
    sid: str
    name: str
    status: str
    progress: float
    message: str
    logs: list[str]
    error: str | None
    started_at: float | None
    finished_at: float | None
    now: float

    def params(self) -> dict[str, Any]:
        return {
            "k_id": self.id,
            "k_sid": self.sid,
            "k_name": self.name,
            "k_status": self.status,
            "k_progress": self.progress,
            "k_message": self.message,
            "k_logs": dumps(self.logs),
            "k_error": self.error,
            "k_started_at": None if self.started_at is None else to_datetime(self.started_at),
            "k_finished_at": None if self.finished_at is None else to_datetime(self.finished_at),
            "now": to_datetime(self.now),
        }


@dataclass(slots=True)
class FileRecord:
    """A stored file's row in ``silo_files``."""

    sid: str
    store: str
    filename: str
    size_bytes: int
    sha256: str
    content_type: str | None
    created_at: float


@dataclass(slots=True)
class SweepResult:
    """What one expiry sweep did."""

    expired: list[str]
    skipped_busy: int
    batches: int = 0
    pruned: int = 0
