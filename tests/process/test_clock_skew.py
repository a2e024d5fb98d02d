"""App servers with skewed clocks agree: every TTL, expiry and heartbeat is the database's.

Two gunicorn servers on one PostgreSQL database, the second one's process
clock 150 s ahead (TTL 120 s): a client just active through the first is not
expired by the second, the second's sweep leaves it alone, and the second's
status poll does not declare the first's running task lost. (SQLite lives on
one machine, whose clock all its processes share.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from liveserver import gunicorn

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
SID = "skewed-clock-client-000000001"


def test_a_server_150_s_ahead_agrees_with_the_others(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    schema.upgrade(engine)
    engine.dispose()
    gate = tmp_path / "gate"
    env = {"SILO_DATABASE_URI": pg_url, "SILO_TEST_GATE": str(gate)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    headers = {HEADER: SID}
    with (
        gunicorn(env, tmp_path / "a", app="clock_app:app") as a,
        gunicorn({**env, "SILO_TEST_CLOCK_SKEW": "150"}, tmp_path / "b", app="clock_app:app") as b,
    ):
        assert requests.post(a.url("/api/write"), headers=headers, timeout=30).json() == {
            "value": 1
        }
        # Through the machine whose clock is ahead: still the same, live session.
        seen = requests.get(b.url("/api/data"), headers=headers, timeout=30)
        assert seen.status_code == 200, seen.text
        assert seen.json() == {"value": 1}
        assert requests.post(b.url("/api/sweep"), timeout=30).json() == {"expired": []}
        assert requests.post(a.url("/api/write"), headers=headers, timeout=30).json() == {
            "value": 2
        }

        assert requests.post(a.url("/api/start"), headers=headers, timeout=30).status_code == 200
        polled = requests.get(b.url("/api/status"), headers=headers, timeout=30).json()
        assert polled["running"] is True, polled
        assert polled["error"] is None
        gate.touch()
        assert requests.get(a.url("/api/data"), headers=headers, timeout=30).status_code == 200
