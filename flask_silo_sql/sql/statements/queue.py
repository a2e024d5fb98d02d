"""The processes that claim durable runs: the claim, and the processes' own rows."""

from __future__ import annotations

from sqlalchemy import (
    Integer,
    String,
    and_,
    any_,
    bindparam,
    delete,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.sql import ColumnElement

from ..models import tasks, workers
from .kit import Kit, ts
from .task import STALE_BEFORE, WORKER, exhausted_run, lost_values, waiting

CLAIMED_COLUMNS = (
    tasks.c.id,
    tasks.c.sid,
    tasks.c.name,
    tasks.c.namespace,
    tasks.c.target,
    tasks.c.args,
    tasks.c.attempt,
    tasks.c.max_attempts,
    tasks.c.retry_delay,
    tasks.c.checkpoint,
    tasks.c.progress,
    tasks.c.message,
    tasks.c.logs,
    tasks.c.error,
    tasks.c.started_at,
)
"""What a claim returns of each run it claimed (:meth:`SQLTaskQueue._ready` reads them)."""


class QueueStatements:
    """The statements of the processes that claim durable runs, compiled for one engine."""

    def __init__(self, k: Kit) -> None:
        self._queue_claims(k)
        self._queue_workers(k)

    def _queue_claims(self, k: Kit) -> None:
        """Due durable runs claimed by a process (each claim the next attempt)."""
        prepare = k.prepare
        now = k.now
        postgresql = k.postgresql
        worker = WORKER
        # A process claims durable runs that are due: queued or retrying ones whose
        # time has come, and running ones whose lease lapsed with attempts left. Each
        # claim is the next attempt (so the previous one's writes are refused).
        claimable = and_(
            tasks.c.target.is_not(None),
            tasks.c.attempt < tasks.c.max_attempts,
            tasks.c.cancel_requested_at.is_(None),
            or_(
                and_(waiting(), tasks.c.run_after <= now),
                and_(tasks.c.status == "running", tasks.c.lease_expires_at < now),
            ),
        )
        candidates = (
            select(tasks.c.id)
            .where(claimable)
            .order_by(func.coalesce(tasks.c.run_after, tasks.c.lease_expires_at))
            .limit(bindparam("limit", type_=Integer()))
        )
        chosen: ColumnElement[bool]
        if postgresql:
            # ARRAY(subquery) is evaluated once. Under ``IN (subquery)`` PostgreSQL may
            # rescan the subquery for each row it updates, and a rescan skips the rows this
            # statement has already updated: ``LIMIT`` would then bound nothing, and one
            # claim take every due run whatever the claimer's concurrency.
            candidates = candidates.with_for_update(skip_locked=True)
            chosen = tasks.c.id == any_(func.array(candidates.scalar_subquery()))
        else:
            chosen = tasks.c.id.in_(candidates.scalar_subquery())
        self.claim_runs = prepare(
            "claim_runs",
            update(tasks)
            .where(chosen, claimable)
            .values(
                status="running",
                progress=0.0,
                message="Starting…",
                attempt=tasks.c.attempt + 1,
                started_at=now,
                heartbeat_at=now,
                lease_expires_at=ts("lease"),
                worker=worker,
                finished_at=null(),
                run_after=null(),
            )
            .returning(*CLAIMED_COLUMNS),
        )
        # Runs out of attempts fail (a claim does it now and then, see FAIL_EXHAUSTED_EVERY).
        self.fail_exhausted = prepare(
            "fail_exhausted", update(tasks).where(exhausted_run(k)).values(**lost_values(k))
        )

    def _queue_workers(self, k: Kit) -> None:
        """The processes that claim runs: registered, beating, dropped, listed."""
        prepare = k.prepare
        insert = k.insert
        now = k.now
        worker = WORKER
        stale_before = STALE_BEFORE
        registered = {
            "id": worker,
            "hostname": bindparam("hostname", type_=String(255)),
            "pid": bindparam("pid", type_=Integer()),
            "kind": bindparam("kind", type_=String(16)),
            "concurrency": bindparam("concurrency", type_=Integer()),
            "started_at": now,
            "heartbeat_at": now,
        }
        worker_row = insert(workers).values(**registered)
        self.register_worker = prepare(
            "register_worker",
            worker_row.on_conflict_do_update(
                index_elements=[workers.c.id],
                set_={"heartbeat_at": worker_row.excluded.heartbeat_at},
            ),
        )
        self.beat_worker = prepare(
            "beat_worker", update(workers).where(workers.c.id == worker).values(heartbeat_at=now)
        )
        self.drop_worker = prepare("drop_worker", delete(workers).where(workers.c.id == worker))
        self.prune_workers = prepare(
            "prune_workers", delete(workers).where(workers.c.heartbeat_at < stale_before)
        )
        running_in = (
            select(func.count())
            .where(tasks.c.worker == workers.c.id, tasks.c.status == "running")
            .scalar_subquery()
        )
        self.live_workers = prepare(
            "live_workers",
            select(
                workers.c.id,
                workers.c.hostname,
                workers.c.pid,
                workers.c.kind,
                workers.c.concurrency,
                workers.c.started_at,
                workers.c.heartbeat_at,
                running_in,
            )
            .where(workers.c.heartbeat_at >= stale_before)
            .order_by(workers.c.started_at),
        )
        self.count_live_workers = prepare(
            "count_live_workers",
            select(func.count()).where(workers.c.heartbeat_at >= stale_before),
        )
        self.oldest_queued = prepare(
            "oldest_queued",
            select(func.min(tasks.c.run_after)).where(tasks.c.status == "queued"),
        )
