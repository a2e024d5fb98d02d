"""One line for a ``flask silo-db`` command that the database or a migration stopped.

A wrong password, host or port, a server that is down or a file that is not a
database reach a command as SQLAlchemy's ``DBAPIError``, and a bad revision as
Alembic's ``CommandError``: each becomes an ``Error: ...`` line that names the
database (its password hidden) and what to check, not a traceback.
"""

from __future__ import annotations

from alembic.util.exc import CommandError
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from .sql.executor import describe

UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError)
"""Errors of connecting, or of a server that went away (libpq, sqlite3 alike)."""

COMMAND_ERRORS = (sa_exc.DBAPIError, CommandError)
"""What :func:`one_line` describes."""


def one_line(exc: BaseException, url: URL | None) -> str:
    """What a command says when *exc* stopped it, the database named by *url*."""
    if isinstance(exc, CommandError):
        return f"the migration command failed: {exc}"
    where = "the silo database" if url is None else f"the silo database {safe_url(url)}"
    if isinstance(exc, UNREACHABLE):
        return (
            f"cannot reach {where} ({describe(exc)}): check SILO_DATABASE_URI (host, port, "
            "user, password, database name) and that the server is running"
        )
    return (
        f"{where} failed ({describe(exc)}): check that SILO_DATABASE_URI names the right "
        "database"
    )


def safe_url(url: URL) -> str:
    """*url* with its password hidden."""
    return url.render_as_string(hide_password=True)
