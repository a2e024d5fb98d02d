"""The apps ``benchmarks/tasks.py`` runs: one trivial durable task each.

* ``silo_app``: flask_silo_sql with ``SILO_TASK_RUNNER = "worker"``; ``POST /api/start``
  starts the registered ``trivial`` task of the client's session (it only returns);
  ``flask --app benchmarks.tasks_apps:silo_app silo-db worker`` runs it; ``POST
  /api/start-sleepy`` starts ``sleepy``, a 60 s run for the recovery measurement.
* ``proc_app``: procrastinate 3 on the same PostgreSQL, its ``trivial`` task (it only
  returns); ``procrastinate --app benchmarks.tasks_apps.proc_app worker`` runs it.

Both read the database from ``SILO_DATABASE_URI`` / ``PROCRASTINATE_DSN``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, jsonify

from flask_silo_sql import BackgroundTask, Silo


def _silo_app() -> tuple[Flask, Silo]:
    app = Flask("silo_tasks_bench")
    app.config["SILO_DATABASE_URI"] = os.environ.get("SILO_DATABASE_URI", "sqlite://")
    app.config["SILO_TASK_RUNNER"] = "worker"
    app.config["SILO_TASK_POLL_INTERVAL"] = float(os.environ.get("SILO_TASK_POLL_INTERVAL", "0.5"))
    timeout = os.environ.get("SILO_TASK_HEARTBEAT_TIMEOUT")
    if timeout:
        app.config["SILO_TASK_HEARTBEAT_TIMEOUT"] = float(timeout)
    silo = Silo(app, auto_cleanup=False)
    silo.register("job", lambda: {"task": BackgroundTask("trivial")})
    return app, silo


silo_app, silo = _silo_app()


@silo.task(name="trivial", retries=0)
def trivial(task: BackgroundTask) -> None:
    """Nothing: what a queue costs per task."""


@silo.task(name="sleepy", retries=3)
def sleepy(task: BackgroundTask, seconds: float) -> None:
    """Sleeps (a run for the recovery measurement to interrupt)."""
    time.sleep(seconds)


@silo_app.post("/api/start")
def start() -> Any:
    silo.state("job")["task"].start(trivial)
    return jsonify(ok=True)


@silo_app.post("/api/start-sleepy")
def start_sleepy() -> Any:
    silo.state("job")["task"].start(sleepy, 60.0)
    return jsonify(ok=True)


def _proc_app() -> Any:
    dsn = os.environ.get("PROCRASTINATE_DSN")
    if not dsn:
        return None
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="trivial")
    def proc_trivial() -> None:
        """Nothing: what a queue costs per task."""

    return app


proc_app = _proc_app()
