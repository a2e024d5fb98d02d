"""End to end: ``examples/data_processor.py`` under ``gunicorn -w 4``, driven over real HTTP.

Each test starts gunicorn with four worker processes on SQLite and on
PostgreSQL (the schema upgraded first with ``flask silo-db upgrade``) and
drives it with ``requests``: upload, process, poll progress until complete
(answered by several workers), fetch the results, reset; and a worker killed
with SIGKILL while it runs a task: the example's task is durable, so another
worker runs it again, to completion. The time from the kill to the next
attempt is printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, parent_pid
from liveserver import gunicorn as live_gunicorn
from sqlalchemy import select

from flask_silo_sql import session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import tasks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP_FILE = "examples/data_processor.py"
WORKERS = 4
HEARTBEAT_TIMEOUT = 2.0
HEADER = "X-Session-ID"
TEXT = "".join(f"line {i} alpha beta\n" for i in range(400)) + "the end\n"


def _env(db_url: str, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SILO_DATABASE_URI=db_url,
        UPLOAD_DIR=str(tmp_path / "uploads"),
        SILO_TASK_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
        SILO_TASK_FLUSH_INTERVAL="0.1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("FLASK_APP", None)
    return env


def _upgrade(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP_FILE, "silo-db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@contextmanager
def gunicorn(db_url: str, tmp_path: Path) -> Iterator[Gunicorn]:
    """``gunicorn -w 4 examples.data_processor:app`` on *db_url*, stopped in any case."""
    env = _env(db_url, tmp_path)
    _upgrade(env)
    with live_gunicorn(
        env, tmp_path, app="examples.data_processor:app", chdir=ROOT, health="/",
        workers=WORKERS, timeout=30,
    ) as server:  # fmt: skip
        yield server


@dataclass
class Client:
    """A real HTTP client that keeps its session ID, as the example's page does."""

    base: str
    sid: str | None = None
    workers: set[int] = field(default_factory=set)

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {HEADER: self.sid} if self.sid else {}
        response = requests.request(method, self.base + path, headers=headers, timeout=10, **kwargs)
        self.sid = response.headers.get(HEADER, self.sid)
        return response

    def status(self) -> dict[str, Any]:
        response = self.call("GET", "/api/status")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        self.workers.add(body["worker"])
        return body

    def upload(self, name: str, text: str) -> None:
        response = self.call("POST", "/api/upload", files={"file": (name, text.encode())})
        assert response.status_code == 200, response.text
        assert response.json() == {"filename": name, "size": len(text.encode())}


def _expected(name: str, text: str) -> dict[str, Any]:
    words = text.split()
    return {
        "filename": name,
        "bytes": len(text.encode()),
        "lines": len(text.splitlines()),
        "words": len(words),
        "characters": len(text),
    }


