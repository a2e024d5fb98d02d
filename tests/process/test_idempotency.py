"""@silo.idempotent across real processes: gunicorn -w 4, concurrent duplicates, SIGKILL.

One Idempotency-Key sent by 100 concurrent identical POSTs to four workers runs
the view once (its side effect, a line appended to a file, and its state
change); every other answer is ``409`` or a byte-identical replay. A worker
killed inside the view leaves its key claimed until the lease ends, then the
retry runs the view. A worker killed between the view's return and the commit
(inside the commit's transaction, its namespace written and its response not
yet) leaves neither the state change nor the response; one killed after the
commit leaves both, and the retry replays. On SQLite and on PostgreSQL, read
back through the app and straight from the tables.
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
from liveserver import REPO_ROOT, Gunicorn, gunicorn, process_gone, wait_for, wait_ready
from sqlalchemy import Engine, select

from flask_silo_sql import session_key
from flask_silo_sql.sql.models import idempotency_keys, namespaces

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
KEY = "Idempotency-Key"
KEY_REPLAYED = "Idempotent-Replayed"
DUPLICATES = 100
CLIENTS = 32
LEASE_S = 5.0


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The test database at the current schema, for reading behind the app's back."""
    return migrated_engine


@pytest.fixture
def app_env(db_url: str, engine: Engine, tmp_path: Path) -> dict[str, str]:
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    return {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_BARRIER_DIR": str(barriers),
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
        "SILO_TEST_RUNS_FILE": str(tmp_path / "runs.txt"),
        "SILO_IDEMPOTENCY_LEASE": str(LEASE_S),
    }


def _db(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]


def _runs(env: dict[str, str]) -> int:
    path = Path(env["SILO_TEST_RUNS_FILE"])
    return len(path.read_text().splitlines()) if path.exists() else 0


def _session(server: Gunicorn) -> str:
    """A session with its row (a key needs its session)."""
    first = requests.post(server.url("/api/inc"), timeout=30)
    assert first.status_code == 200, first.text
    sid: str = first.headers[HEADER]
    return sid


def _counter(engine: Engine, sid: str) -> int:
    with engine.connect() as conn:
        data = conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == "counter"
            )
        ).scalar()
    if data is None:
        return 0
    return int((data if isinstance(data, dict) else json.loads(data))["value"])


