"""The request path's statements, executed on a pooled DBAPI connection.

Every API request runs at most a few statements: load a session, update the
namespaces that changed, refresh ``last_active``, or the single upsert of a
request that never read state. Measured on SQLite, SQLAlchemy Core spends
more time per execute (result and parameter processing, execution context)
than SQLite spends running these statements, so this module compiles the Core
statements of :class:`~flask_silo_sql.sql_storage.SQLStorage` once and runs
them on the DBAPI cursor, converting the few values itself. On PostgreSQL,
reads and single-statement writes run in autocommit: no ``BEGIN`` and
``ROLLBACK`` round trips, and psycopg can prepare the statements.

Connections still come from the engine's pool (so its connect-time settings
apply), one per request when the extension holds it. While anything observes
the engine's statements (``echo``, cursor-execute listeners), the storage runs
these same statements through Core instead, so that they are seen.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from .errors import SessionExpired, StateConflict
from .records import LoadedSession, NamespaceWrite

UTC = dt.timezone.utc
SUPPORTED_DRIVERS = {("sqlite", "pysqlite"), ("postgresql", "psycopg"), ("postgresql", "psycopg2")}


class Prepared:
    """A statement compiled once, with its default parameters and their order."""

    __slots__ = ("defaults", "order", "sql")

    def __init__(self, statement: ClauseElement, engine: Engine) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=engine.dialect))
        self.sql = compiled.string
        self.defaults = {k: v for k, v in compiled.params.items() if v is not None}
        self.order = list(compiled.positiontup or ()) if engine.dialect.positional else None

    def params(self, values: dict[str, Any]) -> Any:
        merged = {**self.defaults, **values} if self.defaults else values
        if self.order is None:
            return merged
        return tuple(merged[name] for name in self.order)


class HotPath:
    """Load, write and touch a session with precompiled SQL on a DBAPI connection."""

    def __init__(self, engine: Engine, statements: Any) -> None:
        self.postgresql = engine.dialect.name == "postgresql"
        self.load_sql = Prepared(statements.load, engine)
        self.update_sql = Prepared(statements.update_namespace, engine)
        self.insert_sql = Prepared(statements.insert_namespace, engine)
        self.touch_sql = Prepared(statements.touch, engine)
        self.has_session_sql = Prepared(statements.has_session, engine)
        self.upsert_sql = Prepared(statements.touch_or_create, engine)
        self.clear_expired_sql = Prepared(statements.clear_expired, engine)

    @staticmethod
    def supports(engine: Engine) -> bool:
        """Whether the engine's driver is one this module knows the values of."""
        return (engine.dialect.name, engine.dialect.driver) in SUPPORTED_DRIVERS

    # -- values --------------------------------------------------------------

    def timestamp(self, when: dt.datetime) -> Any:
        """A bound timestamp: aware on PostgreSQL, SQLAlchemy's text form on SQLite."""
        if self.postgresql:
            return when
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    def read_timestamp(self, value: Any) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return dt.datetime.fromisoformat(value).replace(tzinfo=UTC)

    # -- statements ------------------------------------------------------------

    @staticmethod
    def _run(cursor: Any, prepared: Prepared, values: dict[str, Any]) -> Any:
        cursor.execute(prepared.sql, prepared.params(values))
        return cursor

    def autocommit(self, dbapi_connection: Any, on: bool) -> None:
        """PostgreSQL only: switch the driver's autocommit (a local flag when idle)."""
        if self.postgresql and dbapi_connection.autocommit != on:
            dbapi_connection.autocommit = on

    def load(self, dbapi_connection: Any, sid: str) -> LoadedSession | None:
        """The session and its namespaces, one SELECT (autocommit on PostgreSQL)."""
        self.autocommit(dbapi_connection, True)
        cursor = dbapi_connection.cursor()
        try:
            rows = self._run(cursor, self.load_sql, {"k_sid": sid}).fetchall()
        finally:
            cursor.close()
        if not rows:
            return None
        first = rows[0]
        loaded = LoadedSession(self.read_timestamp(first[0]), self.read_timestamp(first[1]), {})
        namespaces, texts = loaded.namespaces, loaded.texts
        for _, _, name, data, version in rows:
            if name is not None:
                if isinstance(data, str):  # SQLite: the JSON text as written
                    namespaces[name] = (json.loads(data), version)
                    texts[name] = data
                else:
                    namespaces[name] = (data, version)
        return loaded

    def write(
        self,
        dbapi_connection: Any,
        sid: str,
        writes: Sequence[NamespaceWrite],
        when: dt.datetime,
        touch: bool,
    ) -> list[int]:
        """Touch (first: it locks the session row), then write each namespace.

        One transaction; a single statement runs in autocommit on PostgreSQL.
        """
        single = len(writes) + touch == 1
        self.autocommit(dbapi_connection, single)
        stamp = self.timestamp(when)
        cursor = dbapi_connection.cursor()
        versions: list[int] = []
        try:
            if touch:
                touched = self._run(cursor, self.touch_sql, {"k_sid": sid, "now": stamp})
                if touched.rowcount != 1:
                    raise SessionExpired(sid)
            for w in writes:
                values = {"k_sid": sid, "k_name": w.name, "k_data": w.data, "now": stamp}
                if w.expected_version is None:
                    written = self._run(cursor, self.insert_sql, values).fetchone() is not None
                    versions.append(1)
                else:
                    values["expected_version"] = w.expected_version
                    written = self._run(cursor, self.update_sql, values).rowcount == 1
                    versions.append(w.expected_version + 1)
                if not written:
                    found = self._run(cursor, self.has_session_sql, {"k_sid": sid}).fetchone()
                    if found is None:
                        raise SessionExpired(sid)
                    raise StateConflict(sid, w.name)
            if not (single and self.postgresql):
                dbapi_connection.commit()
        except BaseException:
            if not (single and self.postgresql):
                dbapi_connection.rollback()
            raise
        finally:
            cursor.close()
        return versions

    def touch_or_create(
        self, dbapi_connection: Any, sid: str, when: dt.datetime, stale_before: dt.datetime
    ) -> bool:
        """The no-state request: one upsert; True when it created the session."""
        self.autocommit(dbapi_connection, True)
        stamp = self.timestamp(when)
        cursor = dbapi_connection.cursor()
        try:
            row = self._run(
                cursor,
                self.upsert_sql,
                {"k_sid": sid, "now": stamp, "stale_before": self.timestamp(stale_before)},
            ).fetchone()
            created = row is not None and self.read_timestamp(row[0]) == when
            if created:
                self._run(cursor, self.clear_expired_sql, {"k_sid": sid})
            if not self.postgresql:
                dbapi_connection.commit()
        except BaseException:
            if not self.postgresql:
                dbapi_connection.rollback()
            raise
        finally:
            cursor.close()
        return created
