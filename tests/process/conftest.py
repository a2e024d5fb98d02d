"""Process-level tests: each starts real processes (gunicorn, a wheel build, Chromium, ``flask``).

Every test under this directory is marked ``slow``, so ``pytest -m "not slow"``
runs the unit tests only. The fixtures of ``tests/conftest.py`` (databases,
``silo_app``) and the helpers beside it serve these tests too: ``liveserver``
(gunicorn) with the apps it serves in ``tests/apps/``, ``pgserver``, ``support``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``slow`` (before ``-m`` selects)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
