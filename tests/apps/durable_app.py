"""A small API with durable (registered) and plain tasks, run by the durable task tests
under gunicorn and ``flask silo-db worker``.

Configured from the environment: every ``SILO_*`` key (read as JSON when it
parses, else as text), ``SILO_TEST_GATE_DIR`` (where a task waits for its
``<token>.go`` file) and ``SILO_TEST_RETRIES``.

Every attempt of ``work`` records itself in the app's own table
``app_attempts`` (task ID, attempt, process, start, end, outcome), written
with the app's own engine, not silo's: the side effect the tests check for
overlapping attempts.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    update,
)

from flask_silo_sql import BackgroundTask, Silo, TaskLeaseLost
from flask_silo_sql.ext import CONFIG_DEFAULTS

app = Flask(__name__)
for _key in CONFIG_DEFAULTS:
    if _key in os.environ:
        try:
            app.config[_key] = json.loads(os.environ[_key])
        except ValueError:
            app.config[_key] = os.environ[_key]

silo = Silo(app, ttl=3600, auto_cleanup=False)
silo.register("job", lambda: {"task": BackgroundTask("job"), "result": None})

metadata = MetaData()
attempts = Table(
    "app_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", Float, nullable=False),
    Column("ended", Float, nullable=True),
    Column("outcome", String(32), nullable=True),
)
_url = os.environ["SILO_DATABASE_URI"]
if _url.startswith("postgresql://"):
    _url = "postgresql+psycopg://" + _url.split("://", 1)[1]
_engine = create_engine(_url, connect_args={"timeout": 30} if _url.startswith("sqlite") else {})
try:
    metadata.create_all(_engine, checkfirst=True)
except Exception:  # another process of the app made it at the same moment
    metadata.create_all(_engine, checkfirst=True)
GATES = os.environ.get("SILO_TEST_GATE_DIR", "")


def _gate(token: str, timeout: float = 120.0) -> None:
    """Wait until the test creates ``<token>.go`` (a task paused where the test wants it)."""
    if not token:
        return
    path = os.path.join(GATES, token + ".go")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


@silo.task(retries=int(os.environ.get("SILO_TEST_RETRIES", "3")), retry_delay=0.05)
def work(
    task: BackgroundTask,
    state: dict[str, Any],
    seconds: float,
    fail_times: int = 0,
    gate: str = "",
) -> None:
    """Steps for *seconds*, failing its first *fail_times* attempts, then waits for the
    test's *gate* (if any); records each attempt."""
    with _engine.begin() as conn:
        row = conn.execute(
            insert(attempts)
            .values(task=task.task_id, attempt=task.attempt, pid=os.getpid(), started=time.time())
            .returning(attempts.c.id)
        ).scalar_one()
    outcome = "error"
    try:
        steps = max(1, int(seconds / 0.1))
        for step in range(steps):
            time.sleep(seconds / steps)
            task.update(100 * (step + 1) / steps, f"step {step + 1}/{steps}")
        if task.attempt <= fail_times:
            raise RuntimeError(f"planned failure {task.attempt}")
        _gate(gate)  # the attempt that will succeed waits here
        state["result"] = {"attempt": task.attempt, "pid": os.getpid()}
        outcome = "done"
    except TaskLeaseLost:
        outcome = "lease_lost"
        raise
    finally:
        ended = time.time()
        # The database may be away (the outage test): the record then stays open.
        with contextlib.suppress(Exception), _engine.begin() as conn:
            conn.execute(
                update(attempts).where(attempts.c.id == row).values(ended=ended, outcome=outcome)
            )


@silo.task(name="resumable", retries=5, retry_delay=0.05)
def resumable(task: BackgroundTask, state: dict[str, Any], steps: int) -> None:
    """Checkpoints after every step; a later attempt resumes where the last one got to."""
    first = task.last_checkpoint or 0
    for step in range(first, steps):
        time.sleep(0.2)
        task.update(100 * (step + 1) / steps, f"step {step + 1}/{steps}")
        task.checkpoint(step + 1)
    state["result"] = {"attempt": task.attempt, "resumed_from": first, "pid": os.getpid()}


@app.post("/api/start-resumable")
def start_resumable() -> Any:
    ns = silo.state("job")
    ns["task"].start(resumable, ns, int(request.args.get("steps", "10")))
    return jsonify(task_id=ns["task"].task_id, pid=os.getpid())


@app.post("/api/start")
def start() -> Any:
    ns = silo.state("job")
    seconds = float(request.args.get("seconds", "1"))
    fail_times = int(request.args.get("fail", "0"))
    gate = request.args.get("gate", "")
    ns["task"].start(work, ns, seconds, fail_times, gate)
    return jsonify(task_id=ns["task"].task_id, pid=os.getpid())


@app.post("/api/start-closure")
def start_closure() -> Any:
    ns = silo.state("job")
    seconds = float(request.args.get("seconds", "1"))
    gate = request.args.get("gate", "")

    def plain(task: BackgroundTask) -> None:
        with _engine.begin() as conn:
            conn.execute(
                insert(attempts).values(
                    task=task.task_id, attempt=1, pid=os.getpid(), started=time.time()
                )
            )
        task.update(10, "first")
        task.update(20, "second")  # coalesced: written within the flush interval
        _gate(gate)
        time.sleep(seconds)
        ns["result"] = {"pid": os.getpid()}
        task.complete("closure done")

    ns["task"].start(plain)
    return jsonify(task_id=ns["task"].task_id, pid=os.getpid())


@app.get("/api/status")
def status() -> Response:
    ns = silo.state("job")
    task: BackgroundTask = ns["task"]
    return jsonify(task=task.state.to_dict(), result=ns["result"], pid=os.getpid())


@app.get("/health")
def health() -> Response:
    return jsonify(ok=True, pid=os.getpid())
