"""Shared fixtures: real SQLite files and a real, private PostgreSQL server.

Without PostgreSQL binaries the PostgreSQL tests are skipped with a loud
message, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url

sys.path.insert(0, str(Path(__file__).parent))

from pgserver import ExternalPg, PgServer, find_bindir

UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_pg_problem: list[str] = []


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer | ExternalPg]:
    """The PostgreSQL server for this test run."""
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for problem in _pg_problem:
        terminalreporter.write_line("!" * 70, red=True)
        terminalreporter.write_line(f"!!! {problem}: those tests were SKIPPED", red=True)
        terminalreporter.write_line("!" * 70, red=True)
