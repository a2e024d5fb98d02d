"""The built wheel, installed into a fresh virtualenv, works with no file of ours around.

Builds the wheel from this source tree, installs it (dependencies from the
package index, through pip's cache) into a new venv, and drives a tiny app in
a directory that holds nothing but ``app.py``: ``flask silo-db upgrade``
against a configured SQLite file, then requests through the test client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600

APP_SOURCE = '''\
from flask import Flask, jsonify

from flask_silo_sql import Silo


def create_app():
    app = Flask(__name__)
    app.config["SILO_DATABASE_URI"] = {url!r}
    silo = Silo(app, auto_cleanup=False)
    silo.register("counter", lambda: {{"n": 0}})

    @app.post("/api/hit")
    def hit():
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(n=state["n"])

    return app
'''

REQUESTS = """\
import json

from app import create_app

client = create_app().test_client()
first = client.post("/api/hit")
sid = first.headers["X-Session-ID"]
second = client.post("/api/hit", headers={"X-Session-ID": sid})
other = client.post("/api/hit")
print(json.dumps({
    "sid": sid,
    "second_sid": second.headers["X-Session-ID"],
    "other_sid": other.headers["X-Session-ID"],
    "counts": [first.get_json()["n"], second.get_json()["n"], other.get_json()["n"]],
    "status": [first.status_code, second.status_code, other.status_code],
}))
"""

WHERE = """\
import json
import flask_silo_sql
from flask_silo_sql import schema
print(json.dumps({
    "package": flask_silo_sql.__file__,
    "migrations": str(schema.migrations_dir()),
    "head": schema.head(),
}))
"""


@dataclass
class Installed:
    wheel: Path
    venv: Path
    project: Path
    database: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self) -> dict[str, str]:
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SILO_DATABASE_URI", "FLASK_APP"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run a command of the venv, in the project directory."""
        return subprocess.run(
            [str(self.bin / cmd[0]), *cmd[1:]],
            cwd=self.project,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    checked(
        subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    )
    wheels = sorted(dist.glob("flask_silo_sql-*.whl"))
    assert len(wheels) == 1, wheels

    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    project = root / "project"
    project.mkdir()
    database = root / "data" / "silo.db"
    database.parent.mkdir()
    (project / "app.py").write_text(APP_SOURCE.format(url=f"sqlite:///{database}"))
    here = Installed(wheels[0], env_dir, project, database)
    checked(here.run("python", "-m", "pip", "install", "--quiet", str(here.wheel)))
    return here


def test_wheel_ships_the_migrations_and_the_entry_point(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "flask_silo_sql/py.typed" in names
    assert "flask_silo_sql/migrations/env.py" in names
    assert "flask_silo_sql/migrations/script.py.mako" in names
    for revision in (REPO / "migrations" / "versions").glob("*.py"):
        assert f"flask_silo_sql/migrations/versions/{revision.name}" in names
    assert not any("__pycache__" in name for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert "[flask.commands]" in text
    assert "silo-db = flask_silo_sql.cli:silo_db" in text


def test_installed_package_finds_its_own_migrations(installed: Installed) -> None:
    where = json.loads(checked(installed.run("python", "-c", WHERE)).stdout)
    package = Path(where["package"]).parent
    assert package.is_relative_to(installed.venv)  # not this source tree
    assert Path(where["migrations"]) == package / "migrations"
    assert (package / "migrations" / "env.py").is_file()
    shipped = {p.name for p in (package / "migrations" / "versions").glob("*.py")}
    versions = REPO / "migrations" / "versions"
    assert shipped == {p.name for p in versions.glob("*.py")}
    assert where["head"]


def test_fresh_project_upgrades_and_serves(installed: Installed) -> None:
    assert sorted(p.name for p in installed.project.iterdir()) == ["app.py"]

    behind = installed.run("flask", "--app", "app", "silo-db", "check")
    assert behind.returncode == 1, behind.stdout + behind.stderr
    assert "flask silo-db upgrade" in behind.stdout

    upgraded = checked(installed.run("flask", "--app", "app", "silo-db", "upgrade"))
    assert "silo schema at" in upgraded.stderr
    assert installed.database.is_file()
    checked(installed.run("flask", "--app", "app", "silo-db", "check"))
    history = checked(installed.run("flask", "--app", "app", "silo-db", "history"))
    assert "(head)" in history.stdout

    answer = json.loads(checked(installed.run("python", "-c", REQUESTS)).stdout)
    assert answer["status"] == [200, 200, 200]
    assert len(answer["sid"]) >= 16
    assert answer["second_sid"] == answer["sid"]
    assert answer["other_sid"] != answer["sid"]
    assert answer["counts"] == [1, 2, 1]

    stats = json.loads(
        checked(installed.run("flask", "--app", "app", "silo-db", "stats", "--json")).stdout
    )
    assert stats["sessions"] == 2
    assert stats["namespaces"] == 2
    leftovers = {p.name for p in installed.project.iterdir()} - {"app.py", "__pycache__"}
    assert leftovers <= {"instance"}, leftovers  # nothing of the library's was needed here
