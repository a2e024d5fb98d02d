"""A real host project with Flask-SQLAlchemy and Flask-Migrate, sharing its database with silo.

The host project is written into tmp_path: models ``User`` and ``Order``,
``Migrate(app, db, include_name=alembic_include_name,
include_object=alembic_include_object)`` and ``Silo(app,
storage=SQLStorage(db, atomic=True))`` (the documented setup: one transaction
with db.session in requests) on the host's own engine. The host's real ``flask db
init / migrate / upgrade / downgrade`` and ``flask silo-db upgrade /
downgrade`` run as subprocesses against the same database, on SQLite and on
PostgreSQL:

- the host's generated migration never mentions a silo table nor
  ``silo_alembic_version``;
- a second ``flask db migrate`` with both schemas in place proposes nothing
  (Flask-Migrate's "No changes in schema detected", no new revision file, and
  an empty autogenerate diff under the host's own filters);
- both version tables coexist, each with its own revision, and each tool's
  upgrade and downgrade leaves the other's tables, rows and version table alone;
- negative control: without the filters the same ``flask db migrate`` proposes
  dropping every silo table and ``silo_alembic_version`` (so the checks can fail).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flask import Flask
from sqlalchemy import Engine, inspect, text

from flask_silo_sql import SQLStorage, schema
from flask_silo_sql.sql.models import SILO_TABLES, VERSION_TABLE

pytestmark = pytest.mark.slow

UTC = dt.timezone.utc
HOST_TABLES = {"users", "orders"}
SILO_SID = "host-silo-session-0123456789"

HOST_SOURCE = '''\
"""A host application: its own models and migrations, and silo on the same database."""

import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from flask_silo_sql import Silo, SQLStorage, alembic_include_name, alembic_include_object

db = SQLAlchemy()
migrate = Migrate()
silo = Silo(storage=SQLStorage(db, atomic=True), auto_cleanup=False)


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(255), nullable=False, unique=True)
    name = db.Column(db.String(120), nullable=False)


class Order(db.Model):
    __tablename__ = "orders"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False, index=True)
    total_cents = db.Column(db.Integer, nullable=False)


def create_app():
    app = Flask(__name__, instance_path=os.environ["HOST_INSTANCE_PATH"])
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["HOST_DATABASE_URI"]
    db.init_app(app)
    if os.environ.get("HOST_WITHOUT_SILO_FILTERS"):  # the negative control only
        migrate.init_app(app, db)
    else:
        migrate.init_app(
            app, db, include_name=alembic_include_name, include_object=alembic_include_object
        )
    silo.init_app(app)
    silo.register("cart", lambda: {"items": []})
    return app
'''


class Host:
    """The host project in tmp_path, run with the real ``flask`` command line."""

    def __init__(self, directory: Path, url: str) -> None:
        self.directory = directory
        self.url = url
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("FLASK_APP", "SILO_DATABASE_URI", "HOST_WITHOUT_SILO_FILTERS")
        }
        self.env.update(
            HOST_DATABASE_URI=url,
            HOST_INSTANCE_PATH=str(directory / "instance"),
            PYTHONDONTWRITEBYTECODE="1",
        )

    def flask(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``flask --app hostapp:create_app ARGS`` in the project's directory."""
        done = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "hostapp:create_app", *args],
            cwd=self.directory,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"flask {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    @property
    def versions_dir(self) -> Path:
        return self.directory / "migrations" / "versions"

    def revision_files(self) -> set[Path]:
        return set(self.versions_dir.glob("*.py"))


@pytest.fixture
def host(tmp_path: Path, db_url: str) -> Host:
    directory = tmp_path / "hostproject"
    directory.mkdir()
    (directory / "hostapp.py").write_text(HOST_SOURCE)
    return Host(directory, db_url)


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def versions(engine: Engine, table: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text(f"SELECT version_num FROM {table}")).scalars())


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def put_silo_session(engine: Engine) -> None:
    """A silo session with a namespace, through the storage API."""
    now = dt.datetime.now(UTC).timestamp()
    storage = SQLStorage(engine)
    storage.set_session(
        SILO_SID, {"cart": {"items": ["pen"]}, "_meta": {"created_at": now, "last_active": now}}
    )


def put_host_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email, name) VALUES (1, 'a@example.com', 'A')"))
        conn.execute(text("INSERT INTO orders (id, user_id, total_cents) VALUES (1, 1, 1250)"))


def silo_state(engine: Engine) -> tuple[set[str], list[str], int, int]:
    """What must survive the host's migrations: tables, version, rows."""
    return (
        tables(engine) & (SILO_TABLES | {VERSION_TABLE}),
        versions(engine, VERSION_TABLE),
        count(engine, "silo_sessions"),
        count(engine, "silo_namespaces"),
    )


def host_state(engine: Engine) -> tuple[set[str], list[str], int, int]:
    """What must survive silo's migrations: tables, version, rows."""
    return (
        tables(engine) & (HOST_TABLES | {"alembic_version"}),
        versions(engine, "alembic_version"),
        count(engine, "users"),
        count(engine, "orders"),
    )


SILO_NAMES = re.compile(r"silo_\w+")


