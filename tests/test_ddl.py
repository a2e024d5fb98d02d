"""For DBAs: ``flask silo-db upgrade --sql`` and the comments on silo's tables.

``flask silo-db upgrade --sql`` runs as a real ``flask --app`` process on an
application configured with a PostgreSQL URL and with an SQLite URL: it prints
the DDL of that dialect and leaves the database without a single table. The
printed script is then applied as a DBA would (psycopg / sqlite3, outside
silo) and must leave the database at head. On PostgreSQL every silo table and
every one of its columns carries a comment after ``flask silo-db upgrade``, as
``pg_catalog`` reports it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
from sqlalchemy import Engine, inspect, make_url, text

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import SILO_TABLES, VERSION_TABLE, metadata

APP_SOURCE = '''\
"""An application whose silo database comes from the configuration."""

import os

from flask import Flask

from flask_silo_sql import Silo

app = Flask(__name__, instance_path=os.environ["DDL_INSTANCE_PATH"])
app.config["SILO_DATABASE_URI"] = os.environ["DDL_DATABASE_URI"]
silo = Silo(app, auto_cleanup=False)
'''


def flask_silo_db(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``flask --app app silo-db ARGS`` for an app configured with *url*."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "app.py").write_text(APP_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("FLASK_APP", "SILO_DATABASE_URI")}
    env.update(DDL_DATABASE_URI=url, DDL_INSTANCE_PATH=str(tmp_path / "instance"))
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "silo-db", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def apply_script(url: str, script: str) -> None:
    """Run the printed DDL as a DBA would: straight through the driver, not through silo."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(script.encode())  # the script's own BEGIN; ... COMMIT;
        return
    assert parsed.database
    database = sqlite3.connect(parsed.database)
    try:
        database.executescript(script)
    finally:
        database.close()


def test_upgrade_sql_prints_the_dialects_ddl_and_touches_nothing(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    done = flask_silo_db(tmp_path, db_url, "upgrade", "--sql")
    ddl = done.stdout
    for table in sorted(SILO_TABLES | {VERSION_TABLE}):
        assert re.search(rf"^CREATE TABLE {table} \(", ddl, re.MULTILINE), (table, ddl)
    assert "CREATE INDEX ix_silo_sessions_expires_at ON silo_sessions" in ddl
    assert re.search(rf"{VERSION_TABLE} SET version_num='{schema.head()}'", ddl), ddl
    assert "alembic_version " not in ddl.replace(VERSION_TABLE, "")  # never the host's table

    if engine.dialect.name == "postgresql":
        assert "data JSONB NOT NULL" in ddl
        assert "created_at TIMESTAMP WITH TIME ZONE NOT NULL" in ddl
        assert ddl.lstrip().startswith("BEGIN;")
        assert ddl.rstrip().endswith("COMMIT;")
        for model in metadata.sorted_tables:
            assert f"COMMENT ON TABLE {model.name} IS '" in ddl, model.name
            for column in model.columns:
                assert f"COMMENT ON COLUMN {model.name}.{column.name} IS '" in ddl, column
    else:
        assert "data JSON NOT NULL" in ddl
        assert "created_at DATETIME NOT NULL" in ddl
        for pg_only in ("JSONB", "TIME ZONE", "COMMENT ON", "BIGSERIAL"):
            assert pg_only not in ddl

    # Nothing ran: no table at all, not even the version table.
    assert table_names(engine) == set()
    assert schema.current(engine) is None

    # The script, applied by hand, gives the schema `upgrade` would have made.
    apply_script(db_url, ddl)
    assert table_names(engine) == set(SILO_TABLES) | {VERSION_TABLE}
    assert schema.current(engine) == schema.head()
    assert schema.is_current(engine)


def test_upgrade_sql_needs_no_reachable_database(tmp_path: Path) -> None:
    """A DBA can produce the PostgreSQL script on a machine that cannot reach the server."""
    unreachable = "postgresql://nobody:secret@127.0.0.1:1/nowhere"
    done = flask_silo_db(tmp_path, unreachable, "upgrade", "--sql")
    assert "CREATE TABLE silo_sessions (" in done.stdout
    assert "JSONB" in done.stdout
    assert "secret" not in done.stdout + done.stderr


def test_every_silo_table_and_column_has_a_comment_on_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    flask_silo_db(tmp_path, pg_url, "upgrade")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            table_rows = conn.execute(
                text(
                    "SELECT c.relname, obj_description(c.oid, 'pg_class') "
                    "FROM pg_catalog.pg_class c "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
                    "AND c.relname LIKE 'silo\\_%' AND c.relname <> :version"
                ),
                {"version": VERSION_TABLE},
            ).all()
            column_rows = conn.execute(
                text(
                    "SELECT table_name, column_name, col_description("
                    "  format('%I.%I', table_schema, table_name)::regclass, ordinal_position"
                    ") FROM information_schema.columns "
                    "WHERE table_schema = current_schema() "
                    "AND table_name LIKE 'silo\\_%' AND table_name <> :version"
                ),
                {"version": VERSION_TABLE},
            ).all()
    finally:
        engine.dispose()

    table_comments: dict[str, str | None] = {row[0]: row[1] for row in table_rows}
    column_comments: dict[tuple[str, str], str | None] = {
        (row[0], row[1]): row[2] for row in column_rows
    }
    assert set(table_comments) == SILO_TABLES
    for table, comment in table_comments.items():
        assert comment, f"table {table} has no comment"
        assert comment == metadata.tables[table].comment
    expected_columns = {(t.name, c.name) for t in metadata.sorted_tables for c in t.columns}
    assert set(column_comments) == expected_columns
    for (table, column), comment in column_comments.items():
        assert comment, f"column {table}.{column} has no comment"
        assert comment == metadata.tables[table].c[column].comment
