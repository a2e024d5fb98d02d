"""Same-SID concurrency through real processes: gunicorn -w 4, 200 concurrent increments.

Default (optimistic) mode: no update is lost silently. Every response is a 200
or a 409 naming the namespace, and the counter equals the number of 200s.
Locking mode (``SILO_LOCKING=1``): the read-modify-writes are serialised, so
all 200 succeed and the counter is exactly 200. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

INCREMENTS = 200
CLIENTS = 32
WORKERS = 4
THREADS = 2
HEADER = "X-Session-ID"


def _upgrade(url: str) -> None:
    engine = make_engine(url)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()


def _increment(base: str, sid: str) -> tuple[int, Any]:
    response = requests.post(base + "/api/inc", headers={HEADER: sid}, timeout=60)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:500]
    return response.status_code, body


@pytest.mark.parametrize("locking", [False, True], ids=["optimistic", "locking"])
def test_concurrent_increments_of_one_session(db_url: str, locking: bool, tmp_path: Path) -> None:
    _upgrade(db_url)
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_LOCKING": "1" if locking else "0",
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
    }
    with gunicorn(env, tmp_path, workers=WORKERS, threads=THREADS) as server:
        first = requests.get(server.url("/api/counter"), timeout=30)
        assert first.status_code == 200, first.text
        sid = first.headers[HEADER]
        assert first.json() == {"value": 0}

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            results = list(pool.map(lambda _: _increment(server.base, sid), range(INCREMENTS)))
        wall = time.perf_counter() - started

        final = requests.get(server.url("/api/counter"), headers={HEADER: sid}, timeout=30)
        assert final.status_code == 200, final.text
        value = final.json()["value"]
        log = server.log_text()

    statuses = Counter(status for status, _ in results)
    successes, conflicts = statuses[200], statuses[409]
    database = db_url.split(":", 1)[0].split("+", 1)[0]
    mode = "locking" if locking else "optimistic"
    print(
        f"\nCONCURRENCY db={database} mode={mode} workers={WORKERS}x{THREADS} "
        f"requests={INCREMENTS} clients={CLIENTS}: 200={successes} 409={conflicts} "
        f"other={INCREMENTS - successes - conflicts} final={value} wall={wall:.2f}s "
        f"({INCREMENTS / wall:.0f} req/s)"
    )

    others = [(s, b) for s, b in results if s not in (200, 409)]
    assert not others, f"unexpected responses: {others[:5]}\n{log[-3000:]}"
    assert "Exception on /api/" not in log, log[-3000:]  # Flask's unhandled-error log line
    for status, body in results:
        if status == 409:
            assert isinstance(body, dict), body
            assert body["error"] == "state_conflict"
            assert body["namespace"] == "counter"
    # Every success returned the value it wrote, and no two successes wrote the same one.
    written = sorted(body["value"] for status, body in results if status == 200)
    assert written == sorted(set(written))
    if locking:
        assert successes == INCREMENTS
        assert value == INCREMENTS
        assert written == list(range(1, INCREMENTS + 1))
    else:
        assert value == successes  # nothing lost silently
        assert conflicts == INCREMENTS - successes
        assert written == list(range(1, successes + 1))
