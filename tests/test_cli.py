"""``flask silo-db``: every command, against a small app module written into tmp_path.

Commands run in-process through ``app.test_cli_runner()`` (or, where the app
cannot be created outside the CLI, through click's runner with Flask's
``ScriptInfo``), and end to end through a real ``flask --app app silo-db``
subprocess. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import click
import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import ScriptInfo
from flask.cli import cli as flask_cli
from sqlalchemy import Engine, func, insert, inspect, select, update
from support import sql_storage

from flask_silo_sql import InMemoryStorage, SchemaError, Silo, schema, session_key
from flask_silo_sql.app_state import SiloApp
from flask_silo_sql.cli import silo_db
from flask_silo_sql.sql.models import SILO_TABLES, expired_sids, files, namespaces, sessions, tasks

UTC = dt.timezone.utc
HEADER = "X-Session-ID"

APP_SOURCE = '''\
"""A small application using flask_silo_sql on a configured database."""

from flask import Flask, jsonify

from flask_silo_sql import Silo

DATABASE_URI = {url!r}
INSTANCE_PATH = {instance!r}


def create_app():
    app = Flask(__name__, instance_path=INSTANCE_PATH)
    app.config["SILO_DATABASE_URI"] = DATABASE_URI
    silo = Silo(app, ttl=60, auto_cleanup=False)
    silo.register("counter", lambda: {{"n": 0}})
    silo.add_data_endpoints("/api/count")

    @app.post("/api/hit")
    def hit():
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(n=state["n"])

    @app.get("/api/count")
    def count():
        return jsonify(n=silo.state("counter")["n"])

    return app
'''


class AppModule:
    """The app module in tmp_path, its factory, and every app it made (disposed at the end)."""

    def __init__(self, directory: Path, url: str, factory: Callable[[], Flask]) -> None:
        self.directory = directory
        self.url = url
        self._factory = factory
        self.apps: list[Flask] = []

    def create_app(self) -> Flask:
        app = self._factory()
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            state = app.extensions["silo"]
            assert isinstance(state, SiloApp)
            cast(Silo, state.silo).stop()
            sql_storage(state.store).dispose()


@pytest.fixture
def app_module(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AppModule]:
    """``app.py`` with a ``create_app`` factory whose Silo uses the (empty) test database."""
    monkeypatch.delenv("SILO_DATABASE_URI", raising=False)
    directory = tmp_path / "project"
    directory.mkdir()
    path = directory / "app.py"
    path.write_text(APP_SOURCE.format(url=db_url, instance=str(tmp_path / "instance")))
    name = f"silo_cli_app_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    factory: Callable[[], Flask] = module.create_app
    handle = AppModule(directory, db_url, factory)
    yield handle
    handle.close()


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    """The test database, at head."""
    schema.upgrade(engine)
    return engine


def invoke_loading(app_module: AppModule, *args: str) -> Result:
    """``flask silo-db ARGS`` in-process, the app created by the CLI (as ``flask`` does)."""
    info = ScriptInfo(create_app=app_module.create_app)
    return CliRunner().invoke(silo_db, list(args), obj=info, catch_exceptions=False)


def invoke(app: Flask, *args: str) -> Result:
    """``flask silo-db ARGS`` in-process through ``app.test_cli_runner()``."""
    return app.test_cli_runner().invoke(silo_db, list(args), catch_exceptions=False)


def flask_exe() -> list[str]:
    script = Path(sys.executable).with_name("flask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flask"]


def run_flask(app_module: AppModule, *args: str) -> subprocess.CompletedProcess[str]:
    """A real ``flask --app app silo-db ARGS`` in the app's directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("SILO_DATABASE_URI", "FLASK_APP")}
    return subprocess.run(
        [*flask_exe(), "--app", "app", "silo-db", *args],
        cwd=app_module.directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def silo_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) & SILO_TABLES


def hit(client: Any, sid: str | None = None) -> tuple[str, int]:
    response = client.post("/api/hit", headers={HEADER: sid} if sid else {})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.headers[HEADER], int(response.get_json()["n"])


def age_sessions(engine: Engine, sids: list[str], seconds: float) -> None:
    """Move sessions *seconds* into the past (as if their clients went away then)."""
    back = dt.timedelta(seconds=seconds)
    with engine.begin() as conn:
        rows = conn.execute(
            select(
                sessions.c.sid,
                sessions.c.last_active,
                sessions.c.expires_at,
                sessions.c.sweep_after,
            ).where(sessions.c.sid.in_([session_key(s) for s in sids]))
        ).all()
        assert len(rows) == len(sids)
        for sid, last_active, expires_at, sweep_after in rows:
            conn.execute(
                update(sessions)
                .where(sessions.c.sid == sid)
                .values(
                    last_active=last_active - back,
                    expires_at=expires_at - back,
                    sweep_after=sweep_after - back,
                )
            )


