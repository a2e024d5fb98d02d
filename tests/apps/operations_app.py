"""A small API whose views are a session's operations, raced in pairs under gunicorn.

Configured from the environment: ``SILO_DATABASE_URI`` (its schema current),
``SILO_TEST_UPLOAD_DIR`` (the ``uploads`` file store) and every other
``SILO_*`` key the library reads (JSON, else text).

- ``POST /api/start``: a plain run (``?durable=1``: a registered one) that
  reports progress for ``seconds``, then writes its result into its namespace;
- ``POST /api/reset``, ``POST /api/rotate``, ``PUT /api/upload/<name>``;
- ``POST /ops/sweep``: an expiry sweep now (outside the API: it has no session);
- ``GET /ops/fsck``: bytes without a row and rows without bytes in ``uploads``;
- ``GET /api/status``: the task's state, its result, the session's files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from flask_silo_sql import BackgroundTask, Silo
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
uploads = silo.add_file_store("uploads", os.environ["SILO_TEST_UPLOAD_DIR"])


def _steps(task: BackgroundTask, state: dict[str, Any], seconds: float) -> None:
    for step in range(5):
        time.sleep(seconds / 5)
        task.update(20 * (step + 1), f"step {step + 1}/5")
    state["result"] = {"pid": os.getpid()}


@silo.task(retries=2, retry_delay=0.05)
def durable_steps(task: BackgroundTask, state: dict[str, Any], seconds: float) -> None:
    _steps(task, state, seconds)


@app.post("/api/start")
def start() -> Any:
    ns = silo.state("job")
    seconds = float(request.args.get("seconds", "0.5"))
    try:
        if request.args.get("durable"):
            ns["task"].start(durable_steps, ns, seconds)
        else:
            ns["task"].start(lambda task: _steps(task, ns, seconds))
    except RuntimeError:
        return jsonify(error="already_running"), 409
    return jsonify(task_id=ns["task"].task_id)


@app.post("/api/reset")
def reset() -> Any:
    silo.reset_current()
    return jsonify(ok=True)


@app.post("/api/rotate")
def rotate() -> Any:
    return jsonify(sid=silo.rotate())


@app.put("/api/upload/<name>")
def upload(name: str) -> Any:
    uploads.save(silo.sid, name, request.stream, content_type=request.content_type)
    return jsonify(ok=True), 201


@app.post("/ops/sweep")
def sweep() -> Any:
    result = silo.store.sweep()
    return jsonify(expired=len(result.expired), skipped=result.skipped_busy)


@app.get("/ops/fsck")
def fsck() -> Any:
    report = uploads.check(grace=0.0)
    return jsonify(unrecorded=report.unrecorded, missing=report.missing)


@app.get("/api/status")
def status() -> Response:
    ns = silo.state("job")
    task: BackgroundTask = ns["task"]
    return jsonify(
        task=task.state.to_dict(),
        status=task.state.status,
        result=ns["result"],
        files=uploads.list_files(silo.sid),
    )


@app.get("/health")
def health() -> Response:
    return jsonify(ok=True, pid=os.getpid())
