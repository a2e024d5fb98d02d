"""Atomic mode: silo's statements in the host application's own transaction.

A host that keeps its tables in silo's database (a Flask-SQLAlchemy ``db``, or
a ``scoped_session``) can have a request's silo work and its ``db.session``
changes go through one connection and one transaction, committed once after
the view (see ``docs/atomic.md``):

* :class:`HostExecutor` runs silo's statements on the connection of the host's
  session, inside the transaction the session has open (it begins one if
  none is). It never commits nor rolls back by itself: the transaction is the
  host's, and :class:`HostTransaction` ends it.
* :class:`HostTransaction` is one request's (or one ``silo.session`` block's)
  hold on the host session: while it lasts, ``session.commit()`` flushes (the
  changes join the transaction, which commits once at the end) and a
  ``session.rollback()`` by the application is noted (silo then saves nothing
  of the request). Its :meth:`~HostTransaction.commit` is the one COMMIT;
  what must happen only after it (a task's thread) waits for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from ..errors import SiloError, StorageUnavailable
from ..logs import silo_logger
from .executor import Executor, Result, StatementHook, describe

logger = silo_logger("flask_silo_sql.sql")

HostSessions = Callable[[], Session]
"""What names the host's session of the current context: ``db.session`` or a
``scoped_session`` (each call returns the context's one session)."""


def host_sessions(bind: object, atomic: object) -> HostSessions | None:
    """The host's sessions for ``SQLStorage(bind, atomic=...)`` (None: not atomic)."""
    if atomic is False or atomic is None:
        return None
    if atomic is True:
        scoped = getattr(bind, "session", None)
        if scoped is None or not callable(scoped):
            raise TypeError(
                "SQLStorage(..., atomic=True) needs a Flask-SQLAlchemy object as its bind "
                "(its db.session is shared); for plain SQLAlchemy pass atomic=<a scoped_session>"
            )
        return cast(HostSessions, scoped)
    if isinstance(atomic, sessionmaker):
        raise TypeError(
            "SQLStorage(..., atomic=...) was given a sessionmaker, which makes a new session "
            "at every call: pass scoped_session(that_sessionmaker), so that the request's "
            "code and silo share one session"
        )
    if isinstance(atomic, Session):
        raise TypeError(
            "SQLStorage(..., atomic=...) was given one Session: pass a scoped_session (one "
            "session per request); for one block outside a request use "
            "silo.session(sid, host=that_session)"
        )
    if not callable(atomic):
        raise TypeError(
            "atomic must be True (a Flask-SQLAlchemy bind), a scoped_session or False, "
            f"not {type(atomic).__name__}"
        )
    return cast(HostSessions, atomic)


class HostExecutor(Executor):
    """Silo's statements on the host session's connection, in its transaction."""

    kind = "host"

    def __init__(
        self, session: Session, engine: Engine, hook: StatementHook | None, *, core: bool
    ) -> None:
        super().__init__(engine, hook, None)  # the host's connection: never cut off
        self.session = session
        self.in_transaction = True  # always the host's: silo's blocks join it
        self._core = core
        self._transaction: Any = None
        self._conn: Any = None
        self._cursor: Any = None
        self.pending: list[Callable[[], None]] = []
        """What runs once the transaction committed (a task's thread, callbacks)."""

    def _connection(self) -> Any:
        session = self.session
        transaction = session.get_transaction()
        if transaction is None or transaction is not self._transaction or self._conn is None:
            conn = session.connection()  # begins the session's transaction if none is open
            if conn.engine.url != self.engine.url:
                raise SiloError(
                    "atomic mode: the host's session is bound to another database than "
                    "silo's tables; give SQLStorage the host's engine or db"
                )
            self._conn = conn
            self._transaction = session.get_transaction()
            self._drop_cursor()
        return self._conn

    def _drop_cursor(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            with contextlib.suppress(self._dbapi_error):  # a dead connection's cursor
                cursor.close()

    def _send(self, sql: str, params: Any, binary: bool = False) -> Result:
        conn = self._connection()
        if self._core:
            result = conn.exec_driver_sql(sql, params)
            rows = list(result.fetchall()) if result.returns_rows else []
            return Result(rows, result.rowcount)
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = conn.connection.dbapi_connection.cursor()
        if binary:
            cursor.execute(sql, params, binary=True)
        else:
            cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else []
        return Result(rows, cursor.rowcount)

    # The transaction is the host's: it is ended by HostTransaction, never here.
    def begin(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def _on_error(self, exc: BaseException) -> None:
        """A failed statement fails the request: its transaction is rolled back whole."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.pending.append(callback)

    def close(self) -> None:
        self._drop_cursor()
        self._conn = self._transaction = None


def _host_error(exc: BaseException) -> BaseException:
    """The error to raise for a failed COMMIT of the host's transaction: a database that
    went away is silo's 503; anything else (a constraint) is the host's own error."""
    unavailable = (sa_exc.OperationalError, sa_exc.InterfaceError)
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, unavailable)
    ):
        error = StorageUnavailable(f"Silo database error: {describe(exc)}")
        error.original = exc
        return error
    return exc


class HostTransaction:
    """One request's (or block's) hold on the host session's transaction."""

    __slots__ = ("_commit", "_rollback", "done", "executor", "rolled_back", "session")

    def __init__(self, executor: HostExecutor) -> None:
        self.executor = executor
        self.session = session = executor.session
        self.done = False
        self.rolled_back = False
        """The application rolled the host session back during the hold: silo's part of
        the transaction went with it, and nothing of silo's is saved."""
        # The class's methods: what the hold's end calls, whatever the instance says.
        self._commit = type(session).commit.__get__(session)
        self._rollback = type(session).rollback.__get__(session)
        vars(session)["commit"] = self._flush_instead
        vars(session)["rollback"] = self._noted_rollback

    @property
    def failed(self) -> bool:
        """Whether the host's transaction can no longer commit (a flush failed in it)."""
        transaction = self.session.get_transaction()
        return self.rolled_back or (transaction is not None and not transaction.is_active)

    def _flush_instead(self) -> None:
        """``session.commit()`` during the hold: the changes join the one transaction."""
        self.session.flush()

    def _noted_rollback(self) -> None:
        self.rolled_back = True
        self.executor.pending.clear()
        self._rollback()

    def _release(self) -> None:
        if not self.done:
            self.done = True
            session_vars = vars(self.session)
            session_vars.pop("commit", None)
            session_vars.pop("rollback", None)

    def commit(self) -> None:
        """The one COMMIT (the host's pending changes flushed first); then what waited."""
        self._release()
        try:
            self._commit()
        except sa_exc.SQLAlchemyError as exc:
            self._quiet_rollback()
            self.executor.pending.clear()
            error = _host_error(exc)
            if error is exc:
                raise
            raise error from None  # its cause is kept as error.original (no parameters)
        pending, self.executor.pending = self.executor.pending, []
        for callback in pending:
            try:
                callback()
            except Exception:  # the commit stands: one failed callback must not hide it
                logger.exception("an after-commit step of an atomic request failed")

    def rollback(self) -> None:
        """Everything of the hold goes: the host's changes and silo's."""
        self._release()
        self.executor.pending.clear()
        self._quiet_rollback()

    def _quiet_rollback(self) -> None:
        try:
            self._rollback()
        except sa_exc.SQLAlchemyError as exc:
            logger.warning("rolling back the host's transaction failed (%s)", describe(exc))
