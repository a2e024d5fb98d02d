"""Through PgBouncer in transaction pooling mode, as many deployments fit their workers in.

With silo's default settings (no server-side prepared statements, no session
state relied on across transactions), `flask silo-db upgrade` runs through
the pooler, and the gunicorn concurrency test gives the same figures as on a
direct connection: no silent lost update optimistically, exactly 200 of 200
in locking mode, on 5 server connections shared by every worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import APPS_DIR, REPO_ROOT, gunicorn
from pgbouncer import PgBouncer
from sqlalchemy import make_url

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

INCREMENTS = 200
CLIENTS = 32
HEADER = "X-Session-ID"


def flask_silo_db(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SILO_DATABASE_URI": url,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "concurrency_app", "silo-db", *args],
        cwd=APPS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("locking", [False, True], ids=["optimistic", "locking"])
def test_through_pgbouncer_in_transaction_mode(
    pg_bouncer: PgBouncer, pg_url: str, locking: bool, tmp_path: Path
) -> None:
    url = pg_bouncer.url(str(make_url(pg_url).database))
    upgraded = flask_silo_db(url, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    engine = make_engine(pg_url)
    assert schema.is_current(engine)  # as seen directly, not through the pooler
    engine.dispose()

    env = {"SILO_DATABASE_URI": url, "SILO_LOCKING": "1" if locking else "0"}
    with gunicorn(env, tmp_path, workers=4, threads=2) as server:
        first = requests.get(server.url("/api/counter"), timeout=30)
        sid = first.headers[HEADER]

        def inc(_: int) -> tuple[int, Any]:
            response = requests.post(server.url("/api/inc"), headers={HEADER: sid}, timeout=60)
            return response.status_code, response.json()

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            results = list(pool.map(inc, range(INCREMENTS)))
        final = requests.get(server.url("/api/counter"), headers={HEADER: sid}, timeout=30)
        value = final.json()["value"]
        log = server.log_text()
    statuses = Counter(status for status, _ in results)
    print(f"\nPGBOUNCER transaction mode, locking={locking}: {dict(statuses)} final={value}")
    assert "prepared statement" not in log, log[-3000:]
    assert set(statuses) <= {200, 409}, results[:5]
    written = sorted(body["value"] for status, body in results if status == 200)
    assert written == list(range(1, statuses[200] + 1))  # no two wrote the same value
    assert value == statuses[200]  # nothing lost silently
    if locking:
        assert statuses[200] == INCREMENTS
