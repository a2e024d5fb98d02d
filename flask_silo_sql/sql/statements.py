"""Every statement the SQL backend runs, built with SQLAlchemy Core and compiled once.

:class:`Statements` compiles them for one engine's dialect into
:class:`~flask_silo_sql.sql.executor.Prepared` objects, which either executor
sends as they are. :class:`Values` converts what goes in and comes out: times
are Unix seconds in Python, and on the wire an aware datetime (PostgreSQL) or
SQLAlchemy's UTC text form (SQLite); JSON goes in as text; a list of SIDs is
one parameter (an array on PostgreSQL, a JSON array read with ``json_each`` on
SQLite), so a statement's text never depends on how many SIDs it is given.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import ColumnElement

from ..sids import SID_LENGTH
from .executor import Prepared
from .file_statements import FileStatements
from .models import (
    UTCDateTime,
    expired_sids,
    file_chunks,
    files,
    idempotency_keys,
    namespaces,
    sessions,
    tasks,
    workers,
)

UTC = dt.timezone.utc
CHILD_TABLES = (namespaces, files, tasks, idempotency_keys)
NOTIFY_CHANNEL = "silo_tasks"
"""The PostgreSQL channel a queued durable run is announced on (workers LISTEN to it)."""
WAITING = ("queued", "retrying")
"""Statuses of a durable run that waits for a process to claim it."""


def _waiting() -> ColumnElement[bool]:
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
            _waiting(),
            and_(
                tasks.c.status == "running",
                or_(tasks.c.lease_expires_at >= now, tasks.c.attempt < tasks.c.max_attempts),
            ),
        ),
    )
    return or_(plain, durable)


def _ts(name: str) -> Any:
    """A timestamp parameter (typed, so PostgreSQL is told what it is)."""
    return bindparam(name, type_=UTCDateTime())


class Values:
    """Python values to and from the driver's, for one dialect."""

    def __init__(self, postgresql: bool) -> None:
        self.postgresql = postgresql

    def time(self, unix: float) -> Any:
        """A bound timestamp."""
        when = dt.datetime.fromtimestamp(unix, UTC)
        if self.postgresql:
            return when
        return when.replace(tzinfo=None).isoformat(" ", "microseconds")

    @staticmethod
    def unix(value: Any) -> float:
        """A timestamp as the driver returned it, in Unix seconds."""
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return float(value.timestamp())
        return dt.datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()

    @staticmethod
    def maybe_unix(value: Any) -> float | None:
        return None if value is None else Values.unix(value)

    def sids(self, sids: list[str]) -> Any:
        """A list of strings as one parameter."""
        return list(sids) if self.postgresql else json.dumps(list(sids))

    @staticmethod
    def json(value: Any) -> tuple[Any, str | None]:
        """A JSON column as returned: ``(data, text)``; text only where the driver gave text."""
        if isinstance(value, str):  # SQLite: the text as written
            return json.loads(value), value
        return value, None


