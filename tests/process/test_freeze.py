"""A frozen database server: every request answers 503 JSON within its bound, then recovers.

The server's processes are stopped (SIGSTOP): connections stay open, the
kernel keeps acknowledging, nothing answers, and the server cannot enforce any
timeout of its own. Requests in flight and new ones must still answer, on
sync and on threaded gunicorn workers, and the app must work again once the
server goes on, with everything committed before still there.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn, wait_for, wait_ready
from pgserver import PgServer

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0  # SILO_DB_TIMEOUT of the app under test
DEADLINE_S = 30.0  # a request answering later than this has hung
HEADER = "X-Session-ID"


def sid(n: int) -> str:
    return f"frozen-client-{n:04d}-00000000"


def inc(server: Any, n: int, **params: str) -> requests.Response:
    return requests.post(
        server.url("/api/inc"), headers={HEADER: sid(n)}, params=params, timeout=DEADLINE_S
    )


@pytest.mark.parametrize(("workers", "threads"), [(2, 1), (1, 4)], ids=["sync", "threaded"])
def test_frozen_server_answers_503_within_the_bound_and_recovers(
    private_pg: PgServer, tmp_path: Path, workers: int, threads: int
) -> None:
    url = private_pg.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_DB_TIMEOUT": str(TIMEOUT_S),
        "SILO_TEST_BARRIER_DIR": str(barriers),
    }
    with gunicorn(env, tmp_path, workers=workers, threads=threads) as server:
        for n in range(4):
            assert inc(server, n).json() == {"value": 1}

        # One request is in flight (state changed, not saved) when the server freezes.
        in_flight: dict[str, Any] = {}

        def paused() -> None:
            started = time.monotonic()
            in_flight["response"] = requests.post(
                server.url("/api/multi"),
                headers={HEADER: sid(0)},
                params={"value": "7", "pause": "handler", "token": "frozen"},
                timeout=DEADLINE_S,
            )
            in_flight["seconds"] = time.monotonic() - started

        writer = threading.Thread(target=paused)
        writer.start()
        wait_ready(barriers / "frozen.ready")
        private_pg.freeze()
        try:
            (barriers / "frozen.go").touch()
            answers: list[tuple[int, Any, float]] = []

            def one(n: int) -> None:
                started = time.monotonic()
                response = inc(server, n)
                answers.append((response.status_code, response.json(), time.monotonic() - started))

            clients = [threading.Thread(target=one, args=(n % 6,)) for n in range(8)]
            for client in clients:
                client.start()
            for client in clients:
                client.join(DEADLINE_S + 5)
            writer.join(DEADLINE_S + 5)
        finally:
            private_pg.thaw()
        assert len(answers) == 8, "a request hung on the frozen server"
        for status, body, _ in [
            *answers,
            (in_flight["response"].status_code, in_flight["response"].json(), 0.0),
        ]:
            assert status == 503, body
            assert body["error"] == "storage_unavailable"
        slowest = max(s for _, _, s in [*answers, (0, None, in_flight["seconds"])])

        # The server goes on: the app recovers by itself (each process tries again a
        # moment after its last failure), and nothing committed is lost.
        # Concurrent requests, each in its own session (two on one session may
        # rightly answer 409 to each other): every worker answers some.
        def recovered() -> bool | None:
            with ThreadPoolExecutor(2 * workers * threads) as pool:
                statuses = list(pool.map(lambda n: inc(server, 10 + n).status_code, range(8)))
            return True if statuses == [200] * 8 else None

        wait_for("the app to recover", recovered, timeout=60, interval=0.2)
        for n in range(4):
            assert inc(server, n).json() == {"value": 2}
        log = server.log_text()
    assert "Traceback" not in log, log[-3000:]
    print(
        f"\nFROZEN {workers} worker(s) x {threads} thread(s), SILO_DB_TIMEOUT={TIMEOUT_S} s: "
        f"9 requests answered 503 JSON, the slowest after {slowest:.2f} s; recovered"
    )
