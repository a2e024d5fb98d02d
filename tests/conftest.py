"""Shared fixtures: real SQLite files and a real, private PostgreSQL server.

Two kinds of database per test, each on SQLite and on PostgreSQL:

* ``db_url`` (``sqlite_url``, ``pg_url``): a fresh, empty database, no schema;
  ``engine`` on it, ``migrated_engine`` on it at the current schema.
* ``silo_url`` (``sqlite_silo_url``, ``pg_silo_url``): a database at the current
  schema with no silo rows. Each run migrates once per database
  (``sqlite_template``, ``pg_template``); each test gets a copy of the SQLite
  file, each module a copy of the PostgreSQL database (``pg_migrated``) whose
  tables are emptied before each test.
* ``module_silo_url``: one database at the current schema that a whole module
  shares (for module-scoped apps), on SQLite and on PostgreSQL.
* ``executor`` is the SQL backend's default executor; tests marked
  ``each_executor`` run once per executor. ``storage`` is an
  :class:`SQLStorage` on ``silo_url`` with it; ``clock`` a hand-moved clock.

``silo_app`` builds Flask apps with a ``Silo`` on ``silo_url``: the app
harness of ``harness.py``, closed at teardown.

``pg_bouncer`` is a PgBouncer in transaction pooling mode in front of that
server. Without PostgreSQL binaries (or ``pgbouncer``) those tests are skipped
with a loud message, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from harness import AppFactory
from sqlalchemy import Engine, make_url, text
from support import SILO_TABLES_CHILD_FIRST, UNDER_CI, Clock

from flask_silo_sql import SQLStorage, schema
from flask_silo_sql.sql.engine import make_engine

if TYPE_CHECKING:  # imported lazily: a SQLite-only run needs no PostgreSQL driver
    from pgbouncer import PgBouncer
    from pgserver import ExternalPg, PgServer

EXECUTORS = ("dbapi", "core")
"""The SQL backend's executors: the DBAPI cursor and SQLAlchemy Core."""
DEFAULT_EXECUTOR = "dbapi"
"""The executor ``auto`` picks while nothing observes the engine: the one users run."""

_pg_problem: list[str] = []

collect_ignore = [] if importlib.util.find_spec("psycopg") else ["test_pgbouncer_fixture.py"]
"""Without the postgres extra, skip the module that drives psycopg itself."""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer | ExternalPg]:
    """The PostgreSQL server for this test run."""
    if importlib.util.find_spec("psycopg") is None:
        message = "psycopg not installed: PostgreSQL tests cannot run"
        _pg_problem.append(message)
        if UNDER_CI:
            pytest.fail(message + " (CI=true: pip install -e '.[dev,postgres]')")
        pytest.skip(message)
    from pgserver import ExternalPg, PgServer, find_bindir

    external = os.environ.get("SILO_TEST_PG_URL")
    if external:
        yield ExternalPg(external)
        return
    if find_bindir() is None:
        message = "PostgreSQL server binaries not found: PostgreSQL tests cannot run"
        _pg_problem.append(message)
        if UNDER_CI:
            pytest.fail(message + " (CI=true: install postgresql)")
        pytest.skip(message)
    server = PgServer()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_bouncer(pg_server: PgServer | ExternalPg) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode (5 server connections) in front of ``pg_server``."""
    from pgbouncer import PgBouncer, find_pgbouncer

    if find_pgbouncer() is None:
        message = "pgbouncer not found: PgBouncer tests cannot run"
        _pg_problem.append(message)
        if UNDER_CI:
            pytest.fail(message + " (CI=true: install pgbouncer)")
        pytest.skip(message)
    with PgBouncer(pg_server) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A real S3-API server (moto's, in its own process) on loopback, for this test run."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        message = "moto[server] or s3fs not installed: S3 tests cannot run"
        _pg_problem.append(message)
        if UNDER_CI:
            pytest.fail(message + " (CI=true: pip install -e '.[dev]')")
        pytest.skip(message)
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer | ExternalPg) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(str(make_url(url).database))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file for one test."""
    return f"sqlite:///{tmp_path / 'silo.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on the fresh test database (no schema), with silo's connection settings."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def migrated_engine(engine: Engine) -> Engine:
    """The fresh test database, migrated to the current schema."""
    schema.upgrade(engine)
    return engine


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file at the current schema, made once per run and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "silo.db"
    engine = make_engine(f"sqlite:///{path}")
    schema.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer | ExternalPg) -> Iterator[str]:
    """The name of a PostgreSQL database at the current schema, migrated once per run.

    Nothing connects to it after the migration: it is the template of the
    databases a module gets (``CREATE DATABASE ... TEMPLATE``: a file copy).
    """
    url = pg_server.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    name = str(make_url(url).database)
    yield name
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def pg_migrated(pg_server: PgServer | ExternalPg, pg_template: str) -> Iterator[Engine]:
    """One migrated PostgreSQL database for this module, emptied before each test."""
    url = pg_server.create_database(template=pg_template)
    engine = make_engine(url)
    yield engine
    engine.dispose()
    pg_server.drop_database(str(make_url(url).database))


