"""Process-level tests: each starts real processes (gunicorn, a wheel build, Chromium, ``flask``).

Every test under this directory is marked ``slow``, so ``pytest -m "not slow"``
runs the unit tests only. The fixtures of ``tests/conftest.py`` (databases,
``silo_app``) and the helpers beside it serve these tests too: ``liveserver``
(gunicorn) with the apps it serves in ``tests/apps/``, ``pgserver``, ``support``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer, find_bindir
from support import UNDER_CI

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``slow`` (before ``-m`` selects)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of the using module alone: its tests stop, start or freeze it.

    With ``fsync`` on: a crash (``immediate`` stop) must not lose acknowledged commits.
    """
    if find_bindir() is None or importlib.util.find_spec("psycopg") is None:
        message = "PostgreSQL (server binaries, psycopg) not found: this module's tests cannot run"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = PgServer(fsync=True)
    try:
        yield server
    finally:
        with contextlib.suppress(OSError):  # a stopped server has no processes to go on
            server.thaw()  # a frozen one cannot be stopped
        server.destroy()
