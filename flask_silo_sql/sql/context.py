"""What every part of the SQL backend shares: connection, statements, clock, settings.

A :class:`Context` is made once per store by the backend and handed down to
units, task rows and file rows, which need nothing else of the backend; it
also knows which unit the current request works through, so that an upload or
a task start in that request joins its commit as a :class:`Staged` write.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable
from typing import Any, Protocol

from ..backends.base import Policy
from ..errors import StateInsufficientStorage
from ..sealing import sealed_token
from . import sessions as ops
from .disk import SQLiteDisk
from .executor import Connector, Executor
from .statements import Statements


class Staged(Protocol):
    """Something a request does that is written with its commit (a task row, a file row)."""

    directory: str | None
    """A directory whose lock the commit holds while it writes this (uploads), or None."""

    locks_session: bool
    """Whether the commit locks the session row first (a write the session must
    outlive); False for a write guarded on its own (a stored response)."""

    def write(self, ex: Executor, now: float) -> None:
        """In the commit's transaction, with the session row locked."""

    def committed(self) -> None:
        """After the commit (start a thread, let a replaced file go)."""

    def discard(self) -> None:
        """The request failed: undo what was done ahead of the commit."""


class WritesWithNamespace(Protocol):
    """A staged write that can go out with the commit's one namespace write as one statement."""

    def write_with(self, ex: Executor, write: ops.Write, sid: str, now: float) -> int | None:
        """Write *write* (of session *sid*) and this item together, both or neither; the
        namespace's new version, or None when this database cannot (a transaction then
        writes them one after the other)."""


class Staging(Protocol):
    """A unit that takes :class:`Staged` writes (the current request's)."""

    sid: str

    @property
    def since(self) -> float:
        """When the unit began (by the store's clock)."""

    def stage(self, item: Staged) -> None: ...

    def staged(self) -> list[Staged]: ...

    def saw_session(self) -> None:
        """The session's row was seen in this request (the commit must not recreate it)."""


class Context:
    """The shared parts of one store's SQL backend (see the module docstring)."""

    def __init__(
        self,
        connector: Connector,
        statements: Statements,
        clock: Callable[[], float],
        policy: Policy,
        disk: SQLiteDisk | None = None,
    ) -> None:
        self.disk = disk
        """An SQLite database file's disk: its floor for state writes, its reserve."""
        self.connector = connector
        self.st = statements
        self.policy = policy
        self._database_clock = clock
        self._bound: contextvars.ContextVar[tuple[Staging, Any] | None] = contextvars.ContextVar(
            f"silo_unit_{id(self):x}", default=None
        )

    # -- time ------------------------------------------------------------------

    def check_disk(self, growth: int) -> None:
        """``507`` (:class:`StateInsufficientStorage`) for a write that grows state by
        *growth* bytes while an SQLite database's disk is below its floor."""
        floor = self.policy.db_min_free_bytes
        disk = self.disk
        if disk is None or not floor or growth <= 0:
            return
        if not disk.room(floor + growth):
            raise StateInsufficientStorage(floor)

    def now(self) -> float:
        """Unix seconds: the policy's injected clock, else the database's."""
        clock = self.policy.clock
        return clock() if clock is not None else self._database_clock()

    @property
    def touch_interval(self) -> float:
        return self.policy.touch_interval_for(min(60.0, self.policy.ttl / 20))

    def times(
        self, now: float, *, since: float | None = None, created_at: float | None = None
    ) -> ops.Times:
        """The times a write at *now* records (the session expires ttl + touch interval on,
        or at the end of its absolute lifetime, if sooner: known from *created_at*)."""
        lifetime = self.policy.ttl + self.touch_interval
        max_age = self.policy.session_max_age
        times = ops.Times(now, now + lifetime, now if since is None else since, max_age)
        return times if created_at is None else times.of(created_at)

    # -- encrypted namespaces ------------------------------------------------------

    def write(self, name: str, text: str, expected: int | None) -> ops.Write:
        """A namespace write of *text*, sealed when *name* is an encrypted namespace."""
        sealer = self.policy.sealer_for(name)
        return ops.Write(name, text, expected, None if sealer is None else sealer.seal(text))

    def stored_text(self, name: str, text: str) -> str:
        """What the ``data`` column of namespace *name* gets for JSON *text*."""
        sealer = self.policy.sealer_for(name)
        return text if sealer is None else sealer.seal(text)

    def opened(self, sid: str, name: str, stored: ops.Stored | None) -> ops.Stored | None:
        """A namespace row as read, its sealed value opened (an encrypted namespace).

        A plain value in an encrypted namespace (written before it was encrypted)
        is read as it is, and sealed by its next write or ``flask silo-db reencrypt``.
        """
        if stored is None:
            return None
        sealer = self.policy.sealer_for(name)
        token = None if sealer is None else sealed_token(stored.data)
        if sealer is None or token is None:
            return stored
        text = sealer.open(name, sid, token)
        return ops.Stored(json.loads(text), text, stored.version)

    # -- the current request's unit -----------------------------------------------

    def bind(self, unit: Staging) -> None:
        """*unit* is the current request's: this context holds one connection for it."""
        token = self.connector.hold()
        self._bound.set((unit, token))

    def unbind(self, unit: Staging) -> None:
        """End a request's unit: give its connection back."""
        bound = self._bound.get()
        if bound is not None and bound[0] is unit:
            self._bound.set(None)
            self.connector.release(bound[1])

    def current_unit(self, sid: str) -> Staging | None:
        """The unit of this context's request, if it works on *sid*."""
        bound = self._bound.get()
        return bound[0] if bound is not None and bound[0].sid == sid else None
