"""Session events in ``silo_events``: written with the change they tell of, read in order.

:func:`write` runs inside the transaction of the change (a task's write, a cancel,
a view's :meth:`~flask_silo_sql.Silo.publish`), as its last statements: on
PostgreSQL it takes the events' order lock (see :mod:`.statements.events`), inserts
the row and sends ``NOTIFY silo_events, '<id>'`` (delivered with the commit, the
payload only an ID, so no size limit applies). What a stream reads comes from here
too: a session's events after an ID (replay), and every session's after an ID (the
process's poller, which fans them out). Stream tokens are rows too: a token opens a
stream of the session whose row holds its hash, so no SID travels in a URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..tasks import TaskState
from . import sessions as ops
from .context import Context
from .executor import Executor

EVENT_BATCH = 500
"""Most events one read returns (a reader that gets this many reads again)."""


@dataclass(frozen=True)
class Event:
    """One committed event, as a stream sends it."""

    id: int
    sid: str
    kind: str
    data: str
    """JSON text."""
    task_id: str | None = None


def write(
    ex: Executor,
    ctx: Context,
    sid: str,
    kind: str,
    data: dict[str, Any],
    *,
    task_id: str | None = None,
    now: float | None = None,
) -> int:
    """In the open transaction, as its last writes: the event's row (and its ``NOTIFY``)."""
    est = ctx.st.events
    if est.order is not None:
        ex.run(est.order, {})
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
    stamp = ctx.st.values.time(ctx.now() if now is None else now)
    values = {"sid": sid, "task_id": task_id, "kind": kind, "data": text, "now": stamp}
    event_id = int(ex.run(est.insert, values).scalar())
    if est.notify is not None:
        ex.run(est.notify, {"id": event_id})
    return event_id


KINDS = {"running": "progress"}
"""A task's status as the kind of the event its write makes (else the status itself)."""


def task_event(
    name: str, task_id: str, state: TaskState, before: TaskState | None
) -> tuple[str, dict[str, Any]] | None:
    """The event a task's write makes (None for a heartbeat that changed nothing)."""
    status = state.status
    if before is not None and (
        before.status == status
        and before.progress == state.progress
        and before.message == state.message
        and before.logs == state.logs
        and before.error == state.error
        and before.cancel_requested == state.cancel_requested
    ):
        return None
    data: dict[str, Any] = {
        "task_id": task_id,
        "task": name,
        "status": status,
        "progress": round(state.progress, 1),
        "message": state.message,
        "logs": new_lines(before.logs if before is not None else [], state.logs),
        "error": state.error if state.error is not None else state.last_error,
    }
    if state.durable:
        data["attempt"] = state.attempt
    return KINDS.get(status, status), data


def new_lines(before: list[str], after: list[str]) -> list[str]:
    """The log lines of *after* that *before* did not have (the list keeps only the newest)."""
    if after[: len(before)] == before:
        return after[len(before) :]
    for kept in range(min(len(before), len(after)), 0, -1):  # the oldest lines were dropped
        if after[:kept] == before[-kept:]:
            return after[kept:]
    return list(after)


def session_after(ctx: Context, sid: str, after: int, limit: int = EVENT_BATCH) -> list[Event]:
    """The session's events after ID *after*, in order."""
    est = ctx.st.events
    values = {"sid": sid, "after": after, "limit": limit}
    with ctx.connector.executor() as ex:
        rows = ex.run(est.session_after, values).rows
    return [Event(int(r[0]), sid, r[2], r[3], r[1]) for r in rows]


def still_kept(ctx: Context, sid: str, event_id: int) -> bool:
    """Whether the session still has event *event_id* (else replay from it has a gap)."""
    with ctx.connector.executor() as ex:
        return ex.run(ctx.st.events.has, {"sid": sid, "id": event_id}).first() is not None


def last_id(ctx: Context, sid: str | None = None) -> int:
    """The newest event's ID (of *sid*, or of the whole database); 0 when there is none."""
    est = ctx.st.events
    with ctx.connector.executor() as ex:
        if sid is None:
            value = ex.run(est.last, {}).scalar()
        else:
            value = ex.run(est.session_last, {"sid": sid}).scalar()
    return int(value or 0)


def every_after(ctx: Context, after: int, limit: int = EVENT_BATCH) -> list[Event]:
    """Every session's events after ID *after*, in order (the process's poller)."""
    with ctx.connector.executor() as ex:
        rows = ex.run(ctx.st.events.after, {"after": after, "limit": limit}).rows
    return [Event(int(r[0]), r[1], r[3], r[4], r[2]) for r in rows]


def prune(ctx: Context, *, cutoff: float, batch_size: int) -> int:
    """Forget events older than *cutoff* and stream tokens past their end, in batches."""
    est = ctx.st.events
    v = ctx.st.values
    total = 0
    for statement, values in (
        (est.prune, {"cutoff": v.time(cutoff), "batch_size": batch_size}),
        (est.prune_tokens, {"now": v.time(ctx.now()), "batch_size": batch_size}),
    ):
        while True:
            with ctx.connector.executor() as ex:
                count = ex.run(statement, values).rowcount
            total += count
            if count < batch_size:
                break
    return total


def token_hash(secret: str) -> str:
    """What a token's row holds: the hash of its random part."""
    return hashlib.sha256(secret.encode()).hexdigest()


def add_token(ctx: Context, sid: str, secret: str, expires: float) -> None:
    """Bind the token's random part to *sid* until *expires*, in one transaction with the
    session's row (made now for a client whose session was not stored yet)."""
    st = ctx.st
    values = {"sid": sid, "token_hash": token_hash(secret), "expires": st.values.time(expires)}
    with ctx.connector.transaction() as ex:
        created, _ = ops.lock(ex, st, sid, ctx.times(ctx.now()), existed=None)
        ex.run(st.events.insert_token, values)
    if created:
        ctx.policy.created(sid)


def token_session(ctx: Context, secret: str) -> str | None:
    """The session a live token opens, or None (unknown, past its end, or its session gone)."""
    values = {"token_hash": token_hash(secret), "now": ctx.st.values.time(ctx.now())}
    with ctx.connector.executor() as ex:
        row = ex.run(ctx.st.events.token_session, values).first()
    return None if row is None else str(row[0])
