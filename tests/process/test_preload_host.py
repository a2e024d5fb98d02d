"""``gunicorn --preload`` with the host's own engine (``SQLStorage(db)``) and no post_fork hook.

Silo leaves nothing in a pool it does not own: its start-up schema check
closes its connection, and its cleanup thread starts with a process's first
API request (so never in the master). Workers forked then, and workers the
master forks again after one dies, never share a connection with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests
from liveserver import gunicorn, process_gone, wait_for

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
CLIENTS = 6
ROUNDS = 30


def hammer(base: str, outcomes: Counter[str]) -> None:
    http = requests.Session()
    sid = f"preload-client-{uuid.uuid4().hex}"
    expected = 0
    for _ in range(ROUNDS):
        try:
            reply = http.post(base + "/api/inc", headers={HEADER: sid}, timeout=10)
            host = http.get(base + "/api/host", headers={HEADER: sid}, timeout=10)
        except requests.RequestException as exc:
            outcomes[type(exc).__name__] += 1
            continue
        if reply.status_code != 200 or host.status_code != 200:
            outcomes[f"status {reply.status_code}/{host.status_code}"] += 1
            continue
        expected += 1
        outcomes["ok" if reply.json()["value"] == expected else "someone else's state"] += 1


def test_preload_with_the_hosts_engine_needs_no_post_fork(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    engine.dispose()
    with gunicorn(
        {"SILO_DATABASE_URI": db_url}, tmp_path, app="host_engine_app:app", workers=2,
        extra=("--preload",),
    ) as server:  # fmt: skip
        outcomes: Counter[str] = Counter()

        def round_of_clients() -> None:
            threads = [
                threading.Thread(target=hammer, args=(server.base, outcomes))
                for _ in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)

        round_of_clients()
        time.sleep(1.5)  # the workers' cleanup threads have swept meanwhile, the master's not
        victim = next(iter(server.worker_pids()))
        os.kill(victim, signal.SIGKILL)  # the master forks a new worker now
        wait_for("the worker to die", lambda: True if process_gone(victim) else None)
        wait_for("a new worker", lambda: True if len(server.worker_pids()) == 2 else None)
        round_of_clients()
        log = server.log_text()
    assert outcomes == Counter(ok=2 * CLIENTS * ROUNDS), outcomes
    assert "Traceback" not in log, log[-3000:]
