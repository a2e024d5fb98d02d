"""A PostgreSQL outage under a running app (gunicorn), on the test's own server.

While the server is down every API request answers 503 with a JSON body, in
bounded time, and no worker hangs; a request that was in flight when the
server went away answers 503 too and writes nothing. When the server is back
the same app (never restarted) serves requests again and everything committed
before the outage is there.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn, wait_for, wait_ready
from pgserver import PgServer
from sqlalchemy import select

from flask_silo_sql import schema, session_key
from flask_silo_sql.files.limits import TEMP_PREFIX as PENDING_PREFIX
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import files, namespaces

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
ANSWER_BOUND_S = 15.0
WORKERS = 2
THREADS = 2
# Right after the restart, a worker whose pool still holds connections from
# before the outage may answer 503 once per stale connection it discovers.
RECOVERY_REQUESTS = 2 * WORKERS * THREADS + 2


def _timed(method: str, url: str, sid: str) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    response = requests.request(method, url, headers={HEADER: sid}, timeout=ANSWER_BOUND_S + 15)
    return response, time.perf_counter() - started


def _assert_json_503(response: requests.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    assert "<html" not in response.text.lower()
    assert "traceback" not in response.text.lower()
    assert response.json()["error"] == "storage_unavailable"


@pytest.mark.parametrize("locking", [False, True], ids=["optimistic", "locking"])
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_outage_and_recovery(
    private_pg: PgServer, mode: str, locking: bool, tmp_path: Path
) -> None:
    url = private_pg.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_LOCKING": "1" if locking else "0",
        "SILO_TEST_BARRIER_DIR": str(barriers),
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
    }
    down = False
    try:
        with gunicorn(env, tmp_path, workers=WORKERS, threads=THREADS) as server:
            # State committed before the outage.
            first = requests.post(server.url("/api/inc"), timeout=30)
            assert first.status_code == 200, first.text
            sid = first.headers[HEADER]
            for expected in (2, 3):
                response = requests.post(server.url("/api/inc"), headers={HEADER: sid}, timeout=30)
                assert response.json() == {"value": expected}
            multi = requests.post(
                server.url("/api/multi?value=7"), headers={HEADER: sid}, timeout=30
            )
            assert multi.status_code == 200, multi.text
            assert requests.get(
                server.url("/api/counter"), headers={HEADER: sid}, timeout=30
            ).json() == {"value": 3}

            # A request in flight: state loaded and changed, response pending.
            in_flight: dict[str, Any] = {}

            def paused_write() -> None:
                in_flight["response"] = requests.post(
                    server.url("/api/multi?value=9&pause=handler&token=inflight"),
                    headers={HEADER: sid},
                    timeout=60,
                )

            writer = threading.Thread(target=paused_write)
            writer.start()
            wait_ready(barriers / "inflight.ready")

            private_pg.stop_server(mode)
            down = True
            stopped_at = time.perf_counter()

            (barriers / "inflight.go").touch()
            writer.join(timeout=ANSWER_BOUND_S + 30)
            assert not writer.is_alive(), "the in-flight request never answered"
            in_flight_time = time.perf_counter() - stopped_at
            _assert_json_503(in_flight["response"])

            # Every kind of API request answers 503 + JSON, in bounded time.
            times: list[float] = []
            for _ in range(3):
                for method, path in (
                    ("GET", "/api/counter"),
                    ("POST", "/api/inc"),
                    ("POST", "/api/multi?value=8"),
                    ("GET", "/api/ping"),
                ):
                    response, elapsed = _timed(method, server.url(path), sid)
                    _assert_json_503(response)
                    assert elapsed < ANSWER_BOUND_S, (path, elapsed)
                    times.append(elapsed)
            assert server.healthy(), "a worker hung during the outage"

            private_pg.start_server()
            down = False
            restarted_at = time.perf_counter()
            attempts: list[int] = []

            def recovered() -> requests.Response | None:
                response = requests.get(
                    server.url("/api/counter"), headers={HEADER: sid}, timeout=30
                )
                attempts.append(response.status_code)
                if response.status_code == 503:
                    _assert_json_503(response)
                    return None
                return response

            back = wait_for("the app to recover", recovered, timeout=60, interval=0.05)
            recovery = time.perf_counter() - restarted_at
            assert back.status_code == 200, back.text
            assert back.json() == {"value": 3}  # committed before the outage
            assert len(attempts) <= RECOVERY_REQUESTS, attempts

            # From now on every request succeeds, reads and writes alike.
            for _ in range(2 * WORKERS * THREADS):
                response = requests.get(server.url("/api/multi"), headers={HEADER: sid}, timeout=30)
                assert response.status_code == 200, response.text
                assert response.json() == {"alpha": 7, "beta": 7, "gamma": 7}
            inc = requests.post(server.url("/api/inc"), headers={HEADER: sid}, timeout=30)
            assert inc.status_code == 200, inc.text
            assert inc.json() == {"value": 4}
            log = server.log_text()
    finally:
        if down:
            private_pg.start_server()
        engine.dispose()

    with engine.connect() as conn:
        rows = {
            row.name: row.data
            for row in conn.execute(
                select(namespaces.c.name, namespaces.c.data)
                .where(namespaces.c.sid == session_key(sid))
            )
        }
    engine.dispose()
    assert rows == {
        "counter": {"value": 4},
        "alpha": {"value": 7},
        "beta": {"value": 7},
        "gamma": {"value": 7},
    }
    assert "Exception on /api/" not in log, log[-3000:]  # Flask's unhandled-error log line
    print(
        f"\nOUTAGE stop={mode} {'locking' if locking else 'optimistic'}: "
        f"{len(times)} requests during the outage all 503+JSON, "
        f"max {max(times) * 1000:.0f} ms, mean {sum(times) / len(times) * 1000:.0f} ms; "
        f"in-flight write answered 503 {in_flight_time * 1000:.0f} ms after the stop; "
        f"recovered {recovery * 1000:.0f} ms after the server accepted connections, "
        f"after {len(attempts)} request(s) {attempts}"
    )


def test_outage_while_an_upload_replaces_a_file(private_pg: PgServer, tmp_path: Path) -> None:
    """The row write of a replacing upload fails: no row is left without its file."""
    url = private_pg.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    uploads = tmp_path / "uploads"
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_TEST_BARRIER_DIR": str(barriers),
        "SILO_TEST_UPLOAD_DIR": str(uploads),
    }
    old, new = b"old version\n" * 1000, b"new version\n" * 3000
    down = False
    try:
        with gunicorn(env, tmp_path, workers=1) as server:
            first = requests.put(server.url("/api/upload/data.bin"), data=old, timeout=30)
            assert first.status_code == 201, first.text
            sid = first.headers[HEADER]
            in_flight: dict[str, requests.Response] = {}

            def replace() -> None:
                in_flight["response"] = requests.put(
                    server.url("/api/upload/data.bin?pause=before_record&token=upload"),
                    headers={HEADER: sid},
                    data=new,
                    timeout=60,
                )

            writer = threading.Thread(target=replace)
            writer.start()
            wait_ready(barriers / "upload.ready")  # file renamed into place, row not written
            private_pg.stop_server("fast")
            down = True
            (barriers / "upload.go").touch()
            writer.join(timeout=ANSWER_BOUND_S + 30)
            assert not writer.is_alive()
            _assert_json_503(in_flight["response"])

            private_pg.start_server()
            down = False
            listed = wait_for(
                "the app to recover",
                lambda: _ok(server.url("/api/files"), sid),
                timeout=60,
                interval=0.05,
            )
    finally:
        if down:
            private_pg.start_server()
        engine.dispose()

    with engine.connect() as conn:
        rows = {
            row.filename: (row.size_bytes, row.sha256)
            for row in conn.execute(
                select(files.c.filename, files.c.size_bytes, files.c.sha256).where(
                    files.c.sid == session_key(sid),
                    # not the pending row the failed upload could not remove (the
                    # database was down); it counts as dead after STALE_UPLOAD_S
                    ~files.c.filename.startswith(PENDING_PREFIX, autoescape=True),
                )
            )
        }
    engine.dispose()
    for name, (size, sha) in rows.items():
        path = uploads / session_key(sid) / name
        assert path.is_file(), f"silo_files row without its file: {name}"
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
    assert listed["files"] == sorted(rows)
    on_disk = sorted(p.name for p in (uploads / session_key(sid)).iterdir())
    assert all(p in rows for p in on_disk), on_disk  # nothing partial, nothing unrecorded
    print(f"\nOUTAGE during a replacing upload: 503; rows={sorted(rows)} on disk={on_disk}")


def _ok(url: str, sid: str) -> Any:
    response = requests.get(url, headers={HEADER: sid}, timeout=30)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return response.json()
