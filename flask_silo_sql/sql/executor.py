"""The executor seam: how silo's SQL reaches the database, and nothing else.

Every operation of the SQL backend is written once, against :class:`Executor`:
run a precompiled statement with its values, switch autocommit, commit, roll
back. Two executors implement it and send the *same* SQL text with the *same*
parameters, and both hand back the driver's raw values:

* :class:`DBAPIExecutor` runs statements on the pooled DBAPI connection's
  cursor. It is the fastest (on SQLite, SQLAlchemy's execution machinery costs
  more than SQLite takes to run these statements).
* :class:`CoreExecutor` runs them through ``Connection.exec_driver_sql``, so
  that whatever observes the engine (``echo``, ``before_cursor_execute``
  listeners, OpenTelemetry's or Sentry's SQLAlchemy instrumentation) sees every
  statement.

:class:`Connector` picks the executor (``auto``: Core while anything observes
the engine's statements, else DBAPI), and holds one connection per context: a
request holds its connection from its first statement to its end, and every
storage operation in that context uses it, so a request never waits on a
second connection of its own.

Errors: every database error, on either executor, connection checkout
included, becomes :class:`~flask_silo_sql.errors.StorageUnavailable`; a
connection that died is invalidated with its pool's siblings. The optional
``hook(name, sql, values)`` is called before each statement, inside the error
translation: tests count, pause and inject faults there without changing the
path under test.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, cast

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from ..errors import StorageUnavailable
from ..logs import silo_logger
from .watchdog import WATCHDOG, shut_down

logger = silo_logger("flask_silo_sql.sql")

ExecutorMode = Literal["auto", "dbapi", "core"]
SLOW_FAILURE_S = 0.5
"""A failed wait at least this long means a server that does not answer (see ``lost``)."""
QUIET_S = 1.0
"""After such a failure, how long no new connection is tried (requests answer 503 at once)."""
StatementHook = Callable[[str, str, Mapping[str, Any]], None]
"""``hook(statement_name, sql, values)``, called before each statement is sent."""


class Prepared:
    """A statement compiled once for one dialect: its SQL text and how to bind it."""

    __slots__ = ("binary", "defaults", "name", "order", "sql")

    def __init__(
        self, name: str, statement: ClauseElement, engine: Engine, *, binary: bool = False
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=engine.dialect))
        self.name = name
        self.sql = compiled.string
        self.binary = binary and engine.dialect.driver == "psycopg"
        """Rows in PostgreSQL's binary format, where the DBAPI executor can ask for it
        (psycopg 3): a ``bytea`` comes as it is stored, not as hexadecimal text twice
        its size that both ends encode and decode (a chunk's read costs a fifth)."""
        self.defaults = {k: v for k, v in compiled.params.items() if v is not None}
        self.order = list(compiled.positiontup or ()) if engine.dialect.positional else None

    def params(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters: a tuple (qmark dialects) or a dict."""
        merged = {**self.defaults, **values} if self.defaults else values
        if self.order is None:
            return merged
        return tuple(merged[name] for name in self.order)

    def __repr__(self) -> str:
        return f"<Prepared {self.name}>"


class Result:
    """What a statement gave back: its rows (raw driver values) and its row count."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


def unreachable(exc: BaseException) -> StorageUnavailable:
    """The error for a connection that could not be made (its cause kept, not chained)."""
    error = StorageUnavailable(f"Silo database unreachable: {describe(exc)}")
    error.original = exc
    return error


def describe(exc: BaseException) -> str:
    """A log-safe account of a database error: its class and first line, no parameters."""
    original = getattr(exc, "orig", None) or exc
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first[:200]}"


class Executor:
    """Runs prepared statements on one connection (see the module docstring).

    Outside :meth:`transaction` every statement stands alone: PostgreSQL runs
    it in autocommit (no BEGIN/COMMIT round trips), SQLite commits it at once.
    Inside, statements share one transaction, committed at the end of the block.
    """

    kind = "abstract"

    def __init__(
        self, engine: Engine, hook: StatementHook | None, timeout: float | None = None
    ) -> None:
        self.engine = engine
        self.hook = hook
        self.postgresql = engine.dialect.name == "postgresql"
        self._dbapi_error: type[BaseException] = engine.dialect.loaded_dbapi.Error
        self.in_transaction = False
        self.timeout = timeout or 0.0
        """Seconds a statement may wait for the server (PostgreSQL; see :mod:`.watchdog`)."""
        self.busy_since = 0.0
        self.cut = False
        """The watchdog shut this connection down: it is not used again."""
        self._cut_lock = threading.Lock()
        self.on_lost: Callable[[float], None] | None = None
        """Called with the time the failed wait began, when the connection turns out dead
        (the connector stops trying for a moment)."""
        self._waiting_since = 0.0

    def _lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost(self._waiting_since or time.monotonic())

    def _watch(self) -> None:
        if self.timeout and self.postgresql:
            WATCHDOG.watch(self)

    def socket_fd(self) -> int | None:
        """The connection's socket (PostgreSQL), for the watchdog."""
        return None

    def cut_off_if_overdue(self, now: float) -> None:
        """The watchdog's check (see :mod:`.watchdog`); exact: a wait that ended is left be."""
        with self._cut_lock:
            since = self.busy_since
            if not since or now - since <= self.timeout or self.cut:
                return
            fd = self.socket_fd()
            if fd is None:
                return
            self.cut = True
            shut_down(fd)
        logger.error("silo database did not answer within %.1f s: connection cut off", self.timeout)

    def _done_waiting(self) -> None:
        with self._cut_lock:
            self.busy_since = 0.0

    # -- what the operations use -------------------------------------------------

    def run(self, statement: Prepared, values: Mapping[str, Any]) -> Result:
        """Send *statement* with *values* (in the open transaction, if any)."""
        if self.cut:
            raise StorageUnavailable("Silo database connection was cut off (no answer)")
        params = statement.params(values)
        try:
            if self.hook is not None:
                self.hook(statement.name, statement.sql, values)
            self.busy_since = self._waiting_since = time.monotonic()
            result = self._send(statement.sql, params, statement.binary)
            if not self.in_transaction:
                self._end_statement()
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._unavailable(exc) from None
        finally:
            self._done_waiting()
        return result

    @contextmanager
    def transaction(self) -> Iterator[Executor]:
        """One transaction: committed at the end of the block, rolled back on an exception.

        Inside an open transaction (locking mode) the block joins it: the outer
        transaction commits or rolls back the whole.
        """
        if self.in_transaction:
            yield self
            return
        self.begin()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def begin(self) -> None:
        """Open a transaction: the next statements run in it until commit or rollback."""
        if self.in_transaction:
            raise RuntimeError("a transaction is already open on this connection")
        try:
            self._begin()
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._unavailable(exc) from None
        self.in_transaction = True

    def commit(self) -> None:
        if not self.in_transaction:
            return
        self.in_transaction = False
        try:
            self.busy_since = self._waiting_since = time.monotonic()
            self._commit()
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._unavailable(exc) from None
        finally:
            self._done_waiting()

    def rollback(self) -> None:
        if not self.in_transaction:
            return
        self.in_transaction = False
        try:
            self.busy_since = time.monotonic()
            self._rollback()
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._unavailable(exc) from None
        finally:
            self._done_waiting()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run *callback* once what was written is committed: here at once (a transaction
        of the host's defers it to its COMMIT, see :mod:`.host`)."""
        callback()

    # -- implementations ---------------------------------------------------------

    def _send(self, sql: str, params: Any, binary: bool = False) -> Result:
        raise NotImplementedError

    def _end_statement(self) -> None:
        """After a statement outside a transaction: make it durable on its own."""
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Give the connection back (rolled back, autocommit off: as the pool expects)."""
        raise NotImplementedError

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        self._on_error(exc)
        error = StorageUnavailable(f"Silo database error: {describe(exc)}")
        error.original = exc
        return error

    def _on_error(self, exc: BaseException) -> None:
        """Invalidate a connection that died (and its siblings in the pool)."""


class DBAPIExecutor(Executor):
    """Statements on the DBAPI cursor of a pooled connection (the fast executor)."""

    kind = "dbapi"

    def __init__(
        self, engine: Engine, hook: StatementHook | None, timeout: float | None = None
    ) -> None:
        super().__init__(engine, hook, timeout)
        try:
            self._raw = engine.raw_connection()
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise unreachable(exc) from None
        dbapi: Any = self._raw.dbapi_connection
        self._dbapi = dbapi
        self._cursor: Any = None
        if self.postgresql:
            dbapi.autocommit = True  # statements stand alone until begin()
        self._watch()

    def socket_fd(self) -> int | None:
        dbapi = self._dbapi
        return int(dbapi.fileno()) if self.postgresql and dbapi is not None else None

    def _send(self, sql: str, params: Any, binary: bool = False) -> Result:
        if self._dbapi is None:  # invalidated by an earlier error
            raise StorageUnavailable("Silo database connection was lost")
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self._dbapi.cursor()
        if binary:
            cursor.execute(sql, params, binary=True)
        else:
            cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else []
        return Result(rows, cursor.rowcount)

    def _end_statement(self) -> None:
        if not self.postgresql and self._dbapi.in_transaction:
            self._dbapi.commit()

    def _begin(self) -> None:
        if self._dbapi is None:
            raise StorageUnavailable("Silo database connection was lost")
        if self.postgresql:
            self._dbapi.autocommit = False  # psycopg sends BEGIN with the next statement

    def _commit(self) -> None:
        self._dbapi.commit()
        if self.postgresql:
            self._dbapi.autocommit = True

    def _rollback(self) -> None:
        self._dbapi.rollback()
        if self.postgresql:
            self._dbapi.autocommit = True

    def _on_error(self, exc: BaseException) -> None:
        dbapi = self._dbapi
        original = getattr(exc, "orig", None) or exc
        if dbapi is None:
            return
        if isinstance(original, self._dbapi_error) and self.engine.dialect.is_disconnect(
            cast(Any, original), dbapi, self._cursor
        ):
            self._invalidate(original)
            return
        try:  # a failed statement aborts a PostgreSQL transaction: end it here
            if self.in_transaction or (not self.postgresql and dbapi.in_transaction):
                self.in_transaction = False
                dbapi.rollback()
            if self.postgresql:
                dbapi.autocommit = True
        except self._dbapi_error as again:
            self._invalidate(again)

    def _invalidate(self, exc: BaseException) -> None:
        self._lost()
        self._cursor = None
        self._dbapi = None
        self.in_transaction = False
        self._raw.invalidate(cast(Any, exc))
        self.engine.dispose(close=False)  # its siblings are as dead as it is

    def close(self) -> None:
        WATCHDOG.forget(self)
        if self._dbapi is None:
            self._raw.close()
            return
        if self.cut:  # shut down by the watchdog: never back into the pool
            self._invalidate(StorageUnavailable("cut off"))
            self._raw.close()
            return
        try:
            if self._cursor is not None:
                self._cursor.close()
            open_transaction = self.in_transaction or (
                not self.postgresql and self._dbapi.in_transaction
            )
            self.in_transaction = False
            if open_transaction:  # else the pool's reset on return does all there is to do
                self._dbapi.rollback()
            if self.postgresql:
                self._dbapi.autocommit = False  # the pool's default
        except self._dbapi_error as exc:
            self._raw.invalidate(cast(Any, exc))
        finally:
            self._raw.close()


class CoreExecutor(Executor):
    """Statements through SQLAlchemy Core (observers of the engine see each one)."""

    kind = "core"

    def __init__(
        self, engine: Engine, hook: StatementHook | None, timeout: float | None = None
    ) -> None:
        super().__init__(engine, hook, timeout)
        try:
            self._conn: Connection = engine.connect()
            if self.postgresql:
                self._dbapi().autocommit = True
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise unreachable(exc) from None
        self._watch()

    def socket_fd(self) -> int | None:
        if not self.postgresql or self._conn.invalidated:
            return None
        return int(self._dbapi().fileno())

    def _dbapi(self) -> Any:
        return self._conn.connection.dbapi_connection

    def _send(self, sql: str, params: Any, binary: bool = False) -> Result:
        # Text rows: an observer of the engine sees the statement as SQLAlchemy sends it.
        result = self._conn.exec_driver_sql(sql, params)
        rows = list(result.fetchall()) if result.returns_rows else []
        return Result(rows, result.rowcount)

    def _end_statement(self) -> None:
        # PostgreSQL: autocommit, nothing is sent; SQLite: COMMIT if the statement wrote.
        if self.postgresql or self._conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            self._conn.commit()

    def _begin(self) -> None:
        if self._conn.in_transaction():
            self._conn.commit()
        if self.postgresql:
            self._dbapi().autocommit = False

    def _commit(self) -> None:
        self._conn.commit()
        if self.postgresql:
            self._dbapi().autocommit = True

    def _rollback(self) -> None:
        self._conn.rollback()
        if self.postgresql:
            self._dbapi().autocommit = True

    def _on_error(self, exc: BaseException) -> None:
        self.in_transaction = False
        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            self._lost()
            self.engine.dispose(close=False)  # its siblings are as dead as it is
            return
        try:
            if self._conn.in_transaction():
                self._conn.rollback()
            if self.postgresql and not self._conn.invalidated:
                self._dbapi().autocommit = True
        except (sa_exc.SQLAlchemyError, self._dbapi_error):
            self._conn.invalidate()

    def close(self) -> None:
        WATCHDOG.forget(self)
        if self.cut and not self._conn.invalidated:  # never back into the pool
            self._conn.invalidate()
        try:
            if self._conn.in_transaction():
                self._conn.rollback()
            if self.postgresql and not self._conn.invalidated:
                self._dbapi().autocommit = False  # the pool's default
        except (sa_exc.SQLAlchemyError, self._dbapi_error):
            self._conn.invalidate()
        finally:
            self._conn.close()


class _Held:
    """The connection a context holds (acquired at its first statement)."""

    __slots__ = ("depth", "executor")

    def __init__(self) -> None:
        self.executor: Executor | None = None
        self.depth = 0
        """How many holds beyond the first share it (a unit opened inside a request)."""


class _Use:
    """``with connector.executor() as ex``: the held executor, or one for the block."""

    __slots__ = ("_connector", "_own")

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._own: Executor | None = None

    def __enter__(self) -> Executor:
        connector = self._connector
        held = connector._held.get()
        if held is not None:
            if held.executor is None:
                held.executor = connector._new()
            return held.executor
        self._own = connector._new()
        return self._own

    def __exit__(self, *exc: object) -> None:
        own, self._own = self._own, None
        if own is not None:
            own.close()


class Connector:
    """Executors for one engine: chosen by mode, one held per context."""

    def __init__(
        self, engine: Engine, mode: ExecutorMode = "auto", *, timeout: float | None = None
    ) -> None:
        if mode not in ("auto", "dbapi", "core"):
            raise ValueError(f"executor must be 'auto', 'dbapi' or 'core', not {mode!r}")
        self.engine = engine
        self.mode: ExecutorMode = mode
        self.timeout = timeout
        self.hook: StatementHook | None = None
        self._down = False
        self._quiet_until = 0.0
        self._probing = False
        self._state = threading.Lock()
        self._reached = 0.0
        self._held: contextvars.ContextVar[_Held | None] = contextvars.ContextVar(
            f"silo_held_{id(self):x}", default=None
        )

    def observed(self) -> bool:
        """Whether anything watches this engine's statements (then Core runs them)."""
        engine = self.engine
        dispatch = engine.dispatch
        return bool(engine.echo or dispatch.before_cursor_execute or dispatch.after_cursor_execute)

    def _new(self) -> Executor:
        probe = False
        if self._down and time.monotonic() < self._quiet_until:
            raise StorageUnavailable("Silo database unavailable (not answering)")
        if self._down:
            with self._state:
                if self._probing:
                    raise StorageUnavailable("Silo database unavailable (being checked)")
                self._probing = probe = True
        started = time.monotonic()
        mode = self.mode
        try:
            if mode == "core" or (mode == "auto" and self.observed()):
                executor: Executor = CoreExecutor(self.engine, self.hook, self.timeout)
            else:
                executor = DBAPIExecutor(self.engine, self.hook, self.timeout)
        except StorageUnavailable:
            self.lost(started)
            raise
        finally:
            if probe:
                self._probing = False
        self._reached = time.monotonic()
        self._down = False
        executor.on_lost = self.lost
        return executor

    def lost(self, since: float) -> None:
        """A wait that began at *since* found the database gone.

        While the database is down, each process tries one new connection at
        a time; requests arriving meanwhile are answered ``503`` at once
        instead of each waiting out a ``connect_timeout``. When the failure
        took long (a server that does not answer, rather than one that refuses
        connections), no new attempt is made for :data:`QUIET_S` either: on a
        frozen server, requests queued in a sync worker would otherwise wait
        one timeout each. The first connection that succeeds ends it. A
        failure of a wait that began before the database was last reached says
        nothing new, and is ignored.
        """
        if since < self._reached:
            return
        self._down = True
        now = time.monotonic()
        if now - since >= SLOW_FAILURE_S:
            self._quiet_until = now + QUIET_S

    def hold(self) -> contextvars.Token[_Held | None]:
        """From now until :meth:`release`, this context's operations share one connection.

        Inside a context that holds one already, the same connection is shared.
        """
        held = self._held.get()
        if held is not None:
            held.depth += 1
            return self._held.set(held)
        return self._held.set(_Held())

    def release(self, token: contextvars.Token[_Held | None]) -> None:
        """Give the held connection back (rolling back anything left open)."""
        held = self._held.get()
        self._held.reset(token)
        if held is None:
            return
        if held.depth > 0:
            held.depth -= 1
            return
        if held.executor is not None:
            executor, held.executor = held.executor, None
            executor.close()

    def adopt(self, executor: Executor) -> None:
        """This context's held connection is *executor*'s (the host's, in atomic mode)."""
        held = self._held.get()
        if held is None:
            raise RuntimeError("adopt() needs a held connection (a request or a unit)")
        held.executor = executor

    def after_commit(self, callback: Callable[[], None]) -> None:
        """*callback* once this context's writes are committed (at once, unless the held
        connection's transaction is the host's)."""
        held = self._held.get()
        executor = held.executor if held is not None else None
        if executor is None:
            callback()
        else:
            executor.after_commit(callback)

    @property
    def holding(self) -> bool:
        """Whether this context holds a connection (a request is in progress)."""
        return self._held.get() is not None

    def executor(self) -> _Use:
        """This context's held executor, or a connection for the length of the block."""
        return _Use(self)

    @contextmanager
    def transaction(self) -> Iterator[Executor]:
        """An executor inside one transaction (joining the held one's, if open)."""
        with self.executor() as ex, ex.transaction():
            yield ex
