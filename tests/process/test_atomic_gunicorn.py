"""Atomic mode across real processes: gunicorn workers killed before the commit,
and 100 concurrent duplicates of an order-creating idempotent POST.

The app (``tests/apps/atomic_app.py``) is a Flask-SQLAlchemy shop whose silo
shares ``db.session``'s transaction. Read back straight from the tables.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, gunicorn, process_gone, wait_for, wait_ready
from sqlalchemy import Engine, func, select, text

from flask_silo_sql import session_key
from flask_silo_sql.sql.models import idempotency_keys, namespaces

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
APP = "atomic_app:app"


@pytest.fixture
def env(db_url: str, migrated_engine: Engine, tmp_path: Path) -> dict[str, str]:
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    return {"SILO_DATABASE_URI": db_url, "SILO_TEST_BARRIER_DIR": str(barriers)}


def _orders(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM shop_orders")).scalar() or 0)


def _charges(engine: Engine, sid: str) -> list[int]:
    with engine.connect() as conn:
        data = conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == "charges"
            )
        ).scalar()
    if data is None:
        return []
    return list((data if isinstance(data, dict) else json.loads(data))["ids"])


def _keys(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(idempotency_keys)).scalar() or 0)


def _session(server: Gunicorn) -> str:
    first = requests.post(server.url("/api/start"), timeout=30)
    assert first.status_code == 200, first.text
    return str(first.headers[HEADER])


def test_a_worker_killed_after_the_view_before_the_commit_leaves_nothing_and_a_retry_runs(
    env: dict[str, str], migrated_engine: Engine, tmp_path: Path
) -> None:
    engine = migrated_engine
    with gunicorn(env, tmp_path, app=APP, workers=2) as server:
        sid = _session(server)
        outcome: dict[str, Any] = {}

        def doomed() -> None:
            try:
                outcome["response"] = requests.post(
                    server.url("/api/pay"),
                    headers={
                        HEADER: sid,
                        KEY: "pay-1",
                        "X-Test-Pause": "before_commit",
                        "X-Test-Token": "pay-1",
                    },
                    data=b"book",
                    timeout=60,
                )
            except requests.RequestException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=doomed)
        client.start()
        pid = wait_ready(Path(env["SILO_TEST_BARRIER_DIR"]) / "pay-1.ready")
        os.kill(pid, signal.SIGKILL)
        wait_for(f"worker {pid} to die", lambda: True if process_gone(pid) else None)
        client.join(60)
        server.wait_healthy()
        # Its order, its charge and its claim were one transaction, never committed.
        assert (_orders(engine), _charges(engine, sid), _keys(engine)) == (0, [], 0)
        retry = requests.post(
            server.url("/api/pay"), headers={HEADER: sid, KEY: "pay-1"}, data=b"book", timeout=30
        )
        assert retry.status_code == 201, retry.text
        again = requests.post(
            server.url("/api/pay"), headers={HEADER: sid, KEY: "pay-1"}, data=b"book", timeout=30
        )
        assert again.headers.get(REPLAYED) == "true"
        assert again.content == retry.content
    assert _orders(engine) == 1
    assert _charges(engine, sid) == [retry.json()["order"]]


DUPLICATES = 100
CLIENTS = 16


def test_concurrent_duplicates_across_four_workers_make_one_order(
    env: dict[str, str], migrated_engine: Engine, db_url: str, tmp_path: Path
) -> None:
    engine = migrated_engine
    with gunicorn(env, tmp_path, app=APP, workers=4) as server:
        sid = _session(server)

        def send(_: int) -> requests.Response:
            return requests.post(
                server.url("/api/pay?delay=0.2"),
                headers={HEADER: sid, KEY: "one-key"},
                data=b"book",
                timeout=60,
            )

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(pool.map(send, range(DUPLICATES)))
        log = server.log_text()
    fresh = [a for a in answers if a.status_code == 201 and REPLAYED not in a.headers]
    replays = [a for a in answers if a.headers.get(REPLAYED) == "true"]
    busy = [a for a in answers if a.status_code == 409]
    statuses = Counter(a.status_code for a in answers)
    print(
        f"\nATOMIC {db_url.split(':')[0]} x{DUPLICATES} over gunicorn -w 4: {dict(statuses)} "
        f"fresh={len(fresh)} replays={len(replays)} 409={len(busy)}"
    )
    assert len(fresh) == 1, [a.text[:200] for a in answers if a.status_code != 201][:5]
    assert len(fresh) + len(replays) + len(busy) == DUPLICATES, dict(statuses)
    assert all(r.content == fresh[0].content for r in replays)
    assert _orders(engine) == 1
    assert _charges(engine, sid) == [fresh[0].json()["order"]]
    assert "Exception on /api/" not in log, log[-3000:]
