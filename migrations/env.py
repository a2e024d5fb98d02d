"""Alembic environment for flask-silo-sql's own tables.

Run through :mod:`flask_silo_sql.schema` (which passes a connection) or, by
maintainers, with ``alembic`` and the project's ``alembic.ini``. It never
configures logging and only ever looks at ``silo_*`` tables.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine

from flask_silo_sql.sql.models import SILO_TABLES, VERSION_TABLE, metadata

config = context.config


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate compares only silo's own tables."""
    if type_ == "table":
        return name in SILO_TABLES
    return True


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    shared = config.attributes.get("connection")
    if shared is not None:
        run(shared)
    else:
        url = config.get_main_option("sqlalchemy.url")
        assert url, "set sqlalchemy.url in alembic.ini"
        with create_engine(url).begin() as conn:
            run(conn)
