"""Queued durable runs with no process alive to run them: said in the log and the state.

With ``SILO_TASK_RUNNER = "worker"`` web processes only queue runs; with no
``flask silo-db worker`` alive, a run would say ``Queued`` forever and nothing
would tell why. When a run is queued, and when a queued run's state is read,
the live claimers are counted (``silo_workers`` rows whose heartbeat is newer
than the heartbeat timeout, as ``flask silo-db stats`` counts them); with none,
a warning is logged, at most once per :data:`WARN_EVERY_S` seconds per store
in each process, by the storage's clock.
"""

from __future__ import annotations

import threading
import weakref

from ..logs import silo_logger
from .context import Context
from .executor import Executor

logger = silo_logger("flask_silo_sql.tasks")

WARN_EVERY_S = 60.0
"""The least time between two warnings of one store in one process."""

_warned: weakref.WeakKeyDictionary[Context, float] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def live_workers(ctx: Context, ex: Executor, now: float) -> int:
    """How many processes that claim runs are alive (their heartbeat is recent)."""
    stale_before = ctx.st.values.time(now - ctx.policy.heartbeat_timeout)
    return int(ex.run(ctx.st.count_live_workers, {"stale_before": stale_before}).scalar() or 0)


def watch_queue(ctx: Context, ex: Executor, now: float, queued_for: float) -> int:
    """The live workers; none: a warning (see the module docstring) of a run queued
    *queued_for* seconds ago."""
    count = live_workers(ctx, ex, now)
    if count:
        return count
    with _lock:
        last = _warned.get(ctx)
        if last is not None and 0 <= now - last < WARN_EVERY_S:
            return 0
        _warned[ctx] = now
    logger.warning(
        "durable task runs are queued and no task worker is alive to run them "
        "(SILO_TASK_RUNNER = %r): start one with `flask silo-db worker`; a run has waited "
        "%.0f s (this warning repeats every %.0f s while none is alive)",
        ctx.policy.task_runner,
        queued_for,
        WARN_EVERY_S,
    )
    return 0
