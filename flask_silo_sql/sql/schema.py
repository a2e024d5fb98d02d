"""Alembic, driven from Python: upgrade, downgrade, stamp, inspect the schema.

The migrations ship inside the package (``migrations_dir``); the version table is
``silo_alembic_version``, so a host's own ``alembic_version`` is never read or
written. Upgrades hold a lock (an advisory lock on PostgreSQL, a lock file
beside an SQLite database) so that workers starting together do not race.
"""

from __future__ import annotations

import fcntl
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from ..errors import SchemaError, SiloError, StorageUnavailable
from .executor import describe
from .models import SILO_TABLES, VERSION_TABLE

ADVISORY_LOCK_KEY = 0x5110_5C4E  # "silo schema"


def migrations_dir() -> Path:
    """The migrations: ``flask_silo_sql/migrations`` in a wheel, ``migrations/`` in a checkout.

    The wheel ships the top-level ``migrations/`` inside the package (hatch's
    ``force-include``); a checkout (or an editable install) has it beside the package.
    """
    package = Path(__file__).resolve().parent.parent
    installed = package / "migrations"
    if installed.is_dir():
        return installed
    return package.parent / "migrations"


def alembic_config(
    *, connection: Connection | None = None, url: str | None = None, stdout: IO[str] | None = None
) -> Config:
    """An Alembic config for our migrations (no ini file, no logging setup).

    *stdout* receives Alembic's messages and, in ``--sql`` mode, the DDL.
    """
    config = Config(
        stdout=cast(TextIO, stdout or sys.stdout), output_buffer=cast("TextIO | None", stdout)
    )
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this version of the library ships."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:
        raise SiloError("flask-silo-sql's migrations are missing from this installation")
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at, or None when our schema is absent.

    It reads on a connection it closes, never one left in the pool: a host's
    engine checked in a ``gunicorn --preload`` master keeps nothing that its
    forked workers would share. An unreachable database raises
    :class:`~flask_silo_sql.errors.StorageUnavailable` saying why.
    """
    try:
        with engine.connect() as conn:
            if not isinstance(engine.pool, (StaticPool, SingletonThreadPool)):
                conn.detach()  # closed, not pooled, when the block ends
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    except sa_exc.DBAPIError as exc:
        error = StorageUnavailable(f"cannot read the silo schema: {describe(exc)}")
        error.original = exc
        raise error from None


def is_current(engine: Engine) -> bool:
    """Whether the database is at :func:`head`."""
    return current(engine) == head()


def check(engine: Engine) -> None:
    """Raise :class:`SchemaError` (naming ``flask silo-db upgrade``) unless at head."""
    rev, want = current(engine), head()
    if rev != want:
        raise SchemaError(rev, want, engine.url.render_as_string(hide_password=True))


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the schema lock."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            lock_path = Path(database).with_name(Path(database).name + ".silo-migrate.lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    with sqlite_transaction(engine) as conn:
                        yield conn
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with sqlite_transaction(engine) as conn:
            yield conn
        return
    with engine.begin() as conn:
        conn.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK_KEY)))
        yield conn


@contextmanager
def sqlite_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in one real SQLite transaction, DDL included.

    pysqlite (before Python 3.12's ``autocommit``) opens a transaction only
    before a data statement, so the DDL an upgrade runs before its first
    ``INSERT``/``UPDATE`` is committed at once: an upgrade killed at a data step
    left a column added and the revision unchanged, and every later upgrade
    failed ("duplicate column name"). Here pysqlite's own transaction handling
    is off (``isolation_level = None``) and the transaction is opened by an
    explicit ``BEGIN IMMEDIATE``, so the whole upgrade commits or none of it
    does. SQLAlchemy's documented recipe, applied to this connection only (the
    pool gets it back as it was).
    """
    with engine.connect() as conn:
        dbapi: Any = conn.connection.dbapi_connection
        saved = dbapi.isolation_level
        dbapi.isolation_level = None
        try:
            with conn.begin():
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
        finally:
            if dbapi.in_transaction:  # a failure SQLAlchemy did not see: leave nothing open
                dbapi.rollback()
            dbapi.isolation_level = saved


def _offline_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def upgrade(
    engine: Engine, revision: str = "head", *, sql: bool = False, stdout: IO[str] | None = None
) -> None:
    """Migrate up to *revision*; with *sql*, print the DDL instead of running it."""
    if sql:
        command.upgrade(alembic_config(url=_offline_url(engine), stdout=stdout), revision, sql=True)
        return
    with migration_lock(engine) as conn:
        command.upgrade(alembic_config(connection=conn, stdout=stdout), revision)


def downgrade(
    engine: Engine, revision: str, *, sql: bool = False, stdout: IO[str] | None = None
) -> None:
    """Migrate down to *revision* (``base`` removes every silo table)."""
    if sql:
        command.downgrade(
            alembic_config(url=_offline_url(engine), stdout=stdout), revision, sql=True
        )
        return
    with migration_lock(engine) as conn:
        command.downgrade(alembic_config(connection=conn, stdout=stdout), revision)


def stamp(engine: Engine, revision: str, *, stdout: IO[str] | None = None) -> None:
    """Record *revision* as current without running migrations."""
    with migration_lock(engine) as conn:
        command.stamp(alembic_config(connection=conn, stdout=stdout), revision)


def history(*, stdout: IO[str] | None = None) -> str:
    """The revision history, newest first, as text (also written to *stdout*)."""
    buffer = io.StringIO()
    command.history(alembic_config(stdout=buffer), verbose=False)
    text = buffer.getvalue()
    if stdout is not None:
        stdout.write(text)
    return text


def alembic_include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """For a host's ``context.configure(include_name=...)``: hide silo's tables.

    With it, a host's autogenerate neither drops nor alters ``silo_*`` tables
    nor ``silo_alembic_version``.
    """
    if type_ == "table":
        return name not in SILO_TABLES and name != VERSION_TABLE
    table = parent_names.get("table_name")
    return table not in SILO_TABLES and table != VERSION_TABLE


def alembic_include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """For a host's ``context.configure(include_object=...)``: hide silo's tables."""
    if type_ == "table":
        return name not in SILO_TABLES and name != VERSION_TABLE
    table = getattr(getattr(obj, "table", None), "name", None)
    return table not in SILO_TABLES and table != VERSION_TABLE
