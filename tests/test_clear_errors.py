"""Common mistakes get one clear line that says what to do, not a traceback.

Each case is what a new user runs into: the ``postgres://`` URL hosting
platforms give, an unreachable database at start-up, an SQLite path whose
directory is missing or read-only, ``flask silo-db`` commands on a database
nobody migrated yet, and ``silo.state()`` outside a request.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from flask import Flask
from support import sql_storage

from flask_silo_sql import Silo, SiloError, SQLStorage
from flask_silo_sql.cli import silo_db
from flask_silo_sql.sql.engine import normalise_url


def test_a_postgres_url_is_postgresql() -> None:
    assert normalise_url("postgres://app:pw@db.example/app").drivername == "postgresql+psycopg"
    assert normalise_url("postgres+psycopg://app@db/app").drivername == "postgresql+psycopg"
    storage = SQLStorage("postgres://app:pw@127.0.0.1:1/app")
    assert storage.dialect == "postgresql"
    storage.dispose()


def test_an_unreachable_database_at_start_up_says_why_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = "postgresql://app:s3cret-pw@127.0.0.1:1/app"
    with caplog.at_level(logging.WARNING, logger="flask_silo_sql"):
        silo = Silo(app, auto_cleanup=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in line and "refused" in line.lower() for line in lines), lines
    assert all("s3cret-pw" not in line for line in lines)
    silo.stop()


def test_a_missing_sqlite_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(SiloError, match=f"directory {missing} .*does not exist"):
        SQLStorage(f"sqlite:///{missing}/silo.db")
    assert not missing.exists()  # and nothing was created there


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only file system (a tmpfs mounted ``ro``): even root cannot write there."""
    where = tmp_path / "ro"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_read_only_database_directory_is_named(read_only_dir: Path) -> None:
    with pytest.raises(SiloError, match=f"directory {read_only_dir} .*not writable"):
        SQLStorage(f"sqlite:///{read_only_dir}/silo.db")


def test_a_read_only_instance_folder_is_named(read_only_dir: Path) -> None:
    app = Flask(__name__, instance_path=str(read_only_dir / "instance"))
    with pytest.raises(SiloError, match=r"instance folder .*SILO_DATABASE_URI"):
        Silo(app, auto_cleanup=False)


@pytest.mark.parametrize("command", ["stats", "cleanup", "fsck"])
def test_commands_on_an_unmigrated_database_say_run_upgrade(
    db_url: str, command: str, tmp_path: Path
) -> None:
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = db_url
    silo = Silo(auto_cleanup=False)
    silo.add_file_store("uploads", str(tmp_path / "uploads"))
    with click.Context(silo_db):  # as under the flask command line, where the app loads
        silo.init_app(app)
    done = app.test_cli_runner().invoke(silo_db, [command])
    assert done.exit_code == 1, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1, done.output
    assert "flask silo-db upgrade" in lines[0]
    assert "Traceback" not in done.output
    sql_storage(silo.store).dispose()


def test_state_outside_a_request_points_to_the_way(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    silo = Silo(app, auto_cleanup=False)
    silo.register("cart", lambda: {"items": []})
    with pytest.raises(RuntimeError, match=r"silo\.session\(sid\)"):
        silo.state("cart")


def test_a_client_chosen_name_in_an_error_cannot_forge_a_log_line(
    silo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An app that takes a namespace name from the client: the unknown name is logged
    escaped, on the line of its error, whatever control characters the client sent."""
    from flask import jsonify, request

    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = silo_url
    silo = Silo(app, auto_cleanup=False)
    silo.register("cart", lambda: {"items": []})

    @app.get("/api/ns")
    def namespace() -> Any:
        return jsonify(silo.state(request.args["name"]))

    forged = "x\nERROR:flask_silo_sql:forged line\r\u2028\x1b[2J"
    try:
        with caplog.at_level(logging.INFO, logger="flask_silo_sql"):
            answer = app.test_client().get("/api/ns", query_string={"name": forged})
    finally:
        sql_storage(silo.store).dispose()
    assert answer.status_code == 500
    assert answer.get_json()["error"] == "namespace_not_registered"
    (record,) = [r for r in caplog.records if "is not registered" in r.getMessage()]
    line = record.getMessage()
    assert line == (
        "Namespace 'x\\nERROR:flask_silo_sql:forged line\\r\\u2028\\x1b[2J' is not registered. "
        "Call register() first."
    )
    for record in caplog.records:
        text = caplog.handler.format(record)
        assert not any(c in text for c in "\r\u2028\x1b"), text
        assert "\nERROR:flask_silo_sql:forged" not in text