def _record(engine: Engine, sid: str) -> tuple[Any, ...] | None:
    """(status, locked_until is set) of the session's one key record, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(idempotency_keys.c.status, idempotency_keys.c.locked_until).where(
                idempotency_keys.c.sid == session_key(sid)
            )
        ).first()
    return None if row is None else (row[0], row[1] is not None)


def _post(server: Gunicorn, path: str, sid: str, key: str, **headers: str) -> requests.Response:
    return requests.post(
        server.url(path), headers={HEADER: sid, KEY: key, **headers}, data=b"same body", timeout=60
    )


@pytest.mark.parametrize("route", ["/api/idem/inc", "/api/idem/wait"], ids=["409", "wait"])
def test_concurrent_duplicates_across_workers_run_the_view_once(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path, route: str
) -> None:
    with gunicorn(app_env, tmp_path, workers=4, threads=2) as server:
        sid = _session(server)
        path = f"{route}?delay=0.3"  # the first run is still in flight as the others arrive

        def send(_: int) -> requests.Response:
            return _post(server, path, sid, "one-key")

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(pool.map(send, range(DUPLICATES)))
        log = server.log_text()

    fresh = [a for a in answers if a.status_code == 200 and KEY_REPLAYED not in a.headers]
    replays = [a for a in answers if a.headers.get(KEY_REPLAYED) == "true"]
    busy = [a for a in answers if a.status_code == 409]
    statuses = Counter(a.status_code for a in answers)
    print(
        f"\nIDEMPOTENCY {_db(db_url)} {route} x{DUPLICATES} over gunicorn -w 4 --threads 2: "
        f"statuses={dict(statuses)} fresh={len(fresh)} replays={len(replays)} 409={len(busy)} "
        f"view runs={_runs(app_env)} counter={_counter(engine, sid)}"
    )
    assert len(fresh) == 1, [a.text[:200] for a in answers if a.status_code != 200][:5]
    assert len(fresh) + len(replays) + len(busy) == DUPLICATES, dict(statuses)
    assert all(r.status_code == 200 and r.content == fresh[0].content for r in replays)
    for answer in busy:
        assert answer.json()["error"] == "idempotency_key_in_flight"
        assert int(answer.headers["Retry-After"]) >= 1
    if route.endswith("wait"):
        assert not busy  # every duplicate waited for the first response
    assert _runs(app_env) == 1  # the side effect, once
    assert _counter(engine, sid) == 2  # the session's first use, then this key's one run
    assert _record(engine, sid) == (200, False)
    assert "Exception on /api/" not in log, log[-3000:]


def test_reuse_missing_key_raising_view_and_other_sessions_through_gunicorn(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path
) -> None:
    with gunicorn(app_env, tmp_path, workers=2) as server:
        sid = _session(server)
        first = _post(server, "/api/idem/inc", sid, "k1")
        assert first.status_code == 200, first.text
        other = requests.post(
            server.url("/api/idem/inc"), headers={HEADER: sid, KEY: "k1"}, data=b"other body",
            timeout=30,
        )
        assert other.status_code == 422
        assert other.json()["error"] == "idempotency_key_reused"
        missing = requests.post(server.url("/api/idem/required"), headers={HEADER: sid}, timeout=30)
        assert missing.status_code == 400
        assert missing.json()["error"] == "idempotency_key_missing"
        failed = _post(server, "/api/idem/inc", sid, "k2", **{"X-Test-Fail": "1"})
        assert failed.status_code == 500
        assert _counter(engine, sid) == 2  # the failed run changed nothing
        retry = _post(server, "/api/idem/inc", sid, "k2")
        assert retry.status_code == 200
        assert KEY_REPLAYED not in retry.headers
        assert retry.json()["value"] == 3
        other_session = _session(server)
        theirs = _post(server, "/api/idem/inc", other_session, "k1")  # the same key elsewhere
        assert KEY_REPLAYED not in theirs.headers
        assert theirs.json()["value"] == 2
        assert _runs(app_env) == 4  # k1, the failed k2, its retry, the other session's k1
        log = server.log_text()
    assert "the view failed, as asked" in log


def _kill(server: Gunicorn, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(f"worker {pid} to die", lambda: True if process_gone(pid) else None)
    server.wait_healthy()


def _doomed(server: Gunicorn, sid: str, point: str) -> tuple[threading.Thread, dict[str, Any]]:
    """An idempotent request paused at *point* (headers only: its retry is the same request)."""
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["response"] = _post(
                server, "/api/idem/inc", sid, "crash", **{"X-Test-Pause": point,
                                                          "X-Test-Token": "crash"}
            )
        except requests.RequestException as exc:
            outcome["error"] = exc

    client = threading.Thread(target=send)
    client.start()
    return client, outcome


def _retry_until_served(server: Gunicorn, sid: str) -> requests.Response:
    """Retry as a client does, following 409s, until the key answers otherwise."""

    def attempt() -> requests.Response | None:
        answer = _post(server, "/api/idem/inc", sid, "crash")
        if answer.status_code == 409:
            assert answer.json()["error"] == "idempotency_key_in_flight"
            return None
        return answer

    return wait_for("the key's lease to end", attempt, timeout=60, interval=0.2)


def test_a_worker_killed_inside_the_view_frees_its_key_after_the_lease(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path
) -> None:
    barriers = Path(app_env["SILO_TEST_BARRIER_DIR"])
    with gunicorn(app_env, tmp_path, workers=2) as server:
        sid = _session(server)
        client, outcome = _doomed(server, sid, "handler")
        pid = wait_ready(barriers / "crash.ready")
        duplicate = _post(server, "/api/idem/inc", sid, "crash")
        assert duplicate.status_code == 409  # the first one holds the key
        _kill(server, pid)
        client.join(timeout=60)
        assert "error" in outcome, outcome
        assert _record(engine, sid) == (None, True)  # claimed, nothing stored
        assert _counter(engine, sid) == 1
        retry = _retry_until_served(server, sid)
        assert retry.status_code == 200, retry.text
        assert KEY_REPLAYED not in retry.headers
        assert retry.json()["value"] == 2  # the killed run's change was never saved
        replay = _post(server, "/api/idem/inc", sid, "crash")
        assert replay.headers[KEY_REPLAYED] == "true"
        assert replay.content == retry.content
        log = server.log_text()
    assert _runs(app_env) == 2  # the killed run and the retry
    assert _counter(engine, sid) == 2
    assert "Exception on /api/" not in log, log[-3000:]
    print(f"\nIDEMPOTENCY {_db(db_url)} worker killed in the view: retry ran it after the lease")


@pytest.mark.parametrize("point", ["before_response", "after_commit"])
def test_the_response_and_the_state_change_are_never_one_without_the_other(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path, point: str
) -> None:
    barriers = Path(app_env["SILO_TEST_BARRIER_DIR"])
    committed = point == "after_commit"
    with gunicorn(app_env, tmp_path, workers=1) as server:
        sid = _session(server)
        client, outcome = _doomed(server, sid, point)
        pid = wait_ready(barriers / "crash.ready")
        _kill(server, pid)
        client.join(timeout=60)
        assert "error" in outcome, outcome
        record = _record(engine, sid)
        value = _counter(engine, sid)
        if committed:
            assert record == (200, False)  # the response stored ...
            assert value == 2  # ... with the state change
        else:
            assert record == (None, True)  # neither the response ...
            assert value == 1  # ... nor the state change (the claim waits out its lease)
        retry = _retry_until_served(server, sid)
        assert retry.status_code == 200, retry.text
        assert (retry.headers.get(KEY_REPLAYED) == "true") is committed
        assert retry.json()["value"] == 2
        log = server.log_text()
    assert _counter(engine, sid) == 2
    assert _runs(app_env) == (1 if committed else 2)
    assert "Exception on /api/" not in log, log[-3000:]
    print(
        f"\nIDEMPOTENCY {_db(db_url)} killed at {point}: record={record} counter={value}; "
        f"retry {'replayed' if committed else 'ran the view'}"
    )


def test_the_documented_retry_loop_against_a_live_server(
    app_env: dict[str, str], engine: Engine, tmp_path: Path
) -> None:
    """The client loop of docs/idempotency.md, as a user would copy it, through gunicorn."""
    page = (REPO_ROOT / "docs" / "idempotency.md").read_text()
    start = page.index("def post_once(")
    opening = page.rindex("```python", 0, start)
    assert page[:opening].endswith("{.run-by-test}\n")  # the docs build counts on this test
    code = page[opening + len("```python") : page.index("```", start)]
    namespace: dict[str, Any] = {}
    exec(compile(code, "idempotency.md", "exec"), namespace)  # noqa: S102 - our documentation
    with gunicorn(app_env, tmp_path, workers=2) as server, requests.Session() as http:
        sid = _session(server)
        first = namespace["post_once"](http, server.url("/api/idem/inc"), {"n": 1}, sid)
        second = namespace["post_once"](http, server.url("/api/idem/inc"), {"n": 1}, sid)
    assert first.status_code == second.status_code == 200
    assert [first.json()["value"], second.json()["value"]] == [2, 3]  # two keys: two runs
    assert _runs(app_env) == 2
