"""SQL storage: sessions, namespaces and expired SIDs in tables, via SQLAlchemy Core.

Besides the 12 :class:`~flask_silo_sql.storage.SiloStorage` methods (so it can
serve flask-silo itself), :class:`SQLStorage` offers the row-level operations
that :class:`~flask_silo_sql.store.SessionStore` uses to keep a request cheap:
one SELECT to load a session, one UPDATE per changed namespace, and a throttled
``last_active`` write. Statements are built once per storage and reused.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Text,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import JSONB

from .engine import dumps, make_engine
from .errors import SessionExpired, SiloError, StateConflict, StorageUnavailable
from .hot_path import HotPath
from .models import (
    SID_LENGTH,
    UTCDateTime,
    expired_sids,
    files,
    namespaces,
    sessions,
    tasks,
)
from .records import (
    FileRecord,
    LoadedSession,
    NamespaceWrite,
    SweepResult,
    TaskRow,
    to_datetime,
)
from .storage import SiloStorage

__all__ = [
    "FileRecord",
    "LoadedSession",
    "NamespaceWrite",
    "SQLStorage",
    "SweepResult",
    "TaskRow",
    "to_datetime",
]

if TYPE_CHECKING:
    from flask import Flask

UTC = dt.timezone.utc
CHILD_TABLES = (namespaces, files, tasks)


class _Statements:
    """Every statement of the request path, compiled once per dialect."""

    def __init__(self, dialect: str) -> None:
        insert = pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert
        sid = bindparam("k_sid", type_=String(SID_LENGTH))
        now = bindparam("now", type_=UTCDateTime())

        self.load = (
            select(
                sessions.c.created_at,
                sessions.c.last_active,
                namespaces.c.name,
                namespaces.c.data,
                namespaces.c.version,
            )
            .select_from(sessions.outerjoin(namespaces, namespaces.c.sid == sessions.c.sid))
            .where(sessions.c.sid == sid)
        )
        self.has_session = select(literal(1)).where(sessions.c.sid == sid)
        self.is_expired = select(literal(1)).where(expired_sids.c.sid == sid)

        self.create = (
            insert(sessions)
            .values(sid=sid, created_at=now, last_active=now)
            .on_conflict_do_nothing(index_elements=[sessions.c.sid])
            .returning(sessions.c.sid)
        )
        upsert = insert(sessions).values(sid=sid, created_at=now, last_active=now)
        self.touch_or_create = upsert.on_conflict_do_update(
            index_elements=[sessions.c.sid],
            set_={"last_active": upsert.excluded.last_active},
            where=sessions.c.last_active < bindparam("stale_before", type_=UTCDateTime()),
        ).returning(sessions.c.created_at)
        self.touch = update(sessions).where(sessions.c.sid == sid).values(last_active=now)
        self.clear_expired = delete(expired_sids).where(expired_sids.c.sid == sid)

        mark = insert(expired_sids).values(
            sid=sid, expired_at=bindparam("k_expired_at", type_=UTCDateTime())
        )
        self.mark_expired = mark.on_conflict_do_update(
            index_elements=[expired_sids.c.sid], set_={"expired_at": mark.excluded.expired_at}
        )

        name = bindparam("k_name", type_=String(255))
        # Namespace JSON arrives already serialised (it was compared as text).
        data: Any = bindparam("k_data", type_=Text())
        if dialect == "postgresql":
            data = cast(data, JSONB())
        self.insert_namespace = (
            insert(namespaces)
            .from_select(
                ["sid", "name", "data", "version", "updated_at"],
                select(sid, name, data, literal(1, Integer()), now).where(
                    exists().where(sessions.c.sid == sid)
                ),
            )
            .on_conflict_do_nothing(index_elements=[namespaces.c.sid, namespaces.c.name])
            .returning(namespaces.c.version)
        )
        self.update_namespace = (
            update(namespaces)
            .where(
                namespaces.c.sid == sid,
                namespaces.c.name == name,
                namespaces.c.version == bindparam("expected_version", type_=Integer()),
            )
            .values(data=data, version=namespaces.c.version + 1, updated_at=now)
        )
        ns_upsert = insert(namespaces).values(
            sid=sid, name=name, data=data, version=1, updated_at=now
        )
        self.upsert_namespace = ns_upsert.on_conflict_do_update(
            index_elements=[namespaces.c.sid, namespaces.c.name],
            set_={
                "data": ns_upsert.excluded.data,
                "version": namespaces.c.version + 1,
                "updated_at": ns_upsert.excluded.updated_at,
            },
        )
        session_upsert = insert(sessions).values(
            sid=sid,
            created_at=bindparam("k_created_at", type_=UTCDateTime()),
            last_active=bindparam("k_last_active", type_=UTCDateTime()),
        )
        self.upsert_session = session_upsert.on_conflict_do_update(
            index_elements=[sessions.c.sid],
            set_={"last_active": session_upsert.excluded.last_active},
        )

        file_row = insert(files).values(
            sid=bindparam("sid"),
            store=bindparam("store"),
            filename=bindparam("filename"),
            size_bytes=bindparam("size_bytes"),
            sha256=bindparam("sha256"),
            content_type=bindparam("content_type"),
            created_at=bindparam("created_at", type_=UTCDateTime()),
        )
        self.upsert_file = file_row.on_conflict_do_update(
            index_elements=[files.c.sid, files.c.store, files.c.filename],
            set_={
                c: getattr(file_row.excluded, c)
                for c in ("size_bytes", "sha256", "content_type", "created_at")
            },
        )

        # -- tasks ----------------------------------------------------------
        task_id = bindparam("k_id", type_=String(32))
        logs: Any = bindparam("k_logs", type_=Text())
        if dialect == "postgresql":
            logs = cast(logs, JSONB())
        stale_before = bindparam("stale_before", type_=UTCDateTime())
        started_at = bindparam("k_started_at", type_=UTCDateTime())
        fields = {
            "status": bindparam("k_status", type_=String(16)),
            "progress": bindparam("k_progress", type_=Float()),
            "message": bindparam("k_message", type_=Text()),
            "logs": logs,
            "error": bindparam("k_error", type_=Text()),
            "finished_at": bindparam("k_finished_at", type_=UTCDateTime()),
            "heartbeat_at": now,
        }
        claim = insert(tasks).values(
            id=task_id, sid=sid, name=name, started_at=started_at, **fields
        )
        self.claim_task = claim.on_conflict_do_update(
            index_elements=[tasks.c.id],
            set_={
                column: getattr(claim.excluded, column)
                for column in ("name", "started_at", *fields)
            },
            where=(tasks.c.sid == claim.excluded.sid)
            & ~((tasks.c.status == "running") & (tasks.c.heartbeat_at >= stale_before)),
        ).returning(tasks.c.id)
        self.save_task = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.sid == sid,
                tasks.c.started_at == started_at,
                tasks.c.status == "running",  # a run declared lost stays failed
            )
            .values(**fields)
        )
        # Every task statement is scoped to its session as well as its ID.
        self.load_task = select(tasks).where(tasks.c.id == task_id, tasks.c.sid == sid)
        self.mark_task_lost = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.sid == sid,
                tasks.c.status == "running",
                tasks.c.heartbeat_at < stale_before,
            )
            .values(
                status="failed",
                error=bindparam("k_error", type_=Text()),
                message=bindparam("k_message", type_=Text()),
                finished_at=now,
            )
        )
        self.delete_task = delete(tasks).where(tasks.c.id == task_id, tasks.c.sid == sid)
        self.session_running_task = select(literal(1)).where(
            tasks.c.sid == sid, tasks.c.status == "running", tasks.c.heartbeat_at >= stale_before
        )

        # -- expiry ---------------------------------------------------------
        cutoff = bindparam("cutoff", type_=UTCDateTime())
        sids = bindparam("sids", expanding=True, type_=String(SID_LENGTH))
        running_task = exists().where(
            tasks.c.sid == sessions.c.sid,
            tasks.c.status == "running",
            tasks.c.heartbeat_at >= bindparam("heartbeat_cutoff", type_=UTCDateTime()),
        )
        after = tuple_(sessions.c.last_active, sessions.c.sid) > tuple_(
            bindparam("after_ts", type_=UTCDateTime()), bindparam("after_sid", type_=String())
        )
        self.sweep_candidates = (
            select(sessions.c.sid, sessions.c.last_active)
            .where(sessions.c.last_active < cutoff, after, ~running_task)
            .order_by(sessions.c.last_active, sessions.c.sid)
            .limit(bindparam("batch_size", type_=Integer()))
        )
        victims = select(sessions.c.sid).where(
            sessions.c.sid.in_(sids), sessions.c.last_active < cutoff
        )
        if dialect == "postgresql":
            victims = victims.with_for_update(skip_locked=True)
        self.sweep_delete = (
            delete(sessions)
            .where(sessions.c.sid.in_(victims.scalar_subquery()))
            .returning(sessions.c.sid)
        )
        self.sweep_expire: Any = None
        if dialect == "postgresql":
            # One statement per batch: the SIDs as one array parameter (not one
            # parameter each), the rows locked, deleted and recorded as expired.
            locked = (
                select(sessions.c.sid)
                .where(
                    sessions.c.sid
                    == any_(bindparam("sid_array", type_=pg_dialect.ARRAY(String(SID_LENGTH)))),
                    sessions.c.last_active < cutoff,
                )
                .with_for_update(skip_locked=True)
            )
            gone = (
                delete(sessions)
                .where(sessions.c.sid.in_(locked.scalar_subquery()))
                .returning(sessions.c.sid)
                .cte("gone")
            )
            record = pg_dialect.insert(expired_sids).from_select(
                ["sid", "expired_at"],
                select(gone.c.sid, bindparam("k_expired_at", type_=UTCDateTime())),
            )
            self.sweep_expire = record.on_conflict_do_update(
                index_elements=[expired_sids.c.sid],
                set_={"expired_at": record.excluded.expired_at},
            ).returning(expired_sids.c.sid)
        self.delete_children = [delete(t).where(t.c.sid.in_(sids)) for t in CHILD_TABLES]
        self.prune_expired = delete(expired_sids).where(
            expired_sids.c.sid.in_(
                select(expired_sids.c.sid)
                .where(expired_sids.c.expired_at < cutoff)
                .limit(bindparam("batch_size", type_=Integer()))
                .scalar_subquery()
            )
        )


class SQLStorage(SiloStorage):
    """Session storage in SQL tables (SQLite or PostgreSQL).

    *bind* is a database URL, an SQLAlchemy :class:`~sqlalchemy.Engine`, or a
    Flask-SQLAlchemy ``SQLAlchemy`` object whose engine is shared (its
    ``db.session`` is never used). *engine_options* go to ``create_engine``
    when *bind* is a URL.
    """

    def __init__(self, bind: str | URL | Engine | Any, **engine_options: Any) -> None:
        self._engine: Engine | None = None
        self._flask_sqlalchemy: Any = None
        self._statements: _Statements | None = None
        self._hot: HotPath | None = None
        self._hot_ready = False
        self._local = threading.local()  # the connection a request holds
        if isinstance(bind, Engine):
            self._engine = bind
        elif isinstance(bind, (str, URL)):
            self._engine = make_engine(bind, **engine_options)
        elif hasattr(type(bind), "engines") and hasattr(bind, "init_app"):  # no app context needed
            self._flask_sqlalchemy = bind
        else:
            raise TypeError(
                "SQLStorage needs a database URL, an SQLAlchemy Engine or a "
                f"Flask-SQLAlchemy object, not {type(bind).__name__}"
            )
        self.owns_engine = isinstance(bind, (str, URL))

    # -- engine ------------------------------------------------------------

    def bind_app(self, app: Flask) -> None:
        """Resolve a Flask-SQLAlchemy object's engine within *app*."""
        if self._engine is None and self._flask_sqlalchemy is not None:
            with app.app_context():
                self._engine = self._flask_sqlalchemy.engine

    @property
    def engine(self) -> Engine:
        """The engine in use (a Flask-SQLAlchemy engine needs an app context once)."""
        if self._engine is None:
            try:
                self._engine = self._flask_sqlalchemy.engine
            except RuntimeError as exc:
                raise SiloError(
                    "SQLStorage was given a Flask-SQLAlchemy object: initialise it with "
                    "Silo(app) / init_app(app), or use it inside an application context."
                ) from exc
        assert self._engine is not None
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def _sql(self) -> _Statements:
        if self._statements is None:
            if self.dialect not in ("sqlite", "postgresql"):
                raise SiloError(f"Unsupported database {self.dialect!r}")
            self._statements = _Statements(self.dialect)
        return self._statements

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection for reads; database outages become StorageUnavailable."""
        with self._translate_errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A connection in one transaction, committed at the end of the block."""
        with self._translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction (committed at the end of the block)."""
        with self._begin() as conn:
            yield conn

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            raise StorageUnavailable(f"Silo database unavailable: {exc}") from exc
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise StorageUnavailable(f"Silo database connection lost: {exc}") from exc
            raise

    def dispose(self) -> None:
        """Close pooled connections, when this storage created its engine."""
        if self.owns_engine and self._engine is not None:
            self._engine.dispose()

    # -- row-level operations used by SessionStore -------------------------

    # -- the request path ----------------------------------------------------

    @property
    def hot_path(self) -> HotPath | None:
        """Precompiled request statements on the DBAPI cursor, or None to use Core.

        None also while anything observes the engine's statements (``echo``,
        ``before_cursor_execute`` / ``after_cursor_execute`` listeners such as
        SQL loggers or tracing): then the same statements run through Core,
        where those observers see them.
        """
        engine = self.engine
        if not self._hot_ready:
            self._hot = HotPath(engine, self._sql) if HotPath.supports(engine) else None
            self._hot_ready = True
        dispatch = engine.dispatch
        if engine.echo or dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            return None
        return self._hot

    def hold(self) -> None:
        """Keep one pooled connection for this thread until :meth:`release` (a request)."""
        self._local.held = True

    def release(self) -> None:
        """Return the connection :meth:`hold` kept, if one was taken."""
        local = self._local
        local.held = False
        raw = getattr(local, "raw", None)
        if raw is not None:
            local.raw = None
            self._give_back(raw)

    def _give_back(self, raw: Any) -> None:
        hot = self._hot
        try:
            if hot is not None and raw.dbapi_connection is not None:
                hot.autocommit(raw.dbapi_connection, False)  # the pool's default
        finally:
            raw.close()

    @contextmanager
    def _raw(self) -> Iterator[Any]:
        """A DBAPI connection: the held one, or a pooled one for this call."""
        local = self._local
        raw = getattr(local, "raw", None)
        temporary = raw is None
        if raw is None:
            with self._translate_errors():
                raw = self.engine.raw_connection()
            if getattr(local, "held", False):
                local.raw, temporary = raw, False
        dbapi = self.engine.dialect.loaded_dbapi
        try:
            yield raw.dbapi_connection
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            if self.engine.dialect.is_disconnect(exc, raw.dbapi_connection, None):
                raw.invalidate(exc)
                self.engine.dispose(close=False)  # its siblings are as dead as it is
                if not temporary:
                    local.raw, temporary = None, True
            raise StorageUnavailable(f"Silo database unavailable: {exc}") from exc
        finally:
            if temporary:
                self._give_back(raw)

    # -- row-level operations used by SessionStore -------------------------

    def load(self, sid: str, conn: Connection | None = None) -> LoadedSession | None:
        """The session and all its namespaces in one SELECT, or None."""
        hot = self.hot_path
        if conn is None and hot is not None:
            with self._raw() as dbapi_connection:
                return hot.load(dbapi_connection, sid)
        if conn is None:
            with self._connect() as own:
                rows = own.execute(self._sql.load, {"k_sid": sid}).all()
        else:
            rows = conn.execute(self._sql.load, {"k_sid": sid}).all()
        if not rows:
            return None
        loaded = LoadedSession(rows[0].created_at, rows[0].last_active, {})
        for row in rows:
            if row.name is not None:
                loaded.namespaces[row.name] = (row.data, row.version)
        return loaded

    def create(self, sid: str, now: float) -> bool:
        """Create an empty session row and forget any expiry mark; True if created."""
        with self._begin() as conn:
            row = conn.execute(self._sql.create, {"k_sid": sid, "now": to_datetime(now)}).first()
            if row is not None:
                conn.execute(self._sql.clear_expired, {"k_sid": sid})
        return row is not None

    def touch_or_create(self, sid: str, now: float, stale_before: float) -> bool:
        """One statement: create the session, or refresh a stale ``last_active``.

        Returns True when the session was created (its expiry mark is then cleared).
        """
        when = to_datetime(now)
        hot = self.hot_path
        if hot is not None:
            with self._raw() as dbapi_connection:
                return hot.touch_or_create(dbapi_connection, sid, when, to_datetime(stale_before))
        with self._begin() as conn:
            row = conn.execute(
                self._sql.touch_or_create,
                {"k_sid": sid, "now": when, "stale_before": to_datetime(stale_before)},
            ).first()
            created = row is not None and row.created_at == when
            if created:
                conn.execute(self._sql.clear_expired, {"k_sid": sid})
        return created

    def touch(self, sid: str, now: float) -> None:
        """Set ``last_active`` (no-op for a missing session)."""
        with self._begin() as conn:
            conn.execute(self._sql.touch, {"k_sid": sid, "now": to_datetime(now)})

    @contextmanager
    def locked(self, sid: str, now: float) -> Iterator[tuple[Connection, bool]]:
        """A transaction that holds session *sid* locked, creating it if missing.

        Yields ``(connection, created)``. The first statement updates the
        session row: on PostgreSQL that takes its row lock (``FOR NO KEY
        UPDATE`` strength, so inserts into child tables are not blocked); on
        SQLite it takes the database write lock, as ``BEGIN IMMEDIATE`` would.
        Other writers of the same session wait until the block ends.
        """
        sql = self._sql
        params = {"k_sid": sid, "now": to_datetime(now)}
        with self._begin() as conn:
            created = False
            if conn.execute(sql.touch, params).rowcount != 1:
                created = conn.execute(sql.create, params).first() is not None
                if created:
                    conn.execute(sql.clear_expired, params)
                else:
                    conn.execute(sql.touch, params)
            yield conn, created

    def write(
        self,
        sid: str,
        writes: Sequence[NamespaceWrite],
        now: float,
        *,
        touch: bool,
        conn: Connection | None = None,
    ) -> list[int]:
        """Write changed namespaces (and maybe ``last_active``) in one transaction.

        Each namespace is written only if its version is still the one that was
        read: otherwise :class:`StateConflict`, and nothing is written. A session
        that was expired meanwhile raises :class:`SessionExpired` and is not
        recreated. Returns the new version of each write.

        The ``last_active`` update comes first: it locks the session row for the
        transaction, so a concurrent expiry sweep skips (PostgreSQL) or waits
        for (SQLite) this session instead of deleting it under the write.
        """
        if conn is not None:
            return self._write_on(conn, sid, writes, to_datetime(now), touch)
        hot = self.hot_path
        if hot is not None:
            with self._raw() as dbapi_connection:
                return hot.write(dbapi_connection, sid, writes, to_datetime(now), touch)
        with self._begin() as own:
            return self._write_on(own, sid, writes, to_datetime(now), touch)

    def _write_on(
        self,
        conn: Connection,
        sid: str,
        writes: Sequence[NamespaceWrite],
        when: dt.datetime,
        touch: bool,
    ) -> list[int]:
        sql = self._sql
        versions: list[int] = []
        if touch and conn.execute(sql.touch, {"k_sid": sid, "now": when}).rowcount != 1:
            raise SessionExpired(sid)
        for w in writes:
            params = {"k_sid": sid, "k_name": w.name, "k_data": w.data, "now": when}
            if w.expected_version is None:
                written = conn.execute(sql.insert_namespace, params).first() is not None
                versions.append(1)
            else:
                params["expected_version"] = w.expected_version
                written = conn.execute(sql.update_namespace, params).rowcount == 1
                versions.append(w.expected_version + 1)
            if not written:
                if conn.execute(sql.has_session, {"k_sid": sid}).first() is None:
                    raise SessionExpired(sid)
                raise StateConflict(sid, w.name)
        return versions

    def read_namespace(self, conn: Connection, sid: str, name: str) -> tuple[Any, int] | None:
        """One namespace's ``(data, version)`` within *conn*'s transaction."""
        row = conn.execute(
            select(namespaces.c.data, namespaces.c.version).where(
                namespaces.c.sid == sid, namespaces.c.name == name
            )
        ).first()
        return None if row is None else (row.data, row.version)

    def sweep(
        self,
        *,
        now: float,
        cutoff: float,
        heartbeat_cutoff: float,
        batch_size: int = 500,
        is_busy: Callable[[list[str]], set[str]] | None = None,
        on_batch: Callable[[list[str]], None] | None = None,
        dry_run: bool = False,
    ) -> SweepResult:
        """Expire sessions idle since before *cutoff*, batch by batch.

        Candidates come through the ``last_active`` index in keyset order, so
        each batch is a short transaction and cost follows the number of idle
        sessions. A session with a running task whose heartbeat is newer than
        *heartbeat_cutoff* is not a candidate; *is_busy* may veto more (it is
        called outside any transaction). Deleted SIDs are recorded as expired
        in the same transaction; ``DELETE ... RETURNING`` means that when
        several workers sweep at once each SID is expired by exactly one.
        *on_batch* receives each batch's expired SIDs after its commit.
        """
        sql = self._sql
        result = SweepResult([], 0)
        after_ts, after_sid = dt.datetime.min.replace(tzinfo=UTC), ""
        cutoff_at = to_datetime(cutoff)
        params: dict[str, Any] = {
            "cutoff": cutoff_at,
            "heartbeat_cutoff": to_datetime(heartbeat_cutoff),
            "batch_size": batch_size,
        }
        while True:
            with self._connect() as conn:
                rows = conn.execute(
                    sql.sweep_candidates, {**params, "after_ts": after_ts, "after_sid": after_sid}
                ).all()
            if not rows:
                break
            after_ts, after_sid = rows[-1].last_active, rows[-1].sid
            candidates = [row.sid for row in rows]
            busy = is_busy(candidates) if is_busy is not None else set()
            result.skipped_busy += len(busy)
            chosen = [s for s in candidates if s not in busy]
            if dry_run:
                result.batches += 1
                result.expired.extend(chosen)
                if on_batch is not None and chosen:
                    on_batch(chosen)
                continue
            result.batches += 1
            if chosen:
                expired = self._expire_batch(chosen, cutoff=cutoff_at, now=now)
                result.expired.extend(expired)
                if on_batch is not None and expired:
                    on_batch(expired)
            if len(rows) < batch_size:
                break
        return result

    def _expire_batch(self, sids: list[str], *, cutoff: dt.datetime, now: float) -> list[str]:
        sql = self._sql
        when = to_datetime(now)
        with self._begin() as conn:
            if sql.sweep_expire is not None:
                params = {"sid_array": sids, "cutoff": cutoff, "k_expired_at": when}
                return list(conn.execute(sql.sweep_expire, params).scalars().all())
            deleted = list(
                conn.execute(sql.sweep_delete, {"sids": sids, "cutoff": cutoff}).scalars().all()
            )
            if deleted:
                if not self._cascades(conn):  # a host's SQLite engine may not enforce FKs
                    for stmt in sql.delete_children:
                        conn.execute(stmt, {"sids": deleted})
                conn.execute(
                    sql.mark_expired, [{"k_sid": s, "k_expired_at": when} for s in deleted]
                )
        return deleted

    def _cascades(self, conn: Connection) -> bool:
        """Whether deleting a session row deletes its children by itself."""
        if self.dialect != "sqlite":
            return True
        return bool(conn.exec_driver_sql("PRAGMA foreign_keys").scalar())

    def prune_expired(
        self, max_age: float, *, now: float | None = None, batch_size: int = 5000
    ) -> None:
        """Forget expired SIDs older than *max_age* seconds, in batches."""
        self.prune_expired_count(max_age, now=now, batch_size=batch_size)

    def prune_expired_count(
        self, max_age: float, *, now: float | None = None, batch_size: int = 5000
    ) -> int:
        """:meth:`prune_expired`, returning how many records were removed."""
        cutoff = to_datetime((time.time() if now is None else now) - max_age)
        total = 0
        while True:
            with self._begin() as conn:
                count = conn.execute(
                    self._sql.prune_expired, {"cutoff": cutoff, "batch_size": batch_size}
                ).rowcount
            total += count
            if count < batch_size:
                return total

    # -- tasks -------------------------------------------------------------

    def claim_task(self, row: TaskRow, stale_before: float) -> bool:
        """Start a task run: write its row unless a live run holds it (False then)."""
        with self._begin() as conn:
            claimed = conn.execute(
                self._sql.claim_task, {**row.params(), "stale_before": to_datetime(stale_before)}
            ).first()
        return claimed is not None

    def save_task(self, row: TaskRow) -> bool:
        """Write a run's state (and heartbeat); False if that run no longer owns the row."""
        with self._begin() as conn:
            return conn.execute(self._sql.save_task, row.params()).rowcount == 1

    def load_task(self, sid: str, task_id: str) -> Any:
        """The task's row, or None."""
        with self._connect() as conn:
            return conn.execute(self._sql.load_task, {"k_id": task_id, "k_sid": sid}).first()

    def mark_task_lost(
        self, sid: str, task_id: str, stale_before: float, now: float, error: str
    ) -> None:
        """Record a run whose worker stopped heartbeating as failed."""
        with self._begin() as conn:
            conn.execute(
                self._sql.mark_task_lost,
                {
                    "k_id": task_id,
                    "k_sid": sid,
                    "stale_before": to_datetime(stale_before),
                    "now": to_datetime(now),
                    "k_error": error,
                    "k_message": f"Failed: {error}",
                },
            )

    def delete_task(self, sid: str, task_id: str) -> None:
        """Forget a task's state (its reset)."""
        with self._begin() as conn:
            conn.execute(self._sql.delete_task, {"k_id": task_id, "k_sid": sid})

    def has_running_task(self, sid: str, stale_before: float) -> bool:
        """Whether session *sid* has a task running with a fresh heartbeat."""
        with self._connect() as conn:
            found = conn.execute(
                self._sql.session_running_task,
                {"k_sid": sid, "stale_before": to_datetime(stale_before)},
            ).first()
        return found is not None

    # -- files -------------------------------------------------------------

    def record_file(self, record: FileRecord) -> bool:
        """Insert or replace a file's row; False when its session does not exist."""
        values = {
            "sid": record.sid,
            "store": record.store,
            "filename": record.filename,
            "size_bytes": record.size_bytes,
            "sha256": record.sha256,
            "content_type": record.content_type,
            "created_at": to_datetime(record.created_at),
        }
        with self._begin() as conn:
            if conn.execute(self._sql.has_session, {"k_sid": record.sid}).first() is None:
                return False
            conn.execute(self._sql.upsert_file, values)
        return True

    def file_names(self, store: str, sid: str) -> list[str]:
        """Names of the files recorded for *sid* in *store*."""
        with self._connect() as conn:
            return list(
                conn.execute(
                    select(files.c.filename)
                    .where(files.c.store == store, files.c.sid == sid)
                    .order_by(files.c.filename)
                ).scalars()
            )

    def has_file(self, store: str, sid: str, filename: str) -> bool:
        """Whether a row exists for that file."""
        with self._connect() as conn:
            found = conn.execute(
                select(literal(1)).where(
                    files.c.store == store, files.c.sid == sid, files.c.filename == filename
                )
            ).first()
        return found is not None

    def file_bytes(
        self, store: str, sid: str | None = None, *, excluding: str | None = None
    ) -> int:
        """Bytes recorded in *store* (for one session, optionally without one file)."""
        query = select(func.coalesce(func.sum(files.c.size_bytes), 0)).where(files.c.store == store)
        if sid is not None:
            query = query.where(files.c.sid == sid)
        if excluding is not None:
            query = query.where(files.c.filename != excluding)
        with self._connect() as conn:
            return int(conn.execute(query).scalar_one())

    def forget_files(self, store: str, sid: str | None = None, filename: str | None = None) -> int:
        """Delete file rows of *store* (one session's, or one file's); returns how many."""
        query = delete(files).where(files.c.store == store)
        if sid is not None:
            query = query.where(files.c.sid == sid)
        if filename is not None:
            query = query.where(files.c.filename == filename)
        with self._begin() as conn:
            return conn.execute(query).rowcount

    def file_rows(self, store: str) -> list[tuple[str, str, int]]:
        """Every ``(sid, filename, size_bytes)`` recorded in *store* (for fsck)."""
        with self._connect() as conn:
            rows = conn.execute(
                select(files.c.sid, files.c.filename, files.c.size_bytes).where(
                    files.c.store == store
                )
            ).all()
        return [(r.sid, r.filename, int(r.size_bytes)) for r in rows]

    # -- SiloStorage interface ---------------------------------------------

    def get_session(self, sid: str) -> dict[str, Any] | None:
        loaded = self.load(sid)
        if loaded is None:
            return None
        session: dict[str, Any] = {name: data for name, (data, _) in loaded.namespaces.items()}
        session["_meta"] = {
            "created_at": loaded.created_at.timestamp(),
            "last_active": loaded.last_active.timestamp(),
            "sid": sid,
        }
        return session

    def set_session(self, sid: str, data: dict[str, Any]) -> None:
        meta = data.get("_meta") or {}
        now = time.time()
        created_at = to_datetime(float(meta.get("created_at", now)))
        last_active = to_datetime(float(meta.get("last_active", now)))
        with self._begin() as conn:
            conn.execute(
                self._sql.upsert_session,
                {"k_sid": sid, "k_created_at": created_at, "k_last_active": last_active},
            )
            rows = [
                {"k_sid": sid, "k_name": name, "k_data": dumps(value), "now": last_active}
                for name, value in data.items()
                if name != "_meta"
            ]
            conn.execute(  # a replacement: namespaces missing from *data* go
                delete(namespaces).where(
                    namespaces.c.sid == sid,
                    namespaces.c.name.not_in([row["k_name"] for row in rows]),
                )
            )
            if rows:
                conn.execute(self._sql.upsert_namespace, rows)

    def replace_namespaces(self, sid: str, fresh: dict[str, str], now: float) -> None:
        """Reset: every namespace of *sid* becomes *fresh* (JSON text; others dropped).

        Versions are bumped, never restarted, so a request that read the old
        state cannot overwrite the reset.
        """
        when = to_datetime(now)
        with self._begin() as conn:
            if conn.execute(self._sql.has_session, {"k_sid": sid}).first() is None:
                return
            conn.execute(
                delete(namespaces).where(
                    namespaces.c.sid == sid, namespaces.c.name.not_in(list(fresh))
                )
            )
            conn.execute(delete(tasks).where(tasks.c.sid == sid))
            if fresh:
                conn.execute(
                    self._sql.upsert_namespace,
                    [
                        {"k_sid": sid, "k_name": n, "k_data": text, "now": when}
                        for n, text in fresh.items()
                    ],
                )

    def delete_session(self, sid: str) -> None:
        self.delete_sessions([sid])

    def delete_sessions(self, sids: list[str]) -> None:
        """Delete sessions and everything they own, without marking them expired."""
        with self._begin() as conn:
            for stmt in self._sql.delete_children:  # explicit: FKs may be off (SQLite)
                conn.execute(stmt, {"sids": sids})
            conn.execute(delete(sessions).where(sessions.c.sid.in_(sids)))

    def has_session(self, sid: str) -> bool:
        with self._connect() as conn:
            return conn.execute(self._sql.has_session, {"k_sid": sid}).first() is not None

    def all_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        with self._connect() as conn:
            heads = conn.execute(select(sessions).order_by(sessions.c.sid)).all()
            rows = conn.execute(
                select(namespaces.c.sid, namespaces.c.name, namespaces.c.data)
            ).all()
        out: dict[str, dict[str, Any]] = {
            h.sid: {
                "_meta": {
                    "created_at": h.created_at.timestamp(),
                    "last_active": h.last_active.timestamp(),
                    "sid": h.sid,
                }
            }
            for h in heads
        }
        for row in rows:
            if row.sid in out:
                out[row.sid][row.name] = row.data
        return list(out.items())

    def session_count(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(sessions)).scalar_one())

    def all_sids(self) -> list[str]:
        with self._connect() as conn:
            return list(conn.execute(select(sessions.c.sid)).scalars())

    def mark_expired(self, sid: str, timestamp: float) -> None:
        with self._begin() as conn:
            conn.execute(
                self._sql.mark_expired, {"k_sid": sid, "k_expired_at": to_datetime(timestamp)}
            )

    def is_expired(self, sid: str) -> bool:
        with self._connect() as conn:
            return conn.execute(self._sql.is_expired, {"k_sid": sid}).first() is not None

    def clear_expired(self, sid: str) -> None:
        with self._begin() as conn:
            conn.execute(self._sql.clear_expired, {"k_sid": sid})

    def expired_count(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(expired_sids)).scalar_one())

    # -- operators ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Row counts for ``flask silo-db stats``."""
        with self._connect() as conn:

            def count(table: Any) -> int:
                return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

            by_status = {
                row.status: int(row.n)
                for row in conn.execute(
                    select(tasks.c.status, func.count().label("n")).group_by(tasks.c.status)
                )
            }
            file_bytes = conn.execute(
                select(func.coalesce(func.sum(files.c.size_bytes), 0))
            ).scalar_one()
            return {
                "sessions": count(sessions),
                "namespaces": count(namespaces),
                "expired_sids": count(expired_sids),
                "files": count(files),
                "file_bytes": int(file_bytes),
                "tasks": by_status,
            }
