"""``flask silo-db`` on a database it cannot use: one ``Error:`` line and exit status 1.

A wrong port, a database that does not exist on a real PostgreSQL server, and an
SQLite file that is not a database: every command that reaches the database says
so in one line naming the database (password hidden) and what to check, never a
traceback. Commands run in-process as ``flask`` runs them (the app created by the
CLI), and ``upgrade`` also through a real ``flask`` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import ScriptInfo
from support import sql_storage

from flask_silo_sql import Silo, schema
from flask_silo_sql.cli import silo_db

APP_SOURCE = """\
from flask import Flask

from flask_silo_sql import Silo


def create_app():
    app = Flask(__name__, instance_path={instance!r})
    app.config["SILO_DATABASE_URI"] = {url!r}
    silo = Silo(app, auto_cleanup=False)
    silo.add_file_store("uploads", {uploads!r})
    return app
"""

COMMANDS = [
    ["upgrade"],
    ["downgrade", "base"],
    ["current"],
    ["stamp", "head"],
    ["check"],
    ["cleanup"],
    ["fsck"],
    ["stats"],
    ["worker"],
]


@pytest.fixture(params=["sqlite-not-a-database", "postgresql-no-such-database", "refused"])
def bad_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL the commands cannot use, and why."""
    if request.param == "sqlite-not-a-database":
        path = tmp_path / "silo.db"
        path.write_bytes(b"these bytes are not an SQLite database, not at all" * 4)
        return f"sqlite:///{path}"
    if request.param == "refused":  # nothing listens on port 1
        return "postgresql://app:s3cret-pw@127.0.0.1:1/app"
    server = request.getfixturevalue("pg_server")
    return str(server.url("no_such_database_here"))


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[[str], Flask]]:
    """``make_app(url)``: an app whose Silo uses *url* (disposed at the end)."""
    made: list[Silo] = []

    def make(url: str) -> Flask:
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config["SILO_DATABASE_URI"] = url
        silo = Silo(app, auto_cleanup=False)
        silo.add_file_store("uploads", str(tmp_path / "uploads"))
        made.append(silo)
        return app

    yield make
    for silo in made:
        silo.stop()
        sql_storage(silo.store).dispose()


def assert_one_error_line(output: str, url: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    line = errors[0]
    assert "s3cret-pw" not in output
    assert "SILO_DATABASE_URI" in line, line
    host = url.split("@")[-1].split("/")[0] if "@" in url else url.rsplit("/", 1)[-1]
    assert host in line, line  # the database is named
    return line


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_says_it_in_one_line(
    bad_url: str, args: list[str], make_app: Callable[[str], Flask]
) -> None:
    info = ScriptInfo(create_app=lambda: make_app(bad_url))
    result: Result = CliRunner().invoke(silo_db, args, obj=info, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, bad_url)


def test_a_real_flask_upgrade_says_it_in_one_line(bad_url: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text(
        APP_SOURCE.format(
            url=bad_url, instance=str(tmp_path / "instance"), uploads=str(tmp_path / "up")
        )
    )
    flask = Path(sys.executable).with_name("flask")
    env = {k: v for k, v in os.environ.items() if k not in ("SILO_DATABASE_URI", "FLASK_APP")}
    done = subprocess.run(
        [str(flask), "--app", "app", "silo-db", "upgrade"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    line = assert_one_error_line(done.stderr, bad_url)
    assert line.startswith("Error: cannot reach") or "failed" in line


def test_downgrade_sql_asks_for_a_range(
    sqlite_silo_url: str, make_app: Callable[[str], Flask]
) -> None:
    app = make_app(sqlite_silo_url)
    previous = schema.history().splitlines()[0].split(" -> ")[0]  # the one before head
    result = app.test_cli_runner().invoke(silo_db, ["downgrade", previous, "--sql"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "<from>:<to>" in lines[0]
    suggested = lines[0].split("`flask silo-db ")[1].split("`")[0].split()
    again = app.test_cli_runner().invoke(silo_db, suggested)  # the suggestion works
    assert again.exit_code == 0, again.output
    assert "UPDATE silo_alembic_version" in again.output
