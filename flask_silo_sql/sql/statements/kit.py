"""What every feature's statements are built from, for one engine's dialect.

Each feature keeps its statements beside its row code (``SessionStatements`` in
:mod:`.sessions`, ``TaskStatements`` in :mod:`.task_rows`, ...); they all take a
:class:`Kit`: the dialect's ``INSERT`` (for ``ON CONFLICT``), how a statement is
compiled (:meth:`Kit.prepare`), how a list parameter and JSON are bound, and the
parameters most statements share. :class:`Values` converts what goes in and comes
out: times are Unix seconds in Python, and on the wire an aware datetime
(PostgreSQL) or SQLAlchemy's UTC text form (SQLite); JSON goes in as text; a list
of SIDs is one parameter (an array on PostgreSQL, a JSON array read with
``json_each`` on SQLite), so a statement's text never depends on how many SIDs it
is given.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import Engine, String, Text, any_, bindparam, cast, func, select
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import ColumnElement

from ...sids import SID_LENGTH
from ..executor import Prepared
from ..models import UTCDateTime

UTC = dt.timezone.utc


def ts(name: str) -> Any:
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


class Kit:
    """One engine's dialect, and the parameters the features' statements share."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgresql = engine.dialect.name == "postgresql"
        self.values = Values(self.postgresql)
        self.insert: Any = pg.insert if self.postgresql else sqlite.insert
        self.sid = bindparam("sid", type_=String(SID_LENGTH))
        self.name = bindparam("name", type_=String(255))
        self.now = ts("now")
        self.expires = ts("expires")
        self.data = self.json_text(bindparam("data", type_=Text()))

    def prepare(self, name: str, statement: Any, *, binary: bool = False) -> Prepared:
        """*statement* compiled once for this engine."""
        return Prepared(name, statement, self.engine, binary=binary)

    def in_list(self, column: Any, name: str) -> ColumnElement[bool]:
        """``column`` is one of the strings of the list parameter *name*."""
        result: ColumnElement[bool]
        if self.postgresql:
            result = column == any_(bindparam(name, type_=pg.ARRAY(String(SID_LENGTH))))
        else:
            listed = func.json_each(bindparam(name, type_=Text())).table_valued("value")
            result = column.in_(select(listed.c.value))
        return result

    def jsonb(self, param: Any) -> Any:
        return cast(param, pg.JSONB()) if self.postgresql else param

    def json_text(self, param: Any) -> Any:
        """A client's JSON, kept as its text (``json``, not ``jsonb``: see models)."""
        return cast(param, pg.JSON()) if self.postgresql else param
