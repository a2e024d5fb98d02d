"""Backends of :class:`~flask_silo_sql.store.SessionStore`: the protocol and the memory one.

:func:`backend_for` picks the backend a storage calls for: a storage that
offers ``silo_backend(policy)`` (``SQLStorage``) supplies its own; any other
flask-silo ``SiloStorage`` is served by :class:`MemoryBackend`.
"""

from __future__ import annotations

from typing import Any

from ..tasks.queue import TaskQueue
from .base import Backend, Policy, SweepResult, Unit
from .memory import MemoryBackend

__all__ = [
    "Backend",
    "MemoryBackend",
    "Policy",
    "SweepResult",
    "TaskQueue",
    "Unit",
    "backend_for",
]


def backend_for(storage: Any, policy: Policy) -> Backend:
    """The backend that serves *storage* for a store with *policy*."""
    make = getattr(storage, "silo_backend", None)
    if callable(make):
        backend: Backend = make(policy)
        return backend
    return MemoryBackend(storage, policy)
