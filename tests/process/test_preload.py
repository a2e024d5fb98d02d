"""Forked processes never share a pooled connection with their parent (``gunicorn --preload``).

With ``--preload`` gunicorn imports the application, and so creates silo's
engine and checks its schema, in the master, then forks the workers. A pooled
connection inherited across that fork must not be used: two processes talking
over one PostgreSQL socket read each other's answers. Silo's own engines drop
what they inherited right after a fork.

- Unit: after ``os.fork()`` the child's engine opens its own connection (a
  different PostgreSQL backend), and the parent's pooled connection still works.
- End to end: ``gunicorn --preload -w 2 examples.data_processor:app`` on
  PostgreSQL and SQLite under concurrent clients: every answer is 200, each
  client sees its own state, both workers answer, and nothing is logged as an
  error (the master, which started a cleanup thread at import, sweeps too).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from liveserver import gunicorn
from sqlalchemy import Engine, text
from sqlalchemy.pool import QueuePool

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

ROOT = Path(__file__).resolve().parents[2]
HEADER = "X-Session-ID"
CLIENTS = 6
REQUESTS_PER_CLIENT = 40


def _connection_identity(engine: Engine) -> str:
    """Which server connection a checkout gets (a backend PID on PostgreSQL)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return str(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        return str(id(conn.connection.driver_connection))


def test_a_forked_child_never_uses_its_parents_pooled_connection(engine: Engine) -> None:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    parent_identity = _connection_identity(engine)  # now pooled, checked in
    assert pool.checkedin() == 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without any cleanup of the parent's objects
        try:
            os.close(read_end)
            fresh = engine.pool
            pooled = fresh.checkedin() if isinstance(fresh, QueuePool) else -1
            identity = _connection_identity(engine)
            os.write(write_end, f"{pooled} {identity}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    inherited, child_identity = report.split()
    assert inherited == "0"  # the child's pool started empty
    if engine.dialect.name == "postgresql":
        assert child_identity != parent_identity  # its own backend
    # The parent's connection was neither closed nor disturbed by the child.
    assert _connection_identity(engine) == parent_identity


# -- gunicorn --preload end to end ----------------------------------------------------------


@contextmanager
def preloaded_gunicorn(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``gunicorn --preload -w 2 examples.data_processor:app``; yields (base URL, log)."""
    env = {
        "SILO_DATABASE_URI": db_url,
        "UPLOAD_DIR": str(tmp_path / "uploads"),
        "SILO_CLEANUP_INTERVAL": "1",  # master and workers sweep while the test runs
        "PYTHONUNBUFFERED": "1",
    }
    with gunicorn(
        env, tmp_path, app="examples.data_processor:app", chdir=ROOT, health="/",
        workers=2, extra=("--preload",),
    ) as server:  # fmt: skip
        yield server.base, server.log


def _client(base: str, number: int, outcomes: Counter[str], workers: Counter[int]) -> None:
    """One client: uploads its own file, then polls; every answer must be its own."""
    http = requests.Session()
    name = f"client{number}.txt"
    try:
        reply = http.post(
            base + "/api/upload", files={"file": (name, f"client {number}\n".encode())}, timeout=10
        )
    except requests.RequestException as exc:  # counted, not lost with the thread
        outcomes[f"upload {type(exc).__name__}"] += 1
        return
    if reply.status_code != 200:
        outcomes[f"upload {reply.status_code}"] += 1
        return
    sid = reply.headers[HEADER]
    for _ in range(REQUESTS_PER_CLIENT):
        try:
            reply = http.get(base + "/api/status", headers={HEADER: sid}, timeout=10)
        except requests.RequestException as exc:
            outcomes[type(exc).__name__] += 1
            continue
        if reply.status_code != 200:
            outcomes[f"status {reply.status_code}"] += 1
        elif reply.headers.get(HEADER) != sid or reply.json()["filename"] != name:
            outcomes["someone else's state"] += 1
        else:
            outcomes["ok"] += 1
            workers[int(reply.json()["worker"])] += 1


@pytest.mark.slow
def test_gunicorn_preload_workers_do_not_share_connections(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    try:
        schema.upgrade(engine)  # `flask silo-db upgrade`
    finally:
        engine.dispose()
    with preloaded_gunicorn(db_url, tmp_path) as (base, log):
        outcomes: Counter[str] = Counter()
        workers: Counter[int] = Counter()
        threads = [
            threading.Thread(target=_client, args=(base, n, outcomes, workers))
            for n in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        time.sleep(1.5)  # at least one more sweep in every process
    assert outcomes == Counter(ok=CLIENTS * REQUESTS_PER_CLIENT), outcomes
    assert len(workers) == 2, workers  # both forked workers answered
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output
    assert "Error" not in output, output
