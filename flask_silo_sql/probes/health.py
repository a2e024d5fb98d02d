"""Is this app able to serve? The checks behind ``flask silo-db health`` and the
readiness view: the database answers, its silo schema is at this version's head,
and, when durable runs wait for ``flask silo-db worker`` processes
(``SILO_TASK_RUNNER = "worker"``), at least one is alive.

Each check is one short query; a failed one says what to do next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SiloError

if TYPE_CHECKING:
    from ..app_state import SiloApp


@dataclass
class Health:
    """The answer: healthy or not, why in one line, and each check's result."""

    healthy: bool
    reason: str
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unavailable",
            "reason": self.reason,
            "checks": self.checks,
        }


def check(state: SiloApp) -> Health:
    """Run the checks of *state*'s app, in order; the first that fails is the reason."""
    from ..sql import SQLStorage, schema

    store = state.store
    storage = store.storage
    checks: dict[str, Any] = {}
    if not isinstance(storage, SQLStorage):
        checks["database"] = "not used"
        return Health(True, "healthy: state is kept in memory (no database)", checks)
    try:
        revision, head = schema.current(storage.engine), schema.head()
    except SiloError as exc:
        checks["database"] = "unreachable"
        return Health(False, f"database unreachable: {exc}", checks)
    checks["database"] = "reachable"
    checks["schema"] = {"current": revision, "head": head}
    if revision != head:
        return Health(
            False,
            f"schema behind: at {revision or 'nothing'}, this version needs {head}: "
            "run `flask silo-db upgrade`",
            checks,
        )
    reason = f"healthy: database reachable, schema current ({head})"
    if store.task_runner == "worker":
        try:
            workers = live_workers(state)
        except SiloError as exc:
            return Health(False, f"database unreachable: {exc}", checks)
        checks["workers"] = workers
        if workers == 0:
            return Health(
                False,
                "no live task worker (SILO_TASK_RUNNER = 'worker'): queued runs wait; "
                "start `flask silo-db worker`",
                checks,
            )
        reason += f", {workers} live worker{'s' if workers != 1 else ''}"
    return Health(True, reason, checks)


def live_workers(state: SiloApp) -> int:
    """``flask silo-db worker`` processes with a recent heartbeat."""
    from ..sql import SQLStorage

    store = state.store
    storage = store.storage
    assert isinstance(storage, SQLStorage)
    st = storage.statements
    stale_before = {"stale_before": st.values.time(store.now() - store.heartbeat_timeout)}
    with storage.connector.executor() as ex:
        rows = ex.run(st.live_workers, stale_before).rows
    return sum(1 for row in rows if row[3] == "worker")
