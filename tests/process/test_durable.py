"""Durable tasks with real processes: gunicorn web workers and ``flask silo-db worker``.

``tests/apps/durable_app.py`` registers ``work`` (``@silo.task``); each of its
attempts records itself in the app's own table ``app_attempts`` (task,
attempt, process, start, end, outcome), which is how these tests see that no
two attempts of one task ran at once. Processes are killed (``SIGKILL``),
stopped (``SIGSTOP``) and stopped gracefully (``SIGTERM``); every wait is a
bounded poll of the database or of the app. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import APPS_DIR, REPO_ROOT, Gunicorn, gunicorn, process_gone, wait_for
from pgserver import PgServer
from sqlalchemy import Engine, select, text

from flask_silo_sql import schema, session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import tasks, workers

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
APP = "durable_app:app"
FLASK_SILO_KEYS = {
    "running",
    "progress",
    "message",
    "logs",
    "complete",
    "error",
    "started_at",
    "finished_at",
}


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The test database at the current schema, for reading behind the app's back."""
    return migrated_engine


def app_env(url: str, tmp: Path, **settings: Any) -> dict[str, str]:
    gates = tmp / "gates"
    gates.mkdir(exist_ok=True)
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_TEST_GATE_DIR": str(gates),
        "SILO_TASK_POLL_INTERVAL": "0.2",
    }
    env.update({k: str(v) for k, v in settings.items()})
    return env


class Workers:
    """``flask silo-db worker`` processes of the durable app."""

    def __init__(self, env: dict[str, str], tmp: Path, engine: Engine) -> None:
        self.env = {**os.environ, **env}
        self.env.pop("FLASK_APP", None)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.tmp = tmp
        self.engine = engine
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, concurrency: int = 4, *extra: str) -> int:
        log = self.tmp / f"worker-{len(self.procs)}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flask",
                    "--app",
                    APP.split(":")[0],
                    "silo-db",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    *extra,
                ],
                cwd=APPS_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        self.procs[proc.pid] = proc
        wait_for(f"worker {proc.pid} to register", lambda: True if self.live(proc.pid) else None)
        return proc.pid

    def live(self, pid: int) -> bool:
        with self.engine.connect() as conn:
            return pid in set(conn.execute(select(workers.c.pid)).scalars())

    def log(self, pid: int) -> str:
        path: Path = self.procs[pid].log  # type: ignore[attr-defined]
        return path.read_text(errors="replace")

    @property
    def pids(self) -> set[int]:
        return {pid for pid, proc in self.procs.items() if proc.poll() is None}

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@contextmanager
def task_workers(env: dict[str, str], tmp: Path, engine: Engine) -> Iterator[Workers]:
    pool = Workers(env, tmp, engine)
    try:
        yield pool
    except BaseException:
        for pid in pool.procs:
            print(f"worker {pid} log:\n{pool.log(pid)}")
        raise
    finally:
        pool.stop_all()


def start(web: Gunicorn, query: str, sid: str | None = None, path: str = "/api/start") -> str:
    headers = {HEADER: sid} if sid else {}
    response = requests.post(web.url(f"{path}?{query}"), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.headers[HEADER])


def status(web: Gunicorn, sid: str) -> dict[str, Any] | None:
    try:
        response = requests.get(web.url("/api/status"), headers={HEADER: sid}, timeout=30)
    except requests.RequestException:
        return None  # a worker being replaced
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


def until(web: Gunicorn, sid: str, what: str, test: Any, timeout: float = 60.0) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = status(web, sid)
        return body if body is not None and test(body) else None

    return wait_for(what, probe, timeout=timeout, interval=0.05)


def busy_pids(engine: Engine) -> set[int]:
    """Processes that hold a running task now (from ``silo_tasks.worker``: host:pid:random)."""
    with engine.connect() as conn:
        holders = conn.execute(
            select(tasks.c.worker).where(tasks.c.status == "running", tasks.c.worker.is_not(None))
        ).scalars()
        return {int(holder.split(":")[1]) for holder in holders}


def gone(pid: int) -> bool | None:
    return True if process_gone(pid) else None


def attempt_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT task, attempt, pid, started, ended, outcome FROM app_attempts"
                    " ORDER BY task, attempt, started"
                )
            )
        )


def task_row(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(tasks)).one()


# -- chaos ----------------------------------------------------------------------------

