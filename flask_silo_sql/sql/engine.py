"""Engines for silo storage: URL handling and per-dialect connection settings.

SQLite gets WAL journaling, ``synchronous=NORMAL`` (no corruption and no loss
on an application crash; a power cut may lose the last transactions), foreign
keys on, a busy timeout so concurrent workers wait instead of failing, and
``secure_delete=FAST`` so a delete writes no more than the pages it changes.
PostgreSQL URLs without a driver use psycopg 3. A process forked from one that
holds silo's engines (``gunicorn --preload``) drops the pooled connections it
inherited, without closing them, so parent and children never share one.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import weakref
from typing import Any, Literal

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.pool import StaticPool

from ..errors import SiloError
from .disk import make_room_to_open

DEFAULT_TIMEOUT_S = 5.0
"""How long any wait on the database may last by default (``SILO_DB_TIMEOUT``)."""
SQLITE_BUSY_TIMEOUT_MS = int(DEFAULT_TIMEOUT_S * 1000)
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


def sqlite_pragmas(dbapi_connection: Any, _record: Any, busy_timeout_ms: int = 0) -> None:
    """Connection settings for every SQLite connection of a silo engine."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms or SQLITE_BUSY_TIMEOUT_MS)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Builds with SECURE_DELETE on (Debian's) zero every freed page through the WAL:
        # deleting 18 MB of state wrote 18 MB, so on a full disk nothing could be deleted.
        # FAST zeroes what shares a page with live rows, not freed overflow pages.
        cursor.execute("PRAGMA secure_delete = FAST")
    finally:
        cursor.close()


PREPARE_AFTER = 5
"""Uses of a statement on a connection before psycopg prepares it (with ``prepared``)."""

Prepared = bool | Literal["auto"]
"""``SILO_PREPARED_STATEMENTS``: always, never, or on connections that reach the server
directly (``auto``)."""


def reaches_server_directly(dbapi_connection: Any) -> bool:
    """Whether a psycopg connection talks to the PostgreSQL server itself, no pooler between.

    The server's own view of the connection's local end (``inet_server_addr()``,
    ``inet_server_port()``) is the address and port this client dialled only when nothing
    sits in between: a pooler (PgBouncer, pgcat) or a proxy opens its own connection to the
    server, from its own socket to the server's. A Unix socket, or any doubt, answers False.
    """
    info = dbapi_connection.info
    try:
        dialled = ipaddress.ip_address(info.hostaddr)
    except ValueError:  # a Unix socket: no address to compare
        return False
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT host(inet_server_addr()), inet_server_port()")
        address, port = cursor.fetchone()
    finally:
        cursor.close()
        dbapi_connection.rollback()
    if address is None or port is None:
        return False
    return ipaddress.ip_address(address) == dialled and int(port) == int(info.port)


def prepare_where_direct(dbapi_connection: Any, _record: Any) -> None:
    """``auto``: a new connection prepares statements when it reaches the server directly."""
    if reaches_server_directly(dbapi_connection):
        dbapi_connection.prepare_threshold = PREPARE_AFTER


def postgresql_connect_args(timeout: float, *, prepared: Prepared = False) -> dict[str, Any]:
    """libpq and psycopg settings that bound every wait and work through PgBouncer.

    ``prepare_threshold=None`` unless *prepared* is True: no server-side prepared
    statements, which a pooler in transaction mode (PgBouncer before 1.21)
    would hand to other clients (``auto`` turns them on per connection, see
    :func:`prepare_where_direct`). Prepared, the server plans each statement once
    per connection, which measured 14 % off a write and 22 % off a read on one
    machine (``SILO_PREPARED_STATEMENTS``). TCP keepalives and
    ``tcp_user_timeout`` notice a dead network path; the watchdog
    (:mod:`.watchdog`) bounds a wait on a server that still acknowledges.
    """
    seconds = max(1, math.ceil(timeout))
    return {
        "connect_timeout": max(2, math.ceil(timeout / 2)),  # libpq: whole seconds, >= 2
        "prepare_threshold": PREPARE_AFTER if prepared is True else None,
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": seconds * 1000,
    }


def check_sqlite_file(database: str) -> None:
    """An SQLite database file must be in a directory that exists and the app can write.

    SQLite would create a new, empty database in a wrong place, or fail later
    with "unable to open database file" or "attempt to write a readonly
    database" (WAL mode writes beside the file even to read it).
    """
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    directory = os.path.dirname(os.path.abspath(database))
    if not os.path.isdir(directory):
        raise SiloError(
            f"The directory {directory} of the SQLite database does not exist: "
            "create it, or fix the database URL (SILO_DATABASE_URI)."
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SiloError(
            f"The directory {directory} of the SQLite database is not writable by this "
            f"process (user id {os.getuid()}): SQLite writes its journal beside the "
            "database. Make it writable (and the database file too), or use another URL."
        )
    if os.path.exists(database) and not os.access(database, os.R_OK | os.W_OK):
        raise SiloError(
            f"The SQLite database {database} is not readable and writable by this "
            f"process (user id {os.getuid()}): fix its permissions, or use another URL."
        )


def make_engine(
    url: str | URL,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    prepared: Prepared = False,
    **options: Any,
) -> Engine:
    """Create an engine for *url* with the connection settings silo relies on.

    *timeout* (seconds) bounds every wait: connecting, a pool checkout, a
    lock on SQLite, a statement on PostgreSQL (with the watchdog). *prepared*:
    PostgreSQL statements prepared on each connection, or ``auto``: on each connection
    that reaches the server directly (see :func:`postgresql_connect_args`). Other
    *options* go to ``create_engine`` (a ``connect_args`` dict is merged over
    silo's own).
    """
    parsed = normalise_url(url)
    # hide_parameters: an error's text never carries state or SIDs into a log.
    kwargs: dict[str, Any] = {"json_serializer": json_dumps, "hide_parameters": True}
    connect_args: dict[str, Any] = {}
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        check_sqlite_file(parsed.database or "")
        connect_args["check_same_thread"] = False
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one shared in-memory database
    else:
        connect_args.update(postgresql_connect_args(timeout, prepared=prepared))
        kwargs["pool_size"] = 10
        kwargs["pool_timeout"] = timeout / 2
    connect_args.update(options.pop("connect_args", {}))
    kwargs.update(options)
    try:
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    except ModuleNotFoundError as exc:
        if sqlite or exc.name != "psycopg":  # the driver the `postgres` extra brings
            raise
        raise SiloError(
            f"{parsed.drivername} needs the {exc.name} package, which is not installed: "
            'pip install "flask-silo-sql[postgres]" (the PostgreSQL driver, psycopg 3).'
        ) from None
    if sqlite:
        busy_ms = int(timeout * 1000)
        database = parsed.database or ""
        on_disk = database not in ("", ":memory:") and not database.startswith("file:")

        def on_connect(conn: Any, record: Any) -> None:
            if on_disk:
                make_room_to_open(os.path.abspath(database))
            sqlite_pragmas(conn, record, busy_ms)

        event.listen(engine, "connect", on_connect)
    elif prepared == "auto":
        event.listen(engine, "connect", prepare_where_direct)
    if kwargs.get("poolclass") is not StaticPool:
        _forkable.add(engine)  # an in-memory database has no connection to share
    return engine
