"""Engines for silo storage: URL handling and per-dialect connection settings.

SQLite gets WAL journaling, ``synchronous=NORMAL`` (no corruption and no loss
on an application crash; a power cut may lose the last transactions), foreign
keys on and a busy timeout so concurrent workers wait instead of failing.
PostgreSQL URLs without a driver use psycopg 3. A process forked from one that
holds silo's engines (``gunicorn --preload``) drops the pooled connections it
inherited, without closing them, so parent and children never share one.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.pool import StaticPool

from ..errors import SiloError

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
SUPPORTED_DIALECTS = ("sqlite", "postgresql")

_forkable: weakref.WeakSet[Engine] = weakref.WeakSet()
"""Engines made by :func:`make_engine` whose pools a forked child must not reuse."""


def _drop_inherited_connections() -> None:
    """In a forked child: forget the parent's pooled connections (they stay open for it)."""
    for engine in list(_forkable):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_drop_inherited_connections)


json_dumps = functools.partial(
    json.dumps, separators=(",", ":"), allow_nan=False, ensure_ascii=False
)
"""Compact JSON without NaN/Infinity, for JSON columns written through Core."""


def normalise_url(url: str | URL) -> URL:
    """Parse *url*, pick psycopg 3 for bare ``postgresql://`` / ``postgres://`` URLs.

    ``postgres://`` is the form many hosting platforms put in ``DATABASE_URL``.
    Databases other than SQLite and PostgreSQL are refused.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgres" or parsed.drivername.startswith("postgres+"):
        parsed = parsed.set(drivername="postgresql" + parsed.drivername[len("postgres") :])
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise SiloError(
            f"Unsupported database {parsed.get_backend_name()!r}: "
            "flask-silo-sql supports SQLite and PostgreSQL."
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Connection settings for every SQLite connection of a silo engine."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def make_engine(url: str | URL, **options: Any) -> Engine:
    """Create an engine for *url* with the connection settings silo relies on."""
    parsed = normalise_url(url)
    # hide_parameters: an error's text never carries state or SIDs into a log.
    kwargs: dict[str, Any] = {"json_serializer": json_dumps, "hide_parameters": True}
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        connect_args["check_same_thread"] = False
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one shared in-memory database
    else:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        kwargs["pool_size"] = 10
        kwargs["pool_timeout"] = 10
    connect_args.update(options.pop("connect_args", {}))
    kwargs.update(options)
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
    if kwargs.get("poolclass") is not StaticPool:
        _forkable.add(engine)  # an in-memory database has no connection to share
    return engine
