"""The storage interface of flask-silo and its in-process implementation.

:class:`SiloStorage` is the 12-method interface that flask-silo 0.1.6 defines;
any implementation (ours, or one written for flask-silo) plugs into
:class:`~flask_silo_sql.store.SessionStore`. A session is a dict of namespaces
plus a ``"_meta"`` dict holding ``created_at`` and ``last_active`` (Unix time).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any


class SiloStorage(ABC):
    """Abstract storage backend: sessions and remembered expired SIDs."""

    # -- sessions ----------------------------------------------------------

    @abstractmethod
    def get_session(self, sid: str) -> dict[str, Any] | None:
        """Return the session dict for *sid*, or ``None`` if there is none."""

    @abstractmethod
    def set_session(self, sid: str, data: dict[str, Any]) -> None:
        """Create or replace the session *sid*."""

    @abstractmethod
    def delete_session(self, sid: str) -> None:
        """Delete the session *sid* (no-op when missing)."""

    @abstractmethod
    def has_session(self, sid: str) -> bool:
        """Whether the session *sid* exists."""

    @abstractmethod
    def all_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        """A snapshot of every ``(sid, session)`` pair."""

    @abstractmethod
    def session_count(self) -> int:
        """How many sessions exist."""

    @abstractmethod
    def all_sids(self) -> list[str]:
        """Every live session ID."""

    # -- expired SIDs ------------------------------------------------------

    @abstractmethod
    def mark_expired(self, sid: str, timestamp: float) -> None:
        """Remember that *sid* expired at *timestamp* (Unix time)."""

    @abstractmethod
    def is_expired(self, sid: str) -> bool:
        """Whether *sid* is remembered as expired."""

    @abstractmethod
    def clear_expired(self, sid: str) -> None:
        """Forget that *sid* expired."""

    @abstractmethod
    def prune_expired(self, max_age: float) -> None:
        """Forget expired SIDs remembered for longer than *max_age* seconds."""

    @abstractmethod
    def expired_count(self) -> int:
        """How many expired SIDs are remembered."""


class InMemoryStorage(SiloStorage):
    """Sessions in a process-local dict: fast, single process, lost on restart.

    :meth:`get_session` returns the stored dict itself, as in flask-silo.
    """

    __slots__ = ("_data", "_expired")

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._expired: dict[str, float] = {}

    def get_session(self, sid: str) -> dict[str, Any] | None:
        return self._data.get(sid)

    def set_session(self, sid: str, data: dict[str, Any]) -> None:
        self._data[sid] = data

    def delete_session(self, sid: str) -> None:
        self._data.pop(sid, None)

    def has_session(self, sid: str) -> bool:
        return sid in self._data

    def all_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self._data.items())

    def session_count(self) -> int:
        return len(self._data)

    def all_sids(self) -> list[str]:
        return list(self._data)

    def mark_expired(self, sid: str, timestamp: float) -> None:
        self._expired[sid] = timestamp

    def is_expired(self, sid: str) -> bool:
        return sid in self._expired

    def clear_expired(self, sid: str) -> None:
        self._expired.pop(sid, None)

    def prune_expired(self, max_age: float, *, now: float | None = None) -> None:
        cutoff = (time.time() if now is None else now) - max_age
        for sid in [s for s, t in self._expired.items() if t < cutoff]:
            del self._expired[sid]

    def expired_count(self) -> int:
        return len(self._expired)