class Statements:
    """The compiled statements for one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        postgresql = engine.dialect.name == "postgresql"
        self.values = Values(postgresql)
        insert = pg.insert if postgresql else sqlite.insert

        def prepare(name: str, statement: Any, *, binary: bool = False) -> Prepared:
            return Prepared(name, statement, engine, binary=binary)

        def in_list(column: Any, name: str) -> ColumnElement[bool]:
            """``column`` is one of the strings of the list parameter *name*."""
            result: ColumnElement[bool]
            if postgresql:
                result = column == any_(bindparam(name, type_=pg.ARRAY(String(SID_LENGTH))))
            else:
                listed = func.json_each(bindparam(name, type_=Text())).table_valued("value")
                result = column.in_(select(listed.c.value))
            return result

        def jsonb(param: Any) -> Any:
            return cast(param, pg.JSONB()) if postgresql else param

        def json_text(param: Any) -> Any:
            """A client's JSON, kept as its text (``json``, not ``jsonb``: see models)."""
            return cast(param, pg.JSON()) if postgresql else param

        sid = bindparam("sid", type_=String(SID_LENGTH))
        name = bindparam("name", type_=String(255))
        now = _ts("now")
        expires = _ts("expires")
        data = json_text(bindparam("data", type_=Text()))
        # A touch moves the sweep's bound only once it has passed (or to keep it at most
        # expires_at): most touches change no indexed column, a HOT update on PostgreSQL.
        sweep_after = case(
            (or_(sessions.c.sweep_after < now, expires < sessions.c.sweep_after), expires),
            else_=sessions.c.sweep_after,
        )

        # -- sessions and namespaces ---------------------------------------------
        key = select(cast(sid, String(SID_LENGTH)).label("sid")).subquery("k")
        self.probe = prepare(
            "probe",
            select(
                sessions.c.created_at, sessions.c.last_active, expired_sids.c.expired_at
            ).select_from(
                key.outerjoin(sessions, sessions.c.sid == key.c.sid).outerjoin(
                    expired_sids, expired_sids.c.sid == key.c.sid
                )
            ),
        )
        self.load_one = prepare(
            "load_one",
            select(
                sessions.c.created_at,
                sessions.c.last_active,
                namespaces.c.data,
                namespaces.c.version,
            )
            .select_from(
                sessions.outerjoin(
                    namespaces, and_(namespaces.c.sid == sessions.c.sid, namespaces.c.name == name)
                )
            )
            .where(sessions.c.sid == sid),
        )
        self.load_all = prepare(
            "load_all",
            select(
                sessions.c.created_at,
                sessions.c.last_active,
                namespaces.c.name,
                namespaces.c.data,
                namespaces.c.version,
            )
            .select_from(sessions.outerjoin(namespaces, namespaces.c.sid == sessions.c.sid))
            .where(sessions.c.sid == sid),
        )
        self.load_namespace = prepare(
            "load_namespace",
            select(namespaces.c.data, namespaces.c.version).where(
                namespaces.c.sid == sid, namespaces.c.name == name
            ),
        )
        self.touch = prepare(
            "touch",
            update(sessions)
            .where(sessions.c.sid == sid)
            .values(last_active=now, expires_at=expires, sweep_after=sweep_after)
            .returning(sessions.c.created_at),
        )
        self.touch_stale = prepare(
            "touch_stale",
            update(sessions)
            .where(sessions.c.sid == sid, sessions.c.last_active <= _ts("stale_before"))
            .values(last_active=now, expires_at=expires, sweep_after=sweep_after),
        )
        # A new session, unless its SID was expired after :since (while the
        # request that would create it ran: that request must not bring it back).
        self.create = prepare(
            "create",
            insert(sessions)
            .from_select(
                ["sid", "created_at", "last_active", "expires_at", "sweep_after"],
                select(sid, now, now, expires, expires).where(
                    ~exists().where(
                        expired_sids.c.sid == sid,
                        expired_sids.c.expired_at > _ts("since"),
                    )
                ),
            )
            .on_conflict_do_nothing(index_elements=[sessions.c.sid]),
        )
        self.has_session = prepare("has_session", select(literal(1)).where(sessions.c.sid == sid))
        self.is_expired = prepare("is_expired", select(literal(1)).where(expired_sids.c.sid == sid))
        self.clear_expired = prepare(
            "clear_expired", delete(expired_sids).where(expired_sids.c.sid == sid)
        )
        mark = insert(expired_sids).values(sid=sid, expired_at=now)
        self.mark_expired = prepare(
            "mark_expired",
            mark.on_conflict_do_update(
                index_elements=[expired_sids.c.sid], set_={"expired_at": mark.excluded.expired_at}
            ),
        )
        self.update_namespace = prepare(
            "update_namespace",
            update(namespaces)
            .where(
                namespaces.c.sid == sid,
                namespaces.c.name == name,
                namespaces.c.version == bindparam("expected", type_=Integer()),
            )
            .values(data=data, version=namespaces.c.version + 1, updated_at=now),
        )
        self.insert_namespace = prepare(
            "insert_namespace",
            insert(namespaces)
            .from_select(
                ["sid", "name", "data", "version", "updated_at"],
                select(sid, name, data, literal(1, Integer()), now).where(
                    exists().where(sessions.c.sid == sid)
                ),
            )
            .on_conflict_do_nothing(index_elements=[namespaces.c.sid, namespaces.c.name]),
        )
        ns_upsert = insert(namespaces).values(
            sid=sid, name=name, data=data, version=1, updated_at=now
        )
        self.upsert_namespace = prepare(
            "upsert_namespace",
            ns_upsert.on_conflict_do_update(
                index_elements=[namespaces.c.sid, namespaces.c.name],
                set_={
                    "data": ns_upsert.excluded.data,
                    "version": namespaces.c.version + 1,
                    "updated_at": ns_upsert.excluded.updated_at,
                },
            ),
        )
        self.delete_namespaces_except = prepare(
            "delete_namespaces_except",
            delete(namespaces).where(namespaces.c.sid == sid, ~in_list(namespaces.c.name, "names")),
        )
        session_upsert = insert(sessions).values(
            sid=sid,
            created_at=_ts("created_at"),
            last_active=_ts("last_active"),
            expires_at=expires,
            sweep_after=expires,
        )
        self.upsert_session = prepare(
            "upsert_session",
            session_upsert.on_conflict_do_update(
                index_elements=[sessions.c.sid],
                set_={
                    "last_active": session_upsert.excluded.last_active,
                    "expires_at": session_upsert.excluded.expires_at,
                    "sweep_after": case(
                        (
                            session_upsert.excluded.expires_at < sessions.c.sweep_after,
                            session_upsert.excluded.expires_at,
                        ),
                        else_=sessions.c.sweep_after,
                    ),
                },
            ),
        )
        new_sid = bindparam("new_sid", type_=String(SID_LENGTH))
        self.copy_session = prepare(
            "copy_session",
            insert(sessions).from_select(
                ["sid", "created_at", "last_active", "expires_at", "sweep_after"],
                select(
                    new_sid,
                    sessions.c.created_at,
                    sessions.c.last_active,
                    sessions.c.expires_at,
                    sessions.c.sweep_after,
                ).where(sessions.c.sid == sid),
            ),
        )
        self.move_children = [
            prepare(f"move_{t.name}", update(t).where(t.c.sid == sid).values(sid=new_sid))
            for t in CHILD_TABLES
        ]
        # Chunks first: a host's SQLite engine may not cascade from silo_files.
        self.delete_children = [
            prepare(
                "delete_session_chunks",
                delete(file_chunks).where(
                    file_chunks.c.file_id.in_(
                        select(files.c.id).where(in_list(files.c.sid, "sids"))
                    )
                ),
            ),
            *(
                prepare(f"delete_{t.name}", delete(t).where(in_list(t.c.sid, "sids")))
                for t in CHILD_TABLES
            ),
        ]
        self.delete_sessions = prepare(
            "delete_sessions", delete(sessions).where(in_list(sessions.c.sid, "sids"))
        )
        self.count_sessions = prepare("count_sessions", select(func.count()).select_from(sessions))
        self.count_expired = prepare(
            "count_expired", select(func.count()).select_from(expired_sids)
        )
        self.all_sids = prepare("all_sids", select(sessions.c.sid).order_by(sessions.c.sid))
        self.all_heads = prepare(
            "all_heads",
            select(sessions.c.sid, sessions.c.created_at, sessions.c.last_active).order_by(
                sessions.c.sid
            ),
        )
        self.all_namespaces = prepare(
            "all_namespaces", select(namespaces.c.sid, namespaces.c.name, namespaces.c.data)
        )
        self.foreign_keys = (
            None if postgresql else prepare("foreign_keys", text("PRAGMA foreign_keys"))
        )
        self.db_time = prepare("db_time", select(func.clock_timestamp())) if postgresql else None

        # -- expiry ---------------------------------------------------------------
        running_task = exists().where(
            tasks.c.sid == sessions.c.sid, live_task(now, _ts("heartbeat_cutoff"))
        )
        # Candidates come by the sweep's bound; each one's expires_at decides. Those
        # still alive get their bound moved up to their expiry, once per lifetime.
        after = tuple_(sessions.c.sweep_after, sessions.c.sid) > tuple_(
            _ts("after_ts"), bindparam("after_sid", type_=String())
        )
        due = (
            select(sessions.c.sid, sessions.c.sweep_after, sessions.c.expires_at < now)
            .where(sessions.c.sweep_after < now, ~running_task)
            .order_by(sessions.c.sweep_after, sessions.c.sid)
            .limit(bindparam("batch_size", type_=Integer()))
        )
        self.sweep_first = prepare("sweep_first", due)
        self.sweep_candidates = prepare("sweep_candidates", due.where(after))
        self.sweep_defer = prepare(
            "sweep_defer",
            update(sessions)
            .where(
                in_list(sessions.c.sid, "sids"),
                sessions.c.sweep_after < now,
                sessions.c.expires_at >= now,
            )
            .values(sweep_after=sessions.c.expires_at),
        )
        self.sweep_expire: Prepared | None = None
        self.sweep_delete: Prepared | None = None
        self.mark_expired_many: Prepared | None = None
        if postgresql:
            # One statement per batch: the rows locked (skipping those a request
            # holds), deleted (their children cascade) and recorded as expired.
            locked = (
                select(sessions.c.sid)
                .where(in_list(sessions.c.sid, "sids"), sessions.c.expires_at < now)
                .with_for_update(skip_locked=True)
            )
            gone = (
                delete(sessions)
                .where(sessions.c.sid.in_(locked.scalar_subquery()))
                .returning(sessions.c.sid)
                .cte("gone")
            )
            record = pg.insert(expired_sids).from_select(
                ["sid", "expired_at"], select(gone.c.sid, now)
            )
            self.sweep_expire = prepare(
                "sweep_expire",
                record.on_conflict_do_update(
                    index_elements=[expired_sids.c.sid],
                    set_={"expired_at": record.excluded.expired_at},
                ).returning(expired_sids.c.sid),
            )
        else:
            self.sweep_delete = prepare(
                "sweep_delete",
                delete(sessions)
                .where(in_list(sessions.c.sid, "sids"), sessions.c.expires_at < now)
                .returning(sessions.c.sid),
            )
            values = func.json_each(bindparam("sids", type_=Text())).table_valued("value")
            many = sqlite.insert(expired_sids).from_select(
                ["sid", "expired_at"], select(values.c.value, now).where(literal(True))
            )
            self.mark_expired_many = prepare(
                "mark_expired_many",
                many.on_conflict_do_update(
                    index_elements=[expired_sids.c.sid],
                    set_={"expired_at": many.excluded.expired_at},
                ),
            )
        self.prune_expired = prepare(
            "prune_expired",
            delete(expired_sids).where(
                expired_sids.c.sid.in_(
                    select(expired_sids.c.sid)
                    .where(expired_sids.c.expired_at < _ts("cutoff"))
                    .limit(bindparam("batch_size", type_=Integer()))
                    .scalar_subquery()
                )
            ),
        )

        # -- task rows -------------------------------------------------------------
        task_id = bindparam("id", type_=String(32))
        logs = jsonb(bindparam("logs", type_=Text()))
        started_at = _ts("started_at")
        attempt = bindparam("attempt", type_=Integer())
        worker = bindparam("worker", type_=String(64))
        stale_before = _ts("stale_before")
        fields: dict[str, Any] = {
            "status": bindparam("status", type_=String(16)),
            "progress": bindparam("progress", type_=Float()),
            "message": bindparam("message", type_=Text()),
            "logs": logs,
            "error": bindparam("error", type_=Text()),
            "finished_at": _ts("finished_at"),
            "heartbeat_at": now,
            "lease_expires_at": _ts("lease"),
            "run_after": _ts("run_after"),
            "checkpoint": json_text(bindparam("checkpoint", type_=Text())),
        }
        run: dict[str, Any] = {
            "namespace": bindparam("namespace", type_=String(255)),
            "target": bindparam("target", type_=String(255)),
            "args": json_text(bindparam("args", type_=Text())),
            "attempt": attempt,
            "max_attempts": bindparam("max_attempts", type_=Integer()),
            "retry_delay": bindparam("retry_delay", type_=Float()),
            "worker": worker,
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
        # Every write of a run is fenced by its attempt: a run declared lost stays
        # failed, and an attempt whose lease was taken writes nothing more.
        run_of = (
            tasks.c.id == task_id,
            tasks.c.started_at == started_at,
            tasks.c.attempt == attempt,
            tasks.c.status == "running",
        )
        owned = (*run_of, tasks.c.sid == sid)
        self.save_task = prepare("save_task", update(tasks).where(*owned).values(**fields))
        # The session a run's row belongs to now (a rotation moves it to a new SID): the
        # run is named by its row, its start and its attempt, whichever session holds it.
        self.find_run = prepare("find_run", select(tasks.c.sid).where(*run_of))
        self.fence_task = prepare(
            "fence_task",
            update(tasks).where(*owned).values(heartbeat_at=now, lease_expires_at=_ts("lease")),
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
            ).where(tasks.c.id == task_id, tasks.c.sid == sid),
        )
        lost = {
            "status": "failed",
            "error": bindparam("error", type_=Text()),
            "message": bindparam("message", type_=Text()),
            "finished_at": now,
            "lease_expires_at": null(),
        }
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
        exhausted = and_(
            tasks.c.target.is_not(None),
            tasks.c.status == "running",
            tasks.c.lease_expires_at < now,
            tasks.c.attempt >= tasks.c.max_attempts,
        )
        self.fail_exhausted = prepare(
            "fail_exhausted", update(tasks).where(exhausted).values(**lost)
        )
        self.fail_exhausted_one = prepare(
            "fail_exhausted_one",
            update(tasks)
            .where(tasks.c.id == task_id, tasks.c.sid == sid, exhausted)
            .values(**lost),
        )
        # A process claims durable runs that are due: queued or retrying ones whose
        # time has come, and running ones whose lease lapsed with attempts left. Each
        # claim is the next attempt (so the previous one's writes are refused).
        claimable = and_(
            tasks.c.target.is_not(None),
            tasks.c.attempt < tasks.c.max_attempts,
            or_(
                and_(_waiting(), tasks.c.run_after <= now),
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
                lease_expires_at=_ts("lease"),
                worker=worker,
                finished_at=null(),
                run_after=null(),
            )
            .returning(
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
            ),
        )
        # Handing a run back (a worker stopping): queued again at once, and the
        # attempt it did not finish is not counted against its retries.
        hand_back = update(tasks).values(
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

        # -- worker processes ------------------------------------------------------
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

        self.files = FileStatements(engine, in_list)
        self.count_rows = {
            table.name: prepare(f"count_{table.name}", select(func.count()).select_from(table))
            for table in (sessions, namespaces, expired_sids, files, file_chunks, tasks, workers)
        }
        # PostgreSQL: each silo table's size on disk and its dead rows, for operators
        # watching bloat (``flask silo-db stats``). Sizes include TOAST; indexes apart.
        self.table_health = (
            prepare(
                "table_health",
                text(
                    "SELECT s.relname, pg_table_size(s.relid), pg_indexes_size(s.relid),"
                    " s.n_live_tup, s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd,"
                    " greatest(s.last_vacuum, s.last_autovacuum)"
                    " FROM pg_stat_user_tables s"
                    " WHERE s.relid IN (SELECT c.oid FROM pg_class c"
                    " WHERE c.relname = ANY(:names) AND pg_table_is_visible(c.oid))"
                    " ORDER BY s.relname"
                ).bindparams(bindparam("names", type_=pg.ARRAY(String()))),
            )
            if postgresql
            else None
        )

        # -- idempotency keys -----------------------------------------------------
        keys = idempotency_keys
        key_hash = bindparam("key_hash", type_=String(64))
        token = bindparam("token", type_=String(32))
        this_key = and_(keys.c.sid == sid, keys.c.key_hash == key_hash)
        key_record = (
            keys.c.fingerprint,
            keys.c.token,
            keys.c.status,
            keys.c.headers,
            keys.c.body,
            keys.c.locked_until,
        )
        claimed_key = {
            "sid": sid,
            "key_hash": key_hash,
            "idempotency_key": bindparam("key", type_=String(255)),
            "method": bindparam("method", type_=String(16)),
            "route": bindparam("route", type_=Text()),
            "fingerprint": bindparam("fingerprint", type_=String(64)),
            "token": token,
            "created_at": now,
            "locked_until": _ts("lease_until"),
            "expires_at": expires,
        }
        held = select(func.count()).select_from(keys).where(keys.c.sid == sid)
        self.read_key = prepare("read_key", select(*key_record).where(this_key))
        self.count_keys = prepare("count_keys", held)

        def claiming(name: str, capped: bool) -> Prepared:
            """The claim: the key's row if the session exists (and, *capped*, holds fewer
            than ``max_keys`` keys), returning (claimed, record...): its own row, or
            the record that was there."""
            wanted: ColumnElement[bool] = exists().where(sessions.c.sid == sid)
            if capped:
                below = held.scalar_subquery() < bindparam("max_keys", type_=BigInteger())
                wanted = and_(wanted, below)
            if postgresql:
                # The claim commits without waiting for its WAL flush: the request's own
                # commit, later, flushes it too, and a claim lost with a crash had a
                # request that could not finish anyway (its retry runs the view).
                no_flush = func.set_config("synchronous_commit", "off", True) == "off"
                wanted = and_(wanted, no_flush)
            rows = insert(keys).from_select(
                list(claimed_key), select(*claimed_key.values()).where(wanted)
            )
            if postgresql:
                # One round trip for both answers (a row committed during the statement
                # is in neither: read again).
                mine = (
                    rows.on_conflict_do_nothing(index_elements=[keys.c.sid, keys.c.key_hash])
                    .returning(*key_record)
                    .cte("claimed")
                )
                return prepare(
                    name,
                    select(literal(True).label("claimed"), *mine.c).union_all(
                        select(literal(False), *key_record).where(this_key)
                    ),
                )
            # SQLite has no DML in a WITH: a no-op update of the key's row makes the
            # statement return the record that was there (the INSERT takes the write
            # lock either way), so a replay is one statement, as on PostgreSQL.
            return prepare(
                name,
                rows.on_conflict_do_update(
                    index_elements=[keys.c.sid, keys.c.key_hash], set_={"sid": keys.c.sid}
                ).returning((keys.c.token == token).label("claimed"), *key_record),
            )

        self.claim_key = claiming("claim_key", capped=True)
        self.claim_key_uncapped = claiming("claim_key", capped=False)
        """``SILO_IDEMPOTENCY_MAX_KEYS = None``: no count of the session's keys."""
        self.take_over_key = prepare(
            "take_over_key",
            update(keys)
            .where(
                this_key,
                keys.c.token == bindparam("old_token", type_=String(32)),
                keys.c.status.is_(None),
                keys.c.locked_until < now,
            )
            .values(token=token, locked_until=_ts("lease_until")),
        )
        stored = {
            "status": bindparam("status", type_=Integer()),
            "headers": bindparam("headers", type_=Text()),
            "body": bindparam("body", type_=LargeBinary()),
            "locked_until": null(),
        }
        self.complete_key = prepare(
            "complete_key",
            update(keys)
            .where(this_key, keys.c.token == token, keys.c.status.is_(None))
            .values(**stored),
        )
        self.complete_key_with_namespace: Prepared | None = None
        if postgresql:
            # A commit with one namespace to update and the response to store, in one
            # statement: the key's row locked while the claim is still ours, then the
            # namespace under its version guard, then the response; any guard that fails
            # leaves all three untouched. Returns what each step matched.
            ours = (
                select(keys.c.token)
                .where(this_key, keys.c.token == token, keys.c.status.is_(None))
                .with_for_update()
                .cte("ours")
            )
            changed = (
                update(namespaces)
                .where(
                    namespaces.c.sid == sid,
                    namespaces.c.name == name,
                    namespaces.c.version == bindparam("expected", type_=Integer()),
                    exists(select(ours.c.token)),
                )
                .values(data=data, version=namespaces.c.version + 1, updated_at=now)
                .returning(namespaces.c.version)
                .cte("changed")
            )
            completed = (
                update(keys)
                .where(this_key, keys.c.token == token, exists(select(changed.c.version)))
                .values(**stored)
                .returning(keys.c.token)
                .cte("completed")
            )
            self.complete_key_with_namespace = prepare(
                "complete_key_with_namespace",
                select(
                    select(func.count()).select_from(ours).scalar_subquery(),
                    select(func.count()).select_from(changed).scalar_subquery(),
                    select(func.count()).select_from(completed).scalar_subquery(),
                ),
            )
        self.release_key = prepare(
            "release_key",
            delete(keys).where(this_key, keys.c.token == token, keys.c.status.is_(None)),
        )
        self.expire_keys = prepare(
            "expire_keys",
            delete(keys).where(
                tuple_(keys.c.sid, keys.c.key_hash).in_(
                    select(keys.c.sid, keys.c.key_hash)
                    .where(keys.c.expires_at < _ts("cutoff"))
                    .limit(bindparam("batch_size", type_=Integer()))
                )
            ),
        )