@pytest.fixture
def sqlite_silo_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh SQLite file at the current schema, copied from this module's template."""
    shutil.copy(sqlite_template, tmp_path / "silo.db")
    return f"sqlite:///{tmp_path / 'silo.db'}"


@pytest.fixture
def pg_silo_url(pg_migrated: Engine) -> str:
    """This module's migrated PostgreSQL database, with every silo table emptied."""
    with pg_migrated.begin() as conn:
        for table in SILO_TABLES_CHILD_FIRST:
            conn.execute(text(f"DELETE FROM {table}"))
    return pg_migrated.url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def silo_url(request: pytest.FixtureRequest) -> str:
    """A database at the current schema with no silo rows, on SQLite and on PostgreSQL."""
    name = "sqlite_silo_url" if request.param == "sqlite" else "pg_silo_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_silo_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database at the current schema for the whole module, on SQLite and on PostgreSQL."""
    server: PgServer | ExternalPg | None = None
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("module-db") / "silo.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        server = request.getfixturevalue("pg_server")
        url = server.create_database(template=request.getfixturevalue("pg_template"))
    yield url
    if server is not None:
        server.drop_database(str(make_url(url).database))


@pytest.fixture
def silo_app(silo_url: str, tmp_path: Path) -> Iterator[AppFactory]:
    """``silo_app(**options)``: a :class:`harness.Harness` on ``silo_url``, closed at teardown.

    Every app a test makes shares the test database (as workers do), on SQLite
    and on PostgreSQL; its instance folder is ``tmp_path / "instance"``.
    """
    factory = AppFactory(silo_url, instance_path=tmp_path / "instance")
    yield factory
    factory.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the tests marked ``each_executor`` once per executor; the rest on the default one."""
    if "executor" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "each_executor"
    ):
        metafunc.parametrize("executor", EXECUTORS, indirect=True)


@pytest.fixture
def executor(request: pytest.FixtureRequest) -> str:
    """The SQL backend's executor: the default one, or each one under ``each_executor``.

    Both executors send the same statements: the storage contract and the observer
    tests (marked ``each_executor``) prove it, so the other tests run the default one.
    """
    mode: str = getattr(request, "param", DEFAULT_EXECUTOR)
    return mode


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand (starts at ``support.T0``)."""
    return Clock()


@pytest.fixture
def storage(silo_url: str, executor: Any) -> Iterator[SQLStorage]:
    """:class:`SQLStorage` on ``silo_url`` (SQLite and PostgreSQL) with the test's executor."""
    sql = SQLStorage(silo_url, executor=executor)
    yield sql
    sql.dispose()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for problem in _pg_problem:
        terminalreporter.write_line("!" * 70, red=True)
        terminalreporter.write_line(f"!!! {problem}: those tests were SKIPPED", red=True)
        terminalreporter.write_line("!" * 70, red=True)