def swept(result: Result, verb: str = "expired") -> int:
    """How many sessions ``cleanup`` reports it expired (or would expire)."""
    assert result.exit_code == 0, result.output
    match = re.match(rf"{verb} (\d+) session\(s\)", result.stdout.strip())
    assert match, result.stdout
    return int(match.group(1))


def count_rows(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# -- the entry point ------------------------------------------------------------------------


def test_entry_point_is_declared() -> None:
    points = {ep.name: ep for ep in importlib.metadata.entry_points(group="flask.commands")}
    assert points["silo-db"].value == "flask_silo_sql.cli:silo_db"
    assert points["silo-db"].load() is silo_db


def test_flask_cli_finds_silo_db(app_module: AppModule, migrated: Engine) -> None:
    """The plain ``flask`` command group (entry-point plugins) knows ``silo-db``."""
    info = ScriptInfo(create_app=app_module.create_app)
    result = CliRunner().invoke(flask_cli, ["silo-db", "current"], obj=info)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == schema.head()


# -- an empty, non-default database ---------------------------------------------------------


def test_unmigrated_database_end_to_end(app_module: AppModule, engine: Engine) -> None:
    """Outside the CLI the app refuses to start; ``flask silo-db upgrade`` still loads it."""
    with pytest.raises(SchemaError, match="flask silo-db upgrade"):
        app_module.create_app()

    behind = run_flask(app_module, "check")
    assert behind.returncode == 1, behind.stdout + behind.stderr
    assert "flask silo-db upgrade" in behind.stdout

    upgraded = run_flask(app_module, "upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"silo schema at {schema.head()}" in upgraded.stderr
    assert schema.current(engine) == schema.head()
    assert silo_tables(engine) == SILO_TABLES

    current = run_flask(app_module, "current")
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == schema.head()

    at_head = run_flask(app_module, "check")
    assert at_head.returncode == 0, at_head.stdout + at_head.stderr

    app = app_module.create_app()  # now it starts
    client = app.test_client()
    sid, n = hit(client)
    assert n == 1
    assert hit(client, sid) == (sid, 2)


def test_unmigrated_database_upgrade_in_process(app_module: AppModule, engine: Engine) -> None:
    result = invoke_loading(app_module, "check")
    assert result.exit_code == 1
    assert "flask silo-db upgrade" in result.stdout

    result = invoke_loading(app_module, "upgrade")
    assert result.exit_code == 0, result.output
    assert schema.current(engine) == schema.head()

    result = invoke_loading(app_module, "check")
    assert result.exit_code == 0, result.output
    assert schema.head() in result.stdout


def test_unmigrated_database_fails_the_first_api_request_under_the_cli(
    app_module: AppModule, engine: Engine
) -> None:
    """An app loaded by the CLI on an old schema still refuses API requests, by name."""
    with click.Context(silo_db, obj=ScriptInfo(create_app=app_module.create_app)):
        app = app_module.create_app()  # loads, with a warning, as under `flask ...`
    response = app.test_client().post("/api/hit")
    assert response.status_code == 500
    assert response.get_json()["error"] == "schema_out_of_date"
    assert "flask silo-db upgrade" in response.get_json()["message"]
    assert silo_tables(engine) == set()


# -- upgrade / downgrade / current / history / stamp / check --------------------------------


def test_upgrade_sql_prints_ddl_only(app_module: AppModule, engine: Engine) -> None:
    result = invoke_loading(app_module, "upgrade", "--sql")
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE silo_sessions" in result.stdout
    assert "silo_alembic_version" in result.stdout
    assert silo_tables(engine) == set()
    assert schema.current(engine) is None


def test_upgrade_to_a_revision_then_downgrade_to_base(
    app_module: AppModule, engine: Engine
) -> None:
    head = schema.head()
    result = invoke_loading(app_module, "upgrade", head)
    assert result.exit_code == 0, result.output
    assert schema.current(engine) == head

    app = app_module.create_app()
    assert invoke(app, "current").stdout.strip() == head

    result = invoke(app, "downgrade", "base")
    assert result.exit_code == 0, result.output
    assert silo_tables(engine) == set()
    assert invoke(app, "current").stdout.strip() == "(no silo schema)"
    assert invoke(app, "check").exit_code == 1

    result = invoke(app, "upgrade", "head")
    assert result.exit_code == 0, result.output
    assert silo_tables(engine) == SILO_TABLES
    assert invoke(app, "check").exit_code == 0


def test_downgrade_needs_a_revision(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    result = app.test_cli_runner().invoke(silo_db, ["downgrade"])
    assert result.exit_code == 2
    assert "REVISION" in result.output
    assert schema.current(migrated) == schema.head()


def test_history_lists_the_shipped_revisions(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    result = invoke(app, "history")
    assert result.exit_code == 0, result.output
    assert f"-> {schema.head()} (head)" in result.stdout
    assert "<base> -> 0001" in result.stdout


def test_stamp_and_check(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    result = invoke(app, "check")
    assert result.exit_code == 0
    assert schema.head() in result.stdout

    result = invoke(app, "stamp", "base")
    assert result.exit_code == 0, result.output
    assert schema.current(migrated) is None
    assert silo_tables(migrated) == SILO_TABLES  # stamp runs no migration
    result = invoke(app, "check")
    assert result.exit_code == 1
    assert "flask silo-db upgrade" in result.stdout

    result = invoke(app, "stamp", "head")
    assert result.exit_code == 0, result.output
    assert schema.current(migrated) == schema.head()
    assert invoke(app, "check").exit_code == 0


def test_commands_need_a_silo_app() -> None:
    plain = Flask("plain")
    result = plain.test_cli_runner().invoke(silo_db, ["current"])
    assert result.exit_code == 1
    assert "does not use flask_silo_sql.Silo" in result.output

    in_memory = Flask("in_memory")
    silo = Silo(in_memory, storage=InMemoryStorage(), auto_cleanup=False)
    result = in_memory.test_cli_runner().invoke(silo_db, ["stats"])
    silo.stop()
    assert result.exit_code == 1
    assert "does not use SQL storage" in result.output


# -- cleanup ---------------------------------------------------------------------------------


def test_cleanup_expires_idle_sessions(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    client = app.test_client()
    idle = [hit(client)[0] for _ in range(2)]
    fresh, _ = hit(client)
    age_sessions(migrated, idle, seconds=2 * 3600)

    dry = invoke(app, "cleanup", "--dry-run")
    assert swept(dry, "would expire") == 2
    assert count_rows(migrated, sessions) == 3
    assert count_rows(migrated, expired_sids) == 0

    assert swept(invoke(app, "cleanup")) == 2

    with migrated.connect() as conn:
        assert list(conn.execute(select(sessions.c.sid)).scalars()) == [session_key(fresh)]
        assert set(conn.execute(select(expired_sids.c.sid)).scalars()) == set(
            map(session_key, idle)
        )
        assert set(conn.execute(select(namespaces.c.sid)).scalars()) == {session_key(fresh)}

    gone = client.get("/api/count", headers={HEADER: idle[0]})
    assert gone.status_code == 410
    assert gone.get_json()["error"] == "session_expired"
    alive = client.get("/api/count", headers={HEADER: fresh})
    assert alive.status_code == 200
    assert alive.get_json() == {"n": 1}

    assert swept(invoke(app, "cleanup")) == 0


def test_cleanup_keeps_sessions_within_their_ttl(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    client = app.test_client()
    sid, _ = hit(client)
    age_sessions(migrated, [sid], seconds=30)  # ttl is 60
    assert swept(invoke(app, "cleanup")) == 0
    assert count_rows(migrated, sessions) == 1


def test_cleanup_in_batches(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    client = app.test_client()
    idle = [hit(client)[0] for _ in range(5)]
    age_sessions(migrated, idle, seconds=3600)
    assert swept(invoke(app, "cleanup", "--batch-size", "2")) == 5
    assert count_rows(migrated, sessions) == 0
    assert count_rows(migrated, expired_sids) == 5


def test_cleanup_prunes_old_expired_sid_records(app_module: AppModule, migrated: Engine) -> None:
    now = dt.datetime.now(UTC)
    with migrated.begin() as conn:
        conn.execute(
            insert(expired_sids),
            [
                {"sid": "o" * 32, "expired_at": now - dt.timedelta(hours=3)},  # retain is 2 h
                {"sid": "r" * 32, "expired_at": now - dt.timedelta(minutes=5)},
            ],
        )
    app = app_module.create_app()
    assert swept(invoke(app, "cleanup")) == 0
    with migrated.connect() as conn:
        assert list(conn.execute(select(expired_sids.c.sid)).scalars()) == ["r" * 32]


def test_cleanup_through_a_real_flask_process(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    client = app.test_client()
    idle, _ = hit(client)
    age_sessions(migrated, [idle], seconds=3600)
    done = run_flask(app_module, "cleanup")
    assert done.returncode == 0, done.stderr
    assert re.match(r"expired 1 session\(s\)", done.stdout.strip()), done.stdout
    assert count_rows(migrated, sessions) == 0


# -- stats -----------------------------------------------------------------------------------


def test_stats_on_an_empty_schema(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    result = invoke(app, "stats", "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    tables = numbers.pop("tables")
    # PostgreSQL: each silo table's size and rows, for watching bloat; SQLite: none.
    assert set(tables) == (set(SILO_TABLES) if migrated.dialect.name == "postgresql" else set())
    for health in tables.values():
        assert health["table_bytes"] >= 0
        assert health["index_bytes"] > 0  # every silo table has its primary key
        assert set(health) == {
            "table_bytes", "index_bytes", "live_rows", "dead_rows", "updates",
            "hot_updates", "last_vacuum",
        }
    assert numbers == {
        "sessions": 0,
        "namespaces": 0,
        "expired_sids": 0,
        "files": 0,
        "file_bytes": 0,
        "tasks": {},
        "workers": [],
    }


def test_stats_reports_counts(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    client = app.test_client()
    first, _ = hit(client)
    second, _ = hit(client)
    hit(client, second)
    first, second = session_key(first), session_key(second)  # what the tables hold
    now = dt.datetime.now(UTC)
    with migrated.begin() as conn:
        conn.execute(
            insert(files),
            [
                {"sid": first, "store": "uploads", "filename": "a.csv", "size_bytes": 10,
                 "sha256": "0" * 64, "created_at": now},
                {"sid": second, "store": "uploads", "filename": "b.csv", "size_bytes": 32,
                 "sha256": "1" * 64, "created_at": now},
            ],
        )
        conn.execute(
            insert(tasks),
            [
                {"id": f"{i:032x}", "sid": first, "name": "job", "status": status,
                 "progress": 0.0, "message": "", "logs": [], "started_at": now,
                 "heartbeat_at": now}
                for i, status in enumerate(["complete", "complete", "running", "failed"])
            ],
        )
        conn.execute(insert(expired_sids).values(sid="x" * 32, expired_at=now))

    result = invoke(app, "stats", "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    tables = numbers.pop("tables")
    if migrated.dialect.name == "postgresql":
        assert tables["silo_sessions"]["table_bytes"] > 0
        assert tables["silo_files"]["table_bytes"] > 0
    assert numbers == {
        "sessions": 2,
        "namespaces": 2,
        "expired_sids": 1,
        "files": 2,
        "file_bytes": 42,
        "tasks": {"complete": 2, "failed": 1, "running": 1},
        "workers": [],
    }

    text = invoke(app, "stats").stdout.splitlines()
    sizes = text[text.index(next(t for t in text if t.startswith("tables"))) :] if tables else []
    counts = text[: len(text) - len(sizes)]
    table = {line.split()[0]: line.split(None, 1)[1] for line in counts}
    if tables:
        assert sizes[0].split() == ["tables", "size", "indexes", "live", "rows", "dead", "rows",
                                    "HOT", "updates"]
        assert sorted(line.split()[0] for line in sizes[1:]) == sorted(SILO_TABLES)
    assert table == {
        "sessions": "2",
        "namespaces": "2",
        "expired_sids": "1",
        "files": "2",
        "file_bytes": "42",
        "tasks": "queued=0, running=1, retrying=0, failed=1, complete=2",
        "workers": "0 live",
    }


def test_stats_json_through_a_real_flask_process(app_module: AppModule, migrated: Engine) -> None:
    app = app_module.create_app()
    hit(app.test_client())
    done = run_flask(app_module, "stats", "--json")
    assert done.returncode == 0, done.stderr
    numbers: dict[str, Any] = json.loads(done.stdout)
    assert numbers["sessions"] == 1
    assert numbers["namespaces"] == 1


def test_a_command_on_a_database_behind_by_a_revision_says_so_in_one_sentence(
    app_module: AppModule, engine: Engine
) -> None:
    """A database one revision behind: the message names both revisions, then what to do."""
    head = schema.head()
    previous = ScriptDirectory.from_config(schema.alembic_config()).get_revision(head).down_revision
    assert isinstance(previous, str)
    assert invoke_loading(app_module, "upgrade", previous).exit_code == 0
    result = CliRunner().invoke(
        silo_db, ["cleanup"], obj=ScriptInfo(create_app=app_module.create_app)
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        f"Error: the silo database is at revision {previous}, this version needs revision "
        f"{head}: run `flask silo-db upgrade`"
    )