def host_autogenerate_diff(host: Host, *, filters: bool) -> list[Any]:
    """compare_metadata between the host's models and the database, as the host's env.py runs it.

    The host module is imported in-process; its ``Migrate`` object supplies the
    very ``configure_args`` (the filters) that Flask-Migrate's env.py passes to
    ``context.configure``.
    """
    name = f"hostapp_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, host.directory / "hostapp.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = {k: os.environ.get(k) for k in ("HOST_DATABASE_URI", "HOST_INSTANCE_PATH")}
    os.environ["HOST_DATABASE_URI"] = host.env["HOST_DATABASE_URI"]
    os.environ["HOST_INSTANCE_PATH"] = host.env["HOST_INSTANCE_PATH"]
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
        app: Flask = module.create_app()
    finally:
        sys.modules.pop(name, None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        with app.app_context():
            db = app.extensions["migrate"].db
            opts: dict[str, Any] = {"compare_type": True}
            if filters:
                configure_args = app.extensions["migrate"].configure_args
                opts["include_name"] = configure_args["include_name"]
                opts["include_object"] = configure_args["include_object"]
            with db.engine.connect() as conn:
                context = MigrationContext.configure(conn, opts=opts)
                return list(compare_metadata(context, db.metadata))
    finally:
        with app.app_context():
            app.extensions["migrate"].db.engine.dispose()


def removed_tables(diffs: list[Any]) -> set[str]:
    return {d[1].name for d in diffs if isinstance(d, tuple) and d[0] == "remove_table"}


def test_host_migrations_and_silo_migrations_share_one_database(host: Host, engine: Engine) -> None:
    # The host project starts using Flask-Migrate; silo's schema is already there.
    host.flask("db", "init")
    env_py = (host.directory / "migrations" / "env.py").read_text()
    assert "configure_args" in env_py  # Flask-Migrate's env.py hands the filters on
    silo_run = host.flask("silo-db", "upgrade")
    assert f"silo schema at {schema.head()}" in silo_run.stderr
    put_silo_session(engine)
    assert tables(engine) == SILO_TABLES | {VERSION_TABLE}

    # The host's first migration: its own tables, nothing of silo's.
    first = host.flask("db", "migrate", "-m", "users and orders")
    [revision_file] = host.revision_files()
    source = revision_file.read_text()
    assert "op.create_table('users'" in source or 'op.create_table("users"' in source, source
    assert "orders" in source
    assert not SILO_NAMES.findall(source), source
    detected = [line for line in (first.stdout + first.stderr).splitlines() if "Detected" in line]
    assert detected, first.stderr
    assert not SILO_NAMES.findall("\n".join(detected)), detected
    match = re.search(r"^revision = ['\"](\w+)['\"]", source, re.MULTILINE)
    assert match, source
    host_revision = match.group(1)

    silo_before = silo_state(engine)
    host.flask("db", "upgrade")
    assert tables(engine) == SILO_TABLES | {VERSION_TABLE} | HOST_TABLES | {"alembic_version"}
    assert silo_state(engine) == silo_before  # the host's upgrade left silo alone
    put_host_rows(engine)

    # Both version tables, each with its own revision.
    assert versions(engine, "alembic_version") == [host_revision]
    assert versions(engine, VERSION_TABLE) == [schema.head()]

    # With both schemas in place the host's autogenerate proposes nothing.
    second = host.flask("db", "migrate", "-m", "nothing to do")
    assert "No changes in schema detected" in second.stdout + second.stderr
    assert host.revision_files() == {revision_file}
    assert host_autogenerate_diff(host, filters=True) == []

    # The host's downgrade and upgrade leave silo's tables, rows and version alone.
    host.flask("db", "downgrade", "base")
    assert not tables(engine) & HOST_TABLES
    assert versions(engine, "alembic_version") == []
    assert silo_state(engine) == silo_before
    host.flask("db", "upgrade")
    assert versions(engine, "alembic_version") == [host_revision]
    assert silo_state(engine) == silo_before
    put_host_rows(engine)

    # Silo's downgrade and upgrade leave the host's tables, rows and version alone.
    host_before = host_state(engine)
    assert host_before == (HOST_TABLES | {"alembic_version"}, [host_revision], 1, 1)
    host.flask("silo-db", "downgrade", "base")
    assert not tables(engine) & SILO_TABLES
    assert versions(engine, VERSION_TABLE) == []
    assert host_state(engine) == host_before
    host.flask("silo-db", "upgrade")
    assert versions(engine, VERSION_TABLE) == [schema.head()]
    assert host_state(engine) == host_before

    # Still nothing to propose after silo's tables were recreated.
    third = host.flask("db", "migrate", "-m", "still nothing")
    assert "No changes in schema detected" in third.stdout + third.stderr
    assert host.revision_files() == {revision_file}

    # Negative control, so that the checks above can fail: without the filters the host's
    # autogenerate proposes dropping every silo table and silo's version table.
    unfiltered = host_autogenerate_diff(host, filters=False)
    assert removed_tables(unfiltered) == SILO_TABLES | {VERSION_TABLE}
    done = host.flask("db", "migrate", "-m", "unfiltered", env={"HOST_WITHOUT_SILO_FILTERS": "1"})
    assert "No changes in schema detected" not in done.stdout + done.stderr
    [bad] = host.revision_files() - {revision_file}
    bad_source = bad.read_text()
    for table in SILO_TABLES | {VERSION_TABLE}:
        assert re.search(rf"op\.drop_table\(['\"]{table}['\"]", bad_source), (table, bad_source)
    bad.unlink()  # never applied
    assert silo_state(engine)[:2] == (set(SILO_TABLES) | {VERSION_TABLE}, [schema.head()])