CHAOS_TASKS = 80
CHAOS_SECONDS = 24.0
KILL_EVERY_S = 2.0


def test_chaos_every_task_completes_once_at_a_time(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Durable tasks started over HTTP, processes SIGKILLed at random every 2 s: each task
    completes, its result in its namespace, and no two attempts of one task overlapped."""
    env = app_env(
        db_url,
        tmp_path,
        SILO_TASK_HEARTBEAT_TIMEOUT=2,
        SILO_TEST_RETRIES=100,
        SILO_TASK_CONCURRENCY=8,
    )
    rng = random.Random(20261202)
    killed: dict[int, float] = {}
    with (
        gunicorn(env, tmp_path, app=APP, workers=2, threads=4) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        for _ in range(3):
            pool.start(concurrency=8)

        def start_some(count: int) -> None:
            for _ in range(count):
                sids.append(start(web, f"seconds={rng.uniform(2.0, 8.0):.2f}"))

        sids: list[str] = []
        start_some(CHAOS_TASKS // 2)
        chaos_ends = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < chaos_ends:
            time.sleep(KILL_EVERY_S)  # the pace of the chaos, not a wait for anything
            if len(sids) < CHAOS_TASKS:
                web.wait_healthy()
                start_some(min(CHAOS_TASKS // 8, CHAOS_TASKS - len(sids)))
            ours = web.worker_pids() | pool.pids
            victims = sorted(busy_pids(engine) & ours) or sorted(ours)
            victim = rng.choice(victims)  # a random process, one that runs a task if any does
            if victim in pool.procs:
                pool.kill(victim)
                killed[victim] = time.time()  # dead by now (a bound the check can rely on)
                pool.start(concurrency=8)
            else:
                os.kill(victim, signal.SIGKILL)
                wait_for(f"{victim} to die", functools.partial(gone, victim))
                killed[victim] = time.time()

        def all_done() -> bool | None:
            with engine.connect() as conn:
                statuses = list(conn.execute(select(tasks.c.status)).scalars())
            assert "failed" not in statuses
            return True if statuses.count("complete") == CHAOS_TASKS else None

        wait_for("every task to complete", all_done, timeout=240, interval=0.2)
        web.wait_healthy()
        results = [status(web, sid) for sid in sids]

    rows = attempt_rows(engine)
    by_task: dict[str, list[Any]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)
    assert len(by_task) == CHAOS_TASKS
    with engine.connect() as conn:
        final = {r.id: r for r in conn.execute(select(tasks))}
    for body in results:
        assert body is not None
        assert body["task"]["complete"] is True, body
        assert body["result"] is not None, body
    retried = 0
    for task_id, runs in by_task.items():
        numbers = [r.attempt for r in runs]
        assert numbers == sorted(set(numbers)), (task_id, numbers)  # one row per attempt
        done = [r for r in runs if r.outcome == "done"]
        assert len(done) == 1, runs
        assert done[0].attempt == final[task_id].attempt
        for earlier, later in itertools.pairwise(runs):
            end = earlier.ended if earlier.ended is not None else killed.get(earlier.pid)
            assert end is not None, f"attempt {earlier} neither ended nor was killed"
            assert end <= later.started, f"attempts overlap: {earlier} and {later}"
        retried += len(runs) > 1
    completed_by_result = {b["result"]["attempt"] for b in results if b is not None}
    assert completed_by_result  # every namespace holds its attempt's result
    print(
        f"chaos: {CHAOS_TASKS} tasks, {len(killed)} processes killed, {len(rows)} attempts,"
        f" {retried} tasks run more than once"
    )
    assert killed
    assert retried, "the chaos interrupted no task: it tested nothing"


# -- deploys ----------------------------------------------------------------------------


def test_a_deploy_hands_a_running_task_to_the_new_processes(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """SIGTERM to the gunicorn master while a durable task runs, then a fresh start: the
    task completes on the new processes, its result in the namespace."""
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=3)
    with gunicorn(env, tmp_path, app=APP, workers=2) as old:
        sid = start(old, "seconds=6")
        until(old, sid, "the task to run", lambda b: b["task"]["progress"] >= 10)
        old_pids = old.worker_pids()
        old.stop()
    with gunicorn(env, tmp_path, app=APP, workers=2) as new:
        done = until(new, sid, "the task to complete", lambda b: b["task"]["complete"], 90)
        new_pids = new.worker_pids()
    assert done["task"]["attempt"] >= 2
    assert done["result"]["pid"] in new_pids
    assert done["result"]["pid"] not in old_pids
    outcomes = [row.outcome for row in attempt_rows(engine)]
    assert outcomes.count("done") == 1


@pytest.mark.parametrize("preload", [False, True], ids=["fork-per-worker", "preload"])
def test_runs_handed_back_by_a_deploy_go_on_before_any_request(
    db_url: str, engine: Engine, tmp_path: Path, preload: bool
) -> None:
    """The new processes claim what the old ones handed back as they start, not at their
    first API request (a deploy at night gets none); under ``--preload`` each worker runs
    a claimer of its own."""
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=60)
    extra = ["--preload"] if preload else []
    with gunicorn(env, tmp_path, app=APP, workers=2, extra=extra) as old:
        sid = start(old, "seconds=0.2&gate=deploy")  # its first attempt waits for the gate
        until(old, sid, "the task to run", lambda b: b["task"]["progress"] >= 100)
        old.stop()
    assert task_row(engine).status == "queued"  # handed back (not a lapsed lease)
    (Path(env["SILO_TEST_GATE_DIR"]) / "deploy.go").touch()
    with gunicorn(env, tmp_path, app=APP, workers=2, extra=extra) as new:
        # No request to /api/ at all: /health (outside the API) is all that was asked.
        def completed() -> Any:
            row = task_row(engine)
            return row if row.status == "complete" else None

        row = wait_for("the handed-back run to complete", completed, timeout=30, interval=0.1)
        workers = new.worker_pids()
        (done,) = [a for a in attempt_rows(engine) if a.outcome == "done"]
    assert row.attempt >= 2  # (another old worker may have claimed it as the first stopped)
    assert done.pid in workers | {new.proc.pid}
    if not preload:
        assert done.pid in workers


# -- retries ------------------------------------------------------------------------------


def test_a_task_that_keeps_failing_fails_with_its_error_once_retries_are_used_up(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TEST_RETRIES=2)
    with gunicorn(env, tmp_path, app=APP, workers=1) as web:
        sid = start(web, "seconds=0.1&fail=99")
        failed = until(web, sid, "the task to fail", lambda b: b["task"]["error"] is not None)
    task = failed["task"]
    assert task["running"] is False
    assert task["complete"] is False
    assert task["error"] == "planned failure 3"
    assert task["message"] == "Failed: planned failure 3"
    assert task["attempt"] == 3
    assert failed["result"] is None
    rows = attempt_rows(engine)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "error"), (2, "error"), (3, "error")]
    row = task_row(engine)
    assert (row.status, row.attempt, row.max_attempts) == ("failed", 3, 3)


def test_a_failed_attempt_is_retried_and_shows_its_attempt_and_last_error(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TEST_RETRIES=3, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        sid = start(web, "seconds=0.1&fail=1&gate=second")
        queued = status(web, sid)
        assert queued is not None
        pool.start(concurrency=1)
        second = until(web, sid, "the second attempt", lambda b: b["task"]["attempt"] == 2)
        (Path(env["SILO_TEST_GATE_DIR"]) / "second.go").touch()
        done = until(web, sid, "the task to complete", lambda b: b["task"]["complete"])
    assert second["task"]["running"] is True
    assert second["task"]["last_error"] == "planned failure 1"
    assert second["task"]["error"] is None
    assert done["task"]["attempt"] == 2
    assert done["result"] == {"attempt": 2, "pid": done["result"]["pid"]}
    assert done["result"]["pid"] in pool.procs  # run by the worker, not by the web process


def test_a_later_attempt_resumes_from_the_last_checkpoint(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=2, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        first = pool.start(concurrency=1)
        sid = start(web, "steps=15", path="/api/start-resumable")

        def checkpointed() -> int | None:
            row = task_row(engine)
            return row.checkpoint if row.checkpoint is not None and row.checkpoint >= 3 else None

        reached = wait_for("three checkpoints", checkpointed, timeout=30)
        pool.kill(first)
        stats = flask_cli(pool, "stats", "--json")
        second = pool.start(concurrency=1)
        done = until(web, sid, "the task to complete", lambda b: b["task"]["complete"], 60)
    assert done["result"]["attempt"] == 2
    assert done["result"]["pid"] == second
    assert done["result"]["resumed_from"] >= reached
    assert done["task"]["progress"] == 100
    assert stats["tasks"] == {"running": 1}  # the killed worker's run, lease not yet lapsed


def flask_cli(pool: Workers, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP.split(":")[0], "silo-db", *args],
        cwd=APPS_DIR,
        env=pool.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_stats_show_queued_runs_and_live_workers(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        for _ in range(3):
            start(web, "seconds=0.1")
        queued = flask_cli(pool, "stats", "--json")
        pid = pool.start(concurrency=2)

        def drained() -> bool | None:
            return True if flask_cli(pool, "stats", "--json")["tasks"] == {"complete": 3} else None

        wait_for("the queue to drain", drained)
        live = flask_cli(pool, "stats", "--json")
    assert queued["tasks"] == {"queued": 3}
    assert queued["workers"] == []
    (worker,) = live["workers"]
    assert (worker["pid"], worker["kind"], worker["concurrency"]) == (pid, "worker", 2)


def test_sigterm_lets_running_attempts_finish_then_hands_the_rest_back(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=30, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        first = pool.start(2, "--grace", "3")
        short = start(web, "seconds=1.5")
        long = start(web, "seconds=20")

        def both_claimed() -> bool | None:
            with engine.connect() as conn:
                attempts = list(conn.execute(select(tasks.c.attempt)).scalars())
            return True if attempts == [1, 1] else None

        wait_for("both runs to be claimed", both_claimed)
        pool.procs[first].send_signal(signal.SIGTERM)
        pool.procs[first].wait(timeout=30)
        handed = {
            row.sid: (row.status, row.attempt)
            for row in (task_row_of(engine, sid) for sid in (short, long))
        }
        second = pool.start(1)
        done = until(web, long, "the handed-back run to complete", lambda b: b["task"]["complete"])
        finished = status(web, short)
    assert handed == {session_key(short): ("complete", 1), session_key(long): ("queued", 1)}
    assert "1 run(s) handed back" in pool.log(first)
    assert finished is not None
    assert finished["result"] == {"attempt": 1, "pid": first}  # finished within the grace
    assert done["result"] == {"attempt": 2, "pid": second}  # a hand-back is not a retry used
    assert task_row_of(engine, long).max_attempts == 5


def test_a_second_sigterm_hands_running_attempts_back_at_once(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """A worker told to stop twice (Ctrl-C pressed again) does not wait out its grace
    period: the second signal hands the running attempt back now."""
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=30, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        first = pool.start(1, "--grace", "600")
        sid = start(web, "seconds=600")
        wait_for("the claim", lambda: True if task_row_of(engine, sid).attempt == 1 else None)
        pool.procs[first].send_signal(signal.SIGTERM)
        wait_for(
            "the worker's grace period to begin",
            lambda: True if "stop again" in pool.log(first) else None,
        )
        pool.procs[first].send_signal(signal.SIGTERM)
        pool.procs[first].wait(timeout=60)  # not the 600 s of its grace
        handed = task_row_of(engine, sid)
    assert (handed.status, handed.attempt, handed.worker) == ("queued", 1, None)
    assert "1 run(s) handed back" in pool.log(first)


def task_row_of(engine: Engine, sid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.sid == session_key(sid))).one()


# -- a stalled process --------------------------------------------------------------------


def test_a_stalled_process_cannot_write_after_its_lease_was_taken(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=2, SILO_TASK_RUNNER="worker")
    with (
        gunicorn(env, tmp_path, app=APP, workers=1) as web,
        task_workers(env, tmp_path, engine) as pool,
    ):
        first = pool.start(concurrency=1)
        sid = start(web, "seconds=6")
        wait_for(
            "the first worker to claim the run",
            lambda: True if task_row(engine).attempt == 1 else None,
        )
        assert f":{first}:" in task_row(engine).worker
        second = pool.start(concurrency=1)
        os.kill(first, signal.SIGSTOP)
        try:
            wait_for(
                "the second worker to claim the lapsed run",
                lambda: True if task_row(engine).attempt == 2 else None,
                timeout=30,
            )
            assert f":{second}:" in task_row(engine).worker
        finally:
            os.kill(first, signal.SIGCONT)
        done = until(web, sid, "the task to complete", lambda b: b["task"]["complete"], 60)
        wait_for(
            "the stalled attempt to find out",
            lambda: True if "lost its lease" in pool.log(first) else None,
        )
    assert done["result"] == {"attempt": 2, "pid": second}
    rows = {(r.attempt, r.pid): r for r in attempt_rows(engine)}
    assert rows[(1, first)].outcome == "lease_lost"  # it found out, at its next write
    assert rows[(2, second)].outcome == "done"
    row = task_row(engine)
    assert (row.status, row.attempt) == ("complete", 2)


# -- closures keep flask-silo's semantics ----------------------------------------------------


def test_a_closure_whose_worker_dies_is_reported_lost_and_never_run_again(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=2)
    with gunicorn(env, tmp_path, app=APP, workers=1) as web:
        response = requests.post(web.url("/api/start-closure?seconds=60"), timeout=30)
        assert response.status_code == 200, response.text
        sid = response.headers[HEADER]
        running = until(web, sid, "the closure to run", lambda b: b["task"]["progress"] >= 10)
        assert set(running["task"]) == FLASK_SILO_KEYS
        victim = int(response.json()["pid"])
        os.kill(victim, signal.SIGKILL)
        wait_for("the worker to die", lambda: True if process_gone(victim) else None)
        web.wait_healthy()
        lost = until(web, sid, "the closure to be lost", lambda b: b["task"]["error"] is not None)
        row = task_row(engine)
        polls = 0
        while polls < 10:  # the runner of the new worker polls: it must not take it
            assert status(web, sid) is not None
            polls += 1
    assert set(lost["task"]) == FLASK_SILO_KEYS
    assert "worker lost" in lost["task"]["error"]
    assert lost["result"] is None
    assert row.target is None
    assert (row.status, row.attempt) == ("failed", 1)
    assert len(attempt_rows(engine)) == 1


# -- progress is fresh ------------------------------------------------------------------------


def test_a_coalesced_update_is_visible_within_the_flush_interval(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """update(10) then update(20) at once, then a long wait: 20 is visible soon, not at
    the next heartbeat (a quarter of the heartbeat timeout, 30 s here)."""
    flush = 0.5
    env = app_env(db_url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=120, SILO_TASK_FLUSH_INTERVAL=flush)
    with gunicorn(env, tmp_path, app=APP, workers=2) as web:
        response = requests.post(web.url("/api/start-closure?gate=fresh&seconds=0"), timeout=30)
        assert response.status_code == 200, response.text
        sid = response.headers[HEADER]
        try:
            until(web, sid, "progress 20", lambda b: b["task"]["progress"] == 20.0, flush + 2.5)
        finally:
            (Path(env["SILO_TEST_GATE_DIR"]) / "fresh.go").touch()
        until(web, sid, "the closure to complete", lambda b: b["task"]["complete"])


# -- a short outage during the final write --------------------------------------------------


OUTAGE_S = 3.0


@pytest.mark.parametrize("path", ["/api/start-closure", "/api/start"], ids=["plain", "durable"])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_task_finishing_during_a_short_outage_keeps_its_result(
    database: str, path: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if database == "postgresql":
        server: PgServer = request.getfixturevalue("private_pg")
        url = server.create_database()
    else:
        url = f"sqlite:///{tmp_path / 'silo.db'}"
    engine = make_engine(url)
    schema.upgrade(engine)
    env = app_env(url, tmp_path, SILO_TASK_HEARTBEAT_TIMEOUT=20, SILO_DB_TIMEOUT=0.5)
    gate = Path(env["SILO_TEST_GATE_DIR"]) / "outage.go"
    query = "gate=outage&seconds=0" if path.endswith("closure") else "gate=outage&seconds=0.1"
    try:
        with gunicorn(env, tmp_path, app=APP, workers=1) as web:
            sid = start(web, query, path=path)
            until(web, sid, "the task to run", lambda b: b["task"]["running"])
            with outage(database, url, request):
                gate.touch()  # the task ends now, while the database is away
                time.sleep(OUTAGE_S)  # the outage's length, not a wait for anything
            done = until(web, sid, "the task to complete", lambda b: b["task"]["complete"], 40)
            assert "could not save the end of task" not in web.log_text()
    finally:
        engine.dispose()
    assert done["result"] is not None
    assert done["task"]["error"] is None


@contextmanager
def outage(database: str, url: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """PostgreSQL stopped; SQLite locked by another writer (both answer 'unavailable')."""
    if database == "postgresql":
        server: PgServer = request.getfixturevalue("private_pg")
        server.stop_server("fast")
        try:
            yield
        finally:
            server.start_server()
        return
    path = url.split("sqlite:///", 1)[1]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()
