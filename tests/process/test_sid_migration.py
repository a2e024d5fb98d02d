"""Migration 0009 on a database in use: sessions with files and finished tasks, their SIDs
in clear as the previous version left them, upgraded by a real ``flask silo-db upgrade``
(in the documented order: no worker running), then served by gunicorn under load.

Nothing is lost (every row, every file) and every client finds its session by the SID it
holds, while clients keep writing: concurrent requests from many threads, two processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from liveserver import APPS_DIR, Gunicorn, gunicorn, wait_for
from sqlalchemy import Engine, text
from support import as_before_hashing, row_counts

from flask_silo_sql import schema, session_key

HEADER = "X-Session-ID"
APP = "operations_app:app"
CLIENTS = 24


def flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``flask --app operations_app ARGS`` in its own process."""
    script = Path(sys.executable).with_name("flask")
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "flask"]
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(APPS_DIR.parent.parent)])}
    return subprocess.run(
        [*exe, "--app", "operations_app", "silo-db", *args],
        cwd=APPS_DIR, env=full, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def status(web: Gunicorn, sid: str) -> dict[str, object]:
    answer = requests.get(web.url("/api/status"), headers={HEADER: sid}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers[HEADER] == sid
    body: dict[str, object] = answer.json()
    return body


def test_upgrade_keeps_every_session_and_serves_every_client_under_load(
    db_url: str, migrated_engine: Engine, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(uploads),
        "SILO_MIN_FREE_BYTES": "0",
    }
    sids = [f"migrating-client-{i:04d}-0000" for i in range(CLIENTS)]
    with gunicorn(env, tmp_path, app=APP, workers=2, threads=4) as web:
        for sid in sids:
            put = requests.put(
                web.url("/api/upload/first.bin"), headers={HEADER: sid}, data=sid.encode(),
                timeout=30,
            )  # fmt: skip
            assert put.status_code == 201, put.text
            assert requests.post(
                web.url("/api/start?seconds=0.05"), headers={HEADER: sid}, timeout=30
            ).status_code == 200
        for sid in sids:

            def finished(sid: str = sid) -> bool | None:
                return True if status(web, sid)["status"] == "complete" else None

            wait_for("the task", finished)
    before = row_counts(migrated_engine)

    # The previous version's database: at 0008, SIDs in clear in rows and directory names.
    schema.downgrade(migrated_engine, "0008")
    with migrated_engine.begin() as conn:
        as_before_hashing(conn, sids, uploads)
    with migrated_engine.connect() as conn:
        clear = conn.execute(text("SELECT count(*) FROM silo_sessions WHERE sid LIKE 'migr%'"))
        assert clear.scalar_one() == CLIENTS

    done = flask(env, "upgrade")
    assert done.returncode == 0, done.stderr
    assert row_counts(migrated_engine) == before
    assert sorted(os.listdir(uploads)) == sorted(session_key(s) for s in sids)

    def client(sid: str) -> None:
        seen = status(web, sid)
        assert seen["status"] == "complete", seen
        assert seen["files"] == ["first.bin"], seen
        put = requests.put(
            web.url("/api/upload/second.bin"), headers={HEADER: sid}, data=b"after",
            timeout=30,
        )  # fmt: skip
        assert put.status_code == 201, put.text
        assert status(web, sid)["files"] == ["first.bin", "second.bin"]

    with gunicorn(env, tmp_path, app=APP, workers=2, threads=4) as web:
        with ThreadPoolExecutor(12) as pool:
            for outcome in [pool.submit(client, sid) for sid in sids]:
                outcome.result(timeout=120)
        fsck = requests.get(web.url("/ops/fsck"), timeout=60).json()
        assert fsck == {"unrecorded": [], "missing": []}
    with migrated_engine.connect() as conn:
        leftover = conn.execute(text("SELECT count(*) FROM silo_sessions WHERE sid LIKE 'migr%'"))
        assert leftover.scalar_one() == 0
    assert row_counts(migrated_engine)["silo_sessions"] == CLIENTS
