"""Task rows: a run started, fenced by its attempt, declared lost, handed back, deleted."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.sql import ColumnElement

from ...tasks.state import WAITING
from ..models import namespaces, sessions, tasks
from .kit import Kit, ts

NOTIFY_CHANNEL = "silo_tasks"
"""The PostgreSQL channel a queued durable run is announced on (workers LISTEN to it)."""
TASK_ID = bindparam("id", type_=String(32))
STARTED_AT = ts("started_at")
ATTEMPT = bindparam("attempt", type_=Integer())
WORKER = bindparam("worker", type_=String(64))
STALE_BEFORE = ts("stale_before")


def waiting() -> ColumnElement[bool]:
    """A durable run waits to be claimed."""
    return or_(*(tasks.c.status == literal(status) for status in WAITING))


def live_task(now: Any, stale_before: Any) -> ColumnElement[bool]:
    """A task row whose run is not over (it keeps its session busy, refuses a new start).

    A plain run: ``running`` with a fresh heartbeat. A durable run: waiting to be
    claimed, or running, unless its lease lapsed with no attempt left.
    """
    plain = and_(
        tasks.c.target.is_(None), tasks.c.status == "running", tasks.c.heartbeat_at >= stale_before
    )
    durable = and_(
        tasks.c.target.is_not(None),
        or_(
            waiting(),
            and_(
                tasks.c.status == "running",
                or_(
                    tasks.c.lease_expires_at >= now,
                    and_(
                        tasks.c.attempt < tasks.c.max_attempts,
                        tasks.c.cancel_requested_at.is_(None),
                    ),
                ),
            ),
        ),
    )
    return or_(plain, durable)


def _written(k: Kit) -> dict[str, Any]:
    """What a run's writes set."""
    return {
        "status": bindparam("status", type_=String(16)),
        "progress": bindparam("progress", type_=Float()),
        "message": bindparam("message", type_=Text()),
        "logs": k.jsonb(bindparam("logs", type_=Text())),
        "error": bindparam("error", type_=Text()),
        "finished_at": ts("finished_at"),
        "heartbeat_at": k.now,
        "lease_expires_at": ts("lease"),
        "run_after": ts("run_after"),
        "checkpoint": k.json_text(bindparam("checkpoint", type_=Text())),
    }


def _run_of() -> tuple[ColumnElement[bool], ...]:
    """One run: its row, its start and its attempt, still running.

    Every write of a run is fenced by its attempt: a run declared lost stays
    failed, and an attempt whose lease was taken writes nothing more.
    """
    return (
        tasks.c.id == TASK_ID,
        tasks.c.started_at == STARTED_AT,
        tasks.c.attempt == ATTEMPT,
        tasks.c.status == "running",
    )


def _owned(k: Kit) -> tuple[ColumnElement[bool], ...]:
    """One run, in the session that holds it."""
    return (*_run_of(), tasks.c.sid == k.sid)


def lost_values(k: Kit) -> dict[str, Any]:
    """A run declared lost: failed, with the error saying why."""
    return {
        "status": "failed",
        "error": bindparam("error", type_=Text()),
        "message": bindparam("message", type_=Text()),
        "finished_at": k.now,
        "lease_expires_at": null(),
    }


def cancelled_values(k: Kit) -> dict[str, Any]:
    """A run ended by a cancel (never retried)."""
    return {
        "status": "cancelled",
        "message": "Cancelled",
        "finished_at": k.now,
        "lease_expires_at": null(),
        "run_after": null(),
    }


def lapsed_cancelled(k: Kit) -> ColumnElement[bool]:
    """A durable run asked to cancel whose lease lapsed (its process died before it stopped)."""
    return and_(
        tasks.c.target.is_not(None),
        tasks.c.status == "running",
        tasks.c.cancel_requested_at.is_not(None),
        tasks.c.lease_expires_at < k.now,
    )


def exhausted_run(k: Kit) -> ColumnElement[bool]:
    """A durable run whose lease lapsed with no attempt left."""
    return and_(
        tasks.c.target.is_not(None),
        tasks.c.status == "running",
        tasks.c.lease_expires_at < k.now,
        tasks.c.attempt >= tasks.c.max_attempts,
    )


