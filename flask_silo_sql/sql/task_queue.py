"""Durable runs as the processes that run them see them: claims, hand-backs, wake-ups.

A process claims due runs with one ``UPDATE ... RETURNING`` (on PostgreSQL
its candidates are locked ``FOR UPDATE SKIP LOCKED``, so claimers never wait
for each other nor claim one run twice; on SQLite the statement takes the
database's write lock): queued runs, retrying runs whose delay is over, and
running ones whose lease lapsed with attempts left, each as its next attempt.
Runs whose lease lapsed with no attempt left are failed first, by a claim at
most every :data:`FAIL_EXHAUSTED_EVERY` of the heartbeat timeout (a backlog
drained one claim per run would otherwise pay that statement for every run;
a reader of such a run fails it at once anyway). A claimed run
comes back ready to execute: its namespace loaded (the task object found in
it, so what the run changes there is saved), its registered function looked
up, its arguments decoded. ``LISTEN/NOTIFY`` on PostgreSQL wakes claimers as
soon as a run is queued; every claimer polls as well (notifications do not
pass PgBouncer's transaction pooling, and SQLite has none).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..codec import dumps, tasks_in
from ..logs import silo_logger
from ..tasks import (
    LOST_WORKER,
    BackgroundTask,
    Claimed,
    RunRow,
)
from .context import Context
from .statements import NOTIFY_CHANNEL
from .task_rows import SQLTaskHome, hand_back, hand_back_at_exit
from .unit import SQLUnit

logger = silo_logger("flask_silo_sql.tasks")

LISTEN_RETRY_S = 2.0
"""Seconds between two attempts to (re)open the notification connection."""


FAIL_EXHAUSTED_EVERY = 0.25
"""How often (a fraction of the heartbeat timeout, by the database's clock) a claim also
fails the runs whose lease lapsed with no attempt left."""


class SQLTaskQueue:
    """The :class:`~flask_silo_sql.backends.base.TaskQueue` of the SQL backend."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._failed_exhausted_at = float("-inf")

    # -- processes ---------------------------------------------------------------

    def register(self, worker: str, kind: str, concurrency: int) -> None:
        ctx = self.ctx
        st = ctx.st
        v = st.values
        now = ctx.now()
        with ctx.connector.executor() as ex:
            ex.run(
                st.register_worker,
                {
                    "worker": worker,
                    "hostname": socket.gethostname()[:255],
                    "pid": int(worker.split(":")[1]) if worker.count(":") >= 2 else 0,
                    "kind": kind,
                    "concurrency": concurrency,
                    "now": v.time(now),
                },
            )
            stale = now - 4 * ctx.policy.heartbeat_timeout
            ex.run(st.prune_workers, {"stale_before": v.time(stale)})

    def unregister(self, worker: str) -> None:
        with self.ctx.connector.executor() as ex:
            ex.run(self.ctx.st.drop_worker, {"worker": worker})

    # -- runs ----------------------------------------------------------------------

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        ctx = self.ctx
        st = ctx.st
        v = st.values
        now = ctx.now()
        timeout = ctx.policy.heartbeat_timeout
        error = LOST_WORKER.format(timeout=timeout)
        with ctx.connector.executor() as ex:
            if now - self._failed_exhausted_at >= FAIL_EXHAUSTED_EVERY * timeout:
                ex.run(
                    st.fail_exhausted,
                    {"now": v.time(now), "error": error, "message": f"Failed: {error}"},
                )
                ex.run(st.cancel_lapsed, {"now": v.time(now)})
                self._failed_exhausted_at = now
            rows = ex.run(
                st.claim_runs,
                {
                    "now": v.time(now),
                    "lease": v.time(now + timeout),
                    "worker": worker,
                    "limit": limit,
                },
            ).rows
        if rows:
            hand_back_at_exit(ctx)
        claimed: list[Claimed] = []
        for row in rows:
            try:
                claimed.append(self._ready(row))
            except Exception as exc:  # the database went away meanwhile: the lease lapses
                logger.warning("could not prepare a claimed task run (%s)", exc)
        return claimed

    def _ready(self, row: Any) -> Claimed:
        """A claimed row as an attempt to run: namespace loaded, function and arguments found."""
        ctx = self.ctx
        v = ctx.st.values
        (
            task_id,
            sid,
            name,
            namespace,
            target,
            args,
            attempt,
            max_attempts,
            delay,
            checkpoint,
            _progress,
            _message,
            logs,
            error,
            started,
        ) = row
        if checkpoint is not None and not isinstance(checkpoint, str):
            checkpoint = dumps(checkpoint)
        run = RunRow(
            task_id=task_id,
            sid=sid,
            name=name,
            namespace=namespace,
            target=target,
            args=args if isinstance(args, str) else json.dumps(args),
            attempt=int(attempt),
            max_attempts=int(max_attempts),
            retry_delay=float(delay),
            checkpoint=checkpoint,
            logs=list((v.json(logs)[0] if isinstance(logs, str) else logs) or []),
            error=error,
            started_at=v.maybe_unix(started),
        )
        task, holder = self._task(sid, namespace, task_id, name)
        return Claimed.from_row(run, task=task, holder=holder, specs=ctx.policy.tasks)

    def _task(
        self, sid: str, namespace: str | None, task_id: str, name: str
    ) -> tuple[BackgroundTask, dict[str, Any] | None]:
        """The task object inside its namespace as stored now (so the run saves into it)."""
        ctx = self.ctx
        if namespace is None or namespace not in ctx.policy.factories:
            return BackgroundTask.linked(name, SQLTaskHome(ctx, sid, task_id, None)), None
        unit = SQLUnit(ctx, sid)
        try:
            holder = unit.namespace(namespace)
            slot = unit.slot(namespace)
        finally:
            unit.close()
        for _path, found in tasks_in(holder):
            if found.task_id == task_id:
                return found, holder
        return BackgroundTask.linked(name, SQLTaskHome(ctx, sid, task_id, slot)), holder

    def hand_back(self, worker: str) -> int:
        return hand_back(self.ctx, worker)

    # -- notifications --------------------------------------------------------------

    def listen(self, stop: threading.Event, wake: Callable[[], None]) -> bool:
        """On PostgreSQL: ``LISTEN`` on a connection of its own (out of the pool)."""
        engine = self.ctx.connector.engine
        if engine.dialect.name != "postgresql":
            return False
        while not stop.is_set():
            try:
                self._listen(stop, wake)
            except Exception as exc:
                logger.info("task notifications interrupted (%s); polling meanwhile", exc)
            wake()  # whatever was announced meanwhile: look now
            stop.wait(LISTEN_RETRY_S)
        return True

    def _listen(self, stop: threading.Event, wake: Callable[[], None]) -> None:
        raw = self.ctx.connector.engine.raw_connection()
        raw.detach()  # never back into the pool: it stays in LISTEN
        conn: Any = raw.dbapi_connection
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            wake()
            while not stop.is_set():
                for _note in conn.notifies(timeout=1.0, stop_after=1):
                    wake()
        finally:
            conn.close()
