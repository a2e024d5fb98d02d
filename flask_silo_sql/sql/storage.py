"""SQLStorage: the SQL backend's façade, and flask-silo's storage interface on SQL tables.

It owns (or borrows) the engine, the :class:`~.executor.Connector`, the
compiled :class:`~.statements.Statements` and the database clock. A
:class:`~flask_silo_sql.store.SessionStore` over it gets an
:class:`~.backend.SQLBackend`; flask-silo itself (or any code written for its
12-method ``SiloStorage``) can use it directly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import URL, Engine

from ..codec import dumps
from ..errors import SiloError
from ..forks import at_fork
from ..keys import SessionKey, client_key
from ..storage import SiloStorage
from . import sessions as ops
from .backend import SQLBackend
from .clock import DatabaseClock
from .context import Context
from .disk import SQLiteDisk, database_file
from .engine import DEFAULT_TIMEOUT_S, Prepared, make_engine, normalise_url
from .executor import Connector, ExecutorMode, StatementHook
from .host import HostExecutor, HostSessions, HostTransaction, host_sessions
from .models import SILO_TABLES
from .statements import Statements
from .sweep import prune

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ..backends.base import Policy

DEFAULT_LIFETIME_S = 3600.0 + 60.0
"""How long a session written through the bare storage interface lives (flask-silo's TTL)."""


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a storage builds once its engine is known."""

    connector: Connector
    statements: Statements
    clock: DatabaseClock
    disk: SQLiteDisk | None
    """An SQLite database file's disk (its floor and reserve); None on PostgreSQL."""


class EngineSource(Protocol):
    """An object whose ``engine`` is the Engine to use (a Flask-SQLAlchemy ``db``).

    Its engine may need an application context: the extension resolves it in
    ``init_app``, or it is resolved on first use inside one.
    """

    @property
    def engine(self) -> Engine: ...


class SQLStorage(SiloStorage):
    """Session storage in SQL tables (SQLite or PostgreSQL).

    *bind* is a database URL, an SQLAlchemy :class:`~sqlalchemy.Engine`, or a
    Flask-SQLAlchemy ``SQLAlchemy`` object whose engine is shared. *atomic*
    (see ``docs/atomic.md``): ``True`` with a Flask-SQLAlchemy *bind*, or a
    ``scoped_session`` of the host's, makes each request's silo work and the
    host session's changes one transaction on one connection, committed once
    after the view; False (the default) keeps silo's own connection and
    commit, and the host's ``db.session`` is never used. *engine_options* go to
    ``create_engine`` when *bind* is a URL. *executor* picks how statements reach the database:
    ``auto`` (the DBAPI cursor, or SQLAlchemy Core while anything observes the
    engine), ``dbapi`` or ``core``. *timeout* (seconds) bounds every wait on the
    database: connecting and pool checkouts (engines made from a URL), SQLite
    lock waits, and every PostgreSQL statement (any engine). *prepared_statements*
    (engines made from a URL, PostgreSQL): let psycopg prepare statements on each
    connection (``SILO_PREPARED_STATEMENTS``; not through PgBouncer before 1.21), or
    ``"auto"``: on each connection that reaches the server directly.
    """

    def __init__(
        self,
        bind: str | URL | Engine | EngineSource,
        *,
        executor: ExecutorMode = "auto",
        timeout: float = DEFAULT_TIMEOUT_S,
        atomic: bool | HostSessions = False,
        prepared_statements: Prepared = "auto",
        **engine_options: Any,
    ) -> None:
        self.host_sessions: HostSessions | None = host_sessions(bind, atomic)
        """The host's sessions, in atomic mode (else None)."""
        self._engine: Engine | None = None
        self._source: EngineSource | None = None
        self.timeout = float(timeout)
        if isinstance(bind, Engine):
            self._engine = bind
        elif isinstance(bind, (str, URL)):
            self._engine = make_engine(
                bind, timeout=self.timeout, prepared=prepared_statements, **engine_options
            )
        elif hasattr(type(bind), "engine"):  # read lazily: it may need an app context
            self._source = bind
        else:
            raise TypeError(
                "SQLStorage needs a database URL, an SQLAlchemy Engine or a "
                f"Flask-SQLAlchemy object, not {type(bind).__name__}"
            )
        if executor not in ("auto", "dbapi", "core"):
            raise ValueError(f"executor must be 'auto', 'dbapi' or 'core', not {executor!r}")
        self.owns_engine = isinstance(bind, (str, URL))
        self._mode: ExecutorMode = executor
        self._ready = threading.Lock()
        self._parts: _Parts | None = None
        self._hook: StatementHook | None = None
        # A process forked while another thread made the parts (a ``--preload`` master's
        # task runner, say) would inherit their lock held: the fork waits for the parts.
        at_fork(
            self,
            before=SQLStorage._forking,
            in_parent=lambda storage: storage._forked(child=False),
            in_child=lambda storage: storage._forked(child=True),
        )

    def _forking(self) -> None:
        self._ready.acquire()  # no fork while another thread makes the parts

    def _forked(self, *, child: bool) -> None:
        if child:  # the lock is this process's own now, and free
            self._ready = threading.Lock()
        else:
            self._ready.release()

    # -- engine ------------------------------------------------------------------

    @property
    def source(self) -> EngineSource | None:
        """The object the engine comes from, while it is not resolved yet."""
        return self._source if self._engine is None else None

    def attach(self, engine: Engine) -> None:
        """Use *engine* (the extension resolves a Flask-SQLAlchemy engine this way)."""
        if self._engine is None:
            normalise_url(engine.url)  # SQLite or PostgreSQL only
            self._engine = engine

    @property
    def engine(self) -> Engine:
        """The engine in use."""
        engine = self._engine
        if engine is None:
            engine = self._resolve()
            self.attach(engine)
        return engine

    def _resolve(self) -> Engine:
        source = self._source
        try:
            engine = source.engine if source is not None else None
        except RuntimeError as exc:
            raise SiloError(
                "SQLStorage was given a Flask-SQLAlchemy object: initialise it with "
                "Silo(app) / init_app(app), or use it inside an application context."
            ) from exc
        if not isinstance(engine, Engine):
            raise SiloError(f"SQLStorage's engine source gave {engine!r}, not an Engine")
        return engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    def _prepared(self) -> _Parts:
        parts = self._parts
        if parts is None:
            with self._ready:
                parts = self._parts
                if parts is None:
                    engine = self.engine
                    connector = Connector(engine, self._mode, timeout=self.timeout)
                    connector.hook = self._hook
                    statements = Statements(engine)
                    database = database_file(engine)
                    disk = SQLiteDisk(engine, database) if database is not None else None
                    if disk is not None:
                        disk.lay_reserve()
                    clock = DatabaseClock(connector, statements)
                    parts = _Parts(connector, statements, clock, disk)
                    self._parts = parts
        return parts

    @property
    def connector(self) -> Connector:
        """How statements reach the database (one held connection per request)."""
        return self._prepared().connector

    @property
    def statements(self) -> Statements:
        return self._prepared().statements

    @property
    def clock(self) -> DatabaseClock:
        """Unix seconds by the database's clock."""
        return self._prepared().clock

    @property
    def statement_hook(self) -> StatementHook | None:
        """``hook(name, sql, values)`` called before each statement (diagnostics, tests)."""
        return self._hook

    @statement_hook.setter
    def statement_hook(self, hook: StatementHook | None) -> None:
        with self._ready:  # not between another thread's making of the parts and their use
            self._hook = hook
            if self._parts is not None:
                self._parts.connector.hook = hook

    @property
    def atomic(self) -> bool:
        """Whether requests share the host session's transaction (atomic mode)."""
        return self.host_sessions is not None

    def join(self, session: Session) -> HostTransaction:
        """From now on, this context's silo statements run in *session*'s transaction,
        which the returned hold commits (once) or rolls back. The context must hold its
        connection (a request's unit, or ``connector.hold()``)."""
        connector = self.connector
        mode = connector.mode
        core = mode == "core" or (mode == "auto" and connector.observed())
        executor = HostExecutor(session, self.engine, connector.hook, core=core)
        connector.adopt(executor)
        return HostTransaction(executor)

    def dispose(self) -> None:
        """Close pooled connections, when this storage created its engine."""
        if self.owns_engine and self._engine is not None:
            self._engine.dispose()

    # -- the backend of a SessionStore ----------------------------------------------

    def silo_backend(self, policy: Policy) -> SQLBackend:
        """The backend a :class:`~flask_silo_sql.store.SessionStore` delegates to."""

        def context() -> Context:
            parts = self._prepared()
            return Context(parts.connector, parts.statements, parts.clock, policy, parts.disk)

        return SQLBackend(context)

    # -- SiloStorage (flask-silo's interface) -------------------------------------------
    # Its SIDs may come straight from a client (flask-silo checks only their length):
    # each is hashed, a key of :func:`all_sids` (a SessionKey) passes as it is.

    def _times(self, now: float) -> ops.Times:
        return ops.Times(now, now + DEFAULT_LIFETIME_S, now)

    def get_session(self, sid: str) -> dict[str, Any] | None:
        with self.connector.executor() as ex:
            loaded = ops.load_all(ex, self.statements, client_key(sid))
        if loaded is None:
            return None
        head, found = loaded
        session: dict[str, Any] = {name: stored.data for name, stored in found.items()}
        session["_meta"] = {
            "created_at": head.created_at,
            "last_active": head.last_active,
            "sid": sid,
        }
        return session

    def set_session(self, sid: str, data: dict[str, Any]) -> None:
        meta = data.get("_meta") or {}
        now = self.clock()
        st = self.statements
        v = st.values
        last_active = float(meta.get("last_active", now))
        fresh = {name: dumps(value) for name, value in data.items() if name != "_meta"}
        sid = client_key(sid)
        with self.connector.transaction() as ex:
            ex.run(
                st.upsert_session,
                {
                    "sid": sid,
                    "created_at": v.time(float(meta.get("created_at", now))),
                    "last_active": v.time(last_active),
                    "expires": v.time(last_active + DEFAULT_LIFETIME_S),
                },
            )
            ops.replace_namespaces(ex, st, sid, fresh, last_active)

    def delete_session(self, sid: str) -> None:
        with self.connector.executor() as ex:
            ops.delete_sessions(ex, self.statements, [client_key(sid)])

    def has_session(self, sid: str) -> bool:
        with self.connector.executor() as ex:
            found = ex.run(self.statements.has_session, {"sid": client_key(sid)}).first()
            return found is not None

    def all_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        st = self.statements
        v = st.values
        with self.connector.executor() as ex:
            heads = ex.run(st.all_heads, {}).rows
            rows = ex.run(st.all_namespaces, {}).rows
        out: dict[str, dict[str, Any]] = {
            key: {"_meta": {"created_at": v.unix(c), "last_active": v.unix(a), "sid": key}}
            for key, c, a in ((SessionKey(sid), c, a) for sid, c, a in heads)
        }
        for sid, name, data in rows:
            if sid in out:
                out[sid][name] = v.json(data)[0]
        return list(out.items())

    def session_count(self) -> int:
        with self.connector.executor() as ex:
            return int(ex.run(self.statements.count_sessions, {}).scalar())

    def all_sids(self) -> list[str]:
        with self.connector.executor() as ex:
            return [SessionKey(row[0]) for row in ex.run(self.statements.all_sids, {}).rows]

    def mark_expired(self, sid: str, timestamp: float) -> None:
        st = self.statements
        with self.connector.executor() as ex:
            ex.run(st.mark_expired, {"sid": client_key(sid), "now": st.values.time(timestamp)})

    def is_expired(self, sid: str) -> bool:
        with self.connector.executor() as ex:
            return ex.run(self.statements.is_expired, {"sid": client_key(sid)}).first() is not None

    def clear_expired(self, sid: str) -> None:
        with self.connector.executor() as ex:
            ex.run(self.statements.clear_expired, {"sid": client_key(sid)})

    def prune_expired(
        self, max_age: float, *, now: float | None = None, batch_size: int = 5000
    ) -> None:
        """Forget expired SIDs remembered for longer than *max_age* seconds, in batches."""
        self.prune_expired_count(max_age, now=now, batch_size=batch_size)

    def prune_expired_count(
        self, max_age: float, *, now: float | None = None, batch_size: int = 5000
    ) -> int:
        """:meth:`prune_expired`, returning how many records went."""
        cutoff = (self.clock() if now is None else now) - max_age
        return prune(self.connector, self.statements, cutoff=cutoff, batch_size=batch_size)

    def expired_count(self) -> int:
        with self.connector.executor() as ex:
            return int(ex.run(self.statements.count_expired, {}).scalar())

    # -- operators -----------------------------------------------------------------

    def stats(self, *, heartbeat_timeout: float = 60.0) -> dict[str, Any]:
        """Row counts for ``flask silo-db stats``, and the live task workers."""
        st = self.statements
        v = st.values
        now = self.clock()
        with self.connector.executor() as ex:
            counts = {name: int(ex.run(q, {}).scalar()) for name, q in st.count_rows.items()}
            by_status = {row[0]: int(row[1]) for row in ex.run(st.task_counts, {}).rows}
            file_bytes = int(ex.run(st.files.all_file_bytes, {}).scalar() or 0)
            stale_before = {"stale_before": v.time(now - heartbeat_timeout)}
            live = ex.run(st.live_workers, stale_before).rows
            health = (
                ex.run(st.table_health, {"names": sorted(SILO_TABLES)}).rows
                if st.table_health is not None
                else []
            )
        workers = [
            {
                "id": wid,
                "hostname": host,
                "pid": pid,
                "kind": kind,
                "concurrency": concurrency,
                "started_at": v.unix(started),
                "heartbeat_age": max(0.0, now - v.unix(beat)),
                "running": int(running or 0),
            }
            for wid, host, pid, kind, concurrency, started, beat, running in live
        ]
        return {
            "sessions": counts["silo_sessions"],
            "namespaces": counts["silo_namespaces"],
            "expired_sids": counts["silo_expired_sids"],
            "files": counts["silo_files"],
            "file_bytes": file_bytes,
            "tasks": by_status,
            "workers": workers,
            "tables": {
                name: {
                    "table_bytes": int(table_bytes),
                    "index_bytes": int(index_bytes),
                    "live_rows": int(live_rows),
                    "dead_rows": int(dead_rows),
                    "updates": int(updates),
                    "hot_updates": int(hot),
                    "last_vacuum": None if vacuumed is None else v.unix(vacuumed),
                }
                for name, table_bytes, index_bytes, live_rows, dead_rows, updates, hot, vacuumed
                in health
            },
        }