def test_upload_process_poll_results_reset(db_url: str, tmp_path: Path) -> None:
    with gunicorn(db_url, tmp_path) as server:
        client = Client(server.base)
        client.upload("report.txt", TEXT)
        assert client.sid is not None

        started = client.call("POST", "/api/process", params={"steps": 20, "delay": 0.1})
        assert started.status_code == 200, started.text
        task_worker = started.json()["worker"]

        progress_seen: list[float] = []
        seen_complete_by: set[int] = set()
        deadline = time.monotonic() + 30
        while True:
            body = client.status()
            assert body["error"] is None, body
            # The task's namespace changes are saved with complete(); the process that
            # started the run runs it (SILO_TASK_RUNNER "thread").
            assert body["task_worker"] in (None, task_worker), body
            progress_seen.append(body["progress"])
            if body["complete"]:
                if not seen_complete_by:
                    # What the task thread wrote before complete() is there at once.
                    first = client.call("GET", "/api/results").json()["results"]
                    assert first is not None, "complete, but the thread's results are missing"
                seen_complete_by.add(body["worker"])
                # Several workers must have answered; a few more polls if not yet.
                if len(client.workers) > 1 or time.monotonic() > deadline:
                    break
            assert time.monotonic() < deadline, f"task did not complete: {body}"
            time.sleep(0.05)

        print(
            f"\n[{server.base} {db_url.split(':')[0]}] {len(progress_seen)} polls answered by "
            f"workers {sorted(client.workers)}; task ran in worker {task_worker}; "
            f"progress seen {sorted(set(progress_seen))}"
        )
        assert len(client.workers) > 1, "every poll was answered by the same worker"
        assert any(0 < p < 100 for p in progress_seen), progress_seen
        assert progress_seen == sorted(progress_seen), "progress went backwards"
        assert body["progress"] == 100
        assert body["running"] is False
        assert body["task_worker"] == task_worker
        assert body["logs"]
        assert body["logs"][-1].startswith("step 20/20")

        results = client.call("GET", "/api/results")
        assert results.status_code == 200, results.text
        got = results.json()["results"]
        top = got.pop("top_words")
        assert got == _expected("report.txt", TEXT)
        assert [word for word, _ in top[:3]] == ["line", "alpha", "beta"]
        assert top[0][1] == 400

        # Every worker reads the same results, including those that did not run the task.
        for _ in range(2 * WORKERS):
            again = client.call("GET", "/api/results").json()["results"]
            again.pop("top_words")
            assert again == _expected("report.txt", TEXT)

        reset = client.call("POST", "/api/reset")
        assert reset.status_code == 200, reset.text
        for _ in range(2 * WORKERS):
            after = client.call("GET", "/api/results")
            assert after.status_code == 200
            assert after.json() == {"results": None, "filename": None}
            body = client.status()
            assert body["running"] is False
            assert body["complete"] is False
            assert body["error"] is None
            assert body["progress"] == 0
        assert not (tmp_path / "uploads" / client.sid / "report.txt").exists()

        assert server.proc.poll() is None


def test_killed_workers_task_is_run_again_by_a_live_worker(db_url: str, tmp_path: Path) -> None:
    """The example's task is registered (durable): SIGKILL of the worker running it, and
    another worker runs it again, to completion, with its results in the namespace."""
    with gunicorn(db_url, tmp_path) as server:
        client = Client(server.base)
        client.upload("big.txt", TEXT)
        started = client.call("POST", "/api/process", params={"steps": 40, "delay": 0.05})
        assert started.status_code == 200, started.text
        victim = started.json()["worker"]
        assert victim in server.worker_pids(), "the task's worker is not one of ours"

        deadline = time.monotonic() + 20
        while True:  # running, and progress written by its thread
            body = client.status()
            assert body["running"] is True, body
            if body["progress"] > 0 and body["task_worker"] == victim:
                break
            assert time.monotonic() < deadline, f"no progress: {body}"
            time.sleep(0.05)

        assert parent_pid(victim) == server.proc.pid  # only ever kill our own worker
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        answered_by: set[int] = set()
        recovered = None
        deadline = killed_at + 10 * HEARTBEAT_TIMEOUT + 30
        while True:
            body = client.status()
            answered_by.add(body["worker"])
            if recovered is None and body.get("attempt", 0) >= 2:
                recovered = time.monotonic() - killed_at
            if body["complete"]:
                break
            assert body["error"] is None, body
            assert time.monotonic() < deadline, f"task not recovered after its worker died: {body}"
            time.sleep(0.05)

        print(
            f"\n[{db_url.split(':')[0]}] worker {victim} killed with SIGKILL; its task ran again "
            f"after {recovered:.2f} s (heartbeat timeout {HEARTBEAT_TIMEOUT:g} s) and completed "
            f"after {time.monotonic() - killed_at:.2f} s, answered by {sorted(answered_by)}"
        )
        assert victim not in answered_by
        assert body["attempt"] >= 2
        assert body["task_worker"] != victim
        assert body["progress"] == 100
        results = client.call("GET", "/api/results")
        assert results.status_code == 200
        assert results.json()["results"]["lines"] == 401

        assert client.sid is not None
        key = session_key(client.sid)
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(tasks.c.status, tasks.c.attempt).where(tasks.c.sid == key)
                ).all()
        finally:
            engine.dispose()
        assert [(row.status, row.attempt >= 2) for row in rows] == [("complete", True)]

        # gunicorn replaced the dead worker.
        deadline = time.monotonic() + 20
        while len(server.worker_pids() - {victim}) < WORKERS:
            assert time.monotonic() < deadline, "gunicorn did not respawn the worker"
            time.sleep(0.1)
        assert server.proc.poll() is None