class TaskStatements:
    """The statements of task rows, compiled for one engine."""

    def __init__(self, k: Kit) -> None:
        self._task_starts(k)
        self._task_fenced(k)
        self._task_failures(k)
        self._task_ends(k)
        self._task_cancels(k)

    def _task_cancels(self, k: Kit) -> None:
        """A cancel: a waiting run ended now, a running one marked for its next write."""
        prepare = k.prepare
        sid = k.sid
        now = k.now
        task_id = TASK_ID
        mine = (tasks.c.id == task_id, tasks.c.sid == sid)
        self.cancel_waiting = prepare(
            "cancel_waiting",
            update(tasks)
            .where(*mine, waiting())
            .values(cancel_requested_at=now, **cancelled_values(k))
            .returning(tasks.c.progress, tasks.c.attempt, tasks.c.target),
        )
        self.request_cancel = prepare(
            "request_cancel",
            update(tasks)
            .where(*mine, tasks.c.status == "running")
            .values(cancel_requested_at=func.coalesce(tasks.c.cancel_requested_at, now))
            .returning(tasks.c.progress, tasks.c.message, tasks.c.attempt, tasks.c.target),
        )
        self.task_status = prepare(
            "task_status", select(tasks.c.status, tasks.c.started_at).where(*mine)
        )
        self.cancel_lapsed = prepare(
            "cancel_lapsed", update(tasks).where(lapsed_cancelled(k)).values(**cancelled_values(k))
        )

    def _task_starts(self, k: Kit) -> None:
        """A run starting: its row claimed, unless a live run holds it."""
        prepare = k.prepare
        insert = k.insert
        json_text = k.json_text
        sid = k.sid
        name = k.name
        now = k.now
        task_id = TASK_ID
        started_at = STARTED_AT
        attempt = ATTEMPT
        worker = WORKER
        stale_before = STALE_BEFORE
        fields = _written(k)
        run: dict[str, Any] = {
            "namespace": bindparam("namespace", type_=String(255)),
            "target": bindparam("target", type_=String(255)),
            "args": json_text(bindparam("args", type_=Text())),
            "attempt": attempt,
            "max_attempts": bindparam("max_attempts", type_=Integer()),
            "retry_delay": bindparam("retry_delay", type_=Float()),
            "worker": worker,
            "cancel_requested_at": null(),
        }
        claimed = {
            "id": task_id,
            "sid": sid,
            "name": name,
            "started_at": started_at,
            **fields,
            **run,
        }
        claim = insert(tasks).from_select(
            list(claimed),
            select(*claimed.values()).where(exists().where(sessions.c.sid == sid)),
        )
        self.claim_task = prepare(
            "claim_task",
            claim.on_conflict_do_update(
                index_elements=[tasks.c.id],
                set_={c: getattr(claim.excluded, c) for c in claimed if c not in ("id", "sid")},
                where=(tasks.c.sid == claim.excluded.sid) & ~live_task(now, stale_before),
            ).returning(tasks.c.id),
        )

    def _task_fenced(self, k: Kit) -> None:
        """A run's writes and reads, fenced by its attempt."""
        prepare = k.prepare
        sid = k.sid
        now = k.now
        task_id = TASK_ID
        fields = _written(k)
        owned = _owned(k)
        run_of = _run_of()
        self.save_task = prepare(
            "save_task",
            update(tasks)
            .where(*owned)
            .values(**fields)
            .returning(tasks.c.cancel_requested_at),
        )
        # The session a run's row belongs to now (a rotation moves it to a new SID): the
        # run is named by its row, its start and its attempt, whichever session holds it.
        self.find_run = prepare("find_run", select(tasks.c.sid).where(*run_of))
        self.fence_task = prepare(
            "fence_task",
            update(tasks).where(*owned).values(heartbeat_at=now, lease_expires_at=ts("lease")),
        )
        self.load_task = prepare(
            "load_task",
            select(
                tasks.c.status,
                tasks.c.progress,
                tasks.c.message,
                tasks.c.logs,
                tasks.c.error,
                tasks.c.started_at,
                tasks.c.finished_at,
                tasks.c.heartbeat_at,
                tasks.c.target,
                tasks.c.attempt,
                tasks.c.max_attempts,
                tasks.c.lease_expires_at,
                tasks.c.checkpoint,
                tasks.c.run_after,
                tasks.c.cancel_requested_at,
                namespaces.c.version,  # of its namespace now: is a reader's copy behind?
            )
            .select_from(
                tasks.outerjoin(
                    namespaces,
                    and_(namespaces.c.sid == tasks.c.sid, namespaces.c.name == tasks.c.namespace),
                )
            )
            .where(tasks.c.id == task_id, tasks.c.sid == sid),
        )

    def _task_failures(self, k: Kit) -> None:
        """Runs declared lost (a plain run's stale heartbeat, a durable run out of attempts)."""
        prepare = k.prepare
        sid = k.sid
        task_id = TASK_ID
        stale_before = STALE_BEFORE
        lost = lost_values(k)
        exhausted = exhausted_run(k)
        self.mark_task_lost = prepare(
            "mark_task_lost",
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.sid == sid,
                tasks.c.target.is_(None),
                tasks.c.status == "running",
                tasks.c.heartbeat_at < stale_before,
            )
            .values(**lost),
        )
        self.fail_exhausted_one = prepare(
            "fail_exhausted_one",
            update(tasks)
            .where(tasks.c.id == task_id, tasks.c.sid == sid, exhausted)
            .values(**lost),
        )

    def _task_ends(self, k: Kit) -> None:
        """Runs handed back, announced, deleted and counted."""
        prepare = k.prepare
        sid = k.sid
        now = k.now
        postgresql = k.postgresql
        task_id = TASK_ID
        worker = WORKER
        stale_before = STALE_BEFORE
        owned = _owned(k)
        # Handing a run back (a worker stopping): queued again at once, and the
        # attempt it did not finish is not counted against its retries.
        hand_back = update(tasks).where(tasks.c.cancel_requested_at.is_(None)).values(
            status="queued",
            run_after=now,
            lease_expires_at=null(),
            worker=null(),
            max_attempts=tasks.c.max_attempts + 1,
        )
        self.hand_back_all = prepare(
            "hand_back_all",
            hand_back.where(
                tasks.c.worker == worker,
                tasks.c.status == "running",
                tasks.c.target.is_not(None),
            ),
        )
        self.hand_back_one = prepare("hand_back_one", hand_back.where(*owned))
        notify = select(func.pg_notify(NOTIFY_CHANNEL, ""))
        self.notify_tasks = prepare("notify_tasks", notify) if postgresql else None
        self.delete_task = prepare(
            "delete_task", delete(tasks).where(tasks.c.id == task_id, tasks.c.sid == sid)
        )
        self.delete_session_tasks = prepare(
            "delete_session_tasks", delete(tasks).where(tasks.c.sid == sid)
        )
        self.running_task = prepare(
            "running_task",
            select(literal(1)).where(tasks.c.sid == sid, live_task(now, stale_before)),
        )
        self.task_counts = prepare(
            "task_counts",
            select(tasks.c.status, func.count()).group_by(tasks.c.status),
        )
