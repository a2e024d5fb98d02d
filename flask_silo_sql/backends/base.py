"""The backend protocol: what :class:`~flask_silo_sql.store.SessionStore` delegates to.

The store keeps flask-silo's API, the namespace registry, the callbacks and
the settings (its :class:`Policy`); a backend keeps the sessions. Two
implement it: :class:`~flask_silo_sql.backends.memory.MemoryBackend` over any
flask-silo :class:`~flask_silo_sql.storage.SiloStorage` (flask-silo's
semantics), and the SQL backend of :class:`~flask_silo_sql.sql.SQLStorage`.

Work on one session goes through a :class:`Unit`: a request opens one, reads
namespaces through it, and commits it when the response is known; scripts use
one as a locked transaction. File rows, a task queue and idempotency records
are capabilities a backend may lack; it then gives an object that says so,
never ``None``: :data:`~flask_silo_sql.files.unrecorded.UNRECORDED` (file
stores keep flask-silo's disk-only behaviour),
:class:`~flask_silo_sql.tasks.local.LocalQueue` (runs live in the process
that started them, flask-silo's behaviour too), and
:class:`~flask_silo_sql.errors.IdempotencyUnsupported` raised (an
``@silo.idempotent`` view answers that error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..tasks.queue import TaskQueue

if TYPE_CHECKING:
    from ..files.catalog import FileKeeping
    from ..idempotency import IdempotencyRecords
    from ..sealing import Sealer
    from ..tasks.spec import TaskSpec


class Policy(Protocol):
    """The settings and hooks of a store, as a backend sees them."""

    ttl: int
    expired_retain: int
    @property
    def heartbeat_timeout(self) -> float: ...

    @property
    def max_state_bytes(self) -> int | None: ...

    @property
    def db_min_free_bytes(self) -> int | None:
        """SQLite: state writes that grow a session stop (``507``) below this much free disk."""

    @property
    def sweep_batch_size(self) -> int: ...

    @property
    def session_max_age(self) -> float | None:
        """Absolute lifetime of a session (seconds from its creation), or None."""

    @property
    def task_flush_interval(self) -> float: ...

    @property
    def task_max_logs(self) -> int: ...

    @property
    def task_runner(self) -> str:
        """``thread`` (the process that starts a run runs it) or ``worker`` (start only queues)."""

    @property
    def task_retries(self) -> int: ...

    @property
    def task_retry_delay(self) -> float: ...

    @property
    def event_retention(self) -> float: ...

    @property
    def clock(self) -> Callable[[], float] | None:
        """An injected clock (Unix seconds), or None for the backend's own."""

    @property
    def factories(self) -> Mapping[str, Callable[[], dict[str, Any]]]:
        """The registered namespaces and the factories of their default state."""

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        """The registered task functions, by name (their runs are durable)."""

    def sealer_for(self, namespace: str) -> Sealer | None:
        """The sealer of an encrypted namespace (None for a plain one)."""

    def touch_interval_for(self, default: float) -> float:
        """Seconds between ``last_active`` writes (*default* unless configured)."""

    def vetoes(self, sid: str, session: dict[str, Any]) -> bool:
        """Whether the busy check keeps *sid* from expiry and reset."""

    @property
    def has_busy_check(self) -> bool: ...

    def created(self, sid: str) -> None:
        """Fire ``on_create`` (after the commit that created *sid*)."""

    def expired(self, sid: str) -> None:
        """Fire ``on_expire`` (after the commit that expired *sid*)."""


@dataclass(slots=True)
class SweepResult:
    """What one expiry sweep did."""

    expired: list[str] = field(default_factory=list)
    skipped_busy: int = 0
    batches: int = 0
    pruned: int = 0
    keys_expired: int = 0
    """Idempotency keys forgotten (older than their view's ttl)."""


class Unit(Protocol):
    """Work on one session: lazy reads, then one commit (or a rollback)."""

    sid: str

    def expired(self) -> bool:
        """Whether the session is gone and its SID remembered as expired (``410``)."""

    def namespace(self, name: str) -> dict[str, Any]:
        """One registered namespace (loaded on first use)."""

    def session(self) -> dict[str, Any]:
        """Every registered namespace, plus ``_meta``."""

    def lock(self) -> None:
        """Hold the session locked until the end of the unit (creating it if missing)."""

    @property
    def locked(self) -> bool: ...

    @property
    def loaded(self) -> bool:
        """Whether any state was read through this unit."""

    def commit(self, *, state: bool = True, files: bool = True) -> None:
        """Write what changed and refresh ``last_active``; *state*/*files* False discards
        the state changes / the staged files (a failed request)."""

    def rollback(self) -> None:
        """Discard everything (a request that ended with an exception)."""

    def reset(self) -> None:
        """Fresh factory state for the session (SessionBusy while busy)."""

    def close(self) -> None:
        """Release what the unit holds (after commit or rollback, or instead of them)."""


class Backend(Protocol):
    """Sessions for a :class:`~flask_silo_sql.store.SessionStore`."""

    @property
    def touch_interval(self) -> float:
        """Seconds between two ``last_active`` writes of one session."""

    def unit(self, sid: str, *, locking: bool = False) -> Unit:
        """Open a unit of work on *sid* (nothing is read until it is used); with
        *locking*, its first read locks the session until the unit ends."""

    def request(self, sid: str, *, locking: bool = False, issued: bool = False) -> Unit:
        """A unit for the current request: until it is closed, every operation of this
        context (files, tasks, other storage calls) uses its connection. *issued*: the
        SID was made for this request."""

    def get(self, sid: str) -> dict[str, Any]:
        """flask-silo's ``get``: the session (created if missing), touched."""

    def save(self, sid: str, session: dict[str, Any]) -> None:
        """flask-silo's ``save``: store what :meth:`get` returned, changed."""

    def touch(self, sid: str) -> None: ...

    def exists(self, sid: str) -> bool: ...

    def is_expired(self, sid: str) -> bool: ...

    def destroy(self, sid: str) -> None: ...

    def reset(self, sid: str) -> None: ...

    def rotate(
        self,
        old: str,
        new: str,
        before_commit: Callable[[], Callable[[], None]],
        *,
        renew: bool = False,
    ) -> bool:
        """Move everything of session *old* to SID *new* in one transaction (False: no
        session). *before_commit* runs inside it and returns how to undo what it did.
        *renew*: the session's absolute lifetime starts again (its ``created_at`` is now)."""

    def sweep(
        self, *, batch_size: int, dry_run: bool, progress: Callable[[int], None] | None
    ) -> SweepResult: ...

    def active_count(self) -> int: ...

    def expired_count(self) -> int: ...

    def all_sids(self) -> list[str]: ...

    def peek(self, sid: str) -> dict[str, Any]:
        """The session as it is, for a busy check: nothing created, nothing touched."""

    def file_records(self, store: str) -> FileKeeping:
        """Where file store *store* keeps its rows, or ``UNRECORDED`` (its disk alone)."""

    def task_queue(self) -> TaskQueue:
        """Durable task runs, or a ``LocalQueue`` (every run lives in its process, flask-silo's
        way: nothing is queued, nothing is claimed)."""

    def idempotency_records(self) -> IdempotencyRecords:
        """Where idempotency keys are kept; a backend that keeps none raises
        :class:`~flask_silo_sql.errors.IdempotencyUnsupported` (one error, no ``None`` to test)."""

    def now(self) -> float:
        """The time by this backend's clock (the policy's injected clock first)."""
